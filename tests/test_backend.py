"""One model code for CPU and GPU: the backend seam and the CuPy path, verified without a GPU.

- Every `xp.<name>` the model, cache, attention and sampling code uses exists in CuPy,
  and every call binds to CuPy's signature (checked against the installed `cupy`
  module, which imports without a GPU).
- NumPy (`np.`) appears in the compute path only at the host-side uses listed here.
- A decode runs through a stand-in "device" module (NumPy underneath) whose arrays
  refuse every implicit trip to the host: only Backend.to_host / to_int bring data
  back, once per generated token and never during the prefill.
- The GPU dtype policy (float16 weights and cache, float32 activations) runs on the
  CPU and stays close to float32 on the default model.
- `--device cuda` without CuPy, or without a usable GPU, ends in one line, exit 2.
"""

from __future__ import annotations

import ast
import inspect
import json
import operator
import re
import subprocess
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from conftest import REPO, needs_default_model

# -- static checks over the source --------------------------------------------------
SOURCES = sorted([*REPO.glob("runtime/*.py"), *REPO.glob("models/*.py")])
# The compute path: what runs per token. `np.` here must be host-side bookkeeping.
COMPUTE_PATH = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "models").glob("*.py")) + [
    "runtime/attention.py", "runtime/kv_cache.py", "runtime/sampling.py", "runtime/generate.py",
    "runtime/backend.py", "runtime/paged_cache.py", "runtime/kv_mirror.py", "runtime/engine.py"]
