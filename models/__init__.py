"""Architectures, chosen by config.json's `model_type`.

A family that is another's twin maps onto it through ALIASES instead of a copied
file; anything else is refused with the list of what is supported.
"""

from __future__ import annotations

from loaders.errors import ModelError
from models.gpt2 import GPT2
from models.gemma import Gemma2, Gemma3Text
from models.llama import Llama
from models.phi3 import Phi3
from models.qwen2 import Qwen2, Qwen3

ARCHITECTURES = {"llama": Llama, "qwen2": Qwen2, "qwen3": Qwen3}
ARCHITECTURES.update({"gemma2": Gemma2, "gemma3_text": Gemma3Text})
ARCHITECTURES["gpt2"] = GPT2
ARCHITECTURES["phi3"] = Phi3
# Mistral is Llama with a sliding window, which the cache handles.
ALIASES: dict[str, str] = {"mistral": "llama"}


def supported() -> list[str]:
    return sorted([*ARCHITECTURES, *ALIASES])


def architecture(model_type: str | None, source: str = "config.json") -> type:
    """The model class for a model_type; ModelError naming the supported ones otherwise."""
    name = ALIASES.get(model_type, model_type) if isinstance(model_type, str) else None
    if name not in ARCHITECTURES:
        raise ModelError(f"{source}: unsupported model_type {model_type!r} "
                         f"(supported: {', '.join(supported())})")
    return ARCHITECTURES[name]
