"""The paged KV cache and the continuous-batching engine against the single-sequence path.

- Every architecture's tiny model: sequences of different lengths joining and leaving a
  batch mid-way (prompt chunks and decode tokens in the same forward pass), with and
  without prefix blocks reused, give the logits of one prefill through the ring cache
  (itself held to HF transformers by the architecture tests) within 1e-4 in float32.
- The block pool: blocks come back when sequences end, named full blocks are found by
  their prefix (never by a collision), the least recently used cached block goes first.
- The engine: greedy tokens equal Model.tokens for each of 8 concurrent requests; a seed
  gives the same tokens alone and in a batch of 8, and with its prefix from the cache;
  a pool too small for the batch preempts and recomputes, with the same tokens; the
  free-block count returns to its start.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import runtime
from conftest import KV_TOLERANCE, load_net, prefill_logits
from runtime.engine import Engine, Event, Request, wait_idle
from runtime.kv_mirror import KVMirror
from runtime.paged_cache import BlockPool, PagedSequence, PoolSpec, SequenceBatch, new_pools
from runtime.sampling import SamplingParams

pytest.importorskip("transformers")

# one tiny model per architecture (and the window variants), from the parity tests' builders
ARCHS = {
    "llama": ("test_llama", "gqa"), "mistral": ("test_architectures", "mistral"),
    "qwen2-sliding": ("test_architectures", "qwen2-sliding"), "qwen3": ("test_architectures", "qwen3"),
    "gemma2": ("test_gemma", "gemma2"), "gemma3": ("test_gemma", "gemma3"),
    "phi3": ("test_phi3", "longrope-short"), "gpt2": ("test_gpt2", "gpt2"),
}
VOCAB = 320


def _build(arch: str, tmp_path: Path) -> Path:
    module, case = ARCHS[arch]
    folder, _ = __import__(module).build(case, tmp_path)
    return folder


def _pools(net: Any, num_blocks: int, block_size: int = 16, kv_dtype: str = "float32",
           mirror_bytes: int | None = None) -> list[BlockPool]:
    c = net.config
    return new_pools(net.backend, c.layer_windows(), c.num_key_value_heads, c.head_dim, num_blocks, block_size,
                     kv_dtype, mirror_bytes=mirror_bytes)


def _available(pools: list[BlockPool]) -> int:
    return sum(p.available for p in pools)


def _run_schedule(net: Any, pools: list[BlockPool], prompts: list[list[int]], joins: list[int], chunks: list[int],
                  reuse: bool = False) -> tuple[list[np.ndarray], list[int]]:
    """Feed each prompt through the pool in a shared batch: sequence i joins at step joins[i],
    feeds chunks of chunks[i] tokens for its first two chunks and then one token a step,
    and leaves when its prompt is fed. Returns each sequence's logits (one row per token
    fed) and how many tokens each took from the prefix cache."""
    windows = net.config.layer_windows()
    seqs = [PagedSequence(pools, windows, 128) for _ in prompts]
    fed = [0] * len(prompts)
    reused = [0] * len(prompts)
    rows: list[list[np.ndarray]] = [[] for _ in prompts]
    step = 0
    while any(f < len(p) for f, p in zip(fed, prompts)):
        active = [i for i in range(len(prompts)) if step >= joins[i] and fed[i] < len(prompts[i])]
        tokens = []
        for i in active:
            if fed[i] == 0 and reuse:
                fed[i] = reused[i] = seqs[i].reuse_prefix(prompts[i])
            n = chunks[i] if fed[i] < reused[i] + 2 * chunks[i] else 1
            n = min(n, len(prompts[i]) - fed[i])
            assert seqs[i].reserve(n)
            tokens.append(prompts[i][fed[i]:fed[i] + n])
        if active:
            out = net.backend.to_host(net.forward(np.concatenate([np.asarray(t) for t in tokens]),
                                                  SequenceBatch(net.backend, [seqs[i] for i in active], tokens),
                                                  all_logits=True))
            assert out.dtype == np.float32
            start = 0
            for i, t in zip(active, tokens):
                rows[i].append(out[start:start + len(t)])
                start += len(t)
                fed[i] += len(t)
                if fed[i] == len(prompts[i]):
                    seqs[i].free()  # leaves the batch mid-way; its named blocks stay findable
        step += 1
    return [np.concatenate(r) for r in rows], reused


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_batched_logits_equal_unbatched(arch: str, tmp_path: Path) -> None:
    folder = _build(arch, tmp_path)
    net, spec = load_net(folder)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (40, 23, 61, 9)]
    expected = [prefill_logits(net, spec, p) for p in prompts]
    pools = _pools(net, 24)
    start = _available(pools)
    got, _ = _run_schedule(net, pools, prompts, joins=[0, 2, 3, 5], chunks=[10, 7, 20, 3])
    for i, (g, e) in enumerate(zip(got, expected)):
        assert np.abs(g - e).max() <= 1e-4, f"sequence {i}"
    assert _available(pools) == start

    # the same prefixes again: full blocks come from the cache, the logits of the rest agree
    again = [prompts[0][:35] + rng.integers(0, VOCAB, 12).tolist(), prompts[2][:50] + [5, 6, 7]]
    expected = [prefill_logits(net, spec, p) for p in again]
    got, reused = _run_schedule(net, pools, again, joins=[0, 1], chunks=[5, 6], reuse=True)
    assert reused == [32, 48]
    for g, e, r in zip(got, expected, reused):
        assert np.abs(g - e[r:]).max() <= 1e-4
    assert _available(pools) == start


@pytest.mark.parametrize("kv_dtype", ["float16", "int8"])
def test_batched_low_precision_pool_stays_close(kv_dtype: str, tmp_path: Path) -> None:
    net, spec = load_net(_build("qwen2-sliding", tmp_path))
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (40, 30)]
    expected = [prefill_logits(net, spec, p) for p in prompts]
    got, _ = _run_schedule(net, _pools(net, 16, kv_dtype=kv_dtype), prompts, joins=[0, 1], chunks=[8, 5])
    for g, e in zip(got, expected):
        assert np.isfinite(g).all()
        assert np.abs(g - e).max() <= KV_TOLERANCE[kv_dtype]


class _MirrorModes:
    """Counts the modes KVMirror.plan chose (append, gather, None) while it is patched in."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.counts: dict[str | None, int] = {}
        plan = KVMirror.plan

        def counted(mirror: KVMirror, *args: Any) -> bool:
            used = plan(mirror, *args)
            self.counts[mirror.mode] = self.counts.get(mirror.mode, 0) + 1
            return used

        monkeypatch.setattr(KVMirror, "plan", counted)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # an overflow: the mirror read memory it never wrote
