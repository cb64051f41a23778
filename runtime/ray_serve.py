"""The same server as Ray Serve replicas: one engine (and model) per replica, behind Ray's
HTTP proxy, which spreads requests over them. Past one machine, the replicas go where the
Ray cluster has room.

    pip install -e '.[serve,ray]'
    serve run runtime.ray_serve:build replicas=2 max_batch=8 ctx=2048   # http://127.0.0.1:8000/v1

`build` takes the same settings as `cli.py serve` (model, device, dtype, kv_dtype, ctx,
max_batch, block_size, num_blocks, step_tokens, prefill_tokens, max_waiting, api_key, model_name) as
key=value arguments, plus `replicas` and `cpus` (per replica). Ray is the `ray` extra;
nothing else in the runtime imports it.
"""

from __future__ import annotations

from typing import Any

from loaders.errors import ModelError
from runtime import blas

try:
    from ray import serve
except ImportError as exc:  # pragma: no cover - the ray extra is not installed
    raise ModelError("Ray Serve needs the `ray` extra: pip install -e '.[serve,ray]'") from exc

ENGINE_KEYS = {"max_batch": int, "block_size": int, "num_blocks": int, "step_tokens": int, "prefill_tokens": int,
               "max_waiting": int}
LOAD_KEYS = {"model": str, "device": str, "dtype": str, "kv_dtype": str, "ctx": int}


def asgi_app(settings: dict[str, Any]) -> Any:
    """A replica's app: the server of `cli.py serve`, its model loading as the replica starts."""
    import runtime
    from runtime.server import Server

    load = {k: v for k, v in settings.items() if k in LOAD_KEYS}

    def load_model() -> Any:
        return runtime.load(load.get("model"), device=load.get("device", "cpu"), dtype=load.get("dtype"),
                            kv_dtype=load.get("kv_dtype"), max_context=load.get("ctx"), progress=False)

    engine = {k: v for k, v in settings.items() if k in ENGINE_KEYS}
    if "ctx" in load:
        engine["context"] = load["ctx"]
    server = Server(load_model, model_name=settings.get("model_name"), api_key=settings.get("api_key"),
                    engine_options=engine)
    server.start_loading()  # now, not at the first request: Ray's health check waits on the replica
    return server.app()


def build(args: dict[str, str]) -> Any:
    """`serve run runtime.ray_serve:build key=value ...`: the application, its replicas bound."""
    settings: dict[str, Any] = {}
    for key, value in args.items():
        kind = {**ENGINE_KEYS, **LOAD_KEYS, "replicas": int, "cpus": float, "api_key": str,
                "model_name": str}.get(key)
        if kind is None:
            raise ModelError(f"unknown setting {key!r} for runtime.ray_serve:build")
        try:
            settings[key] = kind(value)
        except ValueError:
            raise ModelError(f"{key}={value!r}: expected a {kind.__name__}") from None
    replicas = settings.pop("replicas", 1)
    cpus = settings.pop("cpus", 1.0)
    options: dict[str, Any] = {"num_cpus": cpus}
    env = blas.worker_environment()  # this machine's, as the documented cluster is this machine
    if env:
        options["runtime_env"] = {"env_vars": env}

    @serve.deployment(num_replicas=replicas, ray_actor_options=options,
                      max_ongoing_requests=settings.get("max_waiting", 256) + settings.get("max_batch", 8))
    @serve.ingress(lambda: asgi_app(settings))
    class NprtServer:
        pass

    return NprtServer.bind()
