"""A llama.cpp-style inference runtime in pure NumPy (CuPy on a GPU).

    import runtime
    model = runtime.load()                 # SmolLM2-135M-Instruct, embedded
    print(model.generate("What is the capital of France?"))

The public names are imported on first use: models/ builds on runtime.backend,
runtime.kv_cache and runtime.attention, and runtime.model builds on models/, so
importing runtime.model here eagerly would make the two packages import each other.
"""

from importlib import import_module
from typing import Any

from runtime import blas

blas.choose_kernels()  # before anything imports NumPy (runtime.blas)

_EXPORTS = {
    "load": "runtime.model", "Model": "runtime.model",
    "KVCache": "runtime.kv_cache", "CacheSpec": "runtime.kv_cache",
    "SamplingParams": "runtime.sampling",
    "ModelError": "loaders.errors",
    "render_chat_template": "loaders.chat_template",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
