"""OpenBLAS's kernels: Haswell's named on Zen 4, and on Intel's AVX-512 for a server; nothing
named elsewhere or over a user's choice.

The cpuinfo texts are the first lines of real /proc/cpuinfo blocks (flags cut to the
ones that matter); the wiring is checked in a fresh interpreter, against what
threadpoolctl reports OpenBLAS loaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO
from runtime.blas import preferred_coretype

ZEN4 = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nflags\t\t: fpu avx2 fma avx512f avx512bw\n\nprocessor\t: 1\nvendor_id\t: GenuineIntel\n"
ZEN3 = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\nflags\t\t: fpu avx2 fma\n"
ZEN5 = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\nflags\t\t: fpu avx2 fma avx512f\n"
SKYLAKE_X = "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 85\nflags\t\t: fpu avx2 fma avx512f\n"
INTEL_AVX2 = "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 158\nflags\t\t: fpu avx2 fma\n"


def test_haswell_kernels_are_named_on_zen4_and_for_a_server_on_intels_avx512() -> None:
    assert preferred_coretype(ZEN4) == preferred_coretype(ZEN4, batched=True) == "Haswell"
    assert preferred_coretype(SKYLAKE_X, batched=True) == "Haswell"
    # Intel's AVX-512 kernels prefill faster for a single stream; OpenBLAS already picks
    # Haswell's on Zen 3 and AVX2-only Intel; Zen 5 is not measured
    assert preferred_coretype(SKYLAKE_X) is None
    for batched in (False, True):
        assert [preferred_coretype(t, batched) for t in (ZEN3, ZEN5, INTEL_AVX2, "")] == [None] * 4


def _loaded_core(env: dict[str, str], before_numpy: str = "") -> tuple[str | None, str | None]:
    """OPENBLAS_CORETYPE and the kernels OpenBLAS loaded, in a fresh interpreter that imports
    the runtime, runs `before_numpy`, then NumPy."""
    code = ("import os, json, runtime, threadpoolctl\n" + before_numpy + "import numpy\n"
            "print(json.dumps([os.environ.get('OPENBLAS_CORETYPE'), "
            "next((i.get('architecture') for i in threadpoolctl.threadpool_info() "
            "if i['internal_api'] == 'openblas'), None)]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return tuple(json.loads(out.stdout))


def test_importing_runtime_first_loads_the_kernels_chosen() -> None:
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    cpuinfo = Path("/proc/cpuinfo")
    chosen = preferred_coretype(cpuinfo.read_text(encoding="utf-8")) if cpuinfo.exists() else None
    named, loaded = _loaded_core(env)
    assert named == chosen
    if chosen is not None:
        assert loaded == chosen


def test_a_server_names_its_kernels_after_importing_runtime() -> None:
    """cli.py's serve asks again, batched, after `import runtime` made the single-stream
    choice and before anything imports NumPy: the second choice is the one loaded."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    named, loaded = _loaded_core(env, (
        "import sys, cli\n"
        "assert 'numpy' not in sys.modules, 'importing cli loaded NumPy'\n"
        "runtime.blas._preferred_here = lambda batched=False: 'Sandybridge' if batched else 'Haswell'\n"
        "runtime.blas.choose_kernels(batched=True)\n"))
    assert named == loaded == "Sandybridge"


def test_a_users_coretype_is_kept() -> None:
    env = {**os.environ, "OPENBLAS_CORETYPE": "Sandybridge"}
    named, loaded = _loaded_core(env)
    assert named == "Sandybridge" and loaded in ("Sandybridge", None)  # None: NumPy on another BLAS


def test_a_ray_replica_is_handed_the_choice(monkeypatch) -> None:
    """The replicas' workers import NumPy before the runtime, so the deployment passes them the
    core: the one set here, else this CPU's."""
    from runtime import blas

    monkeypatch.setenv("OPENBLAS_CORETYPE", "Sandybridge")
    assert blas.worker_environment() == {"OPENBLAS_CORETYPE": "Sandybridge"}
    monkeypatch.delenv("OPENBLAS_CORETYPE")
    monkeypatch.setattr(blas, "_preferred_here", lambda batched=False: "Haswell" if batched else None)
    assert blas.worker_environment() == {"OPENBLAS_CORETYPE": "Haswell"}  # a replica serves
    monkeypatch.setattr(blas, "_preferred_here", lambda batched=False: None)
    assert blas.worker_environment() == {}
