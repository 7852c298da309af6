"""A Qwen3-VL-30B-A3B-shaped model on one GPU, served at 16, 4 and 3 bits, load-tested, reported.

    bash bench/gpu_suite.sh [options]        # on the GPU host: installs carried wheels, then this
    python bench/gpu_suite.py --plan         # memory arithmetic and time plan only (no GPU needed)
    python bench/gpu_suite.py --model synthetic:tiny --device cpu --layers 2 --group-size 32 \\
        --duration 5 --no-full --no-write    # the whole flow at test size on a CPU

With the device tool (its GPU host reaches no package index): here, once, `bash
bench/gpu_suite.sh --fetch-wheels` (into the git-ignored .whl/); there, `bash
bench/gpu_suite.sh --export "$OUT"` with `.whl` carried and a timeout above the budget; back
here, `python bench/gpu_suite.py --publish <files_at>/report.md` writes the BENCHMARKS.md section.

Nothing is downloaded: the model is `synthetic:qwen3-vl-30b-a3b` (`veq.models.synthetic`: the
real config written in code, seeded random bf16 weights made directly on the GPU, the offline
processor). Random weights measure memory and speed, not quality, so the method is RTN.

Steps, each one `veq bench --spawn bits=B --model synthetic:qwen3-vl-30b-a3b?layers=L` call
(one `veq serve` process: build or quantize, load, warm up, timed load test, stop):

0. preflight: nvidia-smi (device, driver, free memory), host RAM, disk for the checkpoints, the
   imports `veq serve` needs, and a micro-benchmark of the checkpoint packing on the serving
   device at the real expert shapes, which sets L (`--layers auto`) so the run fits `--budget-s`.
1. `w16-full`: 16-bit with all 48 layers (62 GB of bf16 weights): it must fit beside the KV cache
   and activations on an 80 GB H100 and serve every request.
2. `w16`, `w4`, `w3`: 16-, 4- and 3-bit RTN at L layers (the same model, so speed and memory
   compare; with L = 48 step 1 is this step 2).
3. report: a table (req/s, output tok/s, TTFT, latency, weight bytes against the formula, peak
   GPU memory), where the time went per step (spawn and imports, model build, calibration,
   checkpoint write, checkpoint load, load test; read from the `veq serve` logs) against the
   plan, and the memory arithmetic; under `bench/reports/gpu-suite-<date>/` (report.json,
   report.md, each step's own `veq bench` report and logs) and as the `gpu-suite` section of
   BENCHMARKS.md with the device name and date.

Why L may be < 48 for the quantized steps: memory allows 48 layers (W4 is 18 GB); time may not.
Checkpoints are packed at save and unpacked and repacked into the kernel layout at load on the
serving device (`veq.checkpoint`), in torch ops over int64 copies of the codes: 384 expert
matrices per layer, 18.6 k per model. On a CPU that is tens of seconds per layer; on a GPU it
should be well under one (never measured yet). The preflight measures it on the device and picks
the depth that fits; the report states it.

A run must show: no OOM at 48 layers in 16 bits with requests in flight; peak GPU memory near
the arithmetic (weights + KV + activations); W4/W3 weight bytes equal to the packed-size formula;
every request answered with `max_tokens` tokens (the synthetic lm_head never picks EOS); the
total under the budget, or which step and phase went over.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from _report import device_name, markdown_table, today, write_section  # noqa: E402

# bench/kernels.py would shadow the `kernels` package (veq.nn imports it): drop bench/ again.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
sys.path.insert(0, str(REPO))
GiB = 2**30
MODEL = "synthetic:qwen3-vl-30b-a3b"

# -- the time model (seconds; H100 host, 16 CPU cores). Each estimate is printed beside the
# measured time in the report, so a run corrects the next one's guesses. -----------------------
T_SPAWN = 25.0  # `veq bench` + `veq serve` processes: torch/transformers imports, uvicorn, ready
T_CALIB_SET = 3.0  # encoding the calibration conversations (images through the processor)
T_STOP = 8.0  # final stats, SIGTERM, drain, exit
T_WARMUP = 10.0  # warm-up requests (plus Triton JIT on the first quantized forward, below)
T_JIT = 15.0  # first calls of the fused low-bit kernels compile
BUILD_S_PER_GPARAM = 0.25  # synthetic weights hashed on the GPU: ~8 s for 31 B parameters
CAL_S_PER_LAYER = 1.5  # RTN through the calibration pipeline, per layer (few samples, GPU)
DISK_GBPS = 1.0  # checkpoint bytes written, hashed twice (manifest, verify) and read back
PCIE_GBPS = 10.0  # host → GPU copy of the loaded checkpoint
SAFETY = 0.85  # auto depth plans for this fraction of the budget


# -- shapes and memory arithmetic ------------------------------------------------------------


@dataclass(frozen=True)
class Shapes:
    """Parameter counts of one synthetic model, from its meta-device build (nothing allocated)."""

    spec: str
    layers: int
    total: int
    vision: int
    experts: int  # fused expert parameters, all layers
    attention: int  # q/k/v/o projection parameters, all layers (quantized, with the experts)
    kv_bytes_per_token: int  # bf16 K and V of every layer
    hidden: int
    moe_intermediate: int
    num_experts: int
    head_dim: int
    heads: int
    kv_heads: int

    @property
    def quantized(self) -> int:
        return self.experts + self.attention

    def weight_bytes(self, bits: int, group: int = 128) -> int:
        """Served weight bytes: 16-bit everything, or the quantized linears in the kernel layout
        (b-bit codes, a 16-bit scale and a one-byte zero point per group) plus 16-bit rest."""
        if bits == 16:
            return 2 * self.total
        per_param = bits / 8 + 3 / group
        return int(self.quantized * per_param) + 2 * (self.total - self.quantized)

    def checkpoint_bytes(self, bits: int, group: int = 128) -> int:
        """On disk (compressed-tensors pack-quantized: zero points packed to b bits)."""
        per_param = bits / 8 + (2 + bits / 8) / group
        return int(self.quantized * per_param) + 2 * (self.total - self.quantized)

    def load_peak_bytes(self, bits: int, group: int = 128) -> int:
        """Peak memory on the serving device while `veq serve` loads a checkpoint (an upper
        bound): the packed tensors read onto the device plus the kernel-layout copy being built
        (`veq.checkpoint` frees each module's packed words once its buffers exist, and holds its
        int8 codes only while converting it)."""
        return self.checkpoint_bytes(bits, group) + self.weight_bytes(bits, group)


def with_layers(spec: str, layers: int) -> str:
    from veq.models import synthetic

    s = synthetic.parse_spec(spec)
    return synthetic.SyntheticSpec(
        s.name, dataclasses.replace(s.preset, layers=layers), s.seed
    ).canonical


def shapes(spec: str) -> Shapes:
    from veq.models import synthetic

    model = synthetic.meta_model(spec)
    counts = synthetic.parameter_counts(model)
    t = model.config.text_config
    attention = sum(
        p.numel()
        for n, p in model.named_parameters()
        if re.search(r"language_model\.layers\.\d+\.self_attn\.[qkvo]_proj\.weight$", n)
    )
    return Shapes(
        spec=spec,
        layers=t.num_hidden_layers,
        total=counts["total"],
        vision=counts["vision"],
        experts=counts["experts"],
        attention=attention,
        kv_bytes_per_token=t.num_hidden_layers * 2 * t.num_key_value_heads * t.head_dim * 2,
        hidden=t.hidden_size,
        moe_intermediate=t.moe_intermediate_size,
        num_experts=t.num_experts,
        head_dim=t.head_dim,
        heads=t.num_attention_heads,
        kv_heads=t.num_key_value_heads,
    )


# -- the packing probe -----------------------------------------------------------------------


def probe_packing(s: Shapes, bits: int, group: int, device: str, sample: int = 4) -> float:
    """Seconds per decoder layer spent packing a checkpoint (save) and unpacking and repacking
    it into the kernel layout (load) at `bits` on `device` (where `veq` does it: the serving
    device), timed on `sample` experts of the real shapes and scaled to every expert and the
    attention projections of one layer."""
    import torch

    from veq.config import QuantConfig
    from veq.format import pack_weight, unpack_weight
    from veq.nn import QuantMoEExperts
    from veq.quantizer import QuantizedWeight

    cfg = QuantConfig(bits=bits, group_size=group)
    lo, hi = -(1 << (bits - 1)), 1 << (bits - 1)
    gen = torch.Generator().manual_seed(bits)

    def weight(n: int, k: int) -> QuantizedWeight:
        codes = torch.randint(lo, hi, (n, k), generator=gen, dtype=torch.int8)
        ng = k // cfg.group_for(k)
        scale = (torch.rand(n, ng, generator=gen) + 0.01).to(torch.float16)
        zero = torch.randint(lo, hi, (n, ng), generator=gen, dtype=torch.int8)
        return QuantizedWeight(codes, scale, zero, cfg)

    h, i = s.hidden, s.moe_intermediate
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else device)
    if dev.type == "auto":
        dev = torch.device("cpu")
    gate = [weight(i, h).to(dev) for _ in range(sample)]
    up = [weight(i, h).to(dev) for _ in range(sample)]
    down = [weight(h, i).to(dev) for _ in range(sample)]

    def once() -> None:
        un = [unpack_weight(pack_weight(w), cfg) for w in gate + up + down]
        QuantMoEExperts.from_quantized(un[:sample], un[sample : 2 * sample], un[2 * sample :])
        if dev.type == "cuda":
            torch.cuda.synchronize()

    if dev.type == "cuda":
        once()  # kernel launches' first-call costs are not per layer
    t0 = time.perf_counter()
    once()
    per_expert = (time.perf_counter() - t0) / sample
    attention_per_layer = s.attention / max(s.layers, 1)
    return per_expert * (s.num_experts + attention_per_layer / (3 * h * i))


# -- the plan ---------------------------------------------------------------------------------


@dataclass
class Step:
    name: str
    bits: int
    spec: str
    layers: int
    estimate_s: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)


def estimate(step: Step, s: Shapes, pack_s: dict[int, float], opts: argparse.Namespace) -> None:
    """Fill `step.estimate_s` and its parts from the time model above."""
    parts = {
        "spawn": T_SPAWN,
        "build": 3.0 + BUILD_S_PER_GPARAM * s.total / 1e9,
        "load test": T_WARMUP + opts.duration + T_STOP,
    }
    if step.bits != 16:
        ckpt = s.checkpoint_bytes(step.bits, opts.group_size) / 1e9
        parts["calibrate"] = T_CALIB_SET + CAL_S_PER_LAYER * step.layers
        parts["pack + unpack"] = pack_s[step.bits] * step.layers
        parts["disk + checksums"] = 4 * ckpt / DISK_GBPS
        parts["to GPU"] = s.weight_bytes(step.bits, opts.group_size) / 1e9 / PCIE_GBPS
        parts["load test"] += T_JIT
    step.parts = {k: round(v, 1) for k, v in parts.items()}
    step.estimate_s = sum(parts.values())


def plan_steps(
    opts: argparse.Namespace, layers: int, shapes_at: dict[int, Shapes], pack_s: dict[int, float]
) -> list[Step]:
    full = shapes_at[max(shapes_at)]
    steps = []
    if opts.full and layers < full.layers:
        steps.append(Step("w16-full", 16, with_layers(opts.model, full.layers), full.layers))
    for bits in opts.bits:
        name = f"w{bits}"
        steps.append(Step(name, bits, with_layers(opts.model, layers), layers))
    for st in steps:
        estimate(st, shapes_at[st.layers], pack_s, opts)
    return steps


def choose_layers(
    opts: argparse.Namespace, full: Shapes, pack_s: dict[int, float], spent: float
) -> tuple[int, dict[int, Shapes]]:
    """The deepest L whose plan fits SAFETY x the budget (at least 1), and the shapes used."""
    cache: dict[int, Shapes] = {full.layers: full}

    def at(n: int) -> Shapes:
        if n not in cache:
            cache[n] = shapes(with_layers(opts.model, n))
        return cache[n]

    if opts.layers != "auto":
        n = min(int(opts.layers), full.layers)
        at(n)
        return n, cache

    def cost(n: int) -> float:
        return sum(st.estimate_s for st in plan_steps(opts, n, {**cache, n: at(n)}, pack_s))

    room = SAFETY * opts.budget_s - spent - 10.0
    top = full.layers
    if cost(top) <= room:  # all layers: no separate full-depth 16-bit step
        return top, cache
    # Below full depth the plan is linear in L (the full-depth step a constant): solve for L.
    c1, slope = cost(1), cost(2) - cost(1)
    n = max(1, min(top - 1, int(1 + (room - c1) / slope))) if slope > 0 else top - 1
    at(n)
    return n, cache


# -- GPU memory, sampled from nvidia-smi (device-wide; never initialises CUDA here) ----------


def nvidia_smi(query: str) -> list[str] | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    return [v.strip() for v in out.stdout.strip().splitlines()[0].split(",")]


class GpuSampler:
    """Polls nvidia-smi's memory.used (MiB) once a second on a thread: a timeline and a peak."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            row = nvidia_smi("memory.used")
            if row:
                self.samples.append((time.time(), int(float(row[0]))))
            self._stop.wait(self.interval)

    def start(self) -> GpuSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def peak_between(self, t0: float, t1: float) -> int | None:
        window = [m for t, m in self.samples if t0 <= t <= t1]
        return max(window) if window else None


