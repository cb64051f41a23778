"""A decode batch's keys and values kept in float32 between steps, next to the block pool.

Paged attention reads a sequence's keys and values by gathering its slots from the
pool, at every layer of every step: a decode batch of 16 sequences spent 6-9 ms of a
step on those gathers (docs/benchmarks.md, session 10; the mirror's gain, 3-10% at 16
streams, in session 14's section there). From one decode step to the next the batch's
sequences are usually the same, and each one's keys and values only grew by the token
it just fed. So the mirror keeps what the last step gathered, laid out as attention
reads it, (kv_heads, B, m, d) per layer, and appends each sequence's new key and value
in place. What attention reads is the same numbers in the same layout as a fresh gather
would give.

When the batch changes (a sequence joins, leaves or was fed a prompt chunk since), the
step gathers from the pool again, into the mirror. The pool stays the store of record:
prefix caching, preemption and the sequences that attend one by one read it. A mirror
serves a layer kind only while every sequence's view starts at its first token (for a
sliding window: until the window moves), and only within its budget of bytes; past
either, the step gathers as it would without one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from runtime.kv_cache import KVCache

Array = Any


class KVMirror:
    """Float32 keys and values of the last decode batch over one pool's store, per layer."""

    def __init__(self, store: KVCache, budget: int) -> None:
        self.store = store
        self.xp = store.xp
        self.budget = budget                 # bytes the keys and values may take together
        self.keys: Array | None = None       # (layers, kv_heads, rows, tokens, d), allocated on demand
        self.values: Array | None = None
        self.held: list[tuple[Any, int]] = []  # whose tokens the rows hold: (sequence, its epoch)
        self.lengths = np.zeros(0, dtype=np.int64)  # tokens each row holds
        self.mode: str | None = None         # this step: "append", "gather", or None (not used)
        self._step: tuple[list[tuple[Any, int]], np.ndarray] | None = None
        self._rows: Array | None = None
        self._columns: Array | None = None

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else 2 * self.keys.nbytes

    def plan(self, members: list[tuple[Any, int]], lengths: np.ndarray) -> bool:
        """Whether this decode step's attention reads the mirror. `members`: each sequence's
        identity and epoch, in batch order; `lengths`: the tokens each sees this step (its
        new one included), all from its first token on."""
        b, m = len(members), int(lengths.max())
        same = len(members) == len(self.held) and all(
            s is h and e == f for (s, e), (h, f) in zip(members, self.held))
        if same and self.keys is not None and m <= self.keys.shape[3] and np.array_equal(lengths, self.lengths + 1):
            self.mode = "append"
            self._rows = self.xp.arange(b)
            self._columns = self.xp.asarray(lengths - 1)
        elif self._room(b, m):
            self.mode = "gather"
        else:
            self.mode = None
        self.held = []  # until end(): a step that fails half-way leaves the rows for no one
        self._step = (members, lengths)
        return self.mode is not None

    def _room(self, b: int, m: int) -> bool:
        """Buffers for b rows of m tokens, grown if they are smaller: room for twice the
        tokens, or as many as the budget has (growing is a gather step and fresh pages);
        False if not even m fit."""
        if self.keys is not None and b <= self.keys.shape[2] and m <= self.keys.shape[3]:
            return True
        spec = self.store.spec
        have_b, have_m = (0, 0) if self.keys is None else self.keys.shape[2:4]
        rows = max(b, have_b)
        per_row_token = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * 4
        tokens = min(max(2 * m, have_m), self.budget // (rows * per_row_token))
        self.release()
        if tokens < m:
            return False
        shape = (spec.num_layers, spec.num_kv_heads, rows, tokens, spec.head_dim)
        # zeros, not empty: a shorter row's columns past its tokens are masked, but a value
        # there that is inf or NaN would still turn its zero weight into NaN
        self.keys = self.xp.zeros(shape, dtype=self.xp.float32)
        self.values = self.xp.zeros(shape, dtype=self.xp.float32)
        return True

    def store_decode(self, layer: int, k: Array, v: Array, new_slots: np.ndarray, slots: np.ndarray) -> None:
        """After the pool took this step's keys and values (kv_heads, B, d) at `new_slots`: the
        rows get them too (append), or the whole (B, m) `slots` from the pool (gather)."""
        keys, values = self.keys[layer], self.values[layer]
        if self.mode == "append":
            if self.store.spec.kv_dtype != "float32":  # what the pool holds, as its reads widen it
                k, v = self.store.read_slots(layer, new_slots, False), self.store.read_slots(layer, new_slots, True)
            keys[:, self._rows, self._columns] = k
            values[:, self._rows, self._columns] = v
        else:
            b, m = slots.shape
            keys[:, :b, :m] = self.store.read_slots(layer, slots, False)
            values[:, :b, :m] = self.store.read_slots(layer, slots, True)

    def keys_values(self, layer: int) -> tuple[Array, Array]:
        """This step's (kv_heads, B, m, d) keys and values of a layer, views of the mirror."""
        members, lengths = self._step
        b, m = len(members), int(lengths.max())
        return self.keys[layer][:, :b, :m], self.values[layer][:, :b, :m]

    def end(self) -> None:
        """The step is done: the rows now hold its tokens."""
        if self.mode is not None:
            self.held, self.lengths = self._step
        self.mode, self._step = None, None

    def release(self) -> None:
        """Give the buffers back (an idle engine keeps no copy of finished sequences)."""
        self.keys = self.values = None
        self.held, self.lengths = [], np.zeros(0, dtype=np.int64)
