"""An OpenAI-compatible HTTP server over the continuous-batching engine (Starlette, uvicorn).

    python cli.py serve --port 8080 --max-batch 8

Endpoints: POST /v1/chat/completions and /v1/completions (stream or not), GET
/v1/models, GET /health (503 while the model loads). Responses and errors have
OpenAI's shapes ({"error": {"message", "type", "param", "code"}}); a client that
disconnects cancels its request, whose blocks go back to the pool at the next step.

Starlette and uvicorn are the `serve` extra: nothing else in the runtime needs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from loaders.errors import ModelError
from runtime.engine import Engine, Event, Handle, QueueFull, Request
from runtime.model import DRY_BREAKERS
from runtime.sampling import SamplingParams
from runtime.stop_strings import StopStrings

try:
    from starlette.applications import Starlette
    from starlette.requests import Request as HTTPRequest
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route
except ImportError as exc:  # pragma: no cover - the serve extra is not installed
    raise ModelError("serving needs the `serve` extra: pip install -e '.[serve]' (starlette, uvicorn)") from exc

MAX_STOP_STRINGS = 4
MAX_TOP_LOGPROBS = 20
# not supported: a clear 400 rather than silently ignored
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "response_format", "logit_bias",
               "best_of", "suffix", "echo")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code)


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status)


@dataclass
class Job:
    """One request's parameters, parsed and checked."""

    ids: list[int]
    max_tokens: int
    params: SamplingParams
    stops: list[str]
    stream: bool
    include_usage: bool
    logprobs: int | None     # None: no logprobs; 0..N: with the top N alternatives
    chat: bool
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says


