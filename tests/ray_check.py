"""Run by tests/test_ray_serve.py, in a network namespace of its own where it can: two
replicas of the server on a local Ray cluster (127.0.0.1), checked with the openai client.
Exits 0 and prints "ray serve ok" when every check holds."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import openai  # noqa: E402

from conftest import free_port  # noqa: E402


def main() -> None:
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
    print("ray serve ok")


if __name__ == "__main__":
    main()
