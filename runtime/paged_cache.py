"""The paged KV cache: many sequences' keys and values in pools of fixed-size blocks.

vLLM's PagedAttention layout on the CPU: one preallocated store of
`num_blocks x block_size` slots for a kind of layers (a KVCache without sinks, so its
float32 / float16 / int8 storage, quantization and widening are the ring's own
code), handed out a block at a time. A sequence keeps a block table: position p
lives in slot `table[p // block_size] * block_size + p % block_size`. Nothing is
fragmented and nothing is copied when a sequence grows; a finished sequence gives
its blocks back.

Layer kinds: the layers that attend to everything are one kind, the layers with one
sliding window another (Gemma 2 and 3 alternate them). Each kind has its own pool
and each sequence a table per kind, so the window layers' blocks go back to their
pool as soon as the window has passed them, while the global layers' stay; the
window pool is sized for the running sequences' windows, not for whole contexts.

Prefix caching: a full block is named by its tokens and the name of the block
before it (so a name stands for the whole prefix up to it), and a freed block that
has a name stays findable until the pool needs the slot. A new sequence whose
prompt starts with known blocks takes them as they are (reference counted) and
prefills only the rest. The name holds the token ids themselves, so two prefixes
never share a block by a hash collision.

Attention reads a sequence through `PagedRing`, which offers what `attend` asks of
a ring (keys_values, store, score_keys, weigh_values, old_mask, ...), gathering the
sequence's slots; a layer with a sliding window sees only its window's slots (the
mask HF applies), and `SequenceBatch` is the cache a forward pass over several
sequences gets: one GEMM per projection for all their tokens, attention per
sequence (`attend` splits at `parts`).

A pool sequence does not wrap: it ends at its context (finish reason "length");
the single-sequence ring with attention sinks (kv_cache.py) is what lets a chat
run past its context.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Hashable, Sequence

import numpy as np

from loaders.errors import ModelError
from runtime.backend import Backend
from runtime.kv_cache import CacheSpec, KVCache, _as_slice
from runtime.kv_mirror import KVMirror

DEFAULT_BLOCK_SIZE = 16  # vLLM's default


@dataclass(frozen=True)
class PoolSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_blocks: int
    block_size: int = DEFAULT_BLOCK_SIZE
    kv_dtype: str = "float32"

    @property
    def store_spec(self) -> CacheSpec:
        return CacheSpec(self.num_layers, self.num_kv_heads, self.head_dim, self.num_blocks * self.block_size,
                         self.kv_dtype, n_sink=0)

    @property
    def nbytes(self) -> int:
        return self.store_spec.nbytes


class BlockPool:
    """The blocks, who holds them, and the named (prefix-cached) ones; and the float32
    mirror of the last decode batch's keys and values (runtime.kv_mirror), which may take
    up to `mirror_bytes` (by default as many bytes as the store; 0: none)."""

    def __init__(self, backend: Backend, spec: PoolSpec, mirror_bytes: int | None = None) -> None:
        if spec.num_blocks < 1 or spec.block_size < 1:
            raise ModelError(f"a block pool needs at least one block of at least one slot, got {spec}")
        self.backend = backend
        self.xp = backend.xp
        self.spec = spec
        self.block_size = spec.block_size
        self.store = KVCache(backend, spec.store_spec)
        budget = self.store.spec.nbytes if mirror_bytes is None else mirror_bytes
        self.mirror = KVMirror(self.store, budget) if budget > 0 else None
        self.refs = np.zeros(spec.num_blocks, dtype=np.int64)
        self.free: deque[int] = deque(range(spec.num_blocks))  # never named, or name dropped
        self.cached: OrderedDict[int, None] = OrderedDict()    # named, unreferenced: LRU order
        self.names: dict[Hashable, int] = {}
        self.name_of: dict[int, Hashable] = {}

    @property
    def available(self) -> int:
        """Blocks a sequence could take now (free, or cached and unreferenced)."""
        return len(self.free) + len(self.cached)

    def allocate(self) -> int | None:
        """A fresh block (the least recently used cached one if none is free), or None."""
        if self.free:
            block = self.free.popleft()
        elif self.cached:
            block, _ = self.cached.popitem(last=False)
            del self.names[self.name_of.pop(block)]
        else:
            return None
        self.refs[block] = 1
        return block

    def find(self, name: Hashable) -> int | None:
        """The block holding this prefix, referenced once more, or None."""
        block = self.names.get(name)
        if block is None:
            return None
        if self.refs[block] == 0:
            del self.cached[block]
        self.refs[block] += 1
        return block

    def name(self, block: int, name: Hashable) -> None:
        """Make a full block findable by its prefix (first come keeps the name)."""
        if name not in self.names and block not in self.name_of:
            self.names[name] = block
            self.name_of[block] = name

    def release(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if block in self.name_of:
                self.cached[block] = None
            else:
                self.free.append(block)


def layer_kinds(windows: Sequence[int | None]) -> tuple[list[int | None], list[int]]:
    """The distinct windows (None: full attention) in order of first use, and each layer's
    kind: the layers whose slots one block pool holds."""
    kinds = list(dict.fromkeys(windows))
    return kinds, [kinds.index(w) for w in windows]


def new_pools(backend: Backend, windows: Sequence[int | None], num_kv_heads: int, head_dim: int,
              num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE, kv_dtype: str = "float32",
              window_blocks: int | None = None, mirror_bytes: int | None = None) -> list[BlockPool]:
    """One pool per layer kind, holding only that kind's layers. A sliding-window kind's
    sequences hold no more blocks than their window spans, so its pool may be smaller
    (`window_blocks`); the full-attention kind's holds every token of every sequence."""
    kinds, kind_of = layer_kinds(windows)
    return [BlockPool(backend, PoolSpec(kind_of.count(k), num_kv_heads, head_dim,
                                        num_blocks if w is None or window_blocks is None
                                        else min(num_blocks, window_blocks), block_size, kv_dtype),
                      mirror_bytes)
            for k, w in enumerate(kinds)]


