"""Continuous batching: requests join and leave a running batch between forward passes.

Each `step` runs the new tokens of every running sequence through the model at
once: one token for each sequence that is decoding, a chunk of the prompt for each
that is still prefilling (vLLM's chunked prefill, within a token budget per step).
The projections see all of them as one matrix, so the weights are read once for
the whole batch; attention runs per sequence over its own blocks of the paged
pool (runtime.paged_cache).

A sequence's life: waiting -> running (prefix blocks reused, then prefill,
decode) -> finished, its blocks back in the pool. What a row of logits yields for a
sequence (the draw, stop ids, length) is runtime.generate.Generation, the same
state `decode_tokens` runs a single sequence with: one decode loop, fed one
sequence at a time there and a batch at a time here. When the pool runs dry, the
newest running sequence is preempted: its blocks are freed and it waits again,
to be recomputed from its prompt and the tokens it had generated (its sampler
and its random state carry on, so its text is the same as if it had not been).

The engine is driven by one thread (`run` / `start`); `submit` and `cancel` may
come from any thread. Token events go to each request's `emit` callback, on
the engine's thread.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from loaders.errors import ModelError
from runtime.generate import Generation, NonFiniteLogits
from runtime.model import DRY_BREAKERS
from runtime.paged_cache import DEFAULT_BLOCK_SIZE, BlockPool, PagedSequence, PoolSpec, SequenceBatch
from runtime.sampling import Sampler, SamplingParams

DEFAULT_STEP_TOKENS = 256  # prompt chunk budget of one step; decode tokens come first


class QueueFull(ModelError):
    """The engine already has as many waiting requests as it takes."""


@dataclass
class Request:
    ids: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: frozenset[int] = frozenset()
    logprobs: int | None = None   # also the top-N alternatives per token when > 0


@dataclass
class Event:
    """One generated token, or (token None) the end of the request."""

    token: int | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # stop, length, cancelled, error
    error: str | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0


class Handle:
    """What `submit` returns: usage counts so far, and a way to cancel."""

    def __init__(self, engine: "Engine", request: Request) -> None:
        self.engine = engine
        self.request = request
        self.usage = Usage(prompt_tokens=len(request.ids))
        self.cancelled = False

    def cancel(self) -> None:
        """Stop generating; the blocks are freed at the next step."""
        self.cancelled = True
        self.engine.wake()


class _Seq:
    def __init__(self, handle: Handle, emit: Callable[[Event], None], pool: BlockPool,
                 windows: list[int | None], capacity: int, xp: Any, breakers: frozenset[int]) -> None:
        self.handle = handle
        self.request = r = handle.request
        self.emit = emit
        self.paged = PagedSequence(pool, windows, capacity)
        self.gen = Generation(r.ids, Sampler(xp, r.params, breakers), r.max_tokens, r.stop_ids, capacity,
                              r.logprobs)
        self.prefixed = False  # cached prefix blocks looked up (once per admission)

    @property
    def pending(self) -> list[int]:
        return self.gen.pending


class Engine:
    """The batch scheduler over one model and one block pool."""

    def __init__(self, model: Any, *, max_batch: int = 8, context: int | None = None,
                 num_blocks: int | None = None, block_size: int = DEFAULT_BLOCK_SIZE,
                 step_tokens: int = DEFAULT_STEP_TOKENS, max_waiting: int = 256,
                 prefix_caching: bool = True) -> None:
        if max_batch < 1 or step_tokens < 1 or block_size < 1:
            raise ModelError("max_batch, step_tokens and block_size must be positive")
        self.model = model
        self.net = model.net
        self.backend = model.backend
        spec = model.cache_spec
        self.context = context or spec.capacity
        for limit in (getattr(model.config, "position_limit", None), getattr(self.net, "batch_context_limit", None)):
            if limit is not None:
                self.context = min(self.context, limit)
        self.windows = model.config.layer_windows()
        per_seq = -(-self.context // block_size)
        # by default the pool holds max_batch sequences of 1,024 tokens, or one full context
        # if that is more (8 x 1,024 float32 tokens of the default model: 377 MB); more
        # concurrent tokens than that wait or are preempted, as in vLLM
        self.num_blocks = num_blocks or max(per_seq, max_batch * -(-1024 // block_size))
        if self.num_blocks < per_seq:
            raise ModelError(f"a pool of {self.num_blocks} blocks of {block_size} cannot hold one sequence "
                             f"of {self.context} tokens ({per_seq} blocks)")
        self.pool = BlockPool(self.backend, PoolSpec(spec.num_layers, self.net.config.num_key_value_heads,
                                                     self.net.config.head_dim, self.num_blocks, block_size,
                                                     spec.kv_dtype))
        self.max_batch = max_batch
        # a chunk may not exceed the shortest window: its own keys are only causally masked
        windows = [w for w in self.windows if w is not None]
        self.step_tokens = min([step_tokens] + windows)
        self.max_waiting = max_waiting
        self.prefix_caching = prefix_caching
        self.waiting: deque[_Seq] = deque()
        self.running: list[_Seq] = []
        self.steps = 0
        self.preemptions = 0
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- from any thread -----------------------------------------------------------
    def submit(self, request: Request, emit: Callable[[Event], None]) -> Handle:
        n = len(request.ids)
        if n == 0:
            raise ModelError("the prompt is empty")
        if n >= self.context:
            raise ModelError(f"the prompt is {n:,} tokens, and the context is {self.context:,}: "
                             "it must leave room for at least one new token")
        if request.max_tokens < 0:
            raise ModelError(f"max_tokens must be >= 0, got {request.max_tokens}")
        handle = Handle(self, request)
        breakers = self.model.token_ids_containing(DRY_BREAKERS) if request.params.dry_multiplier > 0 else frozenset()
        seq = _Seq(handle, emit, self.pool, self.windows, self.context, self.backend.xp, breakers)
        with self._work:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting")
            self.waiting.append(seq)
            self._work.notify()
        return handle

    def wake(self) -> None:
        with self._work:
            self._work.notify()

    def start(self) -> "Engine":
        """Run the steps on a daemon thread until `stop`."""
        self._thread = threading.Thread(target=self.run, name="nprt-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._work:
            self._stopping = True
            self._work.notify()
        if self._thread is not None:
            self._thread.join()

    def run(self) -> None:
        while True:
            with self._work:
                while not self._stopping and not self.waiting and not self.running:
                    self._work.wait()
                if self._stopping:
                    return
            self.step()

    @property
    def idle(self) -> bool:
        with self._lock:
            return not self.waiting and not self.running

    # -- the engine's thread -------------------------------------------------------
    def step(self) -> bool:
        """One forward pass over the running batch; False if there was nothing to run."""
        self._drop_cancelled()
        self._admit()
        batch = self._plan()
        if not batch:
            return False
        seqs = [s for s, _ in batch]
        tokens = [chunk for _, chunk in batch]
        try:
            logits = self.net.forward(np.concatenate([np.asarray(c, dtype=np.int64) for c in tokens]),
                                      SequenceBatch(self.backend, [s.paged for s in seqs], tokens))
        except Exception as exc:  # noqa: BLE001 - one bad batch must not take the server down
            for seq in seqs:
                self._finish(seq, "error", _one_line(exc))
            return True
        self.steps += 1
        for row, (seq, chunk) in enumerate(batch):
            self._fed(seq, len(chunk), logits[row])
        return True

    def _drop_cancelled(self) -> None:
        with self._lock:
            gone = [s for s in list(self.waiting) + self.running if s.handle.cancelled]
        for seq in gone:
            self._finish(seq, "cancelled")

    def _admit(self) -> None:
        """Move waiting sequences into the batch while it has room and the pool has blocks."""
        while len(self.running) < self.max_batch:
            with self._lock:
                if not self.waiting:
                    return
                seq = self.waiting[0]
            if not seq.prefixed:
                seq.prefixed = True  # the blocks found are held while it waits for the rest
                if self.prefix_caching:
                    reused = seq.paged.reuse_prefix(seq.pending)
                    del seq.pending[:reused]
                    if not seq.gen.generated:
                        seq.handle.usage.cached_tokens = reused
            first = min(len(seq.pending), self.step_tokens)
            if seq.paged.blocks_needed(first) > self.pool.available:
                return
            with self._lock:
                self.waiting.popleft()
            self.running.append(seq)

    def _plan(self) -> list[tuple[_Seq, list[int]]]:
        """Each running sequence's tokens for this step, their blocks reserved."""
        budget = self.step_tokens
        plan: list[tuple[_Seq, list[int]]] = []
        # decoding sequences first (one token each), then prompt chunks, oldest first
        order = sorted(self.running, key=lambda s: len(s.pending) > 1)
        for seq in order:
            if seq not in self.running:
                continue  # preempted while planning
            n = 1 if len(seq.pending) == 1 else min(len(seq.pending), budget)
            if n < 1:
                continue
            if not self._reserve(seq, n):
                continue
            plan.append((seq, seq.pending[:n]))
            if len(seq.pending) > 1:
                budget -= n
        return [(s, c) for s, c in plan if s in self.running]

    def _reserve(self, seq: _Seq, n: int) -> bool:
        """Blocks for n tokens of seq, preempting the newest other sequences if needed."""
        while not seq.paged.reserve(n):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: _Seq) -> None:
        self.preemptions += 1
        self.running.remove(seq)
        seq.paged.free()
        seq.gen.restart()
        seq.prefixed = False
        with self._lock:
            self.waiting.appendleft(seq)

    def _fed(self, seq: _Seq, n: int, row: Any) -> None:
        try:
            token = seq.gen.fed(n, row, self.backend)
        except NonFiniteLogits as exc:
            self._finish(seq, "error", f"{exc}: {self.model.nonfinite_weight_report()}")
            return
        if token is not None:
            seq.handle.usage.completion_tokens += 1
            event = Event(token=token)
            if seq.gen.last_logprobs is not None:
                event.logprob, event.top_logprobs = seq.gen.last_logprobs
            seq.emit(event)
        if seq.gen.done:
            self._finish(seq, seq.gen.finish_reason)

    def _finish(self, seq: _Seq, reason: str, error: str | None = None) -> None:
        with self._lock:
            if seq in self.waiting:
                self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        seq.paged.free()
        seq.emit(Event(finish_reason=reason, error=error))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def wait_idle(engine: Engine, timeout: float = 60.0) -> None:
    """Block until the engine has nothing waiting or running (tests, shutdown)."""
    deadline = time.monotonic() + timeout
    while not engine.idle:
        if time.monotonic() > deadline:
            raise TimeoutError("the engine did not go idle")
        time.sleep(0.01)