@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("kv_dtype", ["float32", "int8"])
def test_the_decode_mirror_gives_the_logits_of_the_pool_gathers(arch: str, kv_dtype: str, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # the same schedule (joins, leaves, chunks between decode steps) with the pool gathered at
    # every step and with the mirror appended to: the same numbers, bit for bit
    net, _ = load_net(_build(arch, tmp_path))
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (40, 23, 61, 9)]
    schedule = dict(joins=[0, 2, 3, 5], chunks=[10, 7, 20, 3])
    gathered, _ = _run_schedule(net, _pools(net, 24, kv_dtype=kv_dtype, mirror_bytes=0), prompts, **schedule)
    modes = _MirrorModes(monkeypatch)
    pools = _pools(net, 24, kv_dtype=kv_dtype, mirror_bytes=1 << 24)  # an int8 pool's own bytes are too few here
    mirrored, _ = _run_schedule(net, pools, prompts, **schedule)
    if None in net.config.layer_windows():  # else every window moved on before the first decode step
        assert modes.counts.get("append", 0) >= 10 and modes.counts.get("gather", 0) >= 2
    for g, m in zip(gathered, mirrored):
        assert np.array_equal(g, m)


def test_a_mirror_past_its_budget_leaves_the_step_to_the_gathers(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    net, spec = load_net(_build("llama", tmp_path))
    rng = np.random.default_rng(6)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (40, 30)]
    c = net.config
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4
    modes = _MirrorModes(monkeypatch)
    pools = _pools(net, 16, mirror_bytes=2 * 35 * per_token)  # two rows of 35 tokens: the batch outgrows it
    got, _ = _run_schedule(net, pools, prompts, joins=[0, 1], chunks=[8, 5])
    assert modes.counts.get("append", 0) > 0 and modes.counts.get(None, 0) > 0
    for g, p in zip(got, prompts):
        assert np.abs(g - prefill_logits(net, spec, p)).max() <= 1e-4
    assert pools[0].mirror.keys is None  # given back when the batch outgrew it


