"""`veq bench`: load-test running servers and report their speed and their memory truth.

One job per module, data flowing down this list:

- `load`: the load (async httpx chat clients, the seeded request mix, percentiles).
- `probe`: readiness, `/v1/models`, `/admin/stats` and its periodic sampler; `BenchError`.
- `spawn`: one `veq serve` child per setting (free port, random admin key, SIGTERM then kill).
- `session`: a run over settings: warm-up, load with a progress bar, sampling, Ctrl-C → partial.
- `report`: derived memory figures, report.json and report.md.
- `figure`: report.png (matplotlib, Agg).

It speaks HTTP only (and starts processes): nothing here imports the engine or a model.
The command line is `server.cli`'s; `bench/serve.py` reuses `load` and `spawn`.
"""

from server.loadtest.load import LoadConfig, LoadReport, RequestResult, make_messages, run_load
from server.loadtest.probe import BenchError, StatsSampler, Target, probe
from server.loadtest.spawn import (
    ServeSpec,
    SpawnedServer,
    free_port,
    spawn_process,
    spawn_server,
)

__all__ = [
    "BenchError",
    "LoadConfig",
    "LoadReport",
    "RequestResult",
    "ServeSpec",
    "SpawnedServer",
    "StatsSampler",
    "Target",
    "free_port",
    "make_messages",
    "probe",
    "run_load",
    "spawn_process",
    "spawn_server",
]
