"""Continuous batching on a background thread, and the asyncio bridge to it.

The loop, at every step boundary: admit waiting requests (prefill each, sample its first token,
add it to the running batch), then advance every running batch by one token, emit text deltas,
and retire rows that finished (EOS, stop string, max_tokens) or were cancelled. A requantized
model is swapped in between steps: new requests start on it while rows already running finish
on the model they started with, whose batch then empties and is released.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from server.engine.graphs import StaticDecoder
from server.engine.kv import FusedStep, KVPool
from server.engine.runner import ChunkedPrefill, ModelRunner
from server.engine.sampling import sample, suppress_eos
from server.engine.types import FinishReason, GenerationEvent, GenerationRequest

log = logging.getLogger(__name__)


class EngineOverloaded(Exception):
    """The queue is full; retry later."""


class EngineStopped(Exception):
    """The engine is draining or stopped and takes no new requests."""


class NonFiniteLogits(Exception):
    """A row's logits hold NaN or inf: it cannot be sampled."""


@dataclass
class EngineObserver:
    """Callbacks for metrics; each defaults to doing nothing."""

    on_first_token: Callable[[float], None] = lambda ttft: None
    on_token: Callable[[float], None] = lambda itl: None
    on_finish: Callable[[str, int, int], None] = lambda reason, prompt, completion: None
    on_step: Callable[[int], None] = lambda batch_size: None


@dataclass(eq=False)  # identity: the engine finds sequences in lists
class _Seq:
    req: GenerationRequest
    runner: ModelRunner
    position: int
    generator: torch.Generator | None
    slot: int = -1
    """Its KV-cache slot (`KVPool`), owned until the sequence ends."""
    tokens: list[int] = field(default_factory=list)
    emitted: int = 0
    last_token_at: float = 0.0
    text: str = ""
    """The decoded text of `tokens[:read]`."""
    prefix: int = 0
    read: int = 0

    def _detokenize(self, final: bool = False) -> str:
        """The text of `tokens`, decoding only a short window (vLLM's incremental
        detokenisation): `tokens[prefix:read]` are decoded again as context, because a BPE
        token's text can depend on its neighbours; an incomplete UTF-8 character waits for the
        rest of its bytes unless `final`."""
        if self.read == len(self.tokens):
            return self.text
        decode = self.runner.processor.tokenizer.decode
        before = decode(self.tokens[self.prefix : self.read], skip_special_tokens=True)
        after = decode(self.tokens[self.prefix :], skip_special_tokens=True)
        if final:
            return self.text + after[len(before) :]
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.tokens)
        return self.text

    def advance(self, token: int) -> tuple[str, FinishReason | None]:
        """Take one sampled token: the new text to emit and, when done, why."""
        p = self.req.params
        finish: FinishReason | None = None
        if token in self.runner.eos_ids and not p.ignore_eos:
            finish = "stop"
        else:
            self.tokens.append(token)
        if finish is None and len(self.tokens) >= p.max_tokens:
            finish = "length"
        text = self._detokenize(final=finish is not None)
        for stop in p.stop:
            at = text.find(stop, max(0, self.emitted - len(stop)))
            if at >= 0:
                text, finish = text[:at], "stop"
                break
        if finish is not None:
            delta, self.emitted = text[self.emitted :], len(text)
            return delta, finish
        # Hold back what may still become a stop string or an incomplete UTF-8 character.
        safe = len(text) - max((len(s) - 1 for s in p.stop), default=0)
        while safe > self.emitted and text[safe - 1] == "\ufffd":
            safe -= 1
        delta = text[self.emitted : max(safe, self.emitted)]
        self.emitted += len(delta)
        return delta, None


@dataclass(eq=False)  # identity: `x in self._chunking` must not compare tensors
class _Chunked:
    """A request whose prompt is being prefilled in chunks into `slot`."""

    req: GenerationRequest
    runner: ModelRunner
    slot: int
    job: ChunkedPrefill | None = None
    """None until its turn: started one at a time, so arrivals do not pile up in one step."""


@dataclass(eq=False)
class _Batch:
    runner: ModelRunner
    seqs: list[_Seq] = field(default_factory=list)