def test_a_sequence_freed_and_fed_again_is_not_read_from_the_mirror(tmp_path: Path) -> None:
    # two sequences decode (the mirror holds their rows), are freed and fed other prompts up
    # to the same lengths: the lengths fit an append, but the rows are no longer theirs
    net, spec = load_net(_build("llama", tmp_path))
    rng = np.random.default_rng(7)
    pools = _pools(net, 16)
    windows = net.config.layer_windows()
    seqs = [PagedSequence(pools, windows, 128) for _ in range(2)]

    def step(chunks: list[list[int]]) -> np.ndarray:
        for seq, chunk in zip(seqs, chunks):
            assert seq.reserve(len(chunk))
        tokens = np.concatenate([np.asarray(c) for c in chunks])
        return net.backend.to_host(net.forward(tokens, SequenceBatch(net.backend, seqs, chunks)))

    first = [rng.integers(0, VOCAB, 12).tolist() for _ in seqs]
    step([p[:10] for p in first])
    step([p[10:11] for p in first])
    step([p[11:12] for p in first])  # appended: the rows hold 12 tokens each
    assert pools[0].mirror.lengths.tolist() == [12, 12]
    for seq in seqs:
        seq.free()
    second = [rng.integers(0, VOCAB, 13).tolist() for _ in seqs]
    step([p[:12] for p in second])
    got = step([p[12:] for p in second])
    for row, p in zip(got, second):
        assert np.abs(row - prefill_logits(net, spec, p)[-1]).max() <= 1e-4