class Server:
    """The app's state: the model (once loaded), its engine, and the request handlers."""

    def __init__(self, load: Callable[[], Any], *, model_name: str | None = None, api_key: str | None = None,
                 engine_options: dict[str, Any] | None = None) -> None:
        self.load = load
        self.model_name = model_name
        self.api_key = api_key
        self.engine_options = engine_options or {}
        self.model: Any = None
        self.engine: Engine | None = None
        self.load_error: str | None = None
        self.created = int(time.time())
        self.ready = threading.Event()
        self._loading = False
        self._loading_lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------
    def start_loading(self) -> None:
        """Load the model on a thread (once), so that /health answers 503 meanwhile."""
        with self._loading_lock:
            if self._loading:
                return
            self._loading = True
        threading.Thread(target=self._load, name="nprt-load", daemon=True).start()

    def _load(self) -> None:
        try:
            model = self.load()
            self.engine = Engine.for_model(model, **self.engine_options).start()
            self.model = model
            self.model_name = self.model_name or model.folder.name
        except Exception as exc:  # noqa: BLE001 - reported by /health and every request
            self.load_error = " ".join(str(exc).split()) or type(exc).__name__
        finally:
            self.ready.set()

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.stop()

    # -- the app ------------------------------------------------------------------
    def app(self) -> Starlette:
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.model_info, methods=["GET"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
        ]

        async def not_found(request: HTTPRequest, exc: Exception) -> Response:
            status = getattr(exc, "status_code", 404)
            message = "method not allowed" if status == 405 else f"no route {request.url.path}"
            return error_response(status, message, "invalid_request_error" if status == 405 else "not_found_error")

        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            self.start_loading()
            yield
            self.shutdown()

        return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found}, lifespan=lifespan)

    def _check(self, request: HTTPRequest, need_model: bool = True) -> None:
        if self.api_key is not None:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                raise APIError(401, "invalid API key", "authentication_error", code="invalid_api_key")
        if need_model:
            self._check_ready()

    def _check_ready(self) -> None:
        if self.load_error:
            raise APIError(503, f"the model failed to load: {self.load_error}", "server_error")
        if self.engine is None:
            raise APIError(503, "the model is loading", "server_error", code="loading")

    async def health(self, request: HTTPRequest) -> Response:
        try:
            self._check_ready()
        except APIError as exc:
            return exc.response()
        return JSONResponse({"status": "ok"})

    async def metrics(self, request: HTTPRequest) -> Response:
        """The engine's state in Prometheus' text format (as llama-server's /metrics)."""
        try:
            self._check(request)
        except APIError as exc:
            return exc.response()
        e = self.engine
        values = {"kv_blocks_free": e.free_blocks, "kv_blocks_total": e.total_blocks,
                  "kv_block_size": e.block_size, "requests_running": len(e.running),
                  "requests_waiting": len(e.waiting), "steps_total": e.steps, "preemptions_total": e.preemptions,
                  "max_batch": e.max_batch}
        text = "".join(f"nprt_{name} {value}\n" for name, value in values.items())
        return Response(text, media_type="text/plain; version=0.0.4")

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "nprt"}

    async def models(self, request: HTTPRequest) -> Response:
        try:
            self._check(request)
        except APIError as exc:
            return exc.response()
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model_info(self, request: HTTPRequest) -> Response:
        try:
            self._check(request)
        except APIError as exc:
            return exc.response()
        if request.path_params["model_id"] != self.model_name:
            return error_response(404, f"the model {request.path_params['model_id']!r} does not exist",
                                  "not_found_error", "model", "model_not_found")
        return JSONResponse(self._model_card())

    async def chat_completions(self, request: HTTPRequest) -> Response:
        return await self._complete(request, chat=True)

    async def completions(self, request: HTTPRequest) -> Response:
        return await self._complete(request, chat=False)

    # -- one request -----------------------------------------------------------
    async def _complete(self, request: HTTPRequest, chat: bool) -> Response:
        try:
            self._check(request)
            body = await _json_body(request)
            job = self._parse(body, chat)
        except APIError as exc:
            return exc.response()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        request_id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        try:
            handle = self.engine.submit(
                Request(job.ids, job.max_tokens, job.params,
                        frozenset() if job.ignore_eos else frozenset(self.model.stop_ids), job.logprobs,
                        self.model.token_ids_containing(DRY_BREAKERS) if job.params.dry_multiplier > 0
                        else frozenset()),
                lambda event: loop.call_soon_threadsafe(queue.put_nowait, event))
        except QueueFull as exc:
            return error_response(429, f"the server is busy: {exc}", "rate_limit_error", code="queue_full")
        except ModelError as exc:
            return error_response(400, str(exc), param="messages" if chat else "prompt")
        output = _Output(self.model.tokenizer, job, handle)
        if job.stream:
            return StreamingResponse(self._stream(request, request_id, job, output, queue),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            while not output.done:
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        handle.cancel()
                        return Response(status_code=499)
                    continue
                output.take(event)
        finally:
            if not output.done:
                handle.cancel()
        if output.error:
            return error_response(500, output.error, "server_error")
        return JSONResponse(self._final(request_id, job, output))

    async def _stream(self, request: HTTPRequest, request_id: str, job: Job, output: "_Output",
                      queue: asyncio.Queue) -> AsyncIterator[str]:
        created = int(time.time())
        kind = "chat.completion.chunk" if job.chat else "text_completion"

        def chunk(choice: dict[str, Any], usage: dict[str, Any] | None = None) -> str:
            data = {"id": request_id, "object": kind, "created": created, "model": self.model_name,
                    "choices": [choice] if choice is not None else []}
            if job.include_usage:
                data["usage"] = usage
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        try:
            if job.chat:
                yield chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None})
            while not output.done:
                event = await queue.get()
                text, logprobs = output.take(event)
                if output.error:
                    yield f"data: {json.dumps({'error': {'message': output.error, 'type': 'server_error', 'param': None, 'code': None}})}\n\n"
                    break
                if text or logprobs:
                    yield chunk(self._piece(job, text, logprobs, None))
            if not output.error:
                yield chunk(self._piece(job, "", None, output.finish_reason))
                if job.include_usage:
                    yield chunk(None, output.usage())
            yield "data: [DONE]\n\n"
        finally:
            if not output.done:
                output.handle.cancel()  # the client went away mid-stream

    def _piece(self, job: Job, text: str, logprobs: list[dict] | None, finish: str | None) -> dict[str, Any]:
        if job.chat:
            delta = {"content": text} if text or finish is None else {}
            return {"index": 0, "delta": delta, "logprobs": {"content": logprobs} if logprobs else None,
                    "finish_reason": finish}
        return {"index": 0, "text": text, "logprobs": _completion_logprobs(logprobs) if logprobs else None,
                "finish_reason": finish}

    def _final(self, request_id: str, job: Job, output: "_Output") -> dict[str, Any]:
        if job.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": output.text},
                      "logprobs": {"content": output.logprobs} if job.logprobs is not None else None,
                      "finish_reason": output.finish_reason}
        else:
            choice = {"index": 0, "text": output.text,
                      "logprobs": _completion_logprobs(output.logprobs) if job.logprobs is not None else None,
                      "finish_reason": output.finish_reason}
        return {"id": request_id, "object": "chat.completion" if job.chat else "text_completion",
                "created": int(time.time()), "model": self.model_name, "choices": [choice],
                "usage": output.usage()}

    # -- parsing -----------------------------------------------------------------
    def _parse(self, body: dict[str, Any], chat: bool) -> Job:
        for name in UNSUPPORTED:
            if body.get(name) not in (None, False, [], {}):
                raise APIError(400, f"'{name}' is not supported by this server", param=name,
                               code="unsupported_parameter")
        n = _integer(body, "n", 1, 1)
        if n != 1:
            raise APIError(400, "only n = 1 is supported", param="n", code="unsupported_parameter")
        for name in ("presence_penalty", "frequency_penalty"):
            if _number(body, name, 0.0, -2.0, 2.0) != 0.0:
                raise APIError(400, f"'{name}' is not supported (use repetition_penalty)", param=name,
                               code="unsupported_parameter")
        if chat:
            ids = self._chat_ids(body)
        else:
            ids = self._prompt_ids(body)
        context = self.engine.context
        if len(ids) >= context:
            raise APIError(400, f"the prompt is {len(ids):,} tokens, and the context is {context:,} "
                                "(it must leave room for at least one new token)",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
        room = context - len(ids)
        limit = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _integer(body, limit, room if chat else 16, 0)
        params = SamplingParams(
            temperature=_number(body, "temperature", 1.0, 0.0, 100.0),
            top_k=_integer(body, "top_k", 0, 0),
            top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
            min_p=_number(body, "min_p", 0.0, 0.0, 1.0, high_open=True),
            repeat_penalty=_number(body, "repetition_penalty", 1.0, 0.0, 100.0, low_open=True),
            seed=_integer(body, "seed", None, 0) if body.get("seed") is not None else None,
            # llama-server's DRY fields, the same names and meaning
            dry_multiplier=_number(body, "dry_multiplier", 0.0, 0.0, 100.0),
            dry_base=_number(body, "dry_base", 1.75, 1.0, 100.0),
            dry_allowed_length=_integer(body, "dry_allowed_length", 2, 1),
            dry_penalty_last_n=_integer(body, "dry_penalty_last_n", 64, -1),
        )
        stops = body.get("stop")
        stops = [stops] if isinstance(stops, str) else (stops or [])
        if not (isinstance(stops, list) and all(isinstance(s, str) for s in stops)) or len(stops) > MAX_STOP_STRINGS:
            raise APIError(400, f"'stop' must be a string or a list of at most {MAX_STOP_STRINGS} strings",
                           param="stop")
        stream = body.get("stream") or False
        if not isinstance(stream, bool):
            raise APIError(400, "'stream' must be a boolean", param="stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise APIError(400, "'stream_options' must be an object", param="stream_options")
        include_usage = bool(options.get("include_usage")) and stream
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise APIError(400, "'ignore_eos' must be a boolean", param="ignore_eos")
        return Job(ids, min(max_tokens, room), params, stops, stream, include_usage,
                   self._logprobs(body, chat), chat, ignore_eos)

    def _logprobs(self, body: dict[str, Any], chat: bool) -> int | None:
        if chat:
            wanted = body.get("logprobs")
            if wanted is not None and not isinstance(wanted, bool):
                raise APIError(400, "'logprobs' must be a boolean", param="logprobs")
            top = _integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
            if top and not wanted:
                raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
            return top if wanted else None
        if body.get("logprobs") is None:
            return None
        return _integer(body, "logprobs", 0, 0, 5)

    def _chat_ids(self, body: dict[str, Any]) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list", param="messages")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise APIError(400, f"messages[{i}] must be an object with a 'role'", param="messages")
            content = m.get("content")
            if isinstance(content, list):  # content parts: only text is understood
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise APIError(400, f"messages[{i}]: only text content parts are supported",
                                   param="messages")
                content = "".join(p["text"] for p in content)
            if content is not None and not isinstance(content, str):
                raise APIError(400, f"messages[{i}].content must be a string", param="messages")
            clean.append({**m, "content": content or ""})
        try:
            return self.model.encode_chat(clean)  # special-token text in a message stays literal
        except ModelError as exc:
            raise APIError(400, str(exc), param="messages") from None

    def _prompt_ids(self, body: dict[str, Any]) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise APIError(400, "'prompt' is empty", param="prompt")
            try:
                return self.model.tokenizer.encode(prompt)
            except ModelError as exc:
                raise APIError(400, str(exc), param="prompt") from None
        vocab = self.model.config.vocab_size
        if isinstance(prompt, list) and prompt and all(type(t) is int and 0 <= t < vocab for t in prompt):
            return list(prompt)
        raise APIError(400, "'prompt' must be a string or a list of token ids (one prompt per request)",
                       param="prompt")


class _Output:
    """A request's text as it is generated: detokenized, stop strings cut, usage counted."""

    def __init__(self, tokenizer: Any, job: Job, handle: Handle) -> None:
        self.tokenizer = tokenizer
        self.decoder = tokenizer.stream_decoder()
        self.stop = StopStrings(job.stops)
        self.job = job
        self.handle = handle
        self.text = ""
        self.logprobs: list[dict[str, Any]] = []
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.done = False
        self.completion_tokens = 0

    def take(self, event: Event) -> tuple[str, list[dict] | None]:
        """The text (and logprob entries) this event adds."""
        if self.done:
            return "", None
        if event.token is None:
            self.done = True
            if event.finish_reason == "error":
                self.error = event.error or "generation failed"
                return "", None
            self.finish_reason = "length" if event.finish_reason == "length" else "stop"
            piece = self.stop.push(self.decoder.flush()) + self.stop.flush()
            self.text += piece
            return piece, None
        self.completion_tokens += 1
        piece = self.stop.push(self.decoder.push(event.token))
        entries = None
        if self.job.logprobs is not None:
            entries = [self._logprob_entry(event)]
            self.logprobs += entries
        if self.stop.hit:
            self.done = True
            self.finish_reason = "stop"
            self.handle.cancel()
        self.text += piece
        return piece, entries

    def _logprob_entry(self, event: Event) -> dict[str, Any]:
        def one(token: int, logprob: float) -> dict[str, Any]:
            text = self.tokenizer.decode([token], skip_special_tokens=False)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        entry = one(event.token, event.logprob)
        entry["top_logprobs"] = [one(t, lp) for t, lp in (event.top_logprobs or [])]
        return entry

    def usage(self) -> dict[str, Any]:
        u = self.handle.usage
        return {"prompt_tokens": u.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": u.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


def _completion_logprobs(entries: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The legacy completions shape: parallel lists."""
    entries = entries or []
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


async def _json_body(request: HTTPRequest) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    return body


def _integer(body: dict[str, Any], name: str, default: Any, low: int | None = None,
             high: int | None = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if type(value) is not int or (low is not None and value < low) or (high is not None and value > high):
        bounds = f" in [{low}, {high}]" if high is not None else (f" >= {low}" if low is not None else "")
        raise APIError(400, f"'{name}' must be an integer{bounds}, got {value!r}", param=name)
    return value


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float, *,
            low_open: bool = False, high_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    ok = type(value) in (int, float) and (value > low if low_open else value >= low) and \
        (value < high if high_open else value <= high)
    if not ok:
        raise APIError(400, f"'{name}' must be a number in {'(' if low_open else '['}{low:g}, {high:g}"
                            f"{')' if high_open else ']'}, got {value!r}", param=name)
    return float(value)
