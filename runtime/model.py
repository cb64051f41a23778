"""`runtime.load()` and the Model it returns: the API programs embed.

    model = runtime.load()                      # the embedded default model
    print(model.generate("What is the capital of France?", max_tokens=32))
    for piece in model.stream("Tell me a story", temperature=0.7, seed=1): ...
    model.logits(ids)                           # (len(ids), vocab) float32 NumPy
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from loaders.chat_template import CHAT_TEMPLATE_FILE, find_chat_template, generation_end_markers, render_chat_template
from loaders.config import ModelConfig, read_json
from loaders.errors import ModelError
from loaders.resolve import resolve_model
from loaders.safetensors import Checkpoint
from loaders.tokenizer import Tokenizer
from models import architecture
from runtime.backend import Backend, get_backend
from runtime.engine import decode_tokens
from runtime.generate import DEFAULT_PREFILL_CHUNK, GenerationStats, NonFiniteLogits, prefill
from runtime.kv_cache import DEFAULT_SINKS, KV_DTYPES, CacheSpec, HybridCache, HybridSpec, KVCache, new_cache
from runtime.sampling import Sampler, SamplingParams
from runtime.stop_strings import StopStrings

DEFAULT_MAX_CONTEXT = 4096
# llama.cpp's default DRY sequence breakers: a repetition never reaches back past one
DRY_BREAKERS = ("\n", ":", "\"", "*")


@dataclass(frozen=True)
class LoadOptions:
    device: str = "cpu"
    dtype: str | None = None
    kv_dtype: str = "float32"  # load() fills in default_kv_dtype when not given
    max_context: int | None = None
    n_sink: int = DEFAULT_SINKS
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK


def load(model: str | os.PathLike | None = None, *, device: str = "cpu", dtype: str | None = None,
         kv_dtype: str | None = None, max_context: int | None = None, n_sink: int = DEFAULT_SINKS,
         prefill_chunk: int = DEFAULT_PREFILL_CHUNK, progress: bool = True) -> "Model":
    """Load a model folder, .gguf file, hub id, or (None) the embedded default.

    The KV cache is stored in the weight dtype unless kv_dtype says otherwise:
    float32 on the CPU, float16 on a GPU (see default_kv_dtype).
    """
    if kv_dtype is not None and kv_dtype not in KV_DTYPES:
        raise ModelError(f"unknown KV-cache dtype {kv_dtype!r}: choose one of {', '.join(KV_DTYPES)}")
    if max_context is not None and max_context < 1:
        raise ModelError(f"context size must be positive, got {max_context}")
    if prefill_chunk < 1:
        raise ModelError(f"prefill chunk must be positive, got {prefill_chunk}")
    backend = get_backend(device, dtype)  # first: a missing GPU should not wait for a conversion
    options = LoadOptions(device, dtype, kv_dtype or default_kv_dtype(backend), max_context, n_sink, prefill_chunk)
    folder = resolve_model(model, progress=progress)
    raw_config = read_json(folder / "config.json")
    net_class = architecture(raw_config.get("model_type"), str(folder / "config.json"))
    config = net_class.config_class.from_dict(raw_config, str(folder / "config.json"))
    checkpoint = Checkpoint(folder)
    tokenizer = Tokenizer.from_folder(folder)
    spec = cache_spec(config, options)
    check_memory(checkpoint, net_class.expected_shapes(config), backend, spec)
    net = net_class.load(config, checkpoint, backend)
    return Model(folder, config, net, tokenizer, options, spec)


def default_kv_dtype(backend: Backend) -> str:
    """The weight dtype, as HF transformers and mlx-lm keep their caches.

    On the CPU that is float32: NumPy multiplies only float32, so a float16 or
    int8 cache is widened every step, which measured 0.93x / 0.80x float32's
    decode speed at 512 tokens and 0.78x / 0.55x at 4,000 on the default model
    (docs/benchmarks.md); --kv-dtype float16 or int8 trades that for a half or
    a quarter of the memory.
    """
    return backend.dtype


def cache_spec(config: ModelConfig, options: LoadOptions) -> CacheSpec | HybridSpec:
    """The cache geometry: max_context slots with sinks, and a ring of `window`
    slots without sinks for layers with a sliding window (HF's window mask is
    exactly such a ring). Layers that differ get one ring per span."""
    ctx = options.max_context or min(config.max_position_embeddings, DEFAULT_MAX_CONTEXT)
    # a model with learned absolute positions (GPT-2) has none past its table: no larger cache
    limit = getattr(config, "position_limit", None)
    ctx = ctx if limit is None else min(ctx, limit)
    if ctx <= options.n_sink:
        raise ModelError(f"context of {ctx} tokens is too small (the cache keeps {options.n_sink} sink tokens)")
    spans = [(w, 0) if w is not None and w <= ctx else (ctx, options.n_sink) for w in config.layer_windows()]
    kinds = list(dict.fromkeys(spans))
    specs = tuple(CacheSpec(spans.count((capacity, n_sink)), config.num_key_value_heads, config.head_dim, capacity,
                            options.kv_dtype, n_sink) for capacity, n_sink in kinds)
    if len(specs) == 1:
        return specs[0]
    return HybridSpec(specs, tuple(kinds.index(span) for span in spans))


def check_memory(checkpoint: Checkpoint, shapes: dict[str, tuple[int, ...]], backend: Backend,
                 spec: CacheSpec | HybridSpec) -> None:
    """Refuse, before allocating, a model plus cache that cannot fit in memory."""
    weight_bytes = sum(int(np.prod(s)) for s in shapes.values()) * backend.weight_dtype.itemsize
    need = weight_bytes + spec.nbytes
    available = available_memory(backend)
    if available is not None and need > available:
        raise ModelError(f"not enough memory: weights {weight_bytes / 2**20:,.0f} MiB + KV cache "
                         f"{spec.nbytes / 2**20:,.0f} MiB ({spec.capacity:,} tokens of {spec.kv_dtype}) "
                         f"need {need / 2**20:,.0f} MiB, {available / 2**20:,.0f} MiB available; "
                         "lower --ctx or use --kv-dtype int8")


def available_memory(backend: Backend) -> int | None:
    if backend.device == "cuda":
        free, _total = backend.xp.cuda.runtime.memGetInfo()
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _forward_order(name: str) -> tuple[int, int]:
    """Sort key of a tensor name: embeddings, then the layers in order, then the rest."""
    layer = re.search(r"\.(\d+)\.", name)
    if layer:
        return 1, int(layer.group(1))
    return (0 if re.search(r"embed|wte|wpe", name) else 2), 0


class Model:
    """A loaded model with its tokenizer, chat template and generation settings."""

    def __init__(self, folder: Path, config: ModelConfig, net: Any, tokenizer: Tokenizer,
                 options: LoadOptions, spec: CacheSpec | HybridSpec) -> None:
        self.folder = folder
        self.config = config
        self.net = net
        self.backend = net.backend
        self.tokenizer = tokenizer
        self.options = options
        self.cache_spec = spec
        self.chat_template = find_chat_template(folder, tokenizer.config)
        # where the template came from, to name it in its errors (as find_chat_template chooses)
        jinja = folder / CHAT_TEMPLATE_FILE
        self.chat_template_source = str(jinja if jinja.is_file() else folder / "tokenizer_config.json")
        generation = folder / "generation_config.json"
        self.generation_config = read_json(generation) if generation.is_file() else {}
        self.stop_ids = self._stop_ids()
        self.stats = GenerationStats()
        self._containing: dict[tuple[str, ...], frozenset[int]] = {}

    @property
    def model_type(self) -> str:
        return self.config.model_type

    def new_cache(self) -> KVCache | HybridCache:
        return new_cache(self.backend, self.cache_spec)

    # -- prompts --------------------------------------------------------------
    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **context: Any) -> str:
        if not self.chat_template:
            raise ModelError(f"{self.folder}: the model has no chat template; use raw=True / --raw")
        try:
            return render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.tokenizer.bos_token or "",
                                        eos_token=self.tokenizer.eos_token or "", **context)
        except ModelError as exc:
            raise ModelError(f"{self.chat_template_source}: {exc}") from None

    def encode_prompt(self, prompt: str | Sequence[int], *, raw: bool = False,
                      system: str | None = None, allow_special: bool = False) -> list[int]:
        """Token ids for a prompt: a list of ids as-is, a str through the chat template unless raw."""
        if not isinstance(prompt, str):
            return [int(t) for t in prompt]
        if raw or not self.chat_template:
            return self.tokenizer.encode(prompt)
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return self.encode_chat(messages, allow_special=allow_special)

    def encode_chat(self, messages: list[dict[str, Any]], *, allow_special: bool = False,
                    add_generation_prompt: bool = True, **context: Any) -> list[int]:
        """Token ids of a conversation through the chat template.

        Special-token text inside a message (a user typing `<|im_end|>` or
        `<|im_start|>system`) stays literal text unless `allow_special`: only the
        template writes special tokens. When a message holds such text, the template
        is rendered with a marker for each message's content and the contents are
        tokenized on their own, with special tokens off; otherwise (nearly always)
        the rendered text is tokenized whole, exactly as HF's apply_chat_template.
        The template writes BOS itself: adding special tokens would double it.
        """
        text = self.render(messages, add_generation_prompt, **context)
        specials = self.tokenizer.special_texts
        contents = [m.get("content") if isinstance(m.get("content"), str) else None for m in messages]
        if allow_special or not any(c and any(s in c for s in specials) for c in contents):
            return self.tokenizer.encode(text, add_special_tokens=False)
        marked = [{**m, "content": f"\ue000{i}\ue001"} if c is not None else m
                  for i, (m, c) in enumerate(zip(messages, contents))]
        ids: list[int] = []
        for piece in re.split("(\ue000\\d+\ue001)", self.render(marked, add_generation_prompt, **context)):
            index = re.fullmatch("\ue000(\\d+)\ue001", piece)
            if index:
                ids += self.tokenizer.encode(contents[int(index.group(1))], add_special_tokens=False, literal=True)
            elif piece:
                ids += self.tokenizer.encode(piece, add_special_tokens=False)
        return ids

    # -- running --------------------------------------------------------------
    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Logits (len(token_ids), vocab) float32 from one prefill through a fresh cache."""
        ids = [int(t) for t in token_ids]
        if not ids:
            raise ModelError("logits() needs at least one token")
        out = prefill(self.net, self.new_cache(), ids, self.options.prefill_chunk, all_logits=True)
        return self.backend.to_host(out)

    def tokens(self, prompt: str | Sequence[int], *, max_tokens: int = 256, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repeat_penalty: float = 1.0,
               seed: int | None = None, ignore_eos: bool = False, raw: bool = False,
               system: str | None = None, cache: KVCache | None = None,
               truncate: bool = False, logprobs: int | None = None,
               dry: dict[str, Any] | None = None) -> Iterator[int]:
        """Generated token ids, one at a time (the layer under stream and generate).

        A prompt longer than the context is refused (ModelError) unless `truncate`
        (see fit_prompt): prefilling it would only feed the ring buffer tokens it
        evicts again. With `logprobs` (N), each token's log-probability and its N
        most likely alternatives are appended to `stats.logprobs` as it is yielded.
        `dry` holds DRY's settings (SamplingParams' dry_* fields), breaking sequences
        at DRY_BREAKERS.
        """
        if max_tokens < 0:
            raise ModelError(f"max_tokens must be >= 0, got {max_tokens}")
        params = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, seed=seed, **(dry or {}))
        ids = self.encode_prompt(prompt, raw=raw, system=system)
        if not ids:
            raise ModelError("the prompt is empty")
        ids = self.fit_prompt(ids, max_tokens, truncate=truncate, cache=cache)
        cache = cache or self.new_cache()
        self.stats = GenerationStats()
        stop = set() if ignore_eos else self.stop_ids
        breakers = self.token_ids_containing(DRY_BREAKERS) if params.dry_multiplier > 0 else frozenset()
        return self._diagnosed(decode_tokens(self.net, cache, ids, Sampler(self.backend.xp, params, breakers),
                                             max_tokens=max_tokens, stop_ids=stop, stats=self.stats,
                                             prefill_chunk=self.options.prefill_chunk, logprobs=logprobs))

    def token_ids_containing(self, texts: Sequence[str]) -> frozenset[int]:
        """The ids whose text contains any of `texts` (DRY's sequence breakers), found once."""
        key = tuple(texts)
        if key not in self._containing:
            vocab = self.tokenizer.vocab_size
            pieces = self.tokenizer.tokenizer.decode_batch([[i] for i in range(vocab)], skip_special_tokens=False)
            self._containing[key] = frozenset(i for i, p in enumerate(pieces) if any(t in p for t in texts))
        return self._containing[key]

    def fit_prompt(self, ids: list[int], max_tokens: int, *, truncate: bool = False,
                   cache: KVCache | None = None) -> list[int]:
        """ids if they fit the context after what `cache` holds; else a ModelError with
        the numbers, or with `truncate` the sink tokens and the last tokens that leave
        room for min(max_tokens, a quarter of the context) new ones, which is what the
        ring would have kept of them."""
        held = cache.length if cache is not None else 0
        capacity = cache.capacity if cache is not None else self.cache_spec.capacity
        room = capacity - held
        if len(ids) <= room:
            return ids
        if not truncate or room < 1:
            raise ModelError(f"the prompt is {len(ids):,} tokens, longer than the context of {capacity:,}"
                             + (f" ({held:,} already in use)" if held else "") + "; shorten it or raise --ctx")
        keep = room - min(max_tokens, room // 4)
        head = max(0, min(self.cache_spec.n_sink - held, keep))
        return ids[:head] + ids[len(ids) - (keep - head):]

    def _diagnosed(self, tokens: Iterator[int]) -> Iterator[int]:
        """The tokens; non-finite logits are reported with the first weight that holds
        NaN or Inf, found by reading the checkpoint again (only on that path)."""
        try:
            yield from tokens
        except NonFiniteLogits as exc:
            raise ModelError(f"{exc}: {self.nonfinite_weight_report()}") from None

    def nonfinite_weight_report(self) -> str:
        """Which checkpoint tensor first (in forward order) holds NaN or Inf, in words."""
        checkpoint = Checkpoint(self.folder)
        shapes = self.net.expected_shapes(self.config)
        for name in sorted(shapes, key=_forward_order):
            values = checkpoint.get(name, shapes[name])
            bad = ~np.isfinite(values)
            if bad.any():
                kind = "NaN" if np.isnan(values).any() else "Inf"
                return f"weight {name} holds {kind} ({int(bad.sum()):,} of {values.size:,} values)"
        return (f"every weight is finite, so an activation overflowed "
                f"({self.backend.dtype} weights{'; try --dtype float32' if self.backend.dtype != 'float32' else ''})")

    def stream(self, prompt: str | Sequence[int], *, stop: Sequence[str] = (), **kwargs: Any) -> Iterator[str]:
        """Text pieces as they are decoded (never a broken UTF-8 character). Generation
        ends at any of the `stop` strings, which are not part of the text."""
        decoder = self.tokenizer.stream_decoder()
        stops = StopStrings(stop)
        tokens = self.tokens(prompt, **kwargs)
        for token in tokens:
            piece = stops.push(decoder.push(token))
            if piece:
                yield piece
            if stops.hit:
                tokens.close()
                self.stats.stop_reason = "stop"
                return
        tail = stops.push(decoder.flush()) + stops.flush()
        if tail:
            yield tail

    def generate(self, prompt: str | Sequence[int], **kwargs: Any) -> str:
        """The whole generated text (see `tokens` for the keyword arguments)."""
        return "".join(self.stream(prompt, **kwargs))

    def _stop_ids(self) -> set[int]:
        ids = set(self.config.eos_ids)
        eos = self.generation_config.get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else (eos or []))
        if self.tokenizer.eos_id is not None:
            ids.add(self.tokenizer.eos_id)
        # the template's end-of-turn marker ends a reply even where
        # generation_config.json forgets to list it
        for marker in generation_end_markers(self.chat_template or ""):
            token = self.tokenizer.token_id(marker)
            if token is not None:
                ids.add(token)
        return ids
