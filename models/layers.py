"""Blocks every architecture shares: norms, rotary embeddings, activations, linears.

All functions take the array module's arrays and keep float32 activations float32:
constants are Python floats (NumPy 2 would promote over an `np.float64` scalar and
every matmul after it would convert its weights).
"""

from __future__ import annotations

import math
from typing import Any

from runtime.backend import array_module as _xp

Array = Any  # numpy.ndarray or cupy.ndarray


# Elements of a float16 weight widened at a time in a decode step on the CPU: about
# 1 MiB of float32, a scratch block that stays in cache instead of a full float32
# copy of the matrix per token.
_WIDEN_BLOCK = 256 * 1024


def linear(x: Array, weight: Array, bias: Array | None = None) -> Array:
    """x @ weight.T (+ bias), weight in the checkpoint's (out, in) layout.

    Float16 weights (the GPU policy) are multiplied in float32 so that sums
    accumulate in float32.
    """
    y = x @ weight.T if weight.dtype == x.dtype else _widening_matmul(x, weight)
    if bias is not None:
        y += bias
    return y


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
    variance = xp.mean(x * x, axis=-1, keepdims=True)
    y = x * (1.0 / xp.sqrt(variance + eps))
    return y * (weight + offset) if offset else y * weight


def layer_norm(x: Array, weight: Array, bias: Array, eps: float) -> Array:
    """LayerNorm over the last axis (GPT-2): centred, scaled, shifted."""
    xp = _xp(x)
    centred = x - xp.mean(x, axis=-1, keepdims=True)
    variance = xp.mean(centred * centred, axis=-1, keepdims=True)
    return centred * (1.0 / xp.sqrt(variance + eps)) * weight + bias


def silu(x: Array) -> Array:
    xp = _xp(x)
    return x / (1.0 + xp.exp(-x))


def gelu_tanh(x: Array) -> Array:
    """GELU, tanh approximation (HF's gelu_pytorch_tanh / gelu_new)."""
    xp = _xp(x)
    return 0.5 * x * (1.0 + xp.tanh(0.7978845608028654 * (x + 0.044715 * (x * x * x))))


class Rotary:
    """Rotary position embeddings (HF's rotate_half layout) at any absolute position.

    cos/sin are computed for the positions of each forward call rather than from a
    table, because ring-buffer positions grow without bound.
    """

    def __init__(self, xp: Any, head_dim: int, theta: float, scaling: dict | None = None,
                 rotary_dim: int | None = None) -> None:
        self.xp = xp
        self.dim = rotary_dim or head_dim
        inv_freq = 1.0 / (theta ** (xp.arange(0, self.dim, 2, dtype=xp.int64).astype(xp.float32) / self.dim))
        self.inv_freq = _scale_inv_freq(xp, inv_freq.astype(xp.float32), scaling)

    def cos_sin(self, positions: Array) -> tuple[Array, Array]:
        """cos and sin of shape (T, dim) for integer positions of shape (T,)."""
        xp = self.xp
        freqs = positions.astype(xp.float32)[:, None] * self.inv_freq[None, :]
        angles = xp.concatenate([freqs, freqs], axis=-1)
        return xp.cos(angles), xp.sin(angles)

    def apply(self, x: Array, cos: Array, sin: Array) -> Array:
        """Rotate x of shape (heads, T, head_dim) by per-position cos/sin (T, dim)."""
        xp = self.xp
        d = self.dim
        rot, rest = (x, None) if d == x.shape[-1] else (x[..., :d], x[..., d:])
        half = d // 2
        rotated = xp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
        out = rot * cos + rotated * sin
        return out if rest is None else xp.concatenate([out, rest], axis=-1)


def _scale_inv_freq(xp: Any, inv_freq: Array, scaling: dict | None) -> Array:
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        return _llama3_inv_freq(xp, inv_freq, scaling)
    raise ValueError(f"rope type {kind!r} reached the rotary block unchecked")


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