def test_window_model_gives_back_the_blocks_out_of_its_window(tmp_path: Path) -> None:
    # Mistral: every layer a 24-token window, so a sequence holds about 24 tokens of blocks
    net, spec = load_net(_build("mistral", tmp_path))
    prompt = np.random.default_rng(9).integers(0, VOCAB, 100).tolist()
    expected = prefill_logits(net, spec, prompt)
    pools = _pools(net, 8, block_size=8)  # 64 slots for a 100-token sequence
    seq = PagedSequence(pools, net.config.layer_windows(), 128)
    rows, held = _feed_in_chunks(net, seq, prompt, 4, lambda: seq.held)
    assert np.abs(rows - expected).max() <= 1e-4
    assert max(held) <= 5  # the 24-token window spans at most 4 blocks of 8, plus the one being filled
    seq.free()
    assert _available(pools) == 8


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_hybrid_model_gives_back_its_window_layers_blocks(arch: str, tmp_path: Path) -> None:
    # Gemma: 24-token windows on every other layer, full attention between them. The window
    # layers' table holds about its window of blocks, the global layers' every token; the
    # logits are the ring's, and both pools get their blocks back
    net, spec = load_net(_build(arch, tmp_path))
    kinds = list(dict.fromkeys(net.config.layer_windows()))
    assert None in kinds and len(kinds) == 2
    prompt = np.random.default_rng(11).integers(0, VOCAB, 100).tolist()
    expected = prefill_logits(net, spec, prompt)
    pools = _pools(net, 16, block_size=8)
    seq = PagedSequence(pools, net.config.layer_windows(), 128)
    window_table = seq.tables[kinds.index(24)]
    full_table = seq.tables[kinds.index(None)]
    rows, held = _feed_in_chunks(net, seq, prompt, 4, lambda: window_table.held)
    assert np.abs(rows - expected).max() <= 1e-4
    assert max(held) <= 5 and full_table.held == 13  # 100 tokens in blocks of 8
    seq.free()
    assert _available(pools) == 32

    # a prefix found again: the window layers' blocks beyond their window are not needed
    # to continue, and what follows agrees with one prefill of the whole
    again = prompt[:80] + [1, 2, 3]
    seq = PagedSequence(pools, net.config.layer_windows(), 128)
    assert seq.reuse_prefix(again) == 80
    assert seq.tables[kinds.index(24)].held <= 4 and seq.tables[kinds.index(None)].held == 10
    rows, _ = _feed_in_chunks(net, seq, again[80:], 3, lambda: 0)
    assert np.abs(rows - prefill_logits(net, spec, again)[80:]).max() <= 1e-4
    seq.free()
    assert _available(pools) == 32

    # the engine sizes the window pool for its running sequences' windows, not their contexts
    # (each sequence's window and slack, and the chunks of one step: its budget and a token each)
    engine = Engine(net, context=128, max_batch=2, num_blocks=64, step_tokens=8, prefill_tokens=8)
    sizes = [p.spec.num_blocks for p in engine.pools]
    assert sizes[kinds.index(None)] == 64 and sizes[kinds.index(24)] == 2 * (2 + 2) + 1
    # a step where nothing decodes may take prefill_tokens (capped by the window)
    engine = Engine(net, context=128, max_batch=2, num_blocks=64, step_tokens=8)
    assert engine.prefill_tokens == 24 and engine.window_blocks == 2 * (2 + 2) + 2

    # and that is enough: eight requests of up to 100 tokens through four slots, blocks of 8,
    # never preempted for want of window blocks, each answer the one it gets alone
    rng = np.random.default_rng(13)
    prompts = [rng.integers(0, VOCAB, int(rng.integers(5, 100))).tolist() for _ in range(8)]
    alone = [_collect(Engine(net, context=128, max_batch=1, block_size=8), [Request(p, 16)])[0][0] for p in prompts]
    engine = Engine(net, context=128, max_batch=4, block_size=8, step_tokens=8)
    assert engine.window_blocks == 4 * (3 + 2) + 4
    assert [t for t, _ in _collect(engine, [Request(p, 16) for p in prompts])] == alone
    assert engine.preemptions == 0 and engine.free_blocks == engine.total_blocks


def _feed_in_chunks(net: Any, seq: PagedSequence, ids: list[int], size: int,
                    held: Any) -> tuple[np.ndarray, list[int]]:
    """ids through the model in chunks of `size` as a batch of one pool sequence: the
    logits of every token, and held() after each chunk."""
    rows, counts = [], []
    for start in range(0, len(ids), size):
        chunk = ids[start:start + size]
        assert seq.reserve(len(chunk))
        out = net.forward(np.asarray(chunk), SequenceBatch(net.backend, [seq], [chunk]), all_logits=True)
        rows.append(net.backend.to_host(out))
        counts.append(held())
    return np.concatenate(rows), counts


# -- the block pool -------------------------------------------------------------------------

def _small_pool(num_blocks: int = 4, block_size: int = 4) -> BlockPool:
    from runtime.backend import get_backend

    return BlockPool(get_backend("cpu"), PoolSpec(1, 1, 4, num_blocks, block_size))


def test_pool_blocks_come_back_and_cached_ones_go_lru() -> None:
    pool = _small_pool()
    seq = PagedSequence([pool], [None], 16)
    assert seq.reserve(9) and len(seq.blocks) == 3 and pool.available == 1
    seq.begin(list(range(9)))
    seq.end()
    seq.free()
    assert pool.available == 4  # 2 named (full) blocks cached, 2 free
    assert len(pool.cached) == 2 and len(pool.free) == 2
    other = PagedSequence([pool], [None], 16)
    assert other.reserve(16)  # takes the 2 free blocks, then evicts the 2 cached ones, oldest first
    assert not pool.names and pool.available == 0
    assert not PagedSequence([pool], [None], 16).reserve(1)  # none left: reserve says so
    other.free()
    assert pool.available == 4


