"""Blocks every architecture shares: norms, rotary embeddings, activations, linears.

All functions take the array module's arrays and keep float32 activations float32:
constants are Python floats (NumPy 2 would promote over an `np.float64` scalar and
every matmul after it would convert its weights).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np

from runtime.backend import array_module as _xp

Array = Any  # numpy.ndarray or cupy.ndarray


# Elements of a float16 weight widened at a time in a decode step on the CPU: about
# 1 MiB of float32, a scratch block that stays in cache instead of a full float32
# copy of the matrix per token.
_WIDEN_BLOCK = 256 * 1024


def linear(x: Array, weight: Array, bias: Array | None = None) -> Array:
    """x @ weight.T (+ bias), weight shaped (out, in) as in the checkpoint (in either
    memory order: see Backend.matrix_order).

    Float16 weights (the GPU policy) are multiplied in float32 so that sums
    accumulate in float32.
    """
    if weight.dtype != x.dtype:
        y = _widening_matmul(x, weight)
    elif 1 < x.shape[0] <= PAD_ROWS_UP_TO and x.shape[0] % 8 and _xp(x).__name__ == "numpy":
        y = _padded_matmul(x, weight)
    else:
        # a decode batch too: x @ w.T measured faster than (w @ x.T).T for the layer
        # matrices in the engine (8 rows: 57.7 against 65.4 ms a step), whose
        # tall weights are laid out (in, out) (Backend.matrix_order)
        y = x @ weight.T
    if bias is not None:
        y += bias
    return y


# OpenBLAS multiplies a few rows fastest in multiples of 8: the default model's weights
# (30 layers and the lm_head) took 36.9 ms at 8 rows, 41-42 at 2-4, 52-63 at 5-7,
# 54-84 at 10-15 and 48-54 at 16 (benchmarks/batch_rows.py); a decode batch of 2-31
# rows is padded with zero rows up to the next multiple.
PAD_ROWS_UP_TO = 32


def _padded_matmul(x: Array, weight: Array) -> Array:
    rows = x.shape[0]
    padded = _xp(x).zeros((-(-rows // 8) * 8, x.shape[1]), dtype=x.dtype)
    padded[:rows] = x
    return (padded @ weight.T)[:rows]


def _widening_matmul(x: Array, weight: Array) -> Array:
    """x @ weight.T in x's dtype (float32) for a weight stored narrower (float16).

    NumPy has no float16 BLAS and no mixed-precision matmul, so the weight is
    widened. A NumPy decode step (one row) widens it one block of rows at a time
    into a small scratch buffer and multiplies each block into its columns of the
    output (`out=`): no full-size float32 copy of the matrix is allocated per
    token, and the step takes about half the time. CuPy, and a chunk of several
    rows (where many small products cost more than one widening), widen the whole
    matrix at once.
    """
    xp = _xp(x)
    rows, width = weight.shape
    if xp.__name__ != "numpy" or x.ndim != 2 or x.shape[0] != 1 or rows * width <= _WIDEN_BLOCK:
        return x @ weight.astype(x.dtype).T
    out = xp.empty((1, rows), dtype=x.dtype)
    step = max(1, _WIDEN_BLOCK // width)
    scratch = xp.empty((step, width), dtype=x.dtype)
    for start in range(0, rows, step):
        block = scratch[:min(step, rows - start)]
        xp.copyto(block, weight[start:start + step])
        xp.matmul(x, block.T, out=out[:, start:start + step])
    return out


def rms_norm(x: Array, weight: Array, eps: float, offset: float = 0.0) -> Array:
    """RMSNorm in float32; `offset=1.0` gives Gemma's (1 + weight) form."""
    xp = _xp(x)
    if xp is np and x.shape == (1, x.size):
        # A decode step's one row on the CPU: one BLAS dot and Python floats
        # instead of six small array passes (61 norms a step took 2.2 ms of a
        # 28 ms step, 1.0 ms this way). Not on a GPU, where float() would wait
        # for the device.
        inv_rms = 1.0 / math.sqrt(float(xp.dot(x[0], x[0])) / x.shape[-1] + eps)
        y = x * ((weight + offset) if offset else weight)
        y *= inv_rms
        return y
    # a sum then a scale: np.mean's Python wrapper costs more than the math here
    variance = (x * x).sum(axis=-1, keepdims=True)
    variance *= 1.0 / x.shape[-1]
    variance += eps
    y = x * (1.0 / xp.sqrt(variance))
    y *= (weight + offset) if offset else weight
    return y


def layer_norm(x: Array, weight: Array, bias: Array, eps: float) -> Array:
    """LayerNorm over the last axis (GPT-2): centred, scaled, shifted."""
    xp = _xp(x)
    centred = x - xp.mean(x, axis=-1, keepdims=True)
    variance = xp.mean(centred * centred, axis=-1, keepdims=True)
    return centred * (1.0 / xp.sqrt(variance + eps)) * weight + bias


def silu(x: Array) -> Array:
    xp = _xp(x)
    t = xp.negative(x)
    xp.exp(t, out=t)
    t += 1.0
    return xp.divide(x, t, out=t)


def gelu_tanh(x: Array) -> Array:
    """GELU, tanh approximation (HF's gelu_pytorch_tanh / gelu_new)."""
    xp = _xp(x)
    return 0.5 * x * (1.0 + xp.tanh(0.7978845608028654 * (x + 0.044715 * (x * x * x))))


