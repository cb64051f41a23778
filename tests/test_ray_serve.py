"""The server as Ray Serve replicas on a local Ray cluster (127.0.0.1 only): two replicas of
the engine behind Ray's HTTP proxy answer the official openai client as `cli.py serve` does.

Ray is the `ray` extra, which `make test` installs: this test fails rather than skips
without it.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import openai
import pytest

from conftest import free_port, needs_default_model



@needs_default_model
def test_two_replicas_behind_rays_proxy_answer_like_the_model() -> None:
    import shutil
    import tempfile

    import ray
    from ray import serve

    import runtime
    from runtime.ray_serve import build

    port = free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=2, include_dashboard=False,
             _temp_dir=temp, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build({"replicas": "2", "cpus": "1", "max_batch": "4", "ctx": "512"}), route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while httpx.get(url + "/health", timeout=10).status_code != 200:  # both load their model
            assert time.monotonic() < deadline, "the replicas did not load the model"
            time.sleep(0.5)
        status = serve.status().applications["default"].deployments["NprtServer"]
        assert status.replica_states.get("RUNNING") == 2

        model = runtime.load(max_context=512, progress=False)
        question = "What is the capital of France?"
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        expected = model.generate(question, max_tokens=16)
        replies: list[str] = []

        def ask() -> None:
            reply = client.chat.completions.create(model="x", messages=[{"role": "user", "content": question}],
                                                   max_tokens=16, temperature=0)
            replies.append(reply.choices[0].message.content)

        threads = [threading.Thread(target=ask) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert replies == [expected] * 6
        chunks = list(client.completions.create(model="x", prompt="Once upon a time", max_tokens=8, temperature=0,
                                                stream=True))
        assert "".join(c.choices[0].text for c in chunks) == model.generate("Once upon a time", raw=True,
                                                                             max_tokens=8)
        bad = httpx.post(url + "/v1/chat/completions", json={"messages": [], "max_tokens": 1})
        assert bad.status_code == 400 and set(bad.json()["error"]) == {"message", "type", "param", "code"}
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