def test_prefix_found_only_for_the_same_tokens_and_parents() -> None:
    pool = _small_pool(num_blocks=8)
    a = PagedSequence([pool], [None], 32)
    ids = list(range(100, 112))
    assert a.reserve(12)
    a.begin(ids)
    a.end()
    b = PagedSequence([pool], [None], 32)
    assert b.reuse_prefix(ids + [1]) == 12 and b.blocks == a.blocks  # shared, referenced twice
    assert all(pool.refs[blk] == 2 for blk in a.blocks)
    c = PagedSequence([pool], [None], 32)
    # same second block, different first: the second is not found without its parent
    assert c.reuse_prefix([0, 0, 0, 0] + ids[4:] + [1]) == 0
    d = PagedSequence([pool], [None], 32)
    assert d.reuse_prefix(ids[:8]) == 4  # the last token is always left to prefill
    for s in (a, b, d):
        s.free()
    assert pool.available == 8 and not pool.refs.any()


# -- the engine -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from test_errors import _tokenizer_json

    folder = _build("llama", tmp_path_factory.mktemp("engine"))
    _tokenizer_json(folder / "tokenizer.json")
    return runtime.load(folder, max_context=128, progress=False)


def _collect(engine: Engine, requests: list[Request]) -> list[tuple[list[int], str]]:
    results: list[tuple[list[int], str]] = [([], "") for _ in requests]
    done = threading.Event()
    left = [len(requests)]

    def emit_for(i: int):
        def emit(event: Event) -> None:
            if event.token is not None:
                results[i][0].append(event.token)
            else:
                results[i] = (results[i][0], event.finish_reason)
                left[0] -= 1
                if not left[0]:
                    done.set()
        return emit

    for i, r in enumerate(requests):
        engine.submit(r, emit_for(i))
    while not done.is_set():
        engine.step()
    return results


def _prompts(n: int, seed: int = 5) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, int(rng.integers(5, 40))).tolist() for _ in range(n)]


def test_engine_greedy_equals_model_tokens(tiny_model: Any) -> None:
    prompts = _prompts(8)
    lengths = [3, 17, 9, 25, 1, 12, 30, 6]
    expected = [list(tiny_model.tokens(p, max_tokens=n, ignore_eos=True)) for p, n in zip(prompts, lengths)]
    # prompts in chunks of 16 even while nothing decodes (prefill_tokens): chunks across steps
    engine = Engine.for_model(tiny_model, max_batch=8, step_tokens=16, prefill_tokens=16)
    start = engine.free_blocks
    got = _collect(engine, [Request(p, n) for p, n in zip(prompts, lengths)])
    assert [t for t, _ in got] == expected
    assert all(reason == "length" for _, reason in got)
    assert engine.free_blocks == start