# Every `np.` use allowed there, as (file, enclosing function, name): all act on host
# data (token ids, positions, slot bookkeeping, checkpoint arrays before upload).
ALLOWED_NUMPY = {
    ("runtime/kv_cache.py", "CacheSpec.bytes_per_token", "np.dtype"),  # byte accounting
    ("runtime/kv_cache.py", "KVCache.__init__", "np.full"),  # slot -> position table
    ("runtime/kv_cache.py", "KVCache.__init__", "np.int64"),
    ("runtime/kv_cache.py", "KVCache.slot", "np.where"),  # positions -> slots
    ("runtime/kv_cache.py", "KVCache.begin", "np.arange"),  # positions of the new tokens
    ("runtime/kv_cache.py", "KVCache.begin", "np.int64"),
    ("runtime/sampling.py", "Sampler.__init__", "np.random.default_rng"),  # seeded draws on the host
    ("runtime/sampling.py", "apply_repeat_penalty", "np.unique"),  # recent token ids
    ("runtime/sampling.py", "apply_repeat_penalty", "np.asarray"),
    ("runtime/sampling.py", "apply_repeat_penalty", "np.int64"),
    # DRY: matches found over the recent token ids on the host; the penalties go up with xp
    *[("runtime/sampling.py", "dry_penalties", name) for name in (
        "np.asarray", "np.int64", "np.nonzero", "np.ones")],
    ("runtime/sampling.py", "Sampler.__call__", "np.fromiter"),  # the penalized ids and amounts
    ("runtime/sampling.py", "Sampler.__call__", "np.int64"),
    ("runtime/sampling.py", "Sampler.__call__", "np.float32"),
    ("runtime/generate.py", "prefill", "np.asarray"),  # prompt token ids
    ("runtime/generate.py", "prefill", "np.int64"),
    # log-probabilities of a row already brought to the host (only when asked for)
    ("runtime/generate.py", "token_logprobs", "np.argpartition"),
    ("runtime/generate.py", "token_logprobs", "np.argsort"),
    ("runtime/generate.py", "token_logprobs", "np.exp"),
    ("runtime/generate.py", "token_logprobs", "np.float64"),
    ("runtime/engine.py", "Engine.step", "np.asarray"),  # the batch's token ids
    ("runtime/engine.py", "Engine.step", "np.concatenate"),
    ("runtime/engine.py", "Engine.step", "np.int64"),
    # the paged cache's bookkeeping: reference counts, positions, block tables, slot indices
    ("runtime/paged_cache.py", "BlockPool.__init__", "np.int64"),
    ("runtime/paged_cache.py", "BlockPool.__init__", "np.zeros"),
    ("runtime/paged_cache.py", "PagedRing.begin", "np.arange"),
    ("runtime/paged_cache.py", "PagedRing.begin", "np.int64"),
    ("runtime/paged_cache.py", "PagedSequence.begin", "np.arange"),
    ("runtime/paged_cache.py", "PagedSequence.begin", "np.int64"),
    ("runtime/paged_cache.py", "BlockTable.slots", "np.asarray"),
    ("runtime/paged_cache.py", "BlockTable.slots", "np.int64"),
    ("runtime/paged_cache.py", "SequenceBatch._pad", "np.empty"),
    ("runtime/paged_cache.py", "SequenceBatch._pad", "np.int64"),
    ("runtime/paged_cache.py", "SequenceBatch._pad", "np.zeros"),
    ("runtime/paged_cache.py", "SequenceBatch.begin", "np.concatenate"),
    ("runtime/paged_cache.py", "SequenceBatch.logit_rows", "np.asarray"),
    ("runtime/paged_cache.py", "SequenceBatch.logit_rows", "np.int64"),
    # the mirror's plan: which sequences, how many tokens each (host lists), before any array moves
    *[("runtime/paged_cache.py", "SequenceBatch._plan_mirror", name) for name in (
        "np.array_equal", "np.asarray", "np.int64")],
    *[("runtime/kv_mirror.py", f, name) for f, name in (
        ("KVMirror.__init__", "np.zeros"), ("KVMirror.__init__", "np.int64"),
        ("KVMirror.plan", "np.array_equal"), ("KVMirror.release", "np.zeros"), ("KVMirror.release", "np.int64"))],
    ("models/llama.py", "Llama._sink_rope", "np.minimum"),  # positions
    ("runtime/backend.py", "Backend.matrix_order", "np.dtype"),  # a layout decision for host arrays
    ("runtime/backend.py", "Backend.matrix_order", "np.float32"),
    ("models/llama.py", "WeightReader.matrix", "np.empty"),  # the host array checkpoint matrices are read into
    ("runtime/backend.py", "array_module", "np.ndarray"),  # a type check
    ("models/llama.py", "WeightReader.__call__", "np.concatenate"),  # fusing checkpoint arrays
}
# Array methods that read a device array on the host (CuPy: a hidden synchronizing copy);
# `.get()` only without arguments (dict.get takes a key).
HOST_READ_METHODS = {"item", "tolist", "tobytes", "asnumpy"}


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def _chain(node: ast.AST) -> list[str] | None:
    """['self', 'xp', 'cuda', 'runtime'] for self.xp.cuda.runtime; None unless rooted at a name."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(names)]


class _Visitor(ast.NodeVisitor):
    """Attribute chains with their enclosing function, skipping annotations (never executed)."""

    def __init__(self) -> None:
        self.scope: list[str] = []
        self.chains: list[tuple[str, int, list[str], ast.Call | None]] = []
        self.method_calls: list[tuple[str, int, str, int]] = []

    def _scoped(self, node: Any) -> None:
        self.scope.append(node.name)
        for child in [*node.decorator_list, *getattr(node, "bases", [])]:
            self.visit(child)
        if not isinstance(node, ast.ClassDef):
            args = node.args
            for default in [*args.defaults, *args.kw_defaults]:
                if default is not None:
                    self.visit(default)
        for stmt in node.body:
            self.visit(stmt)
        self.scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scoped

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)

    def visit_Call(self, node: ast.Call) -> None:
        if isinstance(node.func, ast.Attribute):
            self.method_calls.append((".".join(self.scope), node.lineno, node.func.attr, len(node.args)))
            chain = _chain(node.func)
            if chain:
                self.chains.append((".".join(self.scope), node.lineno, chain, node))
                for child in [*node.args, *node.keywords]:
                    self.visit(child)
                return
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        chain = _chain(node)
        if chain:
            self.chains.append((".".join(self.scope), node.lineno, chain, None))
            return
        self.generic_visit(node)


def _parse(path: Path) -> _Visitor:
    visitor = _Visitor()
    visitor.visit(ast.parse(path.read_text(), str(path)))
    return visitor


def xp_uses() -> list[tuple[str, int, tuple[str, ...], ast.Call | None]]:
    """(file, line, CuPy path, call) for every `xp.a.b` (xp, self.xp, cache.xp, ...) in the sources."""
    uses = []
    for path in SOURCES:
        for _scope, line, chain, call in _parse(path).chains:
            if "xp" in chain[:-1]:
                uses.append((_rel(path), line, tuple(chain[chain.index("xp") + 1:]), call))
    return uses


def _cupy():
    return pytest.importorskip("cupy", reason="cupy-cuda12x (the test extra) is not installed")


def _resolve(module: Any, path: tuple[str, ...] | str) -> Any:
    obj = module
    for name in (path.split(".") if isinstance(path, str) else path):
        obj = getattr(obj, name)
    return obj


def _docstring_signature(obj: Any) -> inspect.Signature | None:
    """CuPy's Cython functions carry their signature only as a docstring's first line."""
    lines = (getattr(obj, "__doc__", None) or "").strip().splitlines()
    match = re.match(r"[\w.]+\((.*)\)", lines[0]) if lines else None
    if not match:
        return None
    params = []
    for param in filter(None, (p.strip() for p in match.group(1).split(","))):
        name, eq, default = param.partition("=")
        params.append(name.split()[-1] + eq + default)  # drop Cython types: `int device_id=-1`
    namespace: dict[str, Any] = {}
    try:
        exec(f"def f({', '.join(params)}): pass", namespace)  # noqa: S102  (CuPy's own docstring)
    except SyntaxError:
        return None
    return inspect.signature(namespace["f"])


UFUNC_KWARGS = {"out", "dtype", "casting"}
GUFUNC_KWARGS = {"out", "axes", "axis", "order", "dtype", "keepdims", "signature", "casting"}


def cupy_call_problem(func: Any, n_args: int, kwargs: set[str], method: bool = False) -> str | None:
    """Why CuPy's `func` would refuse n_args positionals and these keywords (None if it accepts)."""
    cupy = _cupy()
    if isinstance(func, type):  # dtypes: cupy.float32, cupy.dtype
        return None
    if isinstance(func, cupy.ufunc):
        if n_args not in (func.nin, func.nin + func.nout) or kwargs - UFUNC_KWARGS:
            return f"ufunc takes {func.nin} (+{func.nout}) arguments and only {sorted(UFUNC_KWARGS)}"
        return None
    if type(func).__name__ == "_GUFunc":
        return None if not kwargs - GUFUNC_KWARGS else f"gufunc takes only {sorted(GUFUNC_KWARGS)}"
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        signature = _docstring_signature(func)
        method = method and signature is not None and "self" in signature.parameters
    if signature is None:
        return "no signature to check against"
    try:
        signature.bind(*([None] * (n_args + method)), **dict.fromkeys(kwargs))
    except TypeError as exc:
        return f"{signature}: {exc}"
    return None


