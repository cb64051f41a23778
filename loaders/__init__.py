"""Loaders: everything that turns files on disk into configs, arrays and tokenizers."""

from loaders.errors import ModelError

__all__ = ["ModelError"]