def _forward_sizes(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The token count of each forward pass the engine runs from now on."""
    sizes: list[int] = []
    forward = engine.net.forward

    def counted(tokens: Any, cache: Any, **kw: Any) -> Any:
        sizes.append(len(tokens))
        return forward(tokens, cache, **kw)

    monkeypatch.setattr(engine.net, "forward", counted)
    return sizes


def test_prompts_sent_together_prefill_together_and_a_late_one_in_small_chunks(
        tiny_model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # with no sequence decoding a step carries up to prefill_tokens of prompts, so prompts sent
    # together start decoding together; beside decoding sequences at most step_tokens, which
    # bounds how long they wait for their next token
    prompts = [p for p in _prompts(12, seed=11) if len(p) <= 20][:4]
    assert len(prompts) == 4
    expected = [list(tiny_model.tokens(p, max_tokens=12, ignore_eos=True)) for p in prompts]
    engine = Engine.for_model(tiny_model, max_batch=4, step_tokens=4, prefill_tokens=64)
    sizes = _forward_sizes(engine, monkeypatch)
    got: list[list[int]] = [[] for _ in prompts]

    def emit_for(i: int) -> Any:
        return lambda event: got[i].append(event.token) if event.token is not None else None

    for i in range(3):
        engine.submit(Request(prompts[i], 12), emit_for(i))
    assert engine.step() and sizes == [sum(len(p) for p in prompts[:3])]
    assert all(len(g) == 1 for g in got[:3])  # every stream's first token from one step
    engine.submit(Request(prompts[3], 12), emit_for(3))
    while not got[3]:
        engine.step()
    # the late prompt went in chunks of 4 beside the 3 decoding streams
    chunks = -(-len(prompts[3]) // 4)
    assert sizes[1:] == [3 + 4] * (chunks - 1) + [3 + len(prompts[3]) - 4 * (chunks - 1)]
    while engine.step():
        pass
    assert got == expected


def test_a_started_engine_takes_a_burst_of_requests_in_one_first_step(
        tiny_model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # requests handed over one by one, as the server's event loop does, 20 ms apart: the idle
    # engine waits for the burst (gather_s) and prefills it in one step, then all decode
    prompts = [p for p in _prompts(12, seed=11) if len(p) <= 20][:4]
    engine = Engine.for_model(tiny_model, max_batch=4, step_tokens=4, gather_s=0.25)
    sizes = _forward_sizes(engine, monkeypatch)
    ends: list[str | None] = []
    engine.start()
    try:
        for p in prompts:
            engine.submit(Request(p, 3), lambda event: ends.append(event.finish_reason) if event.token is None else None)
            time.sleep(0.02)
        wait_idle(engine)
    finally:
        engine.stop()
    assert ends == ["length"] * 4
    assert sizes == [sum(len(p) for p in prompts), 4, 4]


def test_a_prefill_chunk_past_step_tokens_never_preempts(tiny_model: Any) -> None:
    # 8 blocks of 16: after the first prompt's 4 blocks, the second's 68-token share of the
    # budget does not fit, so it goes in with a step_tokens chunk rather than push anyone out
    rng = np.random.default_rng(12)
    prompts = [rng.integers(0, 256, 60).tolist(), rng.integers(0, 256, 100).tolist()]
    engine = Engine.for_model(tiny_model, max_batch=2, num_blocks=8, step_tokens=16, prefill_tokens=128)
    for p in prompts:
        engine.submit(Request(p, 4), lambda event: None)
    engine.step()
    assert engine.preemptions == 0 and len(engine.running) == 2
    assert [len(s.pending) for s in engine.running] == [1, 100 - 16]


def test_engine_seed_gives_the_same_tokens_alone_in_a_batch_and_from_the_cache(tiny_model: Any) -> None:
    prompts = _prompts(8, seed=6)
    params = [SamplingParams(temperature=0.9, top_p=0.95, seed=100 + i) for i in range(8)]
    alone = [_collect(Engine.for_model(tiny_model, max_batch=1), [Request(p, 20, s)])[0][0] for p, s in zip(prompts, params)]
    engine = Engine.for_model(tiny_model, max_batch=8, step_tokens=8, prefill_tokens=8)
    batched = _collect(engine, [Request(p, 20, s) for p, s in zip(prompts, params)])
    assert [t for t, _ in batched] == alone
    # again on the same engine: full prefix blocks come from the cache
    handles = []
    again = _collect_with_handles(engine, [Request(p, 20, s) for p, s in zip(prompts, params)], handles)
    assert [t for t, _ in again] == alone
    assert any(h.usage.cached_tokens for h in handles)
    assert all(h.usage.cached_tokens == (len(p) - 1) // 16 * 16 for h, p in zip(handles, prompts))


def _collect_with_handles(engine: Engine, requests: list[Request], handles: list) -> list:
    original = engine.submit

    def submit(request: Request, emit: Any) -> Any:
        handle = original(request, emit)
        handles.append(handle)
        return handle

    engine.submit = submit  # type: ignore[method-assign]
    try:
        return _collect(engine, requests)
    finally:
        engine.submit = original  # type: ignore[method-assign]


def test_engine_preempts_when_the_pool_runs_out_and_recomputes_the_same(tiny_model: Any) -> None:
    # greedy: a recomputed sequence's logits come from a prefill, not from decode steps, and
    # agree to about 1e-7; this random model's next-token distribution is nearly flat, so a
    # seeded draw can land on the other side of such a difference (vLLM's recompute too)
    prompts = _prompts(6, seed=7)
    params = [SamplingParams() for i in range(6)]
    expected = [list(tiny_model.tokens(p, max_tokens=40, ignore_eos=True)) for p in prompts]
    # 8 blocks of 16 slots for 6 sequences of up to 80 tokens: most must wait or be preempted
    engine = Engine.for_model(tiny_model, max_batch=6, num_blocks=8, step_tokens=16, prefix_caching=False)
    got = _collect(engine, [Request(p, 40, s) for p, s in zip(prompts, params)])
    assert engine.preemptions > 0
    assert [t for t, _ in got] == expected
    assert engine.free_blocks == engine.total_blocks


def test_engine_cancel_frees_the_blocks(tiny_model: Any) -> None:
    engine = Engine.for_model(tiny_model, max_batch=4).start()
    start = engine.free_blocks
    events: list[Event] = []
    handle = engine.submit(Request(_prompts(1)[0], 100), events.append)
    while len(events) < 3:
        pass
    handle.cancel()
    wait_idle(engine)
    engine.stop()
    assert events[-1].finish_reason == "cancelled" and len(events) < 100
    assert engine.free_blocks == start


def test_engine_stop_id_ends_without_emitting_it(tiny_model: Any) -> None:
    prompt = _prompts(1, seed=8)[0]
    tokens = list(tiny_model.tokens(prompt, max_tokens=10, ignore_eos=True))
    stop = tokens[4]
    got = _collect(Engine.for_model(tiny_model), [Request(prompt, 10, stop_ids=frozenset({stop}))])
    assert got[0] == (tokens[:tokens.index(stop)], "stop")


def test_generate_runs_through_the_engine(tiny_model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Model.tokens (generate, chat) is the engine stepping one sequence over its ring:
    # the prompt in one step, then one step per token
    steps: list[int] = []
    step = Engine.step

    def counted(engine: Engine) -> bool:
        ran = step(engine)
        steps.append(engine.steps)
        return ran

    monkeypatch.setattr(Engine, "step", counted)
    tokens = list(tiny_model.tokens(_prompts(1, seed=9)[0], max_tokens=7, ignore_eos=True))
    assert len(tokens) == 7 and steps == list(range(1, 8))
    assert tiny_model.stats.generated_tokens == 7 and tiny_model.stats.decode_steps == 6


def test_a_ring_sequence_runs_past_the_context_beside_pool_sequences(tiny_model: Any) -> None:
    # the two stores behind one engine: a ring with sinks (what lets a chat run past its
    # context) and pool blocks (which end at the context), stepped in the same engine
    prompts = _prompts(4, seed=10)
    long = 200  # past the model's context of 128: only the ring holds such a sequence
    expected_ring = list(tiny_model.tokens(prompts[0], max_tokens=long, ignore_eos=True))
    assert len(expected_ring) == long
    expected = [list(tiny_model.tokens(p, max_tokens=30, ignore_eos=True)) for p in prompts[1:]]
    engine = Engine.for_model(tiny_model, max_batch=4, step_tokens=16)
    got: list[list[int]] = [[] for _ in prompts]
    ends: list[str | None] = [None] * len(prompts)

    def emit_for(i: int) -> Any:
        def emit(event: Event) -> None:
            if event.token is None:
                ends[i] = event.finish_reason
            else:
                got[i].append(event.token)
        return emit

    engine.submit(Request(prompts[0], long), emit_for(0), cache=tiny_model.new_cache())
    for i, p in enumerate(prompts[1:], 1):
        engine.submit(Request(p, 30), emit_for(i))
    while engine.step():
        pass
    assert got[0] == expected_ring and got[1:] == expected
    assert ends == ["length"] * 4
    assert engine.free_blocks == engine.total_blocks
