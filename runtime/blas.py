"""Which of OpenBLAS's kernels NumPy's matrix products run on.

NumPy's wheels bundle OpenBLAS, which picks its kernels for the CPU once, when it
loads, or takes the ones OPENBLAS_CORETYPE names. On a CPU with AVX-512 it picks
those written for it (SkylakeX, SapphireRapids), whose products of a few rows by a
weight matrix, a decode batch's, are slow: OpenBLAS's Haswell (AVX2) kernels run
them faster. The default model's weight products (benchmarks/batch_rows.py,
alternating runs each):

- AMD Zen 4 (family 25 with AVX-512, which runs each 512-bit instruction as two
  256-bit halves): 8 rows 60-72 ms on Skylake-X's kernels against 39-51 on
  Haswell's, 16 rows 76-81 against 49-54; 1, 64 and 256 rows the same within the
  noise. Haswell's there, whatever the process does.
- Intel with AVX-512 (a Sapphire Rapids-class VM): 8 rows 75-89 ms against 48-50,
  16 rows 87-99 against 62-64, 1 and 64 rows the same; but 256 rows 331-361 ms
  against 424-439, and a 1,024-token prompt prefills in 1.57-1.61 s against
  1.88-1.95. Haswell's there only in a process that serves a batch (`cli.py
  serve`, a Ray replica): a single stream decodes one row at a time either way
  and prefills faster on OpenBLAS's own choice.

The choice must be made before NumPy is first imported (it cannot change later),
and only where nobody set OPENBLAS_CORETYPE.
"""

from __future__ import annotations

import os
import sys

ZEN4_FAMILY = "25"  # AMD's family 19h: Zen 3 (no AVX-512, where OpenBLAS already picks Haswell) and Zen 4

_named_here = False  # whether OPENBLAS_CORETYPE is this module's choice (which a later call may change)


def preferred_coretype(cpuinfo: str, batched: bool = False) -> str | None:
    """The OpenBLAS core to name for the CPU /proc/cpuinfo describes, None for its own
    choice; `batched`: for a process that multiplies decode batches (a server)."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            break  # the first processor's block is enough
        fields.setdefault(key.strip(), value.strip())
    if "avx512f" not in fields.get("flags", "").split():
        return None
    vendor = fields.get("vendor_id")
    if vendor == "AuthenticAMD" and fields.get("cpu family") == ZEN4_FAMILY:
        return "Haswell"
    if vendor == "GenuineIntel" and batched:
        return "Haswell"
    return None


def choose_kernels(batched: bool = False) -> str | None:
    """Set OPENBLAS_CORETYPE for this CPU if it helps and is still possible; the core set,
    if any. Called on importing `runtime`, and again by a server (batched) before it
    imports NumPy."""
    global _named_here
    if ("OPENBLAS_CORETYPE" in os.environ and not _named_here) or "numpy" in sys.modules:
        return None
    core = _preferred_here(batched)
    if core is not None:
        os.environ["OPENBLAS_CORETYPE"] = core
        _named_here = True
    return core


def worker_environment() -> dict[str, str]:
    """OPENBLAS_CORETYPE for a serving process started from here (a Ray Serve replica,
    whose worker has imported NumPy before the runtime): the one set here, by the user
    or by choose_kernels, else this CPU's own for serving."""
    core = os.environ.get("OPENBLAS_CORETYPE") or _preferred_here(batched=True)
    return {"OPENBLAS_CORETYPE": core} if core else {}


def _preferred_here(batched: bool = False) -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return preferred_coretype(f.read(), batched)
    except OSError:  # not Linux
        return None
