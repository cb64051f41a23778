"""Command line: chat, generate, info (and bench, perplexity).

    python cli.py chat                       # talk to the embedded default model
    python cli.py generate --prompt "What is the capital of France?"
    python cli.py info --ctx 8192 --kv-dtype int8

Generated text goes to stdout, timings to stderr. A user error ends in one line
and exit status 2, Ctrl-C in exit status 130; neither prints a traceback.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, NoReturn

import runtime  # first: it picks OpenBLAS's kernels before NumPy loads (runtime.blas)
from loaders.errors import ModelError

KV_DTYPES = ("float32", "float16", "int8")


# -- argument types: bad values are argparse errors (usage line, exit 2) -----------
def _number(kind: Callable[[str], Any], name: str, ok: Callable[[Any], bool]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {name}: {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"invalid {name}: {text!r}")
        return value
    parse.__name__ = name
    return parse


positive_int = _number(int, "positive integer", lambda v: v > 0)
non_negative_int = _number(int, "non-negative integer", lambda v: v >= 0)
temperature = _number(float, "temperature (>= 0)", lambda v: 0 <= v < math.inf)
top_p = _number(float, "top-p (in (0, 1])", lambda v: 0 < v <= 1)
min_p = _number(float, "min-p (in [0, 1))", lambda v: 0 <= v < 1)
penalty = _number(float, "penalty (> 0)", lambda v: v > 0)
port = _number(int, "port (0-65535)", lambda v: 0 <= v <= 65535)
dry_multiplier = _number(float, "DRY multiplier (>= 0)", lambda v: 0 <= v < math.inf)
dry_base = _number(float, "DRY base (>= 1)", lambda v: 1 <= v < math.inf)
last_n = _number(int, "token count (-1 = all, 0 = off)", lambda v: v >= -1)


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is the error line and a pointer to --help (as git and
    cargo do), not the whole usage block; exit status 2 as before."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\nFor more information, try '{self.prog} --help'.\n")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", help="model folder, .gguf file or hub id (default: SmolLM2-135M-Instruct)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "float16"), help="weight dtype (default: float32 on cpu)")
    p.add_argument("--kv-dtype", choices=KV_DTYPES,
                   help="KV-cache storage (default: the weight dtype; float16 halves it, int8 quarters it)")
    p.add_argument("--ctx", type=positive_int, help="context size in tokens (default: model's, at most 4096)")


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int, chat: bool = False) -> None:
    """The sampling flags. generate defaults to greedy (scripts want determinism); the chat's
    unset flags come from the model's generation_config.json or llama.cpp's conversation
    defaults (runtime.chat.conversation_sampling)."""
    default = (lambda value: None) if chat else (lambda value: value)
    where = "the chat's default: see the banner" if chat else "default: %(default)s"
    p.add_argument("--max-tokens", "-n", type=non_negative_int, default=max_tokens)
    p.add_argument("--temperature", "--temp", type=temperature, default=default(0.0),
                   help="0 = greedy" + (" (the chat samples by default: see the banner)" if chat
                                        else " (generate's default, deterministic)"))
    p.add_argument("--top-k", type=non_negative_int, default=default(0), help=f"0 = off ({where})")
    p.add_argument("--top-p", type=top_p, default=default(1.0), help=f"1 = off ({where})")
    p.add_argument("--min-p", type=min_p, default=default(0.0), help=f"0 = off ({where})")
    p.add_argument("--repeat-penalty", type=penalty, default=default(1.0),
                   help=f"llama.cpp's repeat penalty over the last 64 tokens; 1 = off ({where})")
    p.add_argument("--dry-multiplier", type=dry_multiplier, default=default(0.0),
                   help=f"DRY (llama.cpp's): penalty of a token that extends a repetition; 0 = off ({where})")
    p.add_argument("--dry-base", type=dry_base, default=1.75, help="DRY: growth per repeated token (default 1.75)")
    p.add_argument("--dry-allowed-length", type=positive_int, default=2,
                   help="DRY: repetitions up to this long are free (default 2)")
    p.add_argument("--dry-penalty-last-n", type=last_n, default=64,
                   help="DRY: tokens scanned for repetitions, -1 = all, 0 = off (default 64)")
    p.add_argument("--seed", type=non_negative_int,
                   help="random seed" + (" (default: a new one, printed in the banner)" if chat else ""))
    p.add_argument("--system", help="system message")
    p.add_argument("--allow-special", action="store_true",
                   help="special-token text typed in a message (<|im_end|>) becomes that token; "
                        "by default it stays literal text")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end the answer at this text, which is not printed (repeat for several)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="cli.py", description="A NumPy LLM inference runtime.")
    sub = parser.add_subparsers(dest="command", required=True)

    chat = sub.add_parser("chat", help="talk with a model (the model's own chat template)")
    add_model_args(chat)
    add_sampling_args(chat, max_tokens=512, chat=True)
    chat.add_argument("--hide-thinking", action="store_true",
                      help="a thinking model's reasoning is not shown (it is dimmed by default)")

    gen = sub.add_parser("generate", help="complete one prompt")
    add_model_args(gen)
    add_sampling_args(gen, max_tokens=256)
    gen.add_argument("--prompt", "-p", required=True, help="the prompt ('-' reads stdin)")
    gen.add_argument("--raw", action="store_true", help="feed the prompt as-is, without the chat template")
    gen.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    gen.add_argument("--logprobs", type=non_negative_int, metavar="N",
                     help="after the answer, each token's log-probability and its N likeliest alternatives (stderr)")
    gen.add_argument("--truncate-prompt", action="store_true",
                     help="a prompt longer than the context keeps its first (sink) and last tokens "
                          "instead of being refused")

    ppl = sub.add_parser("perplexity", help="perplexity of a text file (llama-perplexity style)")
    add_model_args(ppl)
    ppl.set_defaults(ctx=512)
    ppl.add_argument("--file", "-f", required=True, help="a UTF-8 text file")
    ppl.add_argument("--rolling", action="store_true",
                     help="one sequence through a --ctx cache (ring buffer past it) instead of windows")
    ppl.add_argument("--skip", type=non_negative_int, default=0, help="rolling: do not score the first N tokens")
    ppl.add_argument("--max-tokens-in", type=positive_int, help="use only the first N tokens of the text")

    bench = sub.add_parser("bench", help="prefill and decode speed (llama-bench style)")
    add_model_args(bench)
    bench.add_argument("-p", "--n-prompt", type=non_negative_int, default=512, help="prompt tokens to prefill")
    bench.add_argument("-n", "--n-gen", type=non_negative_int, default=128, help="tokens to decode")
    bench.add_argument("-r", "--repetitions", type=positive_int, default=3)
    bench.add_argument("-d", "--depth", type=non_negative_int, default=0,
                       help="decode after this many tokens already in the cache")
    bench.add_argument("--json", action="store_true", help="print one JSON object instead of the table")

    info = sub.add_parser("info", help="architecture, parameters, weight and KV-cache memory")
    add_model_args(info)

    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching")
    add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=port, default=8080)
    serve.add_argument("--max-batch", type=positive_int, default=8, help="sequences decoded together (default 8)")
    serve.add_argument("--block-size", type=positive_int, default=16, help="tokens per KV block (default 16)")
    serve.add_argument("--num-blocks", type=positive_int,
                       help="KV blocks in the pool (default: enough for --max-batch full contexts)")
    serve.add_argument("--step-tokens", type=positive_int, default=256,
                       help="prompt tokens a step prefills beside decoding sequences (default 256)")
    serve.add_argument("--prefill-tokens", type=positive_int, default=1024,
                       help="prompt tokens a step prefills when none is decoding (default 1024)")
    serve.add_argument("--max-waiting", type=positive_int, default=256,
                       help="queued requests before 429 (default 256)")
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY'")
    serve.add_argument("--model-name", help="the id /v1/models reports (default: the model folder's name)")
    return parser


# -- commands ---------------------------------------------------------------------
def load_model(args: argparse.Namespace) -> Any:
    import numpy  # noqa: PLC0415  (argparse errors should not wait for NumPy)

    import runtime  # noqa: PLC0415

    # NaN or Inf reaching the logits is one error line of the runtime's (which weight,
    # which token); NumPy's warnings on the way there would only add lines before it
    numpy.seterr(all="ignore")

    start = time.perf_counter()
    model = runtime.load(args.model, device=args.device, dtype=args.dtype, kv_dtype=args.kv_dtype,
                         max_context=args.ctx)
    log(f"loaded {model.model_type} from {model.folder} in {time.perf_counter() - start:.2f} s "
        f"(context {model.cache_spec.capacity}, KV cache {model.cache_spec.kv_dtype})")
    return model


def sampling(args: argparse.Namespace) -> dict[str, Any]:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repeat_penalty=args.repeat_penalty, seed=args.seed, dry=_dry(args))


def _dry(args: argparse.Namespace) -> dict[str, Any] | None:
    if not args.dry_multiplier or not args.dry_penalty_last_n:
        return None
    return dict(dry_multiplier=args.dry_multiplier, dry_base=args.dry_base,
                dry_allowed_length=args.dry_allowed_length, dry_penalty_last_n=args.dry_penalty_last_n)


def chat_sampling(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The chat's sampling: each flag given, else the conversation default; a seed drawn
    (and shown) when none is given, so that the session can be replayed."""
    import secrets  # noqa: PLC0415

    from runtime.chat import conversation_sampling  # noqa: PLC0415

    defaults = conversation_sampling(model.generation_config)
    for name in ("temperature", "top_k", "top_p", "min_p", "dry_multiplier", "repeat_penalty"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    if args.seed is None:
        args.seed = secrets.randbelow(2**31)
    chosen = sampling(args)
    if args.temperature == 0:
        described = "greedy"
    else:
        described = (f"temperature {args.temperature:g}, top-k {args.top_k}, top-p {args.top_p:g}, "
                     f"min-p {args.min_p:g}")
    if chosen["dry"]:
        described += f", DRY {args.dry_multiplier:g} (base {args.dry_base:g}, allowed {args.dry_allowed_length})"
    if args.repeat_penalty != 1.0:
        described += f", repeat penalty {args.repeat_penalty:g}"
    log(f"sampling: {described} ({defaults['source']}); seed {args.seed} (--seed {args.seed} replays it)")
    return chosen


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model = load_model(args)
    ids = model.encode_prompt(prompt, raw=args.raw, system=args.system, allow_special=args.allow_special)
    try:
        fitted = model.fit_prompt(ids, args.max_tokens, truncate=args.truncate_prompt)
    except ModelError as exc:
        raise ModelError(f"{exc}, or keep its last tokens with --truncate-prompt") from None
    if len(fitted) < len(ids):
        log(f"the prompt is {len(ids):,} tokens, longer than the context of {model.cache_spec.capacity:,}: "
            f"keeping its first {min(len(fitted), model.cache_spec.n_sink)} and last "
            f"{len(fitted) - min(len(fitted), model.cache_spec.n_sink):,} tokens")
    for piece in model.stream(fitted, max_tokens=args.max_tokens, ignore_eos=args.ignore_eos, stop=args.stop,
                              logprobs=args.logprobs, **sampling(args)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    s = model.stats
    if args.logprobs is not None:
        _print_logprobs(model, s.logprobs)
    log(f"prefill: {s.prompt_tokens} tokens, {s.prefill_tps:.1f} tokens/s | "
        f"decode: {s.generated_tokens} tokens, {s.decode_tps:.1f} tokens/s | "
        f"first token {s.first_token_seconds:.2f} s | stop: {s.stop_reason}")
    return 0


def _print_logprobs(model: Any, entries: list) -> None:
    """One line a token on stderr: its text, log-probability, and the alternatives."""
    def text(token: int) -> str:
        return repr(model.tokenizer.decode([token], skip_special_tokens=False))

    log("logprobs (token, log-probability, likeliest alternatives):")
    for token, logprob, top in entries:
        alternatives = ", ".join(f"{text(t)} {lp:.4f}" for t, lp in top)
        log(f"{text(token)}\t{logprob:.4f}" + (f"\t{alternatives}" if alternatives else ""))


def cmd_perplexity(args: argparse.Namespace) -> int:
    from runtime import perplexity  # noqa: PLC0415

    try:
        text = Path(args.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"{args.file}: cannot read as UTF-8 text ({exc})") from None
    model = load_model(args)
    ids = model.tokenizer.encode(text)[:args.max_tokens_in]
    start = time.perf_counter()

    def report(done: int, total: int, ppl: float) -> None:
        print(f"[{done}/{total}] {ppl:.4f}", file=sys.stderr, flush=True)

    if args.rolling:
        result = perplexity.rolling(model, ids, skip=args.skip, progress=report)
    else:
        result = perplexity.windowed(model, ids, args.ctx, progress=report)
    seconds = time.perf_counter() - start
    mode = f"rolling, cache {model.cache_spec.capacity}" if args.rolling else f"windows of {args.ctx}"
    log(f"{len(ids)} tokens, {result.scored_tokens} scored ({mode}, KV {model.cache_spec.kv_dtype}), "
        f"{seconds:.1f} s")
    print(f"perplexity: {result.perplexity:.4f}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import json  # noqa: PLC0415

    from runtime.bench import run_bench  # noqa: PLC0415

    start = time.perf_counter()
    model = load_model(args)
    load_s = time.perf_counter() - start
    result = run_bench(model, args.n_prompt, args.n_gen, args.repetitions, args.depth)
    result.load_s = load_s
    summary_row = result.summary()
    if args.json:
        print(json.dumps(summary_row))
        return 0
    name = f"{model.model_type} {model.backend.dtype} kv={result.kv_dtype} ctx={result.context}"
    print("| model | test | tokens/s | first token s |\n|---|---|---|---|")
    if args.n_prompt:
        print(f"| {name} | pp{args.n_prompt} | {summary_row['prefill_tps_mean']:.1f} ± {summary_row['prefill_tps_std']:.1f} "
              f"| {summary_row['first_token_s_mean']:.3f} |")
    if args.n_gen:
        print(f"| {name} | tg{args.n_gen} @ d{args.depth} | {summary_row['decode_tps_mean']:.1f} ± "
              f"{summary_row['decode_tps_std']:.1f} | |")
    print(f"load {load_s:.2f} s, peak RSS {result.peak_rss_mb:.0f} MB, {args.repetitions} repetitions")
    return 0


def _gguf_source(folder: Path) -> dict | None:
    """The record a GGUF conversion leaves in its folder, if this folder is one."""
    import json  # noqa: PLC0415

    from loaders.gguf import SOURCE_FILE  # noqa: PLC0415

    try:
        source = json.loads((folder / SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return source if isinstance(source, dict) else None


def cmd_info(args: argparse.Namespace) -> int:
    model = load_model(args)
    c, spec = model.config, model.cache_spec
    shapes = model.net.expected_shapes(c)
    params = sum(_prod(s) for s in shapes.values())
    weight_bytes = params * model.backend.weight_dtype.itemsize
    cache = model.new_cache()
    print(f"model:          {model.folder}")
    print(f"architecture:   {c.model_type} ({c.num_hidden_layers} layers, hidden {c.hidden_size}, "
          f"{c.num_attention_heads} heads, {c.num_key_value_heads} KV heads, head_dim {c.head_dim})")
    print(f"parameters:     {params:,}")
    print(f"weights:        {weight_bytes:,} bytes ({model.backend.dtype})")
    source = _gguf_source(Path(model.folder))
    if source:
        types = ", ".join(f"{n} {t}" for t, n in source.get("tensor_types", {}).items())
        print(f"converted from: {source.get('file')}, {source.get('quantization')}, {source.get('bytes', 0):,} bytes "
              f"({types} tensors)")
    print(f"context:        {spec.capacity:,} tokens ({spec.n_sink} sink tokens"
          + (f", sliding window {c.sliding_window}" if c.sliding_window else "") + ")")
    print(f"KV cache:       {spec.kv_dtype}, {spec.bytes_per_token:,} bytes per token, "
          f"{cache.nbytes:,} bytes in total")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    runtime.blas.choose_kernels(batched=True)  # before the server imports NumPy (runtime.blas)
    try:
        import uvicorn  # noqa: PLC0415

        from runtime.server import Server  # noqa: PLC0415
    except ImportError as exc:
        raise ModelError(f"serving needs the serve extra: pip install -e '.[serve]' ({exc.name} is missing)") from None
    server = Server(lambda: load_model(args), model_name=args.model_name, api_key=args.api_key,
                    engine_options=dict(max_batch=args.max_batch, context=args.ctx, num_blocks=args.num_blocks,
                                        block_size=args.block_size, step_tokens=args.step_tokens,
                                        prefill_tokens=args.prefill_tokens, max_waiting=args.max_waiting))
    log(f"serving on http://{args.host}:{args.port}/v1 (loading the model; GET /health says when it is ready)")
    uvicorn.run(server.app(), host=args.host, port=args.port, log_level="warning")
    if server.load_error:
        raise ModelError(server.load_error)
    return 0


CHAT_HELP = """commands:
  /help          this text
  /reset         clear the conversation and the KV cache
  /system TEXT   set the system message (clears the conversation)
  /stats         tokens reused and prefilled for the last turn, speeds, context use
  /think on|off  a thinking model (Qwen3) reasons before answering, or not
  /save FILE     save the conversation and its KV cache (compressed)
  /load FILE     resume a chat saved with /save, without prefilling it again
  /exit          leave (also Ctrl-D, or Ctrl-C twice at an empty prompt)
Ctrl-C while the model answers stops the answer and keeps what it said."""


def cmd_chat(args: argparse.Namespace) -> int:
    from runtime.chat import ChatSession  # noqa: PLC0415

    model = load_model(args)
    if not model.chat_template:  # a base model: say what works instead of failing at the first message
        raise ModelError(f"{args.model or model.folder}: the model has no chat template (a base model?), so it cannot chat; "
                         "continue a text with: cli.py generate --raw --model MODEL \"TEXT\"")
    session = ChatSession(model, system=args.system, sampling=chat_sampling(model, args),
                          max_tokens=args.max_tokens, stop=args.stop, notice=log,
                          allow_special=args.allow_special)
    interactive = sys.stdin.isatty()
    if interactive:
        _enable_line_editing()
        log("type a message, /help for commands, Ctrl-D to leave")
    else:
        sys.stdin.reconfigure(errors="replace")  # undecodable bytes must not end the chat
    interrupts = 0
    while True:
        try:
            line = read_message(lambda more: input(("... " if more else ">>> ") if interactive else ""))
            interrupts = 0
        except EOFError:
            break
        except KeyboardInterrupt:
            interrupts += 1
            if interrupts >= 2:
                break
            log("\n(Ctrl-C again or Ctrl-D to leave)")
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if not _chat_command(session, text):
                break
            continue
        try:
            show = _ReplyPrinter(session, hide_thinking=args.hide_thinking, dim=sys.stdout.isatty())
            for piece in session.send(text):
                show(piece)
            show.end()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        except ModelError as exc:  # e.g. the template refuses the conversation: say so, keep chatting
            session.messages = [m for m in session.messages if m.get("content") or m["role"] != "assistant"]
            if session.messages and session.messages[-1]["role"] == "user":
                session.messages.pop()
            log(f"error: {exc}")
        sys.stdout.write("\n")
        sys.stdout.flush()
    if interactive:
        sys.stdout.write("\n")
    return 0


class _ReplyPrinter:
    """Writes a reply as it streams; a thinking model's reasoning dimmed on a terminal, in
    its <think> tags elsewhere, or left out (--hide-thinking)."""

    def __init__(self, session: Any, hide_thinking: bool, dim: bool) -> None:
        from runtime import thinking  # noqa: PLC0415

        self.active = thinking.thinks(session.model.chat_template)
        self.splitter = thinking.ThinkingSplitter(inside=self.active and session.reply_starts_thinking())
        self.hide, self.dim = hide_thinking, dim
        self.in_thinking = False

    def __call__(self, piece: str) -> None:
        parts = self.splitter.push(piece) if self.active else [("answer", piece)]
        for kind, text in parts:
            self._write(kind, text)
        sys.stdout.flush()

    def end(self) -> None:
        for kind, text in self.splitter.flush() if self.active else []:
            self._write(kind, text)
        self._switch("answer")
        sys.stdout.flush()

    def _write(self, kind: str, text: str) -> None:
        self._switch(kind)
        if kind == "answer" or not self.hide:
            sys.stdout.write(text)

    def _switch(self, kind: str) -> None:
        thinking_now = kind == "thinking"
        if thinking_now == self.in_thinking or self.hide:
            self.in_thinking = thinking_now
            return
        if self.dim:
            sys.stdout.write("\x1b[2m" if thinking_now else "\x1b[0m")
        else:
            sys.stdout.write("<think>" if thinking_now else "</think>")
        self.in_thinking = thinking_now


def _chat_command(session: Any, text: str) -> bool:
    """Run a /command; False means leave the chat."""
    name, _, arg = text.partition(" ")
    arg = arg.strip()
    try:
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name == "/help":
            print(CHAT_HELP)
        elif name == "/reset":
            session.reset()
            log("conversation cleared")
        elif name == "/system":
            session.reset()
            session.system = arg or None
            log("system message set; conversation cleared" if arg else "system message removed")
        elif name == "/think" and arg in ("on", "off"):
            from runtime import thinking  # noqa: PLC0415

            if not thinking.can_toggle(session.model.chat_template):
                log("this model's chat template has no enable_thinking switch")
            else:
                session.template_context["enable_thinking"] = arg == "on"
                log(f"thinking {arg} from the next message")
        elif name == "/stats":
            print(_stats_text(session))
        elif name == "/save" and arg:
            session.save(Path(arg))
            log(f"saved {len(session.conversation())} messages and {len(session.cache_ids)} cached tokens to {arg}")
        elif name == "/load" and arg:
            session.load(Path(arg))
            log(f"loaded {len(session.conversation())} messages and {len(session.cache_ids)} cached tokens "
                f"from {arg}")
        else:
            log(f"unknown command {text!r}; /help lists them")
    except (ModelError, OSError) as exc:
        log(f"error: {exc}")
    return True


def _stats_text(session: Any) -> str:
    s = session.last
    cap = session.cache.capacity
    return (f"last turn: {s.reused_tokens} tokens reused from the cache, {s.prefilled_tokens} prefilled "
            f"({s.prefill_tps:.1f} tokens/s), {s.generated_tokens} generated ({s.decode_tps:.1f} tokens/s), "
            f"stop: {s.stop_reason or '-'}\n"
            f"context: {s.context_used}/{cap} tokens; when full, the oldest whole turns are dropped and the "
            f"rest is prefilled again (dropped this turn: {s.dropped_turns})")


def read_message(read: Callable[[bool], str]) -> str:
    """One message from the user: a line; lines ending in a backslash continue on the next;
    a line that starts with \"\"\" opens a block that a line ending in \"\"\" closes (as
    ollama's REPL). `read(more)` returns the next line, `more` when it continues a message."""
    line = read(False)
    if line.lstrip().startswith('"""'):
        text = line.lstrip()[3:]
        if text.rstrip().endswith('"""'):
            return text.rstrip()[:-3]
        lines = [text] if text else []
        while True:
            line = read(True)
            if line.rstrip().endswith('"""'):
                lines.append(line.rstrip()[:-3])
                return "\n".join(lines).strip("\n")
            lines.append(line)
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = read(True)
    return "\n".join(lines + [line])


def _enable_line_editing() -> None:
    try:
        import readline  # noqa: PLC0415  (input() gains editing and history)
    except ImportError:
        return
    # a paste arrives as one message, newlines and all, not one message per line
    readline.parse_and_bind("set enable-bracketed-paste on")


COMMANDS = {"chat": cmd_chat, "generate": cmd_generate, "info": cmd_info, "perplexity": cmd_perplexity,
            "bench": cmd_bench, "serve": cmd_serve}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class _Interrupts:
    """SIGINT raises KeyboardInterrupt as usual, and remembers that it came.

    A Ctrl-C that lands inside an extension's import (NumPy's, say) surfaces as
    an ImportError; knowing a SIGINT arrived lets main() still exit with 130.
    """

    seen = False

    @classmethod
    def handler(cls, signum: int, frame: Any) -> None:
        cls.seen = True
        raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    import signal  # noqa: PLC0415

    signal.signal(signal.SIGINT, _Interrupts.handler)
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception:
        if _Interrupts.seen:
            print("\ninterrupted", file=sys.stderr)
            return 130
        raise


if __name__ == "__main__":
    sys.exit(main())
