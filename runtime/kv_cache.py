"""The KV cache: one preallocated ring buffer of keys and values per sequence.

Layout: keys and values of every layer in one array each, shaped
(layers, kv_heads, capacity, head_dim), allocated once. A token at absolute
position p lives in slot p while p < n_sink ("attention sinks", never evicted) and
in slot n_sink + (p - n_sink) % (capacity - n_sink) after that, so once the buffer
is full each new token overwrites the oldest non-sink token. Keys are stored
rotated at their absolute positions. Models with a sliding window use the same
ring with capacity = window and no sinks, which is exactly HF's window mask.

Storage is float32, float16 or int8. int8 keeps one float16 scale per group of
`INT8_GROUP` (16) channels of each (token, head) vector, symmetric, like
llama.cpp's q8_0 with smaller blocks; keys have outlier channels, and a scale per
small group keeps them from
flattening the rest of the vector.

Each forward call goes: `begin(T)` (slots and masks of the T new tokens), for
every layer `keys_values(layer)` (what is cached, as float32) and `store(layer,
k, v)`, then `end()`. Attention reads the cache before the chunk is stored,
so a chunk never overwrites a key one of its own queries still needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from loaders.errors import ModelError
from runtime.backend import Backend

KV_DTYPES = ("float32", "float16", "int8")
# 16 measured better than 32 and than one scale per (token, head): see the README
INT8_GROUP = 16
DEFAULT_SINKS = 4
# Slots of a float16 or int8 layer a decode step widens at a time: 3 KV heads x
# 512 x 64 x 4 bytes = 384 KiB, inside a 1 MiB L2.
WIDEN_BLOCK = 512
# From this many slots on, a NumPy decode step multiplies a layer's keys and
# values one KV head and one query at a time (see KVCache._per_query); below it,
# one batched matmul costs fewer calls.
PER_QUERY_FROM = 512
# ... a head's slots at most this many at a time (1 MiB of float32: measured as
# fast as 512 KiB at 4,000 slots; longer spans would leave L2 behind).
PER_QUERY_SPAN = 4096
# int16 bits of a float16, sign-extended to int32 and shifted left by 13, keep
# the sign (bit 31) and exponent/mantissa (bits 13-27) under this mask; read as
# float32 that is the float16's value times 2**-112 (also for subnormals and 0).
_F16_SIGN_EXP_MANTISSA = -0x70002000  # 0x8FFFE000 as an int32
F16_WIDEN_FACTOR = 2.0 ** 112


@dataclass(frozen=True)
class CacheSpec:
    """The geometry of one cache; `bytes_per_token` is what it costs per position."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    capacity: int
    kv_dtype: str = "float16"
    n_sink: int = DEFAULT_SINKS

    @property
    def int8_group(self) -> int:
        return INT8_GROUP if self.head_dim % INT8_GROUP == 0 else self.head_dim

    @property
    def bytes_per_token(self) -> int:
        values = 2 * self.num_layers * self.num_kv_heads * self.head_dim
        if self.kv_dtype == "int8":
            scales = 2 * self.num_layers * self.num_kv_heads * (self.head_dim // self.int8_group)
            return values + 2 * scales
        return values * np.dtype(self.kv_dtype).itemsize

    @property
    def nbytes(self) -> int:
        return self.bytes_per_token * self.capacity


class KVCache:
    """Keys and values of one sequence for a stack of layers, in a ring buffer."""

    batched = False  # one sequence (runtime.paged_cache.SequenceBatch is the batched cache)
    logit_rows = slice(-1, None)  # the rows of a forward call whose logits are wanted: the last

    def __init__(self, backend: Backend, spec: CacheSpec) -> None:
        if spec.kv_dtype not in KV_DTYPES:
            raise ModelError(f"unknown KV-cache dtype {spec.kv_dtype!r}: choose one of {', '.join(KV_DTYPES)}")
        if spec.capacity <= spec.n_sink:
            raise ModelError(f"context of {spec.capacity} tokens is too small for {spec.n_sink} sink tokens")
        self.backend = backend
        self.xp = backend.xp
        self.spec = spec
        shape = (spec.num_layers, spec.num_kv_heads, spec.capacity, spec.head_dim)
        store_dtype = self.xp.int8 if spec.kv_dtype == "int8" else self.xp.dtype(spec.kv_dtype)
        self.k = backend.zeros(shape, store_dtype)
        self.v = backend.zeros(shape, store_dtype)
        self.k_scale = self.v_scale = None
        if spec.kv_dtype == "int8":
            scale_shape = shape[:-1] + (spec.head_dim // spec.int8_group,)
            self.k_scale = backend.zeros(scale_shape, self.xp.float16)
            self.v_scale = backend.zeros(scale_shape, self.xp.float16)
            # (groups, head_dim) 0/1, row j 1 over group j's channels: spreads
            # each scale over its group by a matmul (see _dequantize)
            self._spread = self.xp.repeat(self.xp.eye(scale_shape[-1], dtype=self.xp.float32),
                                          spec.int8_group, axis=1)
        # Attention reads float32. A float16 or int8 layer is widened into these
        # two buffers (one layer at a time, reused by every layer and step), so
        # reading the cache never allocates memory that grows with the sequence.
        self._k32 = self._v32 = None
        if spec.kv_dtype != "float32":
            self._k32 = backend.zeros(shape[1:], self.xp.float32)
            self._v32 = backend.zeros(shape[1:], self.xp.float32)
        self._scores: Any = None
        # Host-side bookkeeping: positions are known on the host, so reading them
        # never costs a device round trip.
        self.slot_pos = np.full(spec.capacity, -1, dtype=np.int64)
        self.offset = 0  # tokens seen so far = absolute position of the next token
        self._step: _Step | None = None

    # -- geometry ---------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.spec.capacity

    @property
    def n_sink(self) -> int:
        return self.spec.n_sink

    @property
    def window(self) -> int:
        """How many non-sink tokens the ring keeps."""
        return self.spec.capacity - self.spec.n_sink

    @property
    def max_chunk(self) -> int:
        """The largest number of tokens one forward call may add."""
        return self.window

    @property
    def rings(self) -> tuple["KVCache", ...]:
        return (self,)

    def ring(self, layer: int) -> tuple["KVCache", int]:
        """The ring a layer's keys live in, and the layer's index there."""
        return self, layer

    @property
    def length(self) -> int:
        """How many slots hold a token."""
        return min(self.offset, self.spec.capacity)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored keys, values and scales (what `bytes_per_token` counts)."""
        arrays = [self.k, self.v, self.k_scale, self.v_scale]
        return sum(int(a.nbytes) for a in arrays if a is not None)

    @property
    def wrapped(self) -> bool:
        """True once a token has been evicted."""
        return self.offset > self.spec.capacity

    def slot(self, positions: np.ndarray) -> np.ndarray:
        s = self.spec.n_sink
        return np.where(positions < s, positions, s + (positions - s) % self.window)

    # -- one forward call ---------------------------------------------------
    def begin(self, n_new: int) -> np.ndarray:
        """Start a forward call of n_new tokens; returns their absolute positions."""
        if n_new < 1 or n_new > self.max_chunk:
            raise ValueError(f"a forward call takes 1..{self.max_chunk} tokens, got {n_new}")
        positions = np.arange(self.offset, self.offset + n_new, dtype=np.int64)
        n_old = self.length
        old_pos = self.slot_pos[:n_old]
        # Old keys a new query must not see: evicted-in-spirit tokens that are
        # still in a slot because the chunk has not overwritten them yet.
        hidden = (old_pos[None, :] >= self.spec.n_sink) & (positions[:, None] - old_pos[None, :] >= self.window)
        mask_old = self.xp.asarray(hidden) if hidden.any() else None
        slots = self.slot(positions)
        self._step = _Step(positions, _as_slice(slots), n_old, mask_old)
        return positions

    def end(self) -> None:
        step = self._step
        self.slot_pos[step.slots] = step.positions
        self.offset += len(step.positions)
        self._step = None

    @property
    def old_mask(self) -> Any | None:
        """(T, n_old) bool, True where an old slot is outside a new query's window."""
        return self._step.mask_old

    def keys_values(self, layer: int, n: int | None = None) -> tuple[Any, Any, float]:
        """The first n slots of a layer (default: what was cached before this call)
        as float32 (kv_heads, n, d), and the factor they are scaled down by
        (`widen_factor`). A float16 or int8 layer is widened whole into a reused
        buffer: what a prefill chunk, whose many queries share it, wants."""
        n = self._step.n_old if n is None else n
        k, v = self.k[layer, :, :n], self.v[layer, :, :n]
        if self.spec.kv_dtype == "float32":
            return k, v, 1.0
        k32, v32 = self._k32[:, :n], self._v32[:, :n]
        self._widen(k, None if self.k_scale is None else self.k_scale[layer, :, :n], k32)
        self._widen(v, None if self.v_scale is None else self.v_scale[layer, :, :n], v32)
        return k32, v32, self.widen_factor

    # -- a decode step's products with the cache -------------------------------
    # One query per head multiplies every cached key and value once, so the
    # storage format is dealt with here, where it is known, piece by piece:
    # float32 is read in place; float16 and int8 are widened one head's span
    # (many slots) or WIDEN_BLOCK slots of all heads (few) at a time into one
    # small buffer that is used while it is still in L2 (widening a whole layer
    # first and reading it back halved decode speed at 4,096 tokens).

    def score_keys(self, layer: int, q: Any, out: Any) -> None:
        """out (kv_heads, G, m) = q (kv_heads, G, d) . keys of slots 0..m, the keys
        scaled down by `widen_factor`."""
        xp, m = self.xp, out.shape[-1]
        if self._per_query(m):
            for h, start, end, keys in self._head_spans(self.k, self.k_scale, layer, m):
                for g in range(q.shape[1]):
                    xp.dot(keys, q[h, g], out=out[h, g, start:end])
        elif self.spec.kv_dtype == "float32":
            xp.matmul(q, self.k[layer, :, :m].transpose(0, 2, 1), out=out)
        else:
            for start, end, keys in self._widened_blocks(self.k, self.k_scale, layer, m):
                xp.matmul(q, keys.transpose(0, 2, 1), out=out[:, :, start:end])

    def weigh_values(self, layer: int, p: Any) -> Any:
        """sum over slots t < m of p[:, :, t] (kv_heads, G, m) times value t: (kv_heads, G, d),
        the values scaled down by `widen_factor`."""
        xp, m = self.xp, p.shape[-1]
        if self._per_query(m):
            out = xp.empty(p.shape[:2] + (self.spec.head_dim,), dtype=xp.float32)
            for h, start, end, values in self._head_spans(self.v, self.v_scale, layer, m):
                for g in range(p.shape[1]):
                    if start == 0:
                        xp.dot(p[h, g, :end], values, out=out[h, g])
                    else:
                        out[h, g] += xp.dot(p[h, g, start:end], values)
            return out
        if self.spec.kv_dtype == "float32":
            return p @ self.v[layer, :, :m]
        out = None
        for start, end, values in self._widened_blocks(self.v, self.v_scale, layer, m):
            part = p[:, :, start:end] @ values
            out = part if out is None else xp.add(out, part, out=out)
        return out

    def _per_query(self, m: int) -> bool:
        # OpenBLAS runs a KV head's few query rows against m keys as a GEMM that
        # packs all m first; a gemv per query streams them as stored (or as just
        # widened, one head at a time), and the group's next queries find them in
        # L2 (512 KiB per head at 2,048 slots). Decode step time in place (median
        # of 10-12 alternating rounds, against 3-row GEMMs on 512-slot blocks of
        # all heads): float32 0.97x at 512 slots, 0.91x at 2,048, 0.97x at 4,000;
        # float16 0.94x, 0.82x, 0.80x; int8 0.90x at 2,048. At 32 slots 1.08x,
        # where the 2 x 9 calls per layer cost more than they save; a GPU wants
        # one launch, not 18.
        return self.backend.device == "cpu" and m >= PER_QUERY_FROM

    def _head_spans(self, store: Any, scales: Any | None, layer: int,
                    n: int) -> Iterator[tuple[int, int, int, Any]]:
        """The first n slots of each KV head as float32 (head, start, end, (end - start, d)),
        at most PER_QUERY_SPAN slots at a time; a widened span is valid until the next."""
        for h in range(store.shape[1]):
            for start in range(0, n, PER_QUERY_SPAN):
                end = min(n, start + PER_QUERY_SPAN)
                if self.spec.kv_dtype == "float32":
                    yield h, start, end, store[layer, h, start:end]
                    continue
                span = self._k32[0, :end - start]
                self._widen(store[layer, h, start:end], None if scales is None else scales[layer, h, start:end],
                            span)
                yield h, start, end, span

    def _widened_blocks(self, store: Any, scales: Any | None, layer: int,
                        n: int) -> Iterator[tuple[int, int, Any]]:
        """The first n slots as float32 blocks (start, end, (kv_heads, end - start, d)), each
        valid until the next is made."""
        for start in range(0, n, WIDEN_BLOCK):
            end = min(n, start + WIDEN_BLOCK)
            block = self._k32[:, :end - start]
            self._widen(store[layer, :, start:end], None if scales is None else scales[layer, :, start:end], block)
            yield start, end, block

    @property
    def widen_factor(self) -> float:
        """What the float32 that keys_values, score_keys and weigh_values read must be multiplied by.

        float16 is widened by moving its bits into float32 (exact, and 7x faster
        than NumPy's float16 cast): sign and exponent/mantissa bits shifted into
        place give the value times 2**-112, a power of two that attention folds
        into its scale instead of paying a pass to multiply it back. int8's
        float16 scales are widened the same way, so int8 shares the factor.
        """
        return 1.0 if self.spec.kv_dtype == "float32" else F16_WIDEN_FACTOR

    def _widen(self, stored: Any, scale: Any | None, out: Any) -> None:
        if self.spec.kv_dtype == "int8":
            self._dequantize(stored, scale, out=out)
        else:
            _f16_bits_widened(self.xp, stored, out)

    @property
    def n_after(self) -> int:
        """How many slots hold a token once this call's tokens are stored."""
        return min(self.offset + len(self._step.positions), self.spec.capacity)

    def scores_buffer(self, rows: int, cols: int) -> Any:
        """A float32 (kv_heads, rows, cols) array for attention scores.

        Decode steps (few rows) get a view of one buffer made on first use, so a
        step allocates nothing that grows with the context; prefill chunks,
        whose score matrices are large and short-lived, get a fresh array.
        """
        shape = (self.spec.num_kv_heads, rows, cols)
        if rows * cols > self.spec.capacity * 16:
            return self.xp.empty(shape, dtype=self.xp.float32)
        if self._scores is None:
            self._scores = self.backend.zeros((self.spec.num_kv_heads * self.spec.capacity * 16,), self.xp.float32)
        return self._scores[:shape[0] * rows * cols].reshape(shape)

    def store(self, layer: int, k: Any, v: Any) -> None:
        """Write this call's keys and values (kv_heads, T, d) into their slots."""
        self.write_slots(layer, self._step.slots, k, v)

    def write_slots(self, layer: int, slots: Any, k: Any, v: Any) -> None:
        """Keys and values (kv_heads, T, d) into `slots` (T,) of a layer, in the storage dtype
        (also the paged pool's writes: runtime.paged_cache)."""
        if self.spec.kv_dtype == "int8":
            # keys and values quantized in one go: in a decode step the dozen
            # small-array calls of a quantize cost more than its data (two took
            # 140 us a layer)
            q, scale = self._quantize(self.xp.concatenate([k, v]))
            n = k.shape[0]
            self.k[layer][:, slots], self.k_scale[layer][:, slots] = q[:n], scale[:n]
            self.v[layer][:, slots], self.v_scale[layer][:, slots] = q[n:], scale[n:]
        else:
            self.k[layer][:, slots] = k
            self.v[layer][:, slots] = v

    def read_slots(self, layer: int, slots: Any, values: bool) -> Any:
        """A layer's keys (or values) at `slots` (any index shape) as float32, scaled down by
        widen_factor like everything attention reads (the paged pool's reads)."""
        stored = _take_slots(self.xp, (self.v if values else self.k)[layer], slots)
        if self.spec.kv_dtype == "float32":
            return stored
        scales = None if self.k_scale is None else \
            _take_slots(self.xp, (self.v_scale if values else self.k_scale)[layer], slots)
        out = self.xp.empty(stored.shape, dtype=self.xp.float32)
        self._widen(stored, scales, out)
        return out

    def reset(self) -> None:
        """Forget the sequence; the buffers stay allocated."""
        self.slot_pos[:] = -1
        self.offset = 0

    def truncate(self, n_keep: int) -> None:
        """Keep only the first n_keep tokens (a chat reusing a common prefix).

        Only possible while nothing has been evicted: afterwards the prefix is gone.
        """
        if self.wrapped:
            raise ValueError("cannot truncate a cache that has wrapped around")
        n_keep = min(n_keep, self.offset)
        self.slot_pos[n_keep:] = -1
        self.offset = n_keep

    # -- int8 ---------------------------------------------------------------
    def _quantize(self, x: Any) -> tuple[Any, Any]:
        xp = self.xp
        g = self.spec.int8_group
        groups = x.reshape(x.shape[:-1] + (x.shape[-1] // g, g))
        # round the scale to its stored float16 first, so that dequantizing uses
        # exactly the scale the values were quantized with
        scale = xp.minimum(xp.abs(groups).max(axis=-1) * (1.0 / 127.0), 65504.0).astype(xp.float16)
        safe = xp.where(scale == 0, 1.0, scale.astype(xp.float32))
        q = xp.clip(xp.rint(groups / safe[..., None]), -127, 127).astype(xp.int8)
        return q.reshape(x.shape), scale

    def _dequantize(self, q: Any, scale: Any, out: Any | None = None) -> Any:
        """q * scale as float32, scaled down by `widen_factor` like float16."""
        # The values are widened, then multiplied by their scales spread over
        # the channels by a matmul with a 0/1 matrix: multiplying by a scale
        # broadcast over each group of 16 runs NumPy's inner loop 16 values at
        # a time and cost 2.4x as much (2,048 slots of a head: 70 us against
        # 29 + 25 for the spread and a plain multiply).
        xp = self.xp
        out = xp.empty(q.shape, dtype=xp.float32) if out is None else out
        xp.copyto(out, q)
        scale32 = xp.empty(scale.shape, dtype=xp.float32)
        _f16_bits_widened(xp, scale, scale32)
        out *= scale32 @ self._spread
        return out


def _f16_bits_widened(xp: Any, half: Any, out: Any) -> None:
    """out (float32) = half (float16) * 2**-112, exactly, by moving bits (see widen_factor)."""
    bits = out.view(xp.int32)
    xp.left_shift(half.view(xp.int16), 13, out=bits, dtype=xp.int32)
    xp.bitwise_and(bits, _F16_SIGN_EXP_MANTISSA, out=bits)


def _take_slots(xp: Any, array: Any, slots: Any) -> Any:
    """array[:, slots]: a view for a slice; for an index array `take`, which NumPy runs
    about twice as fast as the same fancy index (a decode batch's 16 x 128 slots of one
    layer: 90 against 190 us)"""
    if isinstance(slots, slice):
        return array[:, slots]
    return xp.take(array, xp.asarray(slots), axis=1)


def _as_slice(slots: np.ndarray) -> slice | np.ndarray:
    """A run of consecutive slots as a slice: a view write instead of a scatter."""
    if slots[-1] - slots[0] == len(slots) - 1:
        return slice(int(slots[0]), int(slots[-1]) + 1)
    return slots


@dataclass
class _Step:
    positions: np.ndarray
    slots: slice | np.ndarray
    n_old: int
    mask_old: Any | None


@dataclass(frozen=True)
class HybridSpec:
    """A model whose layers attend over different spans (Gemma's sliding-window
    and global layers): one ring per span, each sized for it, so a 512-token
    window layer never holds more than 512 tokens."""

    specs: tuple[CacheSpec, ...]
    layer_ring: tuple[int, ...]  # the ring of each layer, in layer order

    @property
    def capacity(self) -> int:
        return max(s.capacity for s in self.specs)

    @property
    def n_sink(self) -> int:
        return max(s.n_sink for s in self.specs)

    @property
    def kv_dtype(self) -> str:
        return self.specs[0].kv_dtype

    @property
    def num_layers(self) -> int:
        return len(self.layer_ring)

    @property
    def bytes_per_token(self) -> int:
        """Bytes per position while every ring still grows."""
        return sum(s.bytes_per_token for s in self.specs)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs)


class HybridCache:
    """Several rings fed the same tokens; each layer reads and writes its own.

    Offers the single ring's interface for the sequence as a whole (begin/end,
    offset, capacity, reset, truncate); `ring(layer)` routes a layer.
    """

    batched = False
    logit_rows = slice(-1, None)

    def __init__(self, backend: Backend, spec: HybridSpec) -> None:
        self.backend = backend
        self.xp = backend.xp
        self.spec = spec
        self.rings = tuple(KVCache(backend, s) for s in spec.specs)
        seen = [0] * len(self.rings)
        self._route = []
        for r in spec.layer_ring:
            self._route.append((self.rings[r], seen[r]))
            seen[r] += 1

    def ring(self, layer: int) -> tuple[KVCache, int]:
        return self._route[layer]

    @property
    def capacity(self) -> int:
        return self.spec.capacity

    @property
    def n_sink(self) -> int:
        return self.spec.n_sink

    @property
    def offset(self) -> int:
        return self.rings[0].offset

    @property
    def length(self) -> int:
        return min(self.offset, self.capacity)

    @property
    def max_chunk(self) -> int:
        return min(r.max_chunk for r in self.rings)

    @property
    def wrapped(self) -> bool:
        return any(r.wrapped for r in self.rings)

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.rings)

    def begin(self, n_new: int) -> np.ndarray:
        positions = [r.begin(n_new) for r in self.rings]
        return positions[0]

    def end(self) -> None:
        for r in self.rings:
            r.end()

    def reset(self) -> None:
        for r in self.rings:
            r.reset()

    def truncate(self, n_keep: int) -> None:
        if self.wrapped:
            raise ValueError("cannot truncate a cache that has wrapped around")
        for r in self.rings:
            r.truncate(n_keep)


def new_cache(backend: Backend, spec: CacheSpec | HybridSpec) -> KVCache | HybridCache:
    return HybridCache(backend, spec) if isinstance(spec, HybridSpec) else KVCache(backend, spec)