def test_every_xp_name_exists_in_cupy():
    cupy = _cupy()
    uses = xp_uses()
    names = {path for _f, _l, path, _c in uses}
    assert {("matmul",), ("copyto",), ("searchsorted",), ("argsort",), ("asnumpy",)} <= names  # the scan works
    missing = []
    for file, line, path, _call in uses:
        try:
            _resolve(cupy, path)
        except AttributeError:
            missing.append(f"{file}:{line}: xp.{'.'.join(path)}")
    assert not missing, "not in CuPy:\n" + "\n".join(missing)


def test_every_xp_call_binds_to_cupys_signature():
    """Keywords and argument counts: xp.matmul(out=), xp.searchsorted(side=), xp.argsort(kind=)..."""
    cupy = _cupy()
    problems, checked = [], set()
    for file, line, path, call in xp_uses():
        if call is None or any(isinstance(a, ast.Starred) for a in call.args) or \
                any(k.arg is None for k in call.keywords):
            continue
        kwargs = {k.arg for k in call.keywords}
        problem = cupy_call_problem(_resolve(cupy, path), len(call.args), kwargs)
        checked.add((".".join(path), tuple(sorted(kwargs))))
        if problem:
            problems.append(f"{file}:{line}: xp.{'.'.join(path)}({len(call.args)} args, {sorted(kwargs)}): {problem}")
    assert ("matmul", ("out",)) in checked and ("searchsorted", ("side",)) in checked
    assert not problems, "\n".join(problems)


def test_numpy_only_at_the_host_boundary():
    found, host_reads, imports = set(), [], []
    for rel in COMPUTE_PATH:
        visitor = _parse(REPO / rel)
        for node in ast.walk(ast.parse((REPO / rel).read_text())):  # NumPy only as `np`, so the scan sees it
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "numpy" or \
                    isinstance(node, ast.Import) and any(a.name.split(".")[0] == "numpy" and a.asname != "np"
                                                         for a in node.names):
                imports.append(f"{rel}:{node.lineno}")
        for scope, line, chain, _call in visitor.chains:
            if chain[0] in ("np", "numpy") and len(chain) > 1:
                found.add((rel, scope, "np." + ".".join(chain[1:])))
        for scope, line, name, n_args in visitor.method_calls:
            if (name in HOST_READ_METHODS or (name == "get" and not n_args)) and \
                    not (rel == "runtime/backend.py" and name == "asnumpy"):
                host_reads.append(f"{rel}:{line} ({scope}): .{name}()")
    assert not imports, "import NumPy as `import numpy as np` only:\n" + "\n".join(imports)
    stray = sorted(found - ALLOWED_NUMPY)
    assert not stray, ("NumPy on the compute path (works on the CPU, fails or copies on the GPU); use the "
                       "backend's xp, or add a host-side use to ALLOWED_NUMPY:\n" + "\n".join(map(str, stray)))
    assert not host_reads, "device arrays are read on the host only through Backend:\n" + "\n".join(host_reads)


# -- a stand-in device: NumPy arrays that refuse every implicit host conversion ------------
class HostRoundTrip(TypeError):
    """Raised where a device array would be read on the host outside Backend.to_host/to_int."""


def _site() -> str:
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename).resolve()
        if path.is_relative_to(REPO) and path.parent.name in ("runtime", "models"):
            return f"{_rel(path)}:{frame.lineno} ({frame.name})"
    return "?"