class BlockTable:
    """One sequence's blocks in one kind's pool: position p of the sequence lives in slot
    `blocks[p // block_size] * block_size + p % block_size` of that pool's store."""

    def __init__(self, pool: BlockPool, window: int | None) -> None:
        self.pool = pool
        self.window = window
        self.blocks: list[int] = []
        self.named = 0               # leading full blocks whose prefix has a name
        self.prefix: Hashable = None  # the name of the prefix up to them
        self.dropped = 0             # leading blocks given back (their entries are -1)

    def blocks_needed(self, total: int) -> int:
        return max(0, -(-total // self.pool.block_size) - len(self.blocks))

    def reserve(self, total: int) -> bool:
        """Blocks for positions up to `total`; False (holding what it got) if the pool ran out."""
        for _ in range(self.blocks_needed(total)):
            block = self.pool.allocate()
            if block is None:
                return False
            self.blocks.append(block)
        return True

    def find_prefix(self, names: Sequence[Hashable]) -> int:
        """Take the cached blocks named by `names` (a prefix's, block by block) while they
        are found; returns how many."""
        for name in names:
            block = self.pool.find(name)
            if block is None:
                break
            self.blocks.append(block)
        self.keep(len(self.blocks), names)
        return len(self.blocks)

    def keep(self, n_blocks: int, names: Sequence[Hashable]) -> None:
        """Keep the first n_blocks found (another kind found fewer), giving back the rest."""
        for block in self.blocks[n_blocks:]:
            self.pool.release(block)
        del self.blocks[n_blocks:]
        self.named = n_blocks
        self.prefix = names[n_blocks - 1] if n_blocks else None

    def name_full(self, tokens: Sequence[int], offset: int) -> None:
        """Name the blocks that just became full: a later prompt with this prefix reuses them."""
        bs = self.pool.block_size
        while self.named < offset // bs:
            i = self.named
            self.prefix = (self.prefix, tuple(tokens[i * bs:(i + 1) * bs]))
            self.pool.name(self.blocks[i], self.prefix)  # kept by another block if it has it
            self.named += 1

    def drop_out_of_window(self, offset: int) -> None:
        """Give back the leading blocks this kind's layers will not read again: the next
        query, at position `offset`, sees positions from offset - window + 1 on. Named
        blocks only, so that a prefix stays findable until the pool needs the block."""
        if self.window is None:
            return
        keep_from = (offset - self.window + 1) // self.pool.block_size  # the first block still in view
        while self.dropped < min(keep_from, self.named):
            self.pool.release(self.blocks[self.dropped])
            self.blocks[self.dropped] = -1
            self.dropped += 1

    @property
    def held(self) -> int:
        return len(self.blocks) - self.dropped

    def free(self) -> None:
        for block in self.blocks[self.dropped:]:
            self.pool.release(block)
        self.blocks, self.named, self.prefix, self.dropped = [], 0, None, 0

    def slots(self, positions: np.ndarray) -> np.ndarray:
        bs = self.pool.block_size
        return np.asarray(self.blocks, dtype=np.int64)[positions // bs] * bs + positions % bs


class PagedSequence:
    """One sequence over the pools: a block table per layer kind, and its position.

    A model whose layers all attend to everything (or all share one window) has one
    kind and one table. A hybrid one (Gemma 2 and 3: sliding-window layers between
    global ones) has a table per kind, so that the window layers' blocks go back to
    their pool as the sequence moves on while the global layers' stay.
    """

    def __init__(self, pools: Sequence[BlockPool], windows: Sequence[int | None], capacity: int) -> None:
        kinds, self.layer_kind = layer_kinds(windows)
        if len(pools) != len(kinds):
            raise ValueError(f"{len(kinds)} layer kinds need as many pools, got {len(pools)}")
        self.capacity = capacity
        self.tokens: list[int] = []   # the ids whose keys and values are stored, in order
        self.offset = 0
        self.epoch = 0                # how many times it was freed: a KVMirror's rows know whose they are
        self.tables = [BlockTable(pool, w) for pool, w in zip(pools, kinds)]
        # each layer's index in its kind's pool
        self.layer_index = [self.layer_kind[:n].count(k) for n, k in enumerate(self.layer_kind)]
        self._rings = [PagedRing(self, table, self.layer_index) for table in self.tables]
        self.layer_ring = [self._rings[k] for k in self.layer_kind]
        self._new: list[int] = []

    @property
    def block_size(self) -> int:
        return self.tables[0].pool.block_size

    @property
    def blocks(self) -> list[int]:
        """The block table of the first kind (the only one for most models)."""
        return self.tables[0].blocks

    @property
    def held(self) -> int:
        """Blocks this sequence holds, over every kind."""
        return sum(t.held for t in self.tables)

    # -- blocks -----------------------------------------------------------------
    def reuse_prefix(self, ids: Sequence[int]) -> int:
        """Take the cached full blocks `ids` starts with, in every kind; returns the tokens
        reused. At least the last token is left to prefill, since its logits are needed."""
        assert not self.offset and not any(t.blocks for t in self.tables), "only a new sequence reuses a prefix"
        bs = self.block_size
        names: list[Hashable] = []  # each full block's name: its tokens and the name before it
        for start in range(0, (len(ids) - 1) // bs * bs, bs):
            names.append((names[-1] if names else None, tuple(ids[start:start + bs])))
        found = len(names)
        for table in self.tables:
            found = min(found, table.find_prefix(names[:found]))
        for table in self.tables:
            table.keep(found, names)
        self.offset = found * bs
        self.tokens = list(ids[:self.offset])
        for table in self.tables:
            table.drop_out_of_window(self.offset)
        return self.offset

    def reserve(self, n_new: int) -> bool:
        """Blocks for n_new more tokens in every kind; False (holding what it got) if a pool ran out."""
        return all(t.reserve(self.offset + n_new) for t in self.tables)

    def blocks_needed(self, n_new: int) -> list[int]:
        """Per kind, the blocks n_new more tokens would take."""
        return [t.blocks_needed(self.offset + n_new) for t in self.tables]

    def free(self) -> None:
        for table in self.tables:
            table.free()
        self.tokens, self.offset = [], 0
        self.epoch += 1

    # -- one forward call --------------------------------------------------------
    def begin(self, tokens: Sequence[int]) -> np.ndarray:
        n = len(tokens)
        if self.offset + n > self.capacity:
            raise ModelError(f"{self.offset + n} tokens do not fit in the sequence's context of {self.capacity}")
        if any(self.blocks_needed(n)):
            raise RuntimeError("reserve() the blocks before the forward pass")
        positions = np.arange(self.offset, self.offset + n, dtype=np.int64)
        for ring in self._rings:
            ring.begin(positions)
        self._new = [int(t) for t in tokens]
        return positions

    def end(self) -> None:
        self.offset += len(self._new)
        self.tokens += self._new
        self._new = []
        for table in self.tables:
            table.name_full(self.tokens, self.offset)
            table.drop_out_of_window(self.offset)


class PagedRing:
    """A sequence's keys and values as one layer kind sees them (all of them, or its
    window), offering `attend` the reading interface of KVCache."""

    n_sink = 0
    batched = False

    def __init__(self, seq: PagedSequence, table: BlockTable, layer_index: list[int]) -> None:
        self.seq = seq
        self.table = table
        self.window = table.window
        self.layer_index = layer_index  # a layer's index in this kind's store
        self.store_cache = table.pool.store
        self.xp = self.store_cache.xp
        self.spec = self.store_cache.spec
        self.old_mask: Any = None
        self._new_slots: Any = None
        self._old_slots: Any = None
        self._after_slots: Any = None

    @property
    def widen_factor(self) -> float:
        return self.store_cache.widen_factor

    @property
    def capacity(self) -> int:
        return self.seq.capacity

    def begin(self, positions: np.ndarray) -> None:
        table, w = self.table, self.window
        first, last = int(positions[0]), int(positions[-1])
        # old tokens the chunk's first query sees; later queries see fewer (old_mask)
        low = 0 if w is None else max(0, first - w + 1)
        self._old_slots = _as_index(table.slots(np.arange(low, first, dtype=np.int64))) if first > low else None
        self.new = table.slots(positions)
        self._new_slots = _as_index(self.new)
        self.old_mask = None
        if w is not None and first > low and len(positions) > 1:
            old = np.arange(low, first)
            hidden = positions[:, None] - old[None, :] >= w
            self.old_mask = self.xp.asarray(hidden) if hidden.any() else None
        # a decode step stores first, then reads its window including itself
        after_low = 0 if w is None else max(0, last - w + 1)
        self.after = table.slots(np.arange(after_low, last + 1, dtype=np.int64))
        self._after_slots = _as_index(self.after)
        self.n_after = last + 1 - after_low

    def _gather(self, layer: int, slots: Any, values: bool) -> Any:
        return self.store_cache.read_slots(self.layer_index[layer], slots, values)

    def keys_values(self, layer: int, n: int | None = None) -> tuple[Any, Any, float]:
        if self._old_slots is None:
            empty = self.xp.empty((self.spec.num_kv_heads, 0, self.spec.head_dim), dtype=self.xp.float32)
            return empty, empty, self.widen_factor
        return (self._gather(layer, self._old_slots, False), self._gather(layer, self._old_slots, True),
                self.widen_factor)

    def store(self, layer: int, k: Any, v: Any) -> None:
        self.store_cache.write_slots(self.layer_index[layer], self._new_slots, k, v)

    def scores_buffer(self, rows: int, cols: int) -> Any:
        return self.xp.empty((self.spec.num_kv_heads, rows, cols), dtype=self.xp.float32)

    def score_keys(self, layer: int, q: Any, out: Any) -> None:
        keys = self._gather(layer, self._after_slots, False)
        self.xp.matmul(q, keys.transpose(0, 2, 1), out=out)

    def weigh_values(self, layer: int, p: Any) -> Any:
        return p @ self._gather(layer, self._after_slots, True)


def _as_index(slots: np.ndarray) -> slice | np.ndarray:
    """A run of consecutive slots as a slice (a view, no gather)."""
    return _as_slice(slots) if len(slots) else slots


class SequenceBatch:
    """The cache of one forward pass over several sequences' new tokens, concatenated.

    The model sees one ring (`ring(n)` is this batch for every layer) and runs
    its projections on all the tokens at once; `attend` asks `parts(layer)` for
    each sequence's ring and token span and attends per sequence.
    """

    n_sink = 0
    batched = True

    def __init__(self, backend: Backend, sequences: list[PagedSequence], tokens: list[Sequence[int]]) -> None:
        self.backend = backend
        self.xp = backend.xp
        self.sequences = sequences
        self.tokens = tokens
        bounds = list(itertools.accumulate([len(t) for t in tokens], initial=0))
        self.spans = list(zip(bounds[:-1], bounds[1:]))
        self.positions: np.ndarray | None = None
        self.decoding = False

    @property
    def capacity(self) -> int:
        return max(s.capacity for s in self.sequences)

    @property
    def logit_rows(self) -> Any:
        """Each sequence's last token: the rows whose logits the next tokens are drawn from."""
        return self.xp.asarray(np.asarray([e - 1 for _, e in self.spans], dtype=np.int64))

    @property
    def max_chunk(self) -> int:
        return self.capacity

    def ring(self, layer: int) -> tuple["SequenceBatch", int]:
        return self, layer

    def parts(self, layer: int) -> list[tuple[PagedRing, int, int]]:
        return [(seq.layer_ring[layer], s, e) for seq, (s, e) in zip(self.sequences, self.spans)]

    def begin(self, n_new: int) -> np.ndarray:
        assert n_new == self.spans[-1][1], "the batch's tokens are its sequences' tokens"
        self.positions = np.concatenate([seq.begin(t) for seq, t in zip(self.sequences, self.tokens)])
        # every sequence decoding one token: attention runs as one product for the whole
        # batch over a padded gather of their slots (attention._attend_decode_batch)
        self.decoding = len(self.sequences) > 1 and n_new == len(self.sequences)
        if self.decoding:
            kinds = range(len(self.sequences[0].tables))
            self._new_slots = [np.concatenate([seq._rings[k].new for seq in self.sequences]) for k in kinds]
            self._padded = [self._pad([seq._rings[k].after for seq in self.sequences]) for k in kinds]
            self._mirrors = [self._plan_mirror(k) for k in kinds]
        return self.positions

    def _plan_mirror(self, kind: int) -> KVMirror | None:
        """The kind's pool mirror if it serves this step: while every sequence's view starts
        at its first token (a window that moved on would need ring rows)."""
        mirror = self.sequences[0].tables[kind].pool.mirror
        if mirror is None:
            return None
        lengths = np.asarray([seq._rings[kind].n_after for seq in self.sequences], dtype=np.int64)
        starts = np.asarray([seq.offset + 1 for seq in self.sequences], dtype=np.int64)
        members = [(seq, seq.epoch) for seq in self.sequences]
        if not np.array_equal(lengths, starts):
            mirror.release()
            return None
        return mirror if mirror.plan(members, lengths) else None

    def _pad(self, slots: list[np.ndarray]) -> tuple[np.ndarray, Any]:
        """(B, m) slots, shorter rows padded with their own first slot, and the (B, m)
        mask of the padding (None if there is none)."""
        m = max(len(s) for s in slots)
        index = np.empty((len(slots), m), dtype=np.int64)
        hidden = np.zeros((len(slots), m), dtype=bool)
        for i, s in enumerate(slots):
            index[i, :len(s)] = s
            index[i, len(s):] = s[0]
            hidden[i, len(s):] = True
        return index, (self.xp.asarray(hidden) if hidden.any() else None)

    @property
    def widen_factor(self) -> float:
        return self.sequences[0].tables[0].pool.store.widen_factor

    def _store(self, layer: int) -> tuple[int, KVCache, int]:
        seq = self.sequences[0]
        kind = seq.layer_kind[layer]
        return kind, seq.tables[kind].pool.store, seq.layer_index[layer]

    def store_decode(self, layer: int, k: Any, v: Any) -> None:
        """Each sequence's one new key and value (kv_heads, B, d) into its slot."""
        kind, store, index = self._store(layer)
        store.write_slots(index, self._new_slots[kind], k, v)
        if self._mirrors[kind] is not None:
            self._mirrors[kind].store_decode(index, k, v, self._new_slots[kind], self._padded[kind][0])

    def decode_keys_values(self, layer: int) -> tuple[Any, Any, Any]:
        """Keys and values (kv_heads, B, m, d) each sequence's query sees at this layer
        (its window, if the layer has one), padded to the longest, and the padding's mask."""
        kind, store, index = self._store(layer)
        slots, hidden = self._padded[kind]
        if self._mirrors[kind] is not None:
            return (*self._mirrors[kind].keys_values(index), hidden)
        return store.read_slots(index, slots, False), store.read_slots(index, slots, True), hidden

    def end(self) -> None:
        for seq in self.sequences:
            seq.end()
        for mirror in self._mirrors if self.decoding else ():
            if mirror is not None:
                mirror.end()