def wait_gpu_idle(baseline_mib: int, timeout: float = 60.0) -> int | None:
    """Wait until the previous step's server has released the GPU; the memory then in use."""
    deadline = time.time() + timeout
    used = None
    while time.time() < deadline:
        row = nvidia_smi("memory.used")
        if row is None:
            return None
        used = int(float(row[0]))
        if used <= baseline_mib + 1024:
            return used
        time.sleep(1.0)
    return used


# -- running one step ------------------------------------------------------------------------


@dataclass
class StepResult:
    step: Step
    status: str  # ok, failed, timeout, skipped
    started: float = 0.0
    wall_s: float = 0.0
    rc: int | None = None
    reason: str = ""
    phases: dict[str, float] = field(default_factory=dict)
    setting: dict[str, Any] | None = None  # the step's `veq bench` report.json setting
    peak_gpu_mib: int | None = None

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["setting"] is not None:
            d["setting"] = {k: v for k, v in d["setting"].items() if k not in ("results",)}
        return d


def _descendants(pid: int) -> list[int]:
    """PIDs of every process below `pid` (the spawned `veq serve` runs in its own session)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            ppid = int(text.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _stop(proc: subprocess.Popen) -> None:
    """Ctrl-C the bench (it writes its partial report and stops its server), then make sure."""
    below = _descendants(proc.pid)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
    for pid in below:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ [\w.]+: (.*)$")
_PHASES = (
    ("build", re.compile(r"^model \S+ ready on \S+ in ([\d.]+) s")),
    ("calibrate", re.compile(r"^calibrated \d+ layers \(.*\) in ([\d.]+) s")),
    ("write checkpoint", re.compile(r"^checkpoint written to \S+ in ([\d.]+) s")),
    ("load checkpoint", re.compile(r"^checkpoint \S+ loaded on \S+ in ([\d.]+) s")),
)


def phases_from_log(log: Path, started: float, ended: float) -> dict[str, float]:
    """Where a step's time went, from its `veq serve` log (veq.api's timing lines)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return {}
    first = ready = None  # when the first timed phase began; when the server said "serving"
    phases: dict[str, float] = {}
    for line in lines:
        m = _LOG_LINE.match(line.split("\r")[-1])
        if not m:
            continue
        ts = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        msg = m.group(2)
        for name, pattern in _PHASES:
            hit = pattern.match(msg)
            if hit:
                took = float(hit.group(1))
                phases[name] = phases.get(name, 0.0) + took
                first = ts - took if first is None else min(first, ts - took)
        if msg.startswith("serving ") and ready is None:
            ready = ts
    if first is None:
        return {}
    # "start": both processes' imports, uvicorn, the calibration set; "other loading": what
    # veq.api does not time (γ, the loader around it).
    out = {"start": max(0.0, first - started), **phases}
    if ready is not None:
        out["other loading"] = max(0.0, ready - first - sum(phases.values()))
        out["warm-up + load test + stop"] = max(0.0, ended - ready)
    return {k: round(v, 1) for k, v in out.items()}