class DeviceArray:
    """A NumPy array posing as a CuPy one: arithmetic, indexing and views work; reading
    it on the host (int(), float(), bool(), iteration, np.asarray, .item, .tolist,
    NumPy functions) is recorded and refused."""

    __slots__ = ("_a", "_xp")
    __array_ufunc__ = None  # NumPy ufuncs and operators with a host array defer to / refuse us
    ATTRIBUTES = {"shape", "dtype", "ndim", "size", "nbytes", "itemsize"}
    METHODS = {"all", "astype", "reshape", "transpose", "max", "min", "sum", "mean", "copy", "fill", "argmax",
               "argsort", "cumsum", "ravel", "squeeze", "view"}

    def __init__(self, a: np.ndarray, xp: "FakeDevice") -> None:
        self._a, self._xp = a, xp

    def __array_namespace__(self, api_version: Any = None) -> "FakeDevice":
        return self._xp

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self._a.shape}, dtype={self._a.dtype})"

    def __len__(self) -> int:
        return len(self._a)  # a shape, known on the host

    @property
    def T(self) -> "DeviceArray":
        return DeviceArray(self._a.T, self._xp)

    def __getattr__(self, name: str) -> Any:
        if name in DeviceArray.ATTRIBUTES:
            return getattr(self._a, name)
        if name in DeviceArray.METHODS:
            def method(*args: Any, **kwargs: Any) -> Any:
                self._xp.method_calls.add((name, len(args), tuple(sorted(kwargs))))
                return self._xp.wrap(getattr(self._a, name)(*self._xp.unwrap(args, name),
                                                            **self._xp.unwrap(kwargs, name)))
            return method
        if name.startswith("__"):
            raise AttributeError(name)
        self._xp.refuse(f"ndarray.{name}, which this stand-in does not offer (add it to DeviceArray.METHODS "
                        "if CuPy's ndarray has it and it does not read the array on the host)")

    def _host(self, what: str) -> Any:
        self._xp.refuse(what)

    def __int__(self): return self._host("int() of a device array")
    def __float__(self): return self._host("float() of a device array")
    def __bool__(self): return self._host("bool() of a device array (an `if`, `and`, `or` or `not`)")
    def __index__(self): return self._host("a device array used as a Python index")
    def __complex__(self): return self._host("complex() of a device array")
    def __iter__(self): return self._host("iteration over a device array")
    def __array__(self, *args: Any, **kwargs: Any): return self._host("np.asarray() of a device array")
    def tolist(self): return self._host(".tolist()")
    def item(self, *args: Any): return self._host(".item()")

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        self._xp.refuse(f"np.{func.__name__}() on a device array")

    def __getitem__(self, index: Any) -> "DeviceArray":
        return self._xp.wrap(self._a[self._xp.index(index)])

    def __setitem__(self, index: Any, value: Any) -> None:
        self._a[self._xp.index(index)] = self._xp.unwrap(value, "item assignment", host_ok=True)

    def __neg__(self): return DeviceArray(-self._a, self._xp)
    def __pos__(self): return DeviceArray(+self._a, self._xp)
    def __abs__(self): return DeviceArray(abs(self._a), self._xp)
    def __invert__(self): return DeviceArray(~self._a, self._xp)


def _binary(op: Any, reflected: bool = False) -> Any:
    def method(self: DeviceArray, other: Any) -> Any:
        other = self._xp.unwrap(other, f"operator {op.__name__}")
        return self._xp.wrap(op(other, self._a) if reflected else op(self._a, other))
    return method


def _inplace(op: Any) -> Any:
    def method(self: DeviceArray, other: Any) -> DeviceArray:
        op(self._a, self._xp.unwrap(other, f"operator {op.__name__}"))
        return self
    return method


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor"):
    _op = getattr(operator, _name if _name not in ("and", "or") else _name + "_")
    setattr(DeviceArray, f"__{_name}__", _binary(_op))
    setattr(DeviceArray, f"__r{_name}__", _binary(_op, reflected=True))
    setattr(DeviceArray, f"__i{_name}__", _inplace(getattr(operator, f"i{_name}")))
for _name in ("lt", "le", "gt", "ge", "eq", "ne"):
    setattr(DeviceArray, f"__{_name}__", _binary(getattr(operator, _name)))


