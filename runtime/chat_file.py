"""A chat saved with its KV cache (`/save FILE`), to resume without prefilling it again.

The file is a compressed NumPy archive (`.npz`, read with allow_pickle=False: nothing in
it is ever executed): the conversation and the ids the cache holds as JSON, and each
ring's filled slots of keys and values (and int8 scales) as arrays. It records a
fingerprint of the model's weights, of the chat template and the cache dtype; loading
refuses a file made with another of any, saying which. A truncated or tampered file (the
archive's CRCs, shapes that do not fit) is one ModelError, and the session is left as it
was: everything is read and checked before anything is changed.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from loaders.errors import ModelError
from loaders.safetensors import checkpoint_files

FORMAT = "nprt-chat-1"
_EDGE = 1 << 16  # bytes of each weight file's start and end that go into its fingerprint


def weights_fingerprint(folder: Path) -> str:
    """sha256 of each checkpoint file's size, safetensors header and first and last 64 KiB:
    another model, or the same one re-converted differently, gets another fingerprint,
    and it costs milliseconds rather than a pass over the weights."""
    digest = hashlib.sha256()
    for path in checkpoint_files(folder):
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            header_len = int.from_bytes(head, "little") if len(head) == 8 else 0
            start = f.read(min(header_len, size) + _EDGE)
            f.seek(max(0, size - _EDGE))
            end = f.read()
        digest.update(f"{path.name}:{size}:".encode() + head + start + end)
    return digest.hexdigest()[:32]


def text_fingerprint(text: str | None) -> str:
    return hashlib.sha256((text or "").encode()).hexdigest()[:32]


def save(session: Any, path: Path) -> None:
    model, cache = session.model, session.cache
    rings = cache.rings
    keep = not cache.wrapped  # a wrapped ring is never reused across turns: only the messages go
    arrays: dict[str, np.ndarray] = {}
    ring_meta = []
    for i, ring in enumerate(rings):
        n = ring.length if keep else 0
        to_host = model.backend.to_host
        arrays[f"k{i}"], arrays[f"v{i}"] = to_host(ring.k[:, :, :n]), to_host(ring.v[:, :, :n])
        if ring.k_scale is not None:
            arrays[f"ks{i}"], arrays[f"vs{i}"] = to_host(ring.k_scale[:, :, :n]), to_host(ring.v_scale[:, :, :n])
        ring_meta.append({"length": n, "offset": ring.offset if keep else 0,
                          "slot_pos": ring.slot_pos[:n].tolist()})
    meta = {"format": FORMAT, "system": session.system, "messages": session.messages,
            "cache_ids": session.cache_ids if keep else [], "rings": ring_meta,
            "model": model_fingerprint(model), "template": text_fingerprint(model.chat_template),
            "kv_dtype": model.cache_spec.kv_dtype}
    arrays["meta"] = np.frombuffer(json.dumps(meta, ensure_ascii=False).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    path.write_bytes(buffer.getvalue())


def model_fingerprint(model: Any) -> str:
    if not hasattr(model, "_weights_fingerprint"):
        model._weights_fingerprint = weights_fingerprint(model.folder)
    return model._weights_fingerprint


def load(session: Any, path: Path) -> None:
    """Restore a saved chat into `session` (its model must match), or raise ModelError."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"{path}: cannot read ({exc.strerror})") from None
    if data[:1] == b"[":  # a conversation saved as JSON messages: no cache, prefilled again
        return _load_json(session, path, data)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}  # every CRC checked here
        meta = json.loads(arrays.pop("meta").tobytes().decode())
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not a chat saved by /save, or damaged ({_one_line(exc)})") from None
    model, cache = session.model, session.cache
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelError(f"{path}: not a chat saved by /save (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("model") != model_fingerprint(model):
        raise ModelError(f"{path}: saved with another model (weights fingerprint {meta.get('model')}, "
                         f"this one {model_fingerprint(model)})")
    if meta.get("template") != text_fingerprint(model.chat_template):
        raise ModelError(f"{path}: saved with another chat template")
    if meta.get("kv_dtype") != model.cache_spec.kv_dtype:
        raise ModelError(f"{path}: saved with a {meta.get('kv_dtype')} KV cache, this session's is "
                         f"{model.cache_spec.kv_dtype} (--kv-dtype {meta.get('kv_dtype')} loads it)")
    restored = _checked(path, meta, arrays, cache)
    messages = _messages(path, meta.get("messages"))
    ids = meta.get("cache_ids")
    if not (isinstance(ids, list) and all(type(t) is int for t in ids)) or len(ids) > cache.capacity:
        raise ModelError(f"{path}: damaged (cache_ids)")
    # checked: now change the session
    session.reset()
    for ring, (n, offset, slot_pos, parts) in zip(cache.rings, restored):
        for name, array in parts.items():
            getattr(ring, name)[:, :, :n] = model.backend.asarray(array)
        ring.slot_pos[:n] = slot_pos
        ring.offset = offset
    session.system = meta.get("system") if isinstance(meta.get("system"), str) else None
    session.messages = messages
    session.cache_ids = ids


def _checked(path: Path, meta: dict, arrays: dict[str, np.ndarray], cache: Any) -> list:
    rings = meta.get("rings")
    if not isinstance(rings, list) or len(rings) != len(cache.rings):
        raise ModelError(f"{path}: damaged (its cache has {len(rings) if isinstance(rings, list) else '?'} rings, "
                         f"this model's {len(cache.rings)})")
    restored = []
    for i, (info, ring) in enumerate(zip(rings, cache.rings)):
        n, offset, slot_pos = info.get("length"), info.get("offset"), info.get("slot_pos")
        if type(n) is not int or not 0 <= n <= ring.capacity or type(offset) is not int or offset < n or \
                not isinstance(slot_pos, list) or len(slot_pos) != n:
            raise ModelError(f"{path}: damaged (ring {i})")
        parts = {}
        for name, key in (("k", f"k{i}"), ("v", f"v{i}"), ("k_scale", f"ks{i}"), ("v_scale", f"vs{i}")):
            target = getattr(ring, name)
            if target is None:
                continue
            array = arrays.get(key)
            want = target.shape[:2] + (n,) + target.shape[3:]
            if array is None or array.shape != want or array.dtype != np.dtype(str(target.dtype)):
                raise ModelError(f"{path}: damaged ({key}: {None if array is None else array.shape}, "
                                 f"expected {want} {target.dtype})")
            parts[name] = array
        restored.append((n, offset, np.asarray(slot_pos, dtype=np.int64), parts))
    return restored


def _messages(path: Path, messages: Any) -> list[dict[str, str]]:
    if not (isinstance(messages, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                               and isinstance(m.get("content"), str) for m in messages)):
        raise ModelError(f"{path}: expected a list of {{'role': ..., 'content': ...}} messages")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _load_json(session: Any, path: Path, data: bytes) -> None:
    try:
        messages = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: cannot load conversation ({exc})") from None
    messages = _messages(path, messages)
    session.reset()
    if messages and messages[0]["role"] == "system":
        session.system = messages[0]["content"]
        messages = messages[1:]
    session.messages = messages


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