def run_step(step: Step, opts: argparse.Namespace, cache: Path, timeout: float) -> StepResult:
    out = opts.out / step.name
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "server.cli",
        "bench",
        "--spawn",
        f"bits={step.bits}",
        "--model",
        step.spec,
        "--method",
        "rtn",
        "--group-size",
        str(opts.group_size),
        "--device",
        opts.device,
        "--cache-dir",
        str(cache),
        "--out",
        str(out),
        "--concurrency",
        str(opts.concurrency),
        "--duration",
        str(opts.duration),
        "--max-tokens",
        str(opts.max_tokens),
        "--warmup",
        str(opts.warmup),
        "--ready-timeout",
        str(max(30, int(timeout))),
        "--no-progress",
    ]
    if opts.threads:
        cmd += ["--threads", str(opts.threads)]
    # RTN reads no calibration data and no γ, but the pipeline still runs the calibration set
    # through every layer and `gamma auto` would run backward passes: keep both minimal.
    env = dict(os.environ, VEQ_GAMMA="20", VEQ_SAMPLES=str(opts.calib_samples))
    env["PYTHONUNBUFFERED"] = "1"
    before = set(cache.iterdir()) if cache.exists() else set()
    result = StepResult(step, "ok", started=time.time())
    print(f"[{step.name}] {' '.join(cmd[3:])}", flush=True)
    with open(out / "bench.log", "wb") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            result.rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(proc)
            result.rc = proc.returncode
            result.status = "timeout"
            result.reason = f"stopped after {timeout:.0f} s (budget)"
        except KeyboardInterrupt:
            _stop(proc)
            raise
    ended = time.time()
    result.wall_s = round(ended - result.started, 1)
    report = out / "report.json"
    if report.is_file():
        settings = json.loads(report.read_text()).get("settings") or []
        result.setting = settings[0] if settings else None
        failed = json.loads(report.read_text()).get("failed")
        if failed and result.status == "ok":
            result.status, result.reason = "failed", str(failed)
    if result.status == "ok" and result.rc != 0:
        result.status = "failed"
        result.reason = _tail(out / "bench.log")
    logs = sorted(out.glob("serve-*.log"))
    if logs:
        result.phases = phases_from_log(logs[-1], result.started, ended)
    if not opts.keep_checkpoints and cache.exists():
        for entry in set(cache.iterdir()) - before:
            shutil.rmtree(entry, ignore_errors=True)
    return result