class Engine:
    """Owns the model runner(s) and the scheduling thread."""

    def __init__(
        self,
        runner: ModelRunner,
        *,
        max_batch: int = 16,
        max_queue: int = 64,
        max_prefill_tokens: int = 8192,
        max_model_len: int = 4096,
        kv_slots: int | None = None,
        max_step_tokens: int | None = None,
        fixed_shapes: bool = False,
        cuda_graphs: bool = False,
        observer: EngineObserver | None = None,
    ) -> None:
        """`kv_slots` sequences of `max_model_len` tokens get a KV slot each, preallocated now
        (default: `max_batch`); requests beyond the free slots wait in the queue. With
        `max_step_tokens`, a prompt longer than that is prefilled in chunks between decode
        steps, each step's decode rows and prefill positions together within it; without, every
        prompt is prefilled whole at admission. `fixed_shapes` decodes through
        `server.engine.graphs.StaticDecoder` (batches padded to buckets, inputs on the device);
        `cuda_graphs` also captures those steps and replays them (CUDA only)."""
        if cuda_graphs and runner.device.type != "cuda":
            raise ValueError("--cuda-graphs needs a CUDA device; the model is on the CPU")
        self._runner = runner
        self.fixed_shapes = fixed_shapes or cuda_graphs
        self.cuda_graphs = cuda_graphs
        self._decoders: dict[ModelRunner, StaticDecoder] = {}
        self.kv = KVPool(
            runner.kv_geometry(),
            kv_slots or max_batch,
            max_model_len,
            runner.device,
            padding_slot=self.fixed_shapes,
        )
        self.max_prefill_tokens = max_prefill_tokens
        # OpenMP thread counts are per OS thread: carry the creator's setting into ours.
        self._threads = torch.get_num_threads()
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.observer = observer or EngineObserver()
        self.max_step_tokens = max_step_tokens
        self._waiting: deque[GenerationRequest] = deque()
        self._batches: list[_Batch] = []
        self._chunking: list[_Chunked] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._accepting = True
        self.steps = 0
        self.max_batch_seen = 0
        self.batch_sizes: list[int] = []

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="veq-engine", daemon=True)
            self._thread.start()

    def drain(self, timeout: float) -> bool:
        """Stop taking requests and wait up to `timeout` s for running ones; True if all done."""
        with self._cond:
            self._accepting = False
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.active == 0 and self.waiting == 0:
                return True
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._thread is not None and self._thread.is_alive():
            log.warning("the engine thread did not stop in 10 s; ending its requests anyway")
        else:
            self._thread = None
        running = [s.req for b in self._batches for s in b.seqs]
        for req in [*self._waiting, *(c.req for c in self._chunking), *running]:
            self._emit(req, GenerationEvent(finish_reason="cancelled"))
        self._waiting.clear()

    # -- state ----------------------------------------------------------------------------

    @property
    def runner(self) -> ModelRunner:
        return self._runner

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        """Requests holding a KV slot: decoding, or being prefilled in chunks."""
        return sum(len(b.seqs) for b in self._batches) + len(self._chunking)

    @property
    def accepting(self) -> bool:
        return self._accepting and not self._stopping

    def swap(self, runner: ModelRunner) -> ModelRunner:
        """Serve new requests with `runner` from the next step on; returns the old runner.
        Its cache must have the same shape per token: it shares the preallocated slots."""
        if runner.kv_geometry() != self.kv.geometry:
            raise ValueError(
                f"the new model's KV cache ({runner.kv_geometry()}) does not fit the slots "
                f"allocated for the current one ({self.kv.geometry})"
            )
        with self._cond:
            old, self._runner = self._runner, runner
            self._cond.notify_all()
        return old

    def kv_bytes(self) -> int:
        """Bytes reserved for the KV cache (every slot, used or not)."""
        return self.kv.nbytes()

    def decode_stats(self) -> dict[str, object]:
        """How decode steps run: fixed shapes or not, and the current model's CUDA graphs."""
        out: dict[str, object] = {"fixed_shapes": self.fixed_shapes}
        decoder = self._decoders.get(self._runner)
        if self.cuda_graphs:
            out["cuda_graphs"] = decoder.stats() if decoder is not None else {"captured": []}
        return out

    def kv_stats(self) -> dict[str, int]:
        """KV capacity and use, for `/admin/stats` and `/metrics`."""
        kv = self.kv
        return {
            "reserved_bytes": kv.nbytes(),
            "slots": kv.slots,
            "free_slots": kv.free_slots,
            "slot_tokens": kv.max_len,
            "capacity_tokens": kv.capacity_tokens,
            "used_tokens": kv.used_tokens(),
        }

    # -- the asyncio side -----------------------------------------------------------------

    def submit(self, req: GenerationRequest) -> asyncio.Queue[GenerationEvent]:
        """Queue `req` (call from the event loop); raises EngineOverloaded / EngineStopped."""
        if not self.accepting:
            raise EngineStopped("the server is shutting down")
        with self._cond:
            if len(self._waiting) + self.active >= self.max_queue:
                raise EngineOverloaded(f"{self.max_queue} requests are already queued or running")
            req._loop = asyncio.get_running_loop()
            req._queue = asyncio.Queue()
            self._waiting.append(req)
            self._cond.notify_all()
        return req._queue

    async def generate(self, req: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Events of `req` until its final one; closing the iterator early cancels it."""
        queue = self.submit(req)
        try:
            while True:
                event = await queue.get()
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            req.cancel()

    def _emit(self, req: GenerationRequest, event: GenerationEvent) -> None:
        if req.finished:
            return
        if event.finish_reason is not None:
            req.finished = True
        if req._loop is not None and req._queue is not None:
            try:
                req._loop.call_soon_threadsafe(req._queue.put_nowait, event)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

    # -- the engine thread ----------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_num_threads(self._threads)
        while True:
            with self._cond:
                while (
                    not self._stopping
                    and not self._waiting
                    and not self._batches
                    and not self._chunking
                ):
                    self._cond.wait()
                if self._stopping:
                    return
                admit = []
                # A request is admitted when it can have a KV slot as well as a batch row.
                room = min(self.max_batch - self.active, self.kv.free_slots)
                while self._waiting and len(admit) < max(room, 0):
                    admit.append(self._waiting.popleft())
                runner = self._runner
            # A failure ends the requests it touches, never the loop: an admission's requests,
            # or one batch's rows; everything else keeps running.
            if admit:
                try:
                    self._admit(admit, runner)
                except Exception as exc:
                    self._fail(admit, exc, "admission")
            try:
                self._decode_and_prefill()
            except Exception:  # a bug of ours must not stop the thread every request waits on
                log.exception("engine step failed")
                self._fail_everything("the engine step failed on the server")

    def _decode_and_prefill(self) -> None:
        """One step after admission: every batch decodes a token, the oldest chunked prompt's
        next positions riding in the same forward as its runner's batch where possible
        (`_fusable`), then chunked prompts get what is left of the step's token budget."""
        decoded = sum(len(b.seqs) for b in self._batches)
        fuse = self._fusable(decoded)
        ran = 0
        for batch in list(self._batches):
            chunk = fuse if fuse is not None and fuse[0].runner is batch.runner else None
            fuse = None if chunk is not None else fuse
            try:
                ran += self._step(batch, chunk)
            except Exception as exc:
                self._fail([s.req for s in batch.seqs], exc, "decode step")
                self._keep(batch, [])
                if batch in self._batches:
                    self._batches.remove(batch)
                if chunk is not None and chunk[0] in self._chunking:
                    self._chunking.remove(chunk[0])
                    self.kv.release(chunk[0].slot)
                    self._fail([chunk[0].req], exc, "prefill")
        left = (self.max_step_tokens or 0) - decoded - ran
        if self._chunking and (left > 0 or ran == 0):
            # The step's token budget: what decoding left of it goes to long prompts.
            assert self.max_step_tokens is not None
            self._advance_chunks(max(left, 1))

    def _fusable(self, decode_rows: int) -> tuple[_Chunked, int] | None:
        """The oldest chunked prompt and how many of its positions join its runner's decode
        forward this step (what the token budget leaves after the decode rows), its vision
        tower and embeddings run first if it had not started; None when nothing fuses (fixed
        shapes, no batch of its runner, no budget left, or a prompt that ended)."""
        if self.fixed_shapes or not self._chunking or self.max_step_tokens is None:
            return None
        c = self._chunking[0]
        budget = self.max_step_tokens - decode_rows
        if c.req.finished or c.req.cancelled or budget < 1:
            return None  # `_advance_chunks` retires ended prompts
        if not any(b.runner is c.runner and b.seqs for b in self._batches):
            return None
        if c.job is None:
            try:
                c.job = c.runner.start_prefill(c.req.inputs)
            except Exception as exc:
                self._chunking.pop(0)
                self.kv.release(c.slot)
                self._fail([c.req], exc, "prefill")
                return None
        return c, min(c.job.remaining, budget)

    def _fail_everything(self, message: str) -> None:
        """End every running and chunking request with an error and free their slots; waiting
        requests stay queued for the next step."""
        reqs = [s.req for b in self._batches for s in b.seqs] + [c.req for c in self._chunking]
        for batch in self._batches:
            self._keep(batch, [])
        for c in self._chunking:
            self.kv.release(c.slot)
        self._batches, self._chunking = [], []
        self._fail(reqs, RuntimeError(message), "engine step")

    def _batch_for(self, runner: ModelRunner) -> _Batch:
        for batch in self._batches:
            if batch.runner is runner:
                return batch
        batch = _Batch(runner)
        self._batches.append(batch)
        return batch

    def _admit(self, reqs: list[GenerationRequest], runner: ModelRunner) -> None:
        """Prefill newcomers together (bounded by `max_prefill_tokens`), sample their first
        tokens, and add the unfinished ones to the runner's batch. Prompts longer than the step
        budget start a chunked prefill instead (`_advance_chunks`)."""
        live = []
        for req in reqs:
            if req.cancelled:
                self._emit(req, GenerationEvent(finish_reason="cancelled"))
            elif self._chunks(req, runner):
                self._start_chunked(req, runner)
            else:
                live.append(req)
        groups: list[list[GenerationRequest]] = []
        budget = 0
        for req in live:
            if not groups or budget + req.prompt_tokens > self.max_prefill_tokens:
                groups.append([])
                budget = 0
            groups[-1].append(req)
            budget += req.prompt_tokens
        for group in groups:
            try:
                prefills = runner.prefill([r.inputs for r in group])
            except Exception as exc:
                self._fail(group, exc, "prefill")
                continue
            for req, pre in zip(group, prefills, strict=True):
                slot = self.kv.allocate()
                assert slot is not None  # admission left a slot for every request
                try:
                    self.kv.write(slot, pre.keys, pre.values)
                except Exception as exc:
                    self.kv.release(slot)
                    self._fail([req], exc, "prefill")
                    continue
                self._first_token(req, runner, slot, pre.logits, pre.next_position)

    def _first_token(
        self, req: GenerationRequest, runner: ModelRunner, slot: int, logits: Tensor, position: int
    ) -> None:
        """Sample a prefilled request's first token from `logits [V]`; the sequence joins its
        runner's batch with `slot` (its prompt's cache) unless it is finished. The slot is
        released on every other path, a failure here ending this request only."""
        try:
            if not bool(torch.isfinite(logits).all()):
                raise NonFiniteLogits()
            gen = (
                torch.Generator().manual_seed(req.params.seed)
                if req.params.seed is not None
                else None
            )
            seq = _Seq(req, runner, position, gen, slot)
            masked = suppress_eos(logits.unsqueeze(0), [req.params], [0], runner.eos_ids)
            token = sample(masked, [req.params], [gen])[0]
            now = time.monotonic()
            self.observer.on_first_token(now - req.created)
            seq.last_token_at = now
            joins = self._deliver(seq, token)
        except Exception as exc:
            self.kv.release(slot)
            self._fail([req], exc, "prefill")
            return
        if joins:
            batch = self._batch_for(runner)
            # In slot order: a batch whose slots are one range decodes from one view.
            bisect.insort(batch.seqs, seq, key=lambda s: s.slot)
        else:
            self.kv.release(slot)

    # -- chunked prefill ------------------------------------------------------------------

    def _chunks(self, req: GenerationRequest, runner: ModelRunner) -> bool:
        return (
            self.max_step_tokens is not None
            and runner.chunked_prefill
            and req.prompt_tokens > self.max_step_tokens
        )

    def _start_chunked(self, req: GenerationRequest, runner: ModelRunner) -> None:
        """Take a slot; the prompt waits its turn (`_advance_chunks` starts it)."""
        slot = self.kv.allocate()
        assert slot is not None  # admission left a slot for every request
        self._chunking.append(_Chunked(req, runner, slot))

    def _advance_chunks(self, budget: int) -> None:
        """Prefill up to `budget` positions of the waiting chunked prompts, oldest first; a
        prompt that completes samples its first token and joins its batch."""
        while self._chunking and budget > 0:
            c = self._chunking[0]
            if c.req.finished:  # ended by a failure elsewhere in its admission
                self._chunking.pop(0)
                self.kv.release(c.slot)
                continue
            if c.req.cancelled:
                self._chunking.pop(0)
                self.kv.release(c.slot)
                self._emit(c.req, GenerationEvent(finish_reason="cancelled"))
                continue
            try:
                if c.job is None:  # everything before the decoder (vision tower, embeddings)
                    c.job = c.runner.start_prefill(c.req.inputs)
                n = min(c.job.remaining, budget)
                logits = c.runner.prefill_chunk(c.job, self.kv.chunk(c.slot, n))
            except Exception as exc:
                self._chunking.pop(0)
                self.kv.release(c.slot)
                self._fail([c.req], exc, "prefill")
                continue
            budget -= n
            if logits is not None:
                self._chunking.pop(0)
                self._first_token(c.req, c.runner, c.slot, logits, c.job.next_position)

    def _deliver(self, seq: _Seq, token: int) -> bool:
        """Emit the token's text; False when the sequence is finished."""
        delta, finish = seq.advance(token)
        event = GenerationEvent(
            text=delta,
            token_ids=[token],
            finish_reason=finish,
            prompt_tokens=seq.req.prompt_tokens,
            completion_tokens=len(seq.tokens),
        )
        self._emit(seq.req, event)
        if finish is not None:
            self.observer.on_finish(finish, seq.req.prompt_tokens, len(seq.tokens))
        return finish is None

    def _step(self, batch: _Batch, chunk: tuple[_Chunked, int] | None = None) -> int:
        """Advance `batch` by one token; with `chunk` (a chunked prompt and a position count),
        its next positions run in the same forward. Returns the chunk positions run (0 when
        the batch had no live row left, and the chunk waits for `_advance_chunks`)."""
        # Rows already ended (an admission that failed after they joined) leave like cancelled
        # ones, without a second final event.
        live = [i for i, s in enumerate(batch.seqs) if not s.req.cancelled and not s.req.finished]
        for s in batch.seqs:
            if s.req.cancelled and not s.req.finished:
                self._emit(s.req, GenerationEvent(finish_reason="cancelled"))
                self.observer.on_finish("cancelled", s.req.prompt_tokens, len(s.tokens))
        if len(live) != len(batch.seqs):
            self._keep(batch, live)
        if not batch.seqs:
            self._batches.remove(batch)
            return 0
        b = len(batch.seqs)
        self.steps += 1
        self.max_batch_seen = max(self.max_batch_seen, b)
        self.batch_sizes.append(b)
        del self.batch_sizes[:-1000]
        self.observer.on_step(b)
        last = [s.tokens[-1] for s in batch.seqs]
        slots = [s.slot for s in batch.seqs]
        first: Tensor | None = None
        if self.fixed_shapes:
            positions = [s.position for s in batch.seqs]
            logits = self._decoder_for(batch.runner).step(last, positions, slots)
        elif chunk is not None:
            c, n = chunk
            assert c.job is not None  # started by `_fusable`
            kv = FusedStep(self.kv.batch(slots), self.kv.chunk(c.slot, n))
            positions_t = torch.tensor([s.position for s in batch.seqs])
            done = c.job.done
            logits, first = batch.runner.decode_and_chunk(last, positions_t, c.job, kv)
            if not bool(torch.isfinite(logits).all()):
                # In one sequence a NaN anywhere reaches every row (attention's 0 · NaN): undo
                # and run apart, where a non-finite row ends alone and the chunk waits.
                kv.rollback()
                c.job.done = done
                logits = batch.runner.decode(last, positions_t, self.kv.batch(slots))
                first, chunk = None, None
        else:
            positions_t = torch.tensor([s.position for s in batch.seqs])
            logits = batch.runner.decode(last, positions_t, self.kv.batch(slots))
        try:
            self._take(batch, logits)
        finally:
            # After the rows (a finished prompt joins this very batch).
            if chunk is not None and first is not None:
                c = chunk[0]
                assert c.job is not None
                self._chunking.remove(c)
                self._first_token(c.req, c.runner, c.slot, first, c.job.next_position)
        return chunk[1] if chunk is not None else 0

    def _take(self, batch: _Batch, logits: Tensor) -> None:
        """Sample the batch's next tokens from `logits [B, V]`, deliver them, retire rows that
        finished or whose logits are not finite."""
        b = len(batch.seqs)
        finite = torch.isfinite(logits).all(-1).tolist()
        if not all(finite):
            # A row whose logits are not finite ends alone; the rest sample as usual.
            good = [i for i, ok in enumerate(finite) if ok]
            bad = [s.req for s, ok in zip(batch.seqs, finite, strict=True) if not ok]
            self._fail(bad, NonFiniteLogits(), "decode")
            logits = logits[good]
            self._keep(batch, good)
            if not batch.seqs:
                self._batches.remove(batch)
                return
            b = len(batch.seqs)
        params = [s.req.params for s in batch.seqs]
        logits = suppress_eos(
            logits, params, [len(s.tokens) for s in batch.seqs], batch.runner.eos_ids
        )
        tokens = sample(logits, params, [s.generator for s in batch.seqs])
        now = time.monotonic()
        keep = []
        for i, (seq, token) in enumerate(zip(batch.seqs, tokens, strict=True)):
            seq.position += 1
            self.observer.on_token(now - seq.last_token_at)
            seq.last_token_at = now
            if self._deliver(seq, token):
                keep.append(i)
        if len(keep) != b:
            self._keep(batch, keep)
        if not batch.seqs:
            self._batches.remove(batch)

    def _decoder_for(self, runner: ModelRunner) -> StaticDecoder:
        """`runner`'s fixed-shape decoder (its graphs are kept while it serves or has rows);
        a swapped-out runner's goes once its last batch is gone."""
        for old in list(self._decoders):
            if old is not runner and old is not self._runner:
                if not any(b.runner is old for b in self._batches):
                    del self._decoders[old]
        decoder = self._decoders.get(runner)
        if decoder is None:
            decoder = StaticDecoder(runner, self.kv, self.max_batch, capture=self.cuda_graphs)
            self._decoders[runner] = decoder
        return decoder

    def _keep(self, batch: _Batch, rows: list[int]) -> None:
        """Keep only `rows` of `batch`; the others' slots go back to the pool."""
        kept = set(rows)
        for i, seq in enumerate(batch.seqs):
            if i not in kept:
                self.kv.release(seq.slot)
        batch.seqs = [batch.seqs[i] for i in rows]

    def _fail(self, reqs: list[GenerationRequest], exc: Exception, where: str) -> None:
        """End `reqs` (those not already finished) with an error event for `exc`."""
        if isinstance(exc, torch.OutOfMemoryError):
            message, status = f"the device ran out of memory during {where}; retry", 503
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        elif isinstance(exc, NonFiniteLogits):
            message, status = f"the model produced non-finite logits during {where}", 500
        else:
            message, status = f"{where} failed on the server ({type(exc).__name__})", 500
        if not isinstance(exc, NonFiniteLogits):
            log.error("%s failed for %d request(s)", where, len(reqs), exc_info=exc)
        for req in reqs:
            if not req.finished:
                self.observer.on_finish("error", req.prompt_tokens, 0)
            self._emit(
                req, GenerationEvent(finish_reason="error", error=message, error_status=status)
            )