class FakeDevice:
    """An `xp` module over NumPy whose arrays live 'on the device' (see DeviceArray).

    Records the functions called (to check them against CuPy), every refused host
    conversion, the boolean-mask indexing CuPy synchronizes on (it counts the True
    entries on the host to size the result), and the reads through asnumpy.
    """

    __name__ = "fakecupy"

    def __init__(self) -> None:
        self.calls: set[tuple[str, int, tuple[str, ...]]] = set()
        self.method_calls: set[tuple[str, int, tuple[str, ...]]] = set()
        self.refused: list[str] = []
        self.mask_syncs: list[str] = []
        self.index_uploads = 0
        self.host_reads = 0
        self.cuda = SimpleNamespace(get_current_stream=lambda: SimpleNamespace(synchronize=lambda: None))

    def refuse(self, what: str) -> None:
        message = f"{what} at {_site()}"
        self.refused.append(message)
        raise HostRoundTrip(message)

    def wrap(self, value: Any) -> Any:
        if isinstance(value, np.ndarray):
            return DeviceArray(value, self)
        if isinstance(value, np.generic):  # CuPy reductions and scalar indexing give 0-d arrays
            return DeviceArray(np.asarray(value), self)
        if isinstance(value, tuple):
            return tuple(self.wrap(v) for v in value)
        return value

    def unwrap(self, value: Any, what: str, host_ok: bool = False) -> Any:
        if isinstance(value, DeviceArray):
            return value._a
        if isinstance(value, np.ndarray) and not host_ok:
            self.refuse(f"a host (NumPy) array passed to {what}")  # CuPy raises TypeError
        if isinstance(value, (list, tuple)):
            return type(value)(self.unwrap(v, what, host_ok) for v in value)
        if isinstance(value, dict):
            return {k: self.unwrap(v, what, host_ok) for k, v in value.items()}
        return value

    def index(self, index: Any) -> Any:
        parts = index if isinstance(index, tuple) else (index,)
        for part in parts:
            if isinstance(part, DeviceArray) and part.dtype == bool:
                self.mask_syncs.append(_site())
        # NumPy index arrays are allowed: CuPy uploads them (a host-to-device copy)
        self.index_uploads += sum(isinstance(p, np.ndarray) for p in parts)
        out = tuple(p._a if isinstance(p, DeviceArray) else p for p in parts)
        return out if isinstance(index, tuple) else out[0]

    # uploads and downloads
    def asarray(self, value: Any, dtype: Any = None) -> DeviceArray:
        self.calls.add(("asarray", 1, ("dtype",) if dtype is not None else ()))
        return DeviceArray(np.asarray(self.unwrap(value, "asarray", host_ok=True), dtype=dtype), self)

    def asnumpy(self, value: DeviceArray) -> np.ndarray:
        self.host_reads += 1
        return value._a.copy()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(np, name)
        if isinstance(attr, type) or not callable(attr):
            return attr  # dtypes, constants

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.add((name, len(args), tuple(sorted(kwargs))))
            return self.wrap(attr(*self.unwrap(args, f"xp.{name}"), **self.unwrap(kwargs, f"xp.{name}")))
        return call


# -- a tiny Llama written straight to safetensors ----------------------------------------
TINY = dict(model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
            rope_theta=10000.0, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    from safetensors.numpy import save_file

    from loaders.config import ModelConfig
    from models.llama import Llama

    folder = tmp_path_factory.mktemp("tiny-llama")
    (folder / "config.json").write_text(json.dumps(TINY))
    rng = np.random.default_rng(0)
    tensors = {}
    for name, shape in Llama.expected_shapes(ModelConfig.from_dict(TINY)).items():
        values = rng.standard_normal(shape)
        tensors[name] = (1.0 + 0.1 * values if name.endswith("norm.weight") else 0.2 * values).astype(np.float32)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def load_tiny(folder: Path, backend: Any):
    from loaders.config import ModelConfig
    from loaders.safetensors import Checkpoint
    from models.llama import Llama

    return Llama.load(ModelConfig.from_dict(TINY), Checkpoint(folder), backend)


# capacity 16 with 4 sinks: a prompt of 18 in chunks of 6 wraps the ring inside a chunk
# (slots 12..15, 4, 5: a NumPy index array), and the decode runs on the wrapped ring
# (old-slot masks, shifted sink positions).
RUNS = {
    "greedy-f16-cache": dict(kv_dtype="float16", sampling=dict()),
    "sampled-int8-cache": dict(kv_dtype="int8", sampling=dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.02,
                                                              repeat_penalty=1.2, seed=3)),
}
PROMPT = [int(t) for t in np.random.default_rng(5).integers(0, TINY["vocab_size"], 18)]
STEPS = 14