def _tail(path: Path) -> str:
    try:
        lines = [x.strip() for x in path.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    errors = [x for x in lines if "error" in x.lower()]
    return (errors or lines or [""])[-1][:300]


# -- preflight -------------------------------------------------------------------------------


def preflight(opts: argparse.Namespace) -> dict[str, Any]:
    """Device, memory and disk facts, and the imports `veq serve` needs; exits on a blocker."""
    facts: dict[str, Any] = {"device": opts.device}
    if opts.device == "cuda":
        row = nvidia_smi("name,driver_version,memory.total,memory.used")
        if row is None:
            sys.exit("gpu_suite: nvidia-smi found no GPU (is this the GPU host?)")
        facts |= {
            "gpu": row[0],
            "driver": row[1],
            "gpu_total_mib": int(float(row[2])),
            "gpu_used_mib": int(float(row[3])),
        }
        facts["gpu_free_bytes"] = (facts["gpu_total_mib"] - facts["gpu_used_mib"]) * 2**20
    else:
        facts["gpu"] = device_name("cpu")
    try:
        meminfo = Path("/proc/meminfo").read_text()
        avail = int(re.search(r"MemAvailable:\s+(\d+) kB", meminfo).group(1)) * 1024  # type: ignore[union-attr]
    except (OSError, AttributeError):
        avail = None
    facts["host_available_bytes"] = avail
    opts.cache_dir.mkdir(parents=True, exist_ok=True)
    facts["disk_free_bytes"] = shutil.disk_usage(opts.cache_dir).free
    facts["cpus"] = os.cpu_count()
    check = (
        "import fastapi, uvicorn, pydantic_settings, httpx, transformers;"
        "import server.app, server.loadtest, veq.models.synthetic;"
        "from veq.models.processor import build_processor; build_processor();"
        "print(transformers.__version__)"
    )
    res = subprocess.run(
        [sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["?"])[-1]
        sys.exit(
            f"gpu_suite: the server's imports fail here: {last}\n"
            "  carry the missing wheels (bash bench/gpu_suite.sh --fetch-wheels on a machine "
            "with PyPI, then name .whl in the device call's carry)"
        )
    facts["transformers"] = res.stdout.strip().splitlines()[-1]
    return facts


#: GPU memory a 16-bit step needs beyond its weights: KV cache and activations of the load,
#: logits over the 152 k vocabulary at prefill, the CUDA context and allocator slack.
GPU_HEADROOM = 8 * GiB


def check_resources(
    steps: list[Step], shapes_at: dict[int, Shapes], facts: dict[str, Any], group: int
) -> list[Step]:
    """Drop a 16-bit step the GPU cannot hold (saying so); exit when a checkpoint would not
    fit on the disk or its loading on the serving device."""
    kept = []
    for st in steps:
        s = shapes_at[st.layers]
        free = facts.get("gpu_free_bytes")
        need = s.weight_bytes(16) + GPU_HEADROOM
        if st.bits == 16 and free is not None and free < need:
            print(
                f"[{st.name}] dropped: {free / GiB:.1f} GiB GPU memory free, a 16-bit "
                f"{st.layers}-layer model needs ~{need / GiB:.1f} GiB with KV cache and activations"
            )
            continue
        if st.bits != 16:
            disk = facts.get("disk_free_bytes")
            room = free if free is not None else facts.get("host_available_bytes")
            ckpt, load = s.checkpoint_bytes(st.bits, group), s.load_peak_bytes(st.bits, group)
            if disk is not None and disk < 1.1 * ckpt:
                sys.exit(
                    f"gpu_suite: {st.name} writes a {ckpt / GiB:.1f} GiB checkpoint; only "
                    f"{disk / GiB:.1f} GiB free on the cache's disk (--cache-dir elsewhere)"
                )
            if room is not None and room < load:
                sys.exit(
                    f"gpu_suite: loading {st.name}'s checkpoint takes up to {load / GiB:.1f} GiB "
                    f"on the serving device; {room / GiB:.1f} GiB available (fewer --layers)"
                )
        kept.append(st)
    return kept


# -- the report ------------------------------------------------------------------------------


def _size(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v / GiB:.2f} GiB" if v >= GiB else f"{v / 2**20:.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def _ms(p: dict[str, Any] | None, key: str) -> str:
    v = (p or {}).get(key)
    return "–" if v is None else f"{1000 * v:.0f}"


def results_table(results: list[StepResult], shapes_at: dict[int, Shapes], group: int) -> str:
    rows = []
    for r in results:
        st = r.step
        s = r.setting or {}
        t, m = s.get("throughput") or {}, s.get("memory") or {}
        formula = shapes_at[st.layers].weight_bytes(st.bits, group)
        rows.append(
            [
                st.name,
                f"{st.bits}" + ("" if st.bits == 16 else " (rtn)"),
                str(st.layers),
                r.status + (f": {r.reason[:60]}" if r.reason else ""),
                f"{t.get('ok', '–')}/{t.get('requests', '–')}",
                f"{t['req_per_s']:.2f}" if "req_per_s" in t else "–",
                f"{t['output_tok_per_s']:.1f}" if "output_tok_per_s" in t else "–",
                f"{_ms(t.get('ttft_s'), 'p50')} / {_ms(t.get('ttft_s'), 'p95')}",
                _ms(t.get("latency_s"), "p50"),
                _size(m.get("weight_bytes")),
                _size(formula),
                _size(m.get("peak_device_allocated")),
                "–" if r.peak_gpu_mib is None else _size(r.peak_gpu_mib * 2**20),
                f"{r.wall_s:.0f} ({st.estimate_s:.0f})",
            ]
        )
    return markdown_table(
        [
            "step",
            "bits",
            "layers",
            "status",
            "ok/sent",
            "req/s",
            "output tok/s",
            "TTFT p50/p95 ms",
            "latency p50 ms",
            "weights (server)",
            "weights (formula)",
            "peak allocated",
            "peak GPU (nvidia-smi)",
            "wall s (plan)",
        ],
        rows,
    )


def time_table(results: list[StepResult], extra: dict[str, float]) -> str:
    rows = [[name, f"{v:.1f}", "", ""] for name, v in extra.items()]
    for r in results:
        measured = ", ".join(f"{k} {v:.0f}" for k, v in r.phases.items()) or "–"
        planned = ", ".join(f"{k} {v:.0f}" for k, v in r.step.parts.items())
        rows.append([r.step.name, f"{r.wall_s:.1f}", measured, planned])
    return markdown_table(["step", "wall s", "measured phases (s)", "planned phases (s)"], rows)


def memory_table(shapes_at: dict[int, Shapes], group: int) -> str:
    rows = []
    for n in sorted(shapes_at, reverse=True):
        s = shapes_at[n]
        for bits in (16, 4, 3):
            rows.append(
                [
                    str(n),
                    str(bits),
                    _count(s.total),
                    _size(s.weight_bytes(bits, group)),
                    "–" if bits == 16 else _size(s.checkpoint_bytes(bits, group)),
                    "–" if bits == 16 else _size(s.load_peak_bytes(bits, group)),
                    f"{s.kv_bytes_per_token / 1024:g}",
                ]
            )
    return markdown_table(
        [
            "layers",
            "bits",
            "params",
            "weights (served)",
            "checkpoint",
            "peak at load (device)",
            "KV KiB/token",
        ],
        rows,
    )


def render(
    opts: argparse.Namespace,
    facts: dict[str, Any],
    results: list[StepResult],
    shapes_at: dict[int, Shapes],
    timing: dict[str, float],
    total: float,
    layers: int,
    pack_s: dict[int, float],
) -> str:
    full = shapes_at[max(shapes_at)]
    over = total - opts.budget_s
    verdict = (
        f"**{total:.0f} s of a {opts.budget_s:.0f} s budget.**"
        if over <= 0
        else f"**{total:.0f} s: over the {opts.budget_s:.0f} s budget by {over:.0f} s** "
        f"(largest step: {max(results, key=lambda r: r.wall_s).step.name})."
        if results
        else f"**{total:.0f} s; no step ran.**"
    )
    gpu = facts.get("gpu", "?")
    if "gpu_total_mib" in facts:
        gpu += f" ({facts['gpu_total_mib'] / 1024:.0f} GiB, driver {facts.get('driver')})"
    pack = ", ".join(f"W{b} {v:.1f} s" for b, v in sorted(pack_s.items(), reverse=True))
    kv48 = full.kv_bytes_per_token
    return "\n".join(
        [
            f"## 30B-shaped serving on one GPU (`bench/gpu_suite.py`, {today()})",
            "",
            f"**{gpu}**, {facts.get('cpus')} CPUs, transformers {facts.get('transformers')}. "
            f"Model `{opts.model}` ({_count(full.total)} parameters at {full.layers} "
            f"layers, random bf16 weights built on the device), RTN, group size "
            f"{opts.group_size}; quantized steps at {layers} layers. Load per step: concurrency "
            f"{opts.concurrency}, {opts.duration:g} s, max_tokens {opts.max_tokens} (every answer "
            f"runs to max_tokens), image+text requests. {verdict}",
            "",
            results_table(results, shapes_at, opts.group_size),
            "",
            "Where the time went (measured phases from the `veq serve` logs; plan = the time "
            "model in `bench/gpu_suite.py`):",
            "",
            time_table(results, timing),
            "",
            f"Checkpoint packing (save) and unpacking + kernel repacking (load), "
            f"measured on the serving device per decoder layer: {pack}; the quantized steps' depth "
            f"follows from it.",
            "",
            "Memory arithmetic (served weights: b-bit codes + a 16-bit scale and a one-byte "
            f"zero point per group of {opts.group_size}; vision tower, router, embeddings and "
            f"lm_head 16-bit; KV cache bf16, {kv48 / 1024:g} KiB per token at "
            f"{full.layers} layers):",
            "",
            memory_table(shapes_at, opts.group_size),
            "",
        ]
    )


def export(opts: argparse.Namespace) -> None:
    """Four files into `opts.export` (the device tool brings back at most 8, 16 MiB each)."""
    import tarfile

    dest = opts.export
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("report.md", "report.json"):
        shutil.copy2(opts.out / name, dest / name)
    if not opts.no_write:
        shutil.copy2(REPO / "BENCHMARKS.md", dest / "BENCHMARKS.md")
    with tarfile.open(dest / "steps.tar.gz", "w:gz") as tar:
        for step in sorted(p for p in opts.out.iterdir() if p.is_dir() and p.name != "cache"):
            tar.add(step, arcname=step.name)
    print(f"exported to {dest}")


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=MODEL, help=f"a synthetic spec (default {MODEL})")
    ap.add_argument("--layers", default="auto", help="depth of the compared steps, or auto")
    ap.add_argument("--bits", default="16,4,3", help="compared settings (default 16,4,3)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="whole run (default 480)")
    ap.add_argument("--duration", type=float, default=20.0, help="load test seconds per step")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--calib-samples", type=int, default=4, help="VEQ_SAMPLES for RTN steps")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--threads", type=int, help="server CPU threads (default: torch's choice)")
    ap.add_argument(
        "--full",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also serve 16-bit at full depth (default on)",
    )
    ap.add_argument("--out", type=Path, help="default bench/reports/gpu-suite-<date>-<time>")
    ap.add_argument("--cache-dir", type=Path, help="checkpoints (default OUT/cache)")
    ap.add_argument("--keep-checkpoints", action="store_true")
    ap.add_argument("--plan", action="store_true", help="print the plan and exit")
    ap.add_argument("--no-write", action="store_true", help="leave BENCHMARKS.md alone")
    ap.add_argument(
        "--publish",
        type=Path,
        metavar="REPORT_MD",
        help="only write this report.md (e.g. brought back from the GPU host) as the gpu-suite "
        "section of BENCHMARKS.md, then exit",
    )
    ap.add_argument(
        "--export",
        type=Path,
        help="also copy report.md, report.json, BENCHMARKS.md and steps.tar.gz (every step's "
        "bench report and logs) here, e.g. the device tool's $OUT",
    )
    opts = ap.parse_args(argv)
    opts.bits = [int(b) for b in str(opts.bits).split(",") if b.strip()]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    opts.out = opts.out or REPO / "bench" / "reports" / f"gpu-suite-{stamp}"
    opts.cache_dir = opts.cache_dir or opts.out / "cache"
    return opts


def main(argv: list[str] | None = None) -> int:
    t_start = time.time()
    opts = parse_args(argv)
    if opts.publish is not None:
        write_section("gpu-suite", opts.publish.read_text())
        print(f"wrote {opts.publish} into BENCHMARKS.md (section gpu-suite)")
        return 0
    timing: dict[str, float] = {}
    if opts.threads:
        import torch

        torch.set_num_threads(opts.threads)  # the packing probe runs here, as the server would
    full = shapes(opts.model)
    facts = (
        preflight(opts)
        if not opts.plan
        else {"device": opts.device, "gpu": opts.device, "cpus": os.cpu_count()}
    )
    t0 = time.time()
    pack_s = {b: probe_packing(full, b, opts.group_size, opts.device) for b in opts.bits if b != 16}
    timing["preflight"] = round(time.time() - t_start, 1)
    layers, shapes_at = choose_layers(opts, full, pack_s, time.time() - t_start)
    steps = check_resources(
        plan_steps(opts, layers, shapes_at, pack_s), shapes_at, facts, opts.group_size
    )
    planned = sum(st.estimate_s for st in steps)
    print(f"gpu_suite: {facts.get('gpu')}; packing probe {time.time() - t0:.1f} s:", flush=True)
    for b, v in pack_s.items():
        print(f"  W{b}: {v:.1f} s of CPU per decoder layer (checkpoint save + load)")
    print(f"  depth of the compared steps: {layers} of {full.layers} layers")
    for st in steps:
        parts = ", ".join(f"{k} {v:.0f}" for k, v in st.parts.items())
        print(f"  plan {st.name:9s} {st.spec}: ~{st.estimate_s:.0f} s ({parts})")
    print(f"  planned total ~{planned + timing['preflight']:.0f} s of {opts.budget_s:.0f} s")
    print(memory_table(shapes_at, opts.group_size))
    if opts.plan:
        return 0

    opts.out.mkdir(parents=True, exist_ok=True)
    sampler = GpuSampler().start() if opts.device == "cuda" else None
    baseline = facts.get("gpu_used_mib", 0)
    results: list[StepResult] = []
    try:
        for st in steps:
            left = opts.budget_s - (time.time() - t_start) - 10.0
            if st.estimate_s > left + 30.0:
                why = f"planned {st.estimate_s:.0f} s > {max(left, 0):.0f} s left in the budget"
                print(f"[{st.name}] skipped: {why}", flush=True)
                results.append(StepResult(st, "skipped", reason=why))
                continue
            r = run_step(st, opts, opts.cache_dir, timeout=max(left, 60.0) + 30.0)
            if sampler is not None:
                r.peak_gpu_mib = sampler.peak_between(r.started, r.started + r.wall_s)
                wait_gpu_idle(baseline)
            results.append(r)
            print(
                f"[{st.name}] {r.status} in {r.wall_s:.0f} s (planned {st.estimate_s:.0f}) "
                + ", ".join(f"{k} {v:.0f}" for k, v in r.phases.items())
                + (f": {r.reason}" if r.reason else ""),
                flush=True,
            )
    finally:
        if sampler is not None:
            sampler.stop()
        if not opts.keep_checkpoints:
            shutil.rmtree(opts.cache_dir, ignore_errors=True)
    t_report = time.time()
    total = t_report - t_start
    body = render(opts, facts, results, shapes_at, timing, total, layers, pack_s)
    report = {
        "created": datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "facts": facts,
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(opts).items()},
        "layers": layers,
        "pack_s_per_layer": pack_s,
        "planned_s": round(planned + timing["preflight"], 1),
        "total_s": round(total, 1),
        "over_budget_s": round(max(0.0, total - opts.budget_s), 1),
        "steps": [r.as_dict() for r in results],
        "memory": {
            str(n): {
                "params": s.total,
                "quantized_params": s.quantized,
                "kv_bytes_per_token": s.kv_bytes_per_token,
                **{
                    f"w{b}": {
                        "weights": s.weight_bytes(b, opts.group_size),
                        "checkpoint": None if b == 16 else s.checkpoint_bytes(b, opts.group_size),
                        "peak_at_load": None if b == 16 else s.load_peak_bytes(b, opts.group_size),
                    }
                    for b in (16, 4, 3)
                },
            }
            for n, s in shapes_at.items()
        },
        "gpu_memory_mib": sampler.samples if sampler is not None else [],
    }
    (opts.out / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (opts.out / "report.md").write_text(body + "\n")
    print(body)
    if not opts.no_write:
        write_section("gpu-suite", body)
        print("wrote BENCHMARKS.md (section gpu-suite)")
    print(f"report: {opts.out / 'report.md'}")
    if opts.export is not None:
        export(opts)
    bad = [r for r in results if r.status not in ("ok", "skipped")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
