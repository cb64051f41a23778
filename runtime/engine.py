"""Continuous batching: requests join and leave a running batch between forward passes.

Each `step` runs the new tokens of every running sequence through the model at
once: one token for each sequence that is decoding, a chunk of the prompt for each
that is still prefilling (vLLM's chunked prefill, within a token budget per step).
The projections see all of them as one matrix, so the weights are read once for
the whole batch; attention runs per sequence over its own blocks of the paged
pool (runtime.paged_cache).

A sequence's life: waiting -> running (prefix blocks reused, then prefill,
decode) -> finished, its blocks back in the pool. What a row of logits yields for a
sequence (the draw, stop ids, length) is runtime.generate.Generation. When the pool
runs dry, the newest running sequence is preempted: its blocks are freed and it
waits again, to be recomputed from its prompt and the tokens it had generated (its
sampler and its random state carry on, so its text is the same as if it had not
been).

A sequence may bring its own cache instead of pool blocks: the single-sequence ring
with attention sinks (runtime.kv_cache), which runs past its context and holds a
chat's earlier turns. `generate` and `chat` (Model.tokens) are this engine with one
such sequence, run by `decode_tokens` below: one decode loop for a batch of one
and for the server's batches. A ring sequence runs in its own forward call and is
never preempted (its cache is not the pool's to take back).

The engine is driven by one thread (`run` / `start`); `submit` and `cancel` may
come from any thread. Token events go to each request's `emit` callback, on
the engine's thread.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from loaders.errors import ModelError
from runtime.generate import DEFAULT_PREFILL_CHUNK, Generation, GenerationStats, NonFiniteLogits
from runtime.kv_cache import KVCache
from runtime.paged_cache import DEFAULT_BLOCK_SIZE, BlockPool, PagedSequence, SequenceBatch, new_pools
from runtime.sampling import Sampler, SamplingParams

DEFAULT_STEP_TOKENS = 256  # prompt chunk budget of a step beside decoding sequences; decode tokens come first
# ... and of a step in which nothing decodes: prompts sent together are prefilled together, as
# llama-server (2,048) and vLLM do, instead of the first ones decoding and then waiting for the
# others' chunks (16 streams of 64 tokens sent at once: docs/benchmarks.md, session 11)
DEFAULT_PREFILL_TOKENS = 1024
# An idle engine woken by a request waits until none has come for this long (at most ten times
# as long) before its first step, so that a burst's requests, which the server's event loop
# hands over one by one, are all in that step.
DEFAULT_GATHER_S = 0.005


class QueueFull(ModelError):
    """The engine already has as many waiting requests as it takes."""


@dataclass
class Request:
    ids: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: frozenset[int] = frozenset()
    logprobs: int | None = None   # also the top-N alternatives per token when > 0
    dry_breakers: frozenset[int] = frozenset()  # token ids DRY's matches never reach across


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
    def __init__(self, handle: Handle, emit: Callable[[Event], None], sampler: Sampler,
                 paged: PagedSequence | None, ring: KVCache | None, context: int | None) -> None:
        self.handle = handle
        self.request = r = handle.request
        self.emit = emit
        self.paged = paged  # pool blocks, or (None) the sequence's own ring
        self.ring = ring
        self.gen = Generation(r.ids, sampler, r.max_tokens, r.stop_ids, context, r.logprobs)
        self.prefixed = False  # cached prefix blocks looked up (once per admission)

    @property
    def pending(self) -> list[int]:
        return self.gen.pending


class Engine:
    """The batch scheduler over one model and its block pools."""

    def __init__(self, net: Any, *, kv_dtype: str = "float32", context: int | None = None,
                 max_batch: int = 8, num_blocks: int | None = None, block_size: int = DEFAULT_BLOCK_SIZE,
                 step_tokens: int = DEFAULT_STEP_TOKENS, prefill_tokens: int = DEFAULT_PREFILL_TOKENS,
                 max_waiting: int = 256, prefix_caching: bool = True, gather_s: float = DEFAULT_GATHER_S,
                 diagnose: Callable[[], str] | None = None, isolate_errors: bool = True) -> None:
        """`diagnose` names the broken weight when logits are not finite; `isolate_errors`
        (serving) turns an exception into an error event for the batch it broke, where
        decode_tokens lets it propagate to its caller."""
        if min(max_batch, step_tokens, prefill_tokens, block_size) < 1:
            raise ModelError("max_batch, step_tokens, prefill_tokens and block_size must be positive")
        self.net = net
        self.backend = net.backend
        config = net.config
        self.context = context or config.max_position_embeddings
        for limit in (getattr(config, "position_limit", None), getattr(net, "batch_context_limit", None)):
            if limit is not None:
                self.context = min(self.context, limit)
        self.windows = config.layer_windows()
        per_seq = -(-self.context // block_size)
        # by default the pool holds max_batch sequences of 1,024 tokens, or one full context
        # if that is more (8 x 1,024 float32 tokens of the default model: 377 MB); more
        # concurrent tokens than that wait or are preempted, as in vLLM
        self.num_blocks = num_blocks or max(per_seq, max_batch * -(-1024 // block_size))
        if self.num_blocks < per_seq:
            raise ModelError(f"a pool of {self.num_blocks} blocks of {block_size} cannot hold one sequence "
                             f"of {self.context} tokens ({per_seq} blocks)")
        self.block_size = block_size
        self.kv_dtype = kv_dtype
        self._pools: list[BlockPool] | None = None
        self.max_batch = max_batch
        # a chunk may not exceed the shortest window: its own keys are only causally masked
        windows = [w for w in self.windows if w is not None]
        self.step_tokens = min([step_tokens] + windows)
        self.prefill_tokens = min([max(prefill_tokens, step_tokens)] + windows)
        # a sliding-window kind's pool: what the running sequences can hold at once, not a whole
        # context each (Gemma 3's 1,024-token window beside 5 of 6 layers). A sequence holds its
        # window and its chunk c, at most ceil(window / b) + 2 + c / b blocks, and a step's chunks
        # add up to its budget and a token per decoding sequence.
        window = max(windows, default=0)
        self.window_blocks = max_batch * (-(-window // block_size) + 2) + \
            -(-(self.prefill_tokens + max_batch) // block_size)
        self.max_waiting = max_waiting
        self.prefix_caching = prefix_caching
        self.gather_s = gather_s
        self.diagnose = diagnose
        self.isolate_errors = isolate_errors
        self.waiting: deque[_Seq] = deque()
        self.running: list[_Seq] = []
        self.steps = 0
        self.preemptions = 0
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopping = False

    @classmethod
    def for_model(cls, model: Any, **options: Any) -> "Engine":
        """The engine of a loaded runtime.Model: its cache dtype, its context by default."""
        options["context"] = options.get("context") or model.cache_spec.capacity
        return cls(model.net, kv_dtype=model.cache_spec.kv_dtype, diagnose=model.nonfinite_weight_report,
                   **options)

    @property
    def pools(self) -> list[BlockPool]:
        """The block pools, one per layer kind (runtime.paged_cache.new_pools), allocated on
        first use: an engine of ring sequences (decode_tokens) has none."""
        return self._allocate_pools()

    def _allocate_pools(self) -> list[BlockPool]:
        if self._pools is None:
            c = self.net.config
            self._pools = new_pools(self.backend, self.windows, c.num_key_value_heads, c.head_dim, self.num_blocks,
                                    self.block_size, self.kv_dtype, self.window_blocks)
        return self._pools

    @property
    def free_blocks(self) -> int:
        """Blocks a sequence could take now, over every pool."""
        return sum(p.available for p in self.pools)

    @property
    def total_blocks(self) -> int:
        return sum(p.spec.num_blocks for p in self.pools)

    # -- from any thread -----------------------------------------------------------
    def submit(self, request: Request, emit: Callable[[Event], None], *, cache: KVCache | None = None,
               sampler: Sampler | None = None) -> Handle:
        """Queue a request; its tokens go to `emit`. With `cache` (a ring, as Model.new_cache
        makes) the sequence continues what that cache holds instead of taking pool blocks."""
        n = len(request.ids)
        if n == 0:
            raise ModelError("the prompt is empty")
        if cache is None and n >= self.context:
            raise ModelError(f"the prompt is {n:,} tokens, and the context is {self.context:,}: "
                             "it must leave room for at least one new token")
        if request.max_tokens < 0:
            raise ModelError(f"max_tokens must be >= 0, got {request.max_tokens}")
        handle = Handle(self, request)
        sampler = sampler or Sampler(self.backend.xp, request.params, request.dry_breakers)
        if cache is None:
            seq = _Seq(handle, emit, sampler, PagedSequence(self.pools, self.windows, self.context), None,
                       self.context)
        else:
            seq = _Seq(handle, emit, sampler, None, cache, None)
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
        """Run the steps on a daemon thread until `stop`. The pools are allocated here, not
        by the first request (which would stall a server's event loop while 377 MB are
        written)."""
        self._allocate_pools()
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
                if not self.running and not self._stopping:
                    self._gather()
                if self._stopping:
                    return
            self.step()

    def _gather(self) -> None:
        """Wait (holding the lock's condition) while requests keep arriving: until none has come
        for gather_s, at most 10 x gather_s in all."""
        deadline = time.monotonic() + 10 * self.gather_s
        seen = len(self.waiting)
        while not self._stopping and (left := deadline - time.monotonic()) > 0:
            self._work.wait(min(self.gather_s, left))
            if len(self.waiting) == seen:
                return
            seen = len(self.waiting)

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
        # the pool's sequences in one call; a ring sequence (decode_tokens) in its own
        calls = [([(s, c)], s.ring) for s, c in batch if s.ring is not None]
        paged = [(s, c) for s, c in batch if s.paged is not None]
        if paged:
            calls.append((paged, SequenceBatch(self.backend, [s.paged for s, _ in paged], [c for _, c in paged])))
        for part, cache in calls:
            tokens = np.concatenate([np.asarray(c, dtype=np.int64) for _, c in part])
            try:
                logits = self.net.forward(tokens, cache)
            except Exception as exc:  # noqa: BLE001 - one bad batch must not take the server down
                if not self.isolate_errors:
                    raise
                for seq, _ in part:
                    self._finish(seq, "error", _one_line(exc))
                continue
            for row, (seq, chunk) in enumerate(part):
                self._fed(seq, len(chunk), logits[row])
        self.steps += 1
        if not self.running and self._pools is not None:
            for pool in self._pools:  # an idle server holds no copy of finished sequences' caches
                if pool.mirror is not None:
                    pool.mirror.release()
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
            if seq.paged is None:  # a ring sequence: no blocks to find or wait for
                with self._lock:
                    self.waiting.popleft()
                self.running.append(seq)
                continue
            if not seq.prefixed:
                seq.prefixed = True  # the blocks found are held while it waits for the rest
                if self.prefix_caching:
                    reused = seq.paged.reuse_prefix(seq.pending)
                    del seq.pending[:reused]
                    if not seq.gen.generated:
                        seq.handle.usage.cached_tokens = reused
            first = min(len(seq.pending), self.step_tokens)
            if not self._fits(seq, first):
                return
            with self._lock:
                self.waiting.popleft()
            self.running.append(seq)

    def _plan(self) -> list[tuple[_Seq, list[int]]]:
        """Each running sequence's tokens for this step, their blocks reserved."""
        decoding = any(len(s.pending) == 1 for s in self.running)
        budget = self.step_tokens if decoding else self.prefill_tokens
        plan: list[tuple[_Seq, list[int]]] = []
        # decoding sequences first (one token each), then prompt chunks, oldest first
        order = sorted(self.running, key=lambda s: len(s.pending) > 1)
        for seq in order:
            if seq not in self.running:
                continue  # preempted while planning
            n = 1 if len(seq.pending) == 1 else min(len(seq.pending), budget)
            if seq.ring is not None:
                n = min(n, seq.ring.max_chunk)
            elif n > self.step_tokens and not self._fits(seq, n):
                n = self.step_tokens  # a chunk past a busy step's size never preempts another sequence
            if n < 1:
                continue
            if not self._reserve(seq, n):
                continue
            plan.append((seq, seq.pending[:n]))
            if len(seq.pending) > 1:
                budget -= n
        return [(s, c) for s, c in plan if s in self.running]

    def _fits(self, seq: _Seq, n: int) -> bool:
        return all(k <= pool.available for k, pool in zip(seq.paged.blocks_needed(n), self.pools))

    def _reserve(self, seq: _Seq, n: int) -> bool:
        """Blocks for n tokens of seq, preempting the newest other pool sequences if needed."""
        if seq.paged is None:
            return True
        while not seq.paged.reserve(n):
            victim = [s for s in self.running if s.paged is not None][-1]
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
            if not self.isolate_errors:
                raise
            self._finish(seq, "error", f"{exc}: {self.diagnose()}" if self.diagnose else str(exc))
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
        if seq.paged is not None:
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


def decode_tokens(net: Any, cache: KVCache, prompt: Sequence[int], sampler: Sampler, *,
                  max_tokens: int, stop_ids: set[int] | frozenset[int], stats: GenerationStats,
                  prefill_chunk: int = DEFAULT_PREFILL_CHUNK, logprobs: int | None = None) -> Iterator[int]:
    """Prefill `prompt` (tokens not yet in `cache`) and yield up to max_tokens new ids: an
    Engine running one sequence over its own cache, a step at a time, on this thread.

    A stop id ends the loop and is not yielded. Only the chosen id crosses from the
    device to the host each step: it is -1 when the row it was drawn from is not
    finite, which raises NonFiniteLogits. With `logprobs`, each token's
    log-probability and its `logprobs` best alternatives go to stats.logprobs.
    Closing the iterator early leaves in the cache every token whose forward pass ran.
    """
    engine = Engine(net, max_batch=1, step_tokens=prefill_chunk, prefill_tokens=prefill_chunk, isolate_errors=False)
    events: deque[Event] = deque()
    engine.submit(Request(list(prompt), max_tokens, stop_ids=frozenset(stop_ids), logprobs=logprobs),
                  events.append, cache=cache, sampler=sampler)
    stats.prompt_tokens = len(prompt)
    stats.stop_reason = "length"
    start = time.perf_counter()
    first: float | None = None
    while engine.step():
        now = time.perf_counter()
        while events:
            event = events.popleft()
            if event.token is None:
                stats.stop_reason = event.finish_reason or "length"
                return
            stats.generated_tokens += 1
            if first is None:
                first = now
                stats.prefill_seconds = stats.first_token_seconds = now - start
            else:
                stats.decode_steps += 1
                stats.decode_seconds = now - first
            if event.logprob is not None:
                stats.logprobs.append((event.token, event.logprob, event.top_logprobs or []))
            yield event.token