def run_decode(folder: Path, backend: Any, kv_dtype: str, sampling: dict) -> tuple[list[int], list[int]]:
    """Tokens of a decode, and host_transfers after each yielded token."""
    from runtime.engine import decode_tokens
    from runtime.generate import GenerationStats
    from runtime.kv_cache import CacheSpec, KVCache
    from runtime.sampling import Sampler, SamplingParams

    net = load_tiny(folder, backend)
    spec = CacheSpec(TINY["num_hidden_layers"], TINY["num_key_value_heads"],
                     TINY["hidden_size"] // TINY["num_attention_heads"], 16, kv_dtype, 4)
    cache = KVCache(backend, spec)
    tokens, transfers = [], []
    for token in decode_tokens(net, cache, PROMPT, Sampler(backend.xp, SamplingParams(**sampling)),
                               max_tokens=STEPS, stop_ids=set(), stats=GenerationStats(), prefill_chunk=6):
        tokens.append(token)
        transfers.append(backend.host_transfers)
    assert cache.wrapped
    return tokens, transfers


@pytest.fixture(scope="module")
def fake_runs(tiny_folder):
    from runtime.backend import Backend

    results = {}
    for name, run in RUNS.items():
        xp = FakeDevice()
        backend = Backend("cuda", xp, "float16")
        try:
            tokens, transfers = run_decode(tiny_folder, backend, **run)
        except HostRoundTrip:
            tokens, transfers = None, None
        results[name] = SimpleNamespace(xp=xp, backend=backend, tokens=tokens, transfers=transfers)
    return results


@pytest.mark.parametrize("name", sorted(RUNS))
def test_decode_reads_the_device_only_for_the_token_id(fake_runs, name):
    run = fake_runs[name]
    assert not run.xp.refused, "hidden device -> host round trips:\n" + "\n".join(run.xp.refused)
    # nothing during the prefill, then exactly one read (the token id) per step
    assert run.transfers == list(range(1, STEPS + 1))
    assert run.xp.host_reads == run.backend.host_transfers  # every read went through the Backend
    assert run.xp.index_uploads  # the run covered a prefill chunk that wraps around the ring


@pytest.mark.parametrize("name", sorted(RUNS))
def test_device_run_matches_the_numpy_run(tiny_folder, fake_runs, name):
    from runtime.backend import get_backend

    tokens, _ = run_decode(tiny_folder, get_backend("cpu", "float16"), **RUNS[name])
    assert fake_runs[name].tokens == tokens


def test_no_boolean_mask_indexing_on_device_arrays(fake_runs):
    syncs = sorted({site for run in fake_runs.values() for site in run.xp.mask_syncs})
    assert not syncs, "boolean-mask indexing (a CuPy host sync) at:\n" + "\n".join(syncs)


def test_calls_made_on_the_device_bind_to_cupy(fake_runs):
    """What the decode actually called, with its keywords, against CuPy's functions and ndarray methods."""
    cupy = _cupy()
    calls = set().union(*(run.xp.calls for run in fake_runs.values()))
    methods = set().union(*(run.xp.method_calls for run in fake_runs.values()))
    assert {c[0] for c in calls} >= {"matmul", "copyto", "left_shift", "repeat", "searchsorted", "argsort", "cumsum", "triu"}
    problems = []
    for name, n_args, kwargs in sorted(calls):
        if not hasattr(cupy, name):
            problems.append(f"xp.{name} is not in CuPy")
        elif problem := cupy_call_problem(getattr(cupy, name), n_args, set(kwargs)):
            problems.append(f"xp.{name}({n_args} args, {list(kwargs)}): {problem}")
    for name, n_args, kwargs in sorted(methods):
        if not hasattr(cupy.ndarray, name):
            problems.append(f"ndarray.{name} is not in CuPy")
        elif problem := cupy_call_problem(getattr(cupy.ndarray, name), n_args, set(kwargs), method=True):
            problems.append(f"ndarray.{name}({n_args} args, {list(kwargs)}): {problem}")
    missing = [f"ndarray.{a} is not in CuPy" for a in sorted(DeviceArray.ATTRIBUTES | DeviceArray.METHODS | {"T"})
               if not hasattr(cupy.ndarray, a)]
    assert not problems and not missing, "\n".join(problems + missing)


def test_array_module_of_each_kind():
    from runtime.backend import array_module

    xp = FakeDevice()
    assert array_module(np.zeros(2)) is np and array_module(np.float32(1)) is np and array_module(1.0) is np
    assert array_module(xp.asarray(np.zeros(2))) is xp


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_weight_reader_reads_matrices_into_the_decode_layout(tmp_path, monkeypatch, dtype):
    """Fused and transposed matrices hold exactly the checkpoint's values; only float32
    matrices at least as tall as wide are laid out (in, out) in memory (Fortran order).
    Small read bands make every tensor cross several of them."""
    from safetensors.numpy import save_file

    import loaders.safetensors as st
    from loaders.errors import ModelError
    from loaders.safetensors import Checkpoint
    from models.llama import WeightReader
    from runtime.backend import get_backend

    monkeypatch.setattr(st, "_READ_CHUNK", 1000)
    monkeypatch.setattr(st, "LAYOUT_BAND", 16)
    rng = np.random.default_rng(0)
    tensors = {"a": (131, 40), "b": (24, 40), "c": (7, 40), "wide": (30, 261), "conv": (40, 300), "norm": (40,)}
    host = {k: rng.standard_normal(s, dtype=np.float32) for k, s in tensors.items()}
    save_file(host, str(tmp_path / "model.safetensors"))
    read = WeightReader(Checkpoint(tmp_path), get_backend("cpu", dtype), tensors)
    fortran = dtype == "float32"
    for got, expected, tall in ((read("a", "b", "c"), np.concatenate([host["a"], host["b"], host["c"]]), True),
                                (read("wide"), host["wide"], False),
                                (read.matrix(["conv"], transposed=True), host["conv"].T, True)):
        assert got.dtype == np.dtype(dtype) and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected.astype(dtype))
        assert got.flags.f_contiguous == (tall and fortran) and got.flags.c_contiguous == (not (tall and fortran))
    np.testing.assert_array_equal(read("norm"), host["norm"].astype(dtype))
    with pytest.raises(ModelError, match="config.json implies"):
        WeightReader(Checkpoint(tmp_path), get_backend("cpu", dtype), {"a": (130, 40)})("a")


