"""The server as Ray Serve replicas on a local Ray cluster (127.0.0.1 only): two replicas of
the engine behind Ray's HTTP proxy answer the official openai client as `cli.py serve` does.

The checks run in tests/ray_check.py, in a network namespace whose only interface is the
loopback where `unshare -n` is allowed (root, as in CI): Ray picks the machine's outward
address for its components otherwise, and this test must talk to 127.0.0.1 alone. Ray is
the `ray` extra, which `make test` installs: this test fails rather than skips without it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

from conftest import REPO, needs_default_model


@needs_default_model
def test_two_replicas_behind_rays_proxy_answer_like_the_model() -> None:
    import ray  # noqa: F401  (the extra is installed)

    script = [sys.executable, str(REPO / "tests" / "ray_check.py")]
    isolated = shutil.which("unshare") and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0
    command = (["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', *script] if isolated else script)
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0 and "ray serve ok" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
