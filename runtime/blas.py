"""Which of OpenBLAS's kernels NumPy's matrix products run on.

NumPy's wheels bundle OpenBLAS, which picks its kernels for the CPU once, when it
loads, or takes the ones OPENBLAS_CORETYPE names. On AMD's Zen 4 (family 25 with
AVX-512) it picks those written for Intel's Skylake-X, and Zen 4 runs each 512-bit
instruction as two 256-bit halves: products of a few rows by a weight matrix, a
decode batch's, run faster on OpenBLAS's Haswell (AVX2) kernels. The default
model's weight products (benchmarks/batch_rows.py, three alternating runs each):
8 rows 60-72 ms on Skylake-X's kernels against 39-51 on Haswell's, 16 rows 76-81
against 49-54; 1, 64 and 256 rows the same within the noise.

So the runtime names Haswell's kernels on that CPU, before NumPy is first imported
(the choice cannot change later), and only where nobody set OPENBLAS_CORETYPE.
"""

from __future__ import annotations

import os
import sys

ZEN4_FAMILY = "25"  # AMD's family 19h: Zen 3 (no AVX-512, where OpenBLAS already picks Haswell) and Zen 4


def preferred_coretype(cpuinfo: str) -> str | None:
    """The OpenBLAS core to name for the CPU /proc/cpuinfo describes, None for its own choice."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            break  # the first processor's block is enough
        fields.setdefault(key.strip(), value.strip())
    amd = fields.get("vendor_id") == "AuthenticAMD"
    if amd and fields.get("cpu family") == ZEN4_FAMILY and "avx512f" in fields.get("flags", "").split():
        return "Haswell"
    return None


def choose_kernels() -> str | None:
    """Set OPENBLAS_CORETYPE for this CPU if it helps and is still possible; the core set, if any."""
    if "OPENBLAS_CORETYPE" in os.environ or "numpy" in sys.modules:
        return None
    core = _preferred_here()
    if core is not None:
        os.environ["OPENBLAS_CORETYPE"] = core
    return core


def worker_environment() -> dict[str, str]:
    """OPENBLAS_CORETYPE for a process started from here (a Ray Serve replica, whose worker
    has imported NumPy before the runtime): the one set here, by the user or by
    choose_kernels, else this CPU's own."""
    core = os.environ.get("OPENBLAS_CORETYPE") or _preferred_here()
    return {"OPENBLAS_CORETYPE": core} if core else {}


def _preferred_here() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return preferred_coretype(f.read())
    except OSError:  # not Linux
        return None