def _usable_gpu(cupy: Any) -> bool:
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


# -- the GPU dtype policy on the CPU, on the default model --------------------------------
GPL = Path("/usr/share/common-licenses/GPL-3")
# Float32 greedy continuations (32 tokens, EOS ignored) of five chat prompts, stored as
# token ids so the check needs no 5 x 32 float32 decode steps: the test proves they are
# still float32's greedy output, then asks the same of the float16 model. The prompts
# are SmolLM2's chat template (its default system message) around the user text.
# Regenerate with `python tests/test_backend.py`.
CHAT_HEAD = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712,
             8182, 2, 198, 1, 4093, 198]
CHAT_TAIL = [2, 198, 1, 520, 9531, 198]
GREEDY = [
    ("What is the capital of France?", [1780, 314, 260, 3575, 282, 4649, 47],
     [504, 3575, 282, 4649, 314, 7042, 30, 2, 198, 2, 1, 9690, 198, 2, 198, 1, 4093, 198, 57, 5248, 3946, 288,
      7198, 253, 725, 1406, 281, 260, 2342, 30, 339, 3543]),
    ("Write a haiku about the sea.", [19161, 253, 421, 30614, 563, 260, 3426, 30],
     [504, 6147, 282, 260, 3426, 28, 253, 13879, 6122, 28, 198, 49, 9154, 303, 5082, 282, 260, 10393, 28, 198,
      49, 13151, 282, 260, 6122, 338, 5721, 8823, 28, 198, 49, 13151]),
    ("List three primary colors.", [6106, 1296, 3003, 4683, 30],
     [504, 3003, 4683, 359, 42, 198, 198, 12869, 42, 718, 4210, 23557, 198, 23390, 42, 14305, 20451, 2, 198, 2,
      1, 9690, 198, 2, 198, 1, 4093, 198, 57, 5248, 3946, 288]),
    ("Explain photosynthesis in one sentence.", [36971, 19173, 281, 582, 6330, 30],
     [33580, 14870, 314, 253, 4334, 5748, 980, 338, 18065, 3118, 7600, 618, 4880, 6756, 28, 715, 347, 8102, 284,
      4983, 28, 1015, 8118, 347, 253, 2257, 282, 1439, 30, 2, 198, 2]),
    ("Name a famous scientist and what they discovered.", [5820, 253, 4248, 8201, 284, 732, 502, 3658, 30],
     [504, 768, 4248, 8201, 282, 511, 655, 314, 3105, 14338, 16211, 30, 909, 436, 253, 3697, 21130, 617, 1135,
      14805, 9570, 281, 6944, 28, 1285, 24581, 284, 8671, 12774, 30, 2736, 746]),
]


def greedy_choices(model: Any, prompt: list[int], continuation: list[int]) -> list[int]:
    """The token greedy decoding picks after prompt + each prefix of continuation, from one prefill."""
    return model.logits(prompt + continuation[:-1])[len(prompt) - 1:].argmax(-1).tolist()


@pytest.fixture(scope="module")
def models():
    import runtime

    f32 = runtime.load(kv_dtype="float32", max_context=1024, progress=False)
    f16 = runtime.load(device="cpu", dtype="float16", kv_dtype="float16", max_context=1024, progress=False)
    return f32, f16


@needs_default_model
def test_float16_policy_dtypes(models, monkeypatch):
    """float16 weights and cache, float32 activations, scores and logits."""
    import models.llama as llama

    _, f16 = models
    net = f16.net
    weights = [net.embed_tokens, net.norm, net.lm_head]
    for layer in net.layers:
        weights += [w for w in vars(layer).values() if w is not None]
    assert {w.dtype for w in weights} == {np.dtype(np.float16)}
    cache = f16.new_cache()
    assert f16.cache_spec.kv_dtype == "float16" and cache.k.dtype == cache.v.dtype == np.float16

    seen = set()
    block, attend = llama.Llama.block, llama.attend

    def spy_block(self, h, *args, **kwargs):
        out = block(self, h, *args, **kwargs)
        seen.update({("block in", h.dtype), ("block out", out.dtype)})
        return out

    def spy_attend(q, k, v, cache, layer, **kwargs):
        seen.update({("q", q.dtype), ("k", k.dtype), ("v", v.dtype)})
        keys, values, _ = cache.keys_values(layer)
        seen.update({("cached k read", keys.dtype), ("cached v read", values.dtype)})
        return attend(q, k, v, cache, layer, **kwargs)

    monkeypatch.setattr(llama.Llama, "block", spy_block)
    monkeypatch.setattr(llama, "attend", spy_attend)
    logits = f16.net.forward(np.asarray(f16.encode_prompt("hi")), cache)
    step = f16.net.forward(np.asarray([42]), cache)  # a decode step over the float16 cache
    assert logits.dtype == step.dtype == np.float32
    assert {dtype for _, dtype in seen} == {np.dtype(np.float32)}, seen


