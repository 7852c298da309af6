"""`POST /admin/requantize`, `GET /admin/jobs/{id}`, `GET /admin/stats` (admin key only).

`/admin/stats` is what `veq bench` samples: the served quantization, weight bytes with their
accounting against the packed-size formula (`server.metrics.weight_accounting`), KV-cache bytes
per token and per full-length sequence, process memory, and batching.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from server.api.deps import AdminKey, State, ready_chat
from server.engine.requant import Job, JobConflict
from server.errors import conflict, not_found
from server.metrics import kv_cache_geometry, memory_stats, weight_accounting
from server.protocol import JobProgress, JobStatus, RequantizeRequest

router = APIRouter(prefix="/admin", dependencies=[AdminKey])


def _status(job: Job) -> JobStatus:
    return JobStatus(
        id=job.id,
        state=job.state,
        request=RequantizeRequest(**job.settings),
        progress=JobProgress(layer=job.layer, layers=job.layers),
        error=job.error,
        created=int(job.created),
        started=int(job.started) if job.started else None,
        finished=int(job.finished) if job.finished else None,
    )


@router.post("/requantize", status_code=202, response_model=JobStatus)
async def requantize(body: RequantizeRequest, state: State) -> JSONResponse:
    ready_chat(state)
    assert state.requant is not None
    settings = body.model_dump(exclude_none=True)
    if settings.get("group_size") == "channel":
        settings["group_size"] = None
    try:
        job = state.requant.submit(settings)
    except JobConflict as exc:
        raise conflict(f"a requantization is already running ({exc}); wait for it") from None
    status = _status(job)
    return JSONResponse(
        status.model_dump(mode="json"),
        status_code=202,
        headers={"Location": f"/admin/jobs/{job.id}"},
    )


@router.get("/jobs/{job_id}", response_model=JobStatus)
async def job(job_id: str, state: State) -> JobStatus:
    found = state.requant.jobs.get(job_id) if state.requant else None
    if found is None:
        raise not_found(f"no requantization job {job_id!r}", code="job_not_found")
    return _status(found)


@router.get("/stats")
async def stats(state: State) -> dict:
    chat = ready_chat(state)
    engine = chat.engine
    runner = engine.runner
    info = runner.info
    recent = engine.batch_sizes[-100:]
    return {
        "model": info.name,
        "method": None if info.bits == 16 else info.method,
        "bits": info.bits,
        "group_size": info.group_size,
        "symmetric": info.symmetric,
        "label": info.label,
        "weight_bytes": info.weight_bytes,
        "checkpoint": info.checkpoint,
        "device": runner.device.type,
        "dtype": str(runner.dtype).removeprefix("torch."),
        "weights": weight_accounting(runner.model),
        "kv_cache_bytes": engine.kv_bytes(),
        "kv_cache": kv_cache_geometry(runner, state.settings.max_model_len) | engine.kv_stats(),
        "memory": memory_stats(),
        "engine": {
            "running": engine.active,
            "waiting": engine.waiting,
            "steps": engine.steps,
            "max_batch_seen": engine.max_batch_seen,
            "mean_recent_batch": sum(recent) / len(recent) if recent else 0.0,
            "decode": engine.decode_stats(),
        },
    }