class Rotary:
    """Rotary position embeddings (HF's rotate_half layout) at any absolute position.

    cos/sin are computed for the positions of each forward call rather than from a
    table, because ring-buffer positions grow without bound.

    LongRoPE (Phi-3) has two sets of frequencies: `inv_freq` from the short factors
    and `long_inv_freq` from the long ones, and scales cos and sin by its
    attention factor.
    """

    def __init__(self, xp: Any, head_dim: int, theta: float, scaling: dict | None = None,
                 rotary_dim: int | None = None) -> None:
        self.xp = xp
        self.dim = rotary_dim or head_dim
        exponents = xp.arange(0, self.dim, 2, dtype=xp.int64).astype(xp.float32) / self.dim
        # the float32 power correctly rounded, as torch computes it: NumPy's float32 pow is
        # 1 ulp off for some bases (50,000: 2 of 8 frequencies), which HF parity notices
        powers = (theta ** exponents.astype(xp.float64)).astype(xp.float32)
        self.inv_freq = _scale_inv_freq(xp, (1.0 / powers).astype(xp.float32), scaling)
        self.long_inv_freq: Array | None = None
        self.original_max = 0
        self.attention_factor = 1.0
        if _rope_kind(scaling) in LONGROPE:
            self.inv_freq, self.long_inv_freq = (_longrope_inv_freq(xp, powers, scaling[key])
                                                 for key in ("short_factor", "long_factor"))
            self.original_max = int(scaling["original_max_position_embeddings"])
            # the config loader fills in HF's default when config.json has none
            self.attention_factor = float(scaling.get("attention_factor") or 1.0)

    def cos_sin(self, positions: Array) -> tuple[Array, Array]:
        """cos and sin of shape (T, dim) for integer positions of shape (T,)."""
        xp = self.xp
        freqs = positions.astype(xp.float32)[:, None] * self._call_inv_freq(positions)[None, :]
        angles = xp.concatenate([freqs, freqs], axis=-1)
        if self.attention_factor == 1.0:
            return xp.cos(angles), xp.sin(angles)
        return xp.cos(angles) * self.attention_factor, xp.sin(angles) * self.attention_factor

    def _call_inv_freq(self, positions: Array) -> Array:
        # LongRoPE as HF's rotary forward picks it: one set for the whole call, the
        # long one once the call's largest position reaches original_max_position_embeddings.
        # Chosen on the device, so that no position is read back.
        if self.long_inv_freq is None:
            return self.inv_freq
        return self.xp.where(positions.max() >= self.original_max, self.long_inv_freq, self.inv_freq)

    def fixed(self, long: bool) -> "Rotary":
        """This rotary with LongRoPE's long (or short) frequencies at every position."""
        out = copy.copy(self)
        out.inv_freq = self.long_inv_freq if long and self.long_inv_freq is not None else self.inv_freq
        out.long_inv_freq = None
        return out

    def matrix(self, cos: Array, sin: Array, head_dim: int) -> Array:
        """R (head_dim, head_dim) with x @ R == apply(x, cos, sin) for one position's cos/sin (dim,).

        rotate_half pairs dimension i with i + dim/2: out[i] = x[i] cos[i] - x[i+h] sin[i]
        and out[i+h] = x[i+h] cos[i+h] + x[i] sin[i+h]; dimensions past `dim` pass through.
        """
        xp = self.xp
        d, h = self.dim, self.dim // 2
        r = xp.eye(head_dim, dtype=xp.float32)
        idx = xp.arange(h)
        r[xp.arange(d), xp.arange(d)] = cos
        r[idx + h, idx] = -sin[:h]
        r[idx, idx + h] = sin[h:]
        return r

    def apply(self, x: Array, cos: Array, sin: Array) -> Array:
        """Rotate x of shape (heads, T, head_dim) by per-position cos/sin (T, dim)."""
        xp = self.xp
        d = self.dim
        rot, rest = (x, None) if d == x.shape[-1] else (x[..., :d], x[..., d:])
        half = d // 2
        rotated = xp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
        out = rot * cos + rotated * sin
        return out if rest is None else xp.concatenate([out, rest], axis=-1)


LONGROPE = ("longrope", "su")  # "su": the name Phi-3's first releases gave it


def _rope_kind(scaling: dict | None) -> str:
    return scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"


def _scale_inv_freq(xp: Any, inv_freq: Array, scaling: dict | None) -> Array:
    kind = _rope_kind(scaling)
    if kind in ("default", *LONGROPE):  # LongRoPE's frequencies are made from the powers instead
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        return _llama3_inv_freq(xp, inv_freq, scaling)
    raise ValueError(f"rope type {kind!r} reached the rotary block unchecked")


def _longrope_inv_freq(xp: Any, powers: Array, factors: list[float]) -> Array:
    # 1 / (factor * theta^(2i/d)), in HF's order of operations (float32 throughout)
    return (1.0 / (xp.asarray(factors, dtype=xp.float32) * powers)).astype(xp.float32)


def _llama3_inv_freq(xp: Any, inv_freq: Array, s: dict) -> Array:
    # Llama 3.1's frequency-dependent scaling: long wavelengths are divided by
    # `factor`, short ones kept, and the band between them interpolated.
    factor = float(s["factor"])
    low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_ctx = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2.0 * math.pi / inv_freq
    scaled = xp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1.0 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return xp.where(is_medium, smoothed, scaled).astype(xp.float32)
