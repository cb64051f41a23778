"""The paged KV cache: many sequences' keys and values in one pool of fixed-size blocks.

vLLM's PagedAttention layout on the CPU: one preallocated store of
`num_blocks x block_size` slots for every layer (a KVCache without sinks, so its
float32 / float16 / int8 storage, quantization and widening are the ring's own
code), handed out a block at a time. A sequence keeps a block table: position p
lives in slot `table[p // block_size] * block_size + p % block_size`. Nothing is
fragmented and nothing is copied when a sequence grows; a finished sequence gives
its blocks back.

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
    """The blocks, who holds them, and the named (prefix-cached) ones."""

    def __init__(self, backend: Backend, spec: PoolSpec) -> None:
        if spec.num_blocks < 1 or spec.block_size < 1:
            raise ModelError(f"a block pool needs at least one block of at least one slot, got {spec}")
        self.backend = backend
        self.xp = backend.xp
        self.spec = spec
        self.block_size = spec.block_size
        self.store = KVCache(backend, spec.store_spec)
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


class PagedSequence:
    """One sequence's block table over the pool, and its position."""

    def __init__(self, pool: BlockPool, windows: Sequence[int | None], capacity: int) -> None:
        self.pool = pool
        self.capacity = capacity
        self.blocks: list[int] = []
        self.tokens: list[int] = []   # the ids whose keys and values are stored, in order
        self.offset = 0
        self._named = 0               # leading full blocks whose prefix has a name
        self._prefix: Hashable = None  # the name of the prefix up to them
        # a model whose every layer has a window never looks further back than the
        # widest: blocks older than that go back to the pool as the sequence grows
        self.horizon = max(windows) if all(w is not None for w in windows) else None
        self._dropped = 0             # leading blocks given back (their table entries are -1)
        kinds = list(dict.fromkeys(windows))
        self._rings = [PagedRing(self, w) for w in kinds]
        self.layer_kind = [kinds.index(w) for w in windows]
        self.layer_ring = [self._rings[k] for k in self.layer_kind]
        self._new: list[int] = []

    # -- blocks -----------------------------------------------------------------
    def reuse_prefix(self, ids: Sequence[int]) -> int:
        """Take the cached full blocks `ids` starts with; returns the tokens reused.

        At least the last token is left to prefill, since its logits are needed.
        """
        assert not self.blocks, "a prefix is reused only by a new sequence"
        bs = self.pool.block_size
        name: Hashable = None
        for start in range(0, len(ids) - 1 - bs + 1, bs):
            name = (name, tuple(ids[start:start + bs]))
            block = self.pool.find(name)
            if block is None:
                break
            self.blocks.append(block)
        self._named = len(self.blocks)
        self._prefix = name if self.blocks else None
        self.offset = len(self.blocks) * bs
        self.tokens = list(ids[:self.offset])
        return self.offset

    def reserve(self, n_new: int) -> bool:
        """Blocks for n_new more tokens; False (holding what it got) if the pool ran out."""
        need = -(-(self.offset + n_new) // self.pool.block_size) - len(self.blocks)
        for _ in range(need):
            block = self.pool.allocate()
            if block is None:
                return False
            self.blocks.append(block)
        return True

    def blocks_needed(self, n_new: int) -> int:
        return max(0, -(-(self.offset + n_new) // self.pool.block_size) - len(self.blocks))

    def free(self) -> None:
        for block in self.blocks[self._dropped:]:
            self.pool.release(block)
        self.blocks, self.tokens, self.offset, self._named, self._prefix = [], [], 0, 0, None
        self._dropped = 0

    def _drop_out_of_window(self) -> None:
        """Give back the leading blocks no layer will read again: the next query, at
        position `offset`, sees positions from offset - horizon + 1 on."""
        if self.horizon is None:
            return
        bs = self.pool.block_size
        keep_from = (self.offset - self.horizon + 1) // bs  # the first block still in view
        while self._dropped < min(keep_from, self._named):  # named first: a prefix stays findable
            self.pool.release(self.blocks[self._dropped])
            self.blocks[self._dropped] = -1
            self._dropped += 1

    def slots(self, positions: np.ndarray) -> np.ndarray:
        bs = self.pool.block_size
        return np.asarray(self.blocks, dtype=np.int64)[positions // bs] * bs + positions % bs

    # -- one forward call --------------------------------------------------------
    def begin(self, tokens: Sequence[int]) -> np.ndarray:
        n = len(tokens)
        if self.offset + n > self.capacity:
            raise ModelError(f"{self.offset + n} tokens do not fit in the sequence's context of {self.capacity}")
        if self.blocks_needed(n):
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
        # name the blocks that just became full: a later prompt with this prefix reuses them
        bs = self.pool.block_size
        while self._named < self.offset // bs:
            i = self._named
            self._prefix = (self._prefix, tuple(self.tokens[i * bs:(i + 1) * bs]))
            self.pool.name(self.blocks[i], self._prefix)  # kept by another block if it has it already
            self._named += 1
        self._drop_out_of_window()


class PagedRing:
    """A sequence's keys and values as one ring kind (full or one window) sees them,
    offering `attend` the reading interface of KVCache."""

    n_sink = 0
    batched = False

    def __init__(self, seq: PagedSequence, window: int | None) -> None:
        self.seq = seq
        self.window = window
        self.store_cache = seq.pool.store
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
        seq, w = self.seq, self.window
        first, last = int(positions[0]), int(positions[-1])
        # old tokens the chunk's first query sees; later queries see fewer (old_mask)
        low = 0 if w is None else max(0, first - w + 1)
        self._old_slots = _as_index(seq.slots(np.arange(low, first, dtype=np.int64))) if first > low else None
        self._new_slots = _as_index(seq.slots(positions))
        self.old_mask = None
        if w is not None and first > low and len(positions) > 1:
            old = np.arange(low, first)
            hidden = positions[:, None] - old[None, :] >= w
            self.old_mask = self.xp.asarray(hidden) if hidden.any() else None
        # a decode step stores first, then reads its window including itself
        after_low = 0 if w is None else max(0, last - w + 1)
        self.after = seq.slots(np.arange(after_low, last + 1, dtype=np.int64))
        self._after_slots = _as_index(self.after)
        self.n_after = last + 1 - after_low

    def _gather(self, layer: int, slots: Any, values: bool) -> Any:
        return self.store_cache.read_slots(layer, slots, values)

    def keys_values(self, layer: int, n: int | None = None) -> tuple[Any, Any, float]:
        if self._old_slots is None:
            empty = self.xp.empty((self.spec.num_kv_heads, 0, self.spec.head_dim), dtype=self.xp.float32)
            return empty, empty, self.widen_factor
        return (self._gather(layer, self._old_slots, False), self._gather(layer, self._old_slots, True),
                self.widen_factor)

    def store(self, layer: int, k: Any, v: Any) -> None:
        self.store_cache.write_slots(layer, self._new_slots, k, v)

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
            self._new_slots = np.concatenate([seq.slots(seq_pos) for seq, seq_pos in
                                              zip(self.sequences, self.positions[:, None])])
            self._padded = [self._pad([seq._rings[kind].after for seq in self.sequences])
                            for kind in range(len(self.sequences[0]._rings))]
        return self.positions

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
        return self.sequences[0].pool.store.widen_factor

    def store_decode(self, layer: int, k: Any, v: Any) -> None:
        """Each sequence's one new key and value (kv_heads, B, d) into its slot."""
        self.sequences[0].pool.store.write_slots(layer, self._new_slots, k, v)

    def decode_keys_values(self, layer: int) -> tuple[Any, Any, Any]:
        """Keys and values (kv_heads, B, m, d) each sequence's query sees at this layer
        (its window, if the layer has one), padded to the longest, and the padding's mask."""
        index, hidden = self._padded[self.sequences[0].layer_kind[layer]]
        store = self.sequences[0].pool.store
        return store.read_slots(layer, index, False), store.read_slots(layer, index, True), hidden

    def end(self) -> None:
        for seq in self.sequences:
            seq.end()
