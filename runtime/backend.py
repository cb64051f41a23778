"""The backend seam: the one place that knows which array library runs the model.

Model code, attention, the KV cache and sampling get an array module `xp` from a
`Backend` and call only that; `numpy` appears elsewhere only at the host boundary
(tokens in, logits out). On `device="cpu"` the module is NumPy and compute is
float32; on `device="cuda"` it is CuPy, with float16 weights and float32
accumulation by default.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from loaders.errors import ModelError

DEVICES = ("cpu", "cuda")
WEIGHT_DTYPES = ("float32", "float16")


@dataclass
class Backend:
    """An array module plus the dtype policy and host transfer counters."""

    device: str
    xp: ModuleType
    dtype: str  # storage dtype of the weights; activations are always float32
    host_transfers: int = field(default=0)

    @property
    def weight_dtype(self) -> Any:
        return self.xp.dtype(self.dtype)

    def asarray(self, host_array: np.ndarray, dtype: Any = None) -> Any:
        """Upload a host array once (weights, position tables) in the given dtype."""
        return self.xp.asarray(host_array, dtype=dtype)

    def matrix_order(self, shape: tuple[int, int], dtype: Any) -> str:
        """The memory order ("C" or "F") to lay a weight matrix out in, shaped (out, in)
        as `linear` multiplies it (x @ w.T) whatever its order.

        A decode step multiplies one row by every matrix, which OpenBLAS runs as a
        gemv. For a float32 matrix at least as tall as it is wide (q/k/v, o,
        gate/up, the lm_head) that is faster with the matrix laid out (in, out) in
        memory, Fortran order of the same shape; a wide one (down_proj) streams
        faster as stored. The decode step measured 12-19% faster on the default
        model and the same on the 1B-shaped one (docs/benchmarks.md). CuPy's
        cuBLAS gets the checkpoint's layout.
        """
        rows, cols = shape
        tall_float32 = self.xp is np and np.dtype(dtype) == np.float32 and rows >= cols
        return "F" if tall_float32 else "C"

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> Any:
        """Allocate a persistent buffer (cache, scratch); never called per token.

        The memory is written here, not just reserved: the OS hands out untouched
        pages lazily, and a cache whose pages arrive one decode step at a time
        looks, from outside, like a process whose memory grows with the sequence.
        """
        array = self.xp.empty(shape, dtype=dtype)
        array.fill(0)
        return array

    def to_host(self, array: Any) -> np.ndarray:
        """Bring an array back to NumPy; counted, so tests can see round trips."""
        self.host_transfers += 1
        if self.xp is np:
            return array
        return self.xp.asnumpy(array)

    def to_int(self, scalar: Any) -> int:
        """Bring one device integer (a token id) to the host."""
        self.host_transfers += 1
        return int(scalar if self.xp is np else self.xp.asnumpy(scalar))

    def synchronize(self) -> None:
        if self.xp is not np:
            self.xp.cuda.get_current_stream().synchronize()


def array_module(x: Any) -> ModuleType:
    """The array module an array belongs to, without importing CuPy on the CPU.

    Arrays of any other library that names its namespace (the array API's
    `__array_namespace__`, as the tests' host-transfer-checking double does) get
    that namespace.
    """
    if type(x) is np.ndarray:  # the hot case: called by every layer's blocks
        return np
    package = type(x).__module__.split(".")[0]
    if package == "numpy":
        return np
    if package == "cupy":
        import cupy  # noqa: PLC0415
        return cupy
    namespace = getattr(x, "__array_namespace__", None)
    return namespace() if namespace is not None else np


def get_backend(device: str = "cpu", dtype: str | None = None) -> Backend:
    """The backend for a device; `dtype` is the weight dtype (default per device)."""
    if device not in DEVICES:
        raise ModelError(f"unknown device {device!r}: choose one of {', '.join(DEVICES)}")
    if dtype is None:
        dtype = "float32" if device == "cpu" else "float16"
    if dtype == "bfloat16":
        raise ModelError("bfloat16 compute is not supported: use float32 or float16 "
                         "(bfloat16 checkpoints are converted on load)")
    if dtype not in WEIGHT_DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}: choose one of {', '.join(WEIGHT_DTYPES)}")
    if device == "cpu":
        keep_freed_memory()
        return Backend("cpu", np, dtype)
    return Backend("cuda", _import_cupy(), dtype)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.cache
def keep_freed_memory() -> None:
    """Have glibc's malloc keep freed blocks (up to 32 MB each, 64 MB in all) for reuse.

    A prefill makes its activations layer by layer: 240 MB of short-lived arrays
    of 0.1-7 MB for 512 tokens of the default model. By default glibc hands most
    of them back to the OS when freed (mmap, or trimming the heap), and the next
    layer faults as much in again, zeroed by the kernel: 60,000 page faults a
    prefill, about 10% of its time here (docs/benchmarks.md). Kept, they are
    reused and a second prefill faults none in; peak memory is the same. This
    is process-wide, like setting MALLOC_MMAP_THRESHOLD_ and
    MALLOC_TRIM_THRESHOLD_, which take precedence when set.
    """
    if sys.platform != "linux" or {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} & os.environ.keys():
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    mallopt(_M_TRIM_THRESHOLD, 64 << 20)


def _import_cupy() -> ModuleType:
    try:
        import cupy  # noqa: PLC0415  (optional extra: only a CUDA run needs it)
    except ImportError:
        raise ModelError("--device cuda needs CuPy, which is not installed: "
                         "pip install '.[gpu]' (cupy-cuda12x)") from None
    except Exception as exc:  # a broken install (CUDA libraries missing) fails in other ways
        raise ModelError(f"--device cuda needs CuPy, which failed to import ({_one_line(exc)})") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CuPy raises its own CUDARuntimeError family here
        raise ModelError(f"CuPy is installed but no usable CUDA GPU was found ({_one_line(exc)})") from None
    if count < 1:
        raise ModelError("CuPy is installed but no usable CUDA GPU was found (0 devices)")
    return cupy


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