@needs_default_model
def test_float16_logits_close_to_float32(models):
    f32, f16 = models
    ids = f32.tokenizer.encode(GPL.read_text())[:512]
    assert len(ids) == 512
    a, b = f32.logits(ids), f16.logits(ids)
    assert a.dtype == b.dtype == np.float32
    diff = np.abs(a - b)
    top1 = float((a.argmax(-1) == b.argmax(-1)).mean())
    print(f"\nfloat16 weights+cache vs float32, {len(ids)} tokens of GPL-3: max |diff| {diff.max():.4f}, "
          f"mean |diff| {diff.mean():.5f}, top-1 agreement {top1:.2%}")
    assert top1 >= 0.99
    assert diff.max() <= 0.25 and diff.mean() <= 0.02  # measured: about 0.05 and 0.005


@needs_default_model
def test_float16_greedy_text_matches_float32(models):
    """Five prompts, 32 greedy tokens: float16 weights and cache pick float32's tokens.

    One prefill over prompt + continuation gives, at every position, the token greedy
    decoding picks there once all earlier ones agree; a real float16 decode of the
    first tokens checks that prefill and decode choose alike.
    """
    f32, f16 = models
    matched = 0
    for text, user, continuation in GREEDY:
        prompt = CHAT_HEAD + user + CHAT_TAIL
        assert greedy_choices(f32, prompt, continuation) == continuation, (
            f"the stored continuation of {text!r} is no longer float32's greedy output: "
            "regenerate GREEDY with `python tests/test_backend.py`")
        matched += greedy_choices(f16, prompt, continuation) == continuation
    print(f"\nfloat16 greedy == float32 greedy over 32 tokens: {matched}/{len(GREEDY)} prompts")
    assert matched >= len(GREEDY) - 1
    prompt = CHAT_HEAD + GREEDY[0][1] + CHAT_TAIL
    before = f16.backend.host_transfers
    assert list(f16.tokens(prompt, max_tokens=8, ignore_eos=True)) == GREEDY[0][2][:8]
    assert f16.backend.host_transfers - before == 8  # the token ids, nothing else


# -- --device cuda without CuPy or without a GPU ---------------------------------------------
def _cli(folder: Path, block_cupy: bool) -> subprocess.CompletedProcess:
    """`cli.py generate --device cuda` as a user runs it; `block_cupy` makes `import cupy` fail."""
    args = ["generate", "--device", "cuda", "--model", str(folder), "--prompt", "hi"]
    if block_cupy:
        command = [sys.executable, "-c", "import runpy, sys; sys.modules['cupy'] = None; "
                   "sys.argv = ['cli.py', *sys.argv[1:]]; runpy.run_path('cli.py', run_name='__main__')", *args]
    else:
        command = [sys.executable, "cli.py", *args]
    return subprocess.run(command, capture_output=True, timeout=120, cwd=REPO)


def _one_line(result: subprocess.CompletedProcess) -> str:
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_cuda_without_cupy(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    line = _one_line(_cli(tmp_path, block_cupy=True))
    assert "needs CuPy" in line and "not installed" in line


def test_cuda_with_cupy_but_no_gpu(tmp_path):
    cupy = _cupy()
    if _usable_gpu(cupy):
        pytest.skip("a CUDA GPU is usable here")
    (tmp_path / "config.json").write_text("{}")
    line = _one_line(_cli(tmp_path, block_cupy=False))
    assert "CuPy is installed but no usable CUDA GPU" in line


if __name__ == "__main__":  # regenerate GREEDY: float32 greedy decoding of each prompt
    import runtime

    model = runtime.load(kv_dtype="float32", progress=False)
    for text, user, _ in GREEDY:
        prompt = model.encode_prompt(text)
        assert prompt[:len(CHAT_HEAD)] == CHAT_HEAD and prompt[len(prompt) - len(CHAT_TAIL):] == CHAT_TAIL
        print((text, prompt[len(CHAT_HEAD):len(prompt) - len(CHAT_TAIL)],
               list(model.tokens(prompt, max_tokens=32, ignore_eos=True))), end=",\n")
