"""ImageNet weights availability goes through huggingface_hub: HF_ENDPOINT, proxies, HF_HUB_OFFLINE.

huggingface_hub reads its environment (HF_ENDPOINT, HF_HUB_OFFLINE, HF_HOME) once, at import, so
every check runs in a fresh process with the environment set, as on a compute node. The endpoint
is a small HTTP server on 127.0.0.1 that records what it is asked.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp

ENCODER = "resnet18"
SETTINGS = smp.encoders.encoders[ENCODER]["pretrained_settings"]["imagenet"]
WEIGHTS_PATH = f"/{SETTINGS['repo_id']}/resolve/{SETTINGS['revision']}/model.safetensors"
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


@dataclass
class Endpoint:
    """A recording HTTP server: `status` answers every request; `requests` holds (method, target)."""

    url: str
    status: int = 404
    requests: list[tuple[str, str]] = field(default_factory=list)


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    server_endpoint = Endpoint(url="")

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            server_endpoint.requests.append((self.command, self.path))
            self.send_response(server_endpoint.status)
            self.send_header("Content-Length", "0")
            self.send_header("ETag", '"0123456789abcdef"')
            self.send_header("X-Repo-Commit", SETTINGS["revision"])
            self.end_headers()

        do_HEAD = do_GET = _answer

        def log_message(self, format: str, *args: object) -> None:  # keep pytest's output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server_endpoint.url = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server_endpoint
    finally:
        server.shutdown()
        server.server_close()


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a node with an empty Hugging Face cache and no proxy unless given."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k.upper() not in PROXY_VARS and not k.startswith(("HF_", "HUGGINGFACE_"))
    }
    env.update(HF_HOME=str(tmp_path / "hf-home"), NO_PROXY="", no_proxy="", **extra)
    return env


def _aerialseg(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The real entry point of this environment."""
    exe = shutil.which("aerialseg", path=str(Path(sys.executable).parent))
    assert exe is not None, "the aerialseg command is not installed next to this Python"
    return subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=300)


CHECK = """
import sys, time
import aerialseg.model as m
import segmentation_models_pytorch, huggingface_hub  # imported by the check itself: not what is timed
m.HUB_CHECK_TIMEOUT = float(sys.argv[1])
start = time.monotonic()
try:
    m.ensure_imagenet_reachable(sys.argv[2])
    print(f"OK {time.monotonic() - start:.3f}")
except m.WeightsUnavailableError as err:
    print(f"FAILED {time.monotonic() - start:.3f}")
    print(err)
"""


def _check(env: dict[str, str], timeout: float = 5.0) -> tuple[str, float, str]:
    """Run the weights check alone in a fresh process: (OK or FAILED, seconds it took, message)."""
    run = subprocess.run(
        [sys.executable, "-c", CHECK, str(timeout), ENCODER],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    first, _, message = run.stdout.partition("\n")
    verdict, seconds = first.split()
    return verdict, float(seconds), message.strip()


def _assert_one_actionable_line(message: str) -> None:
    assert "\n" not in message.strip()
    assert f"`aerialseg prefetch-weights {ENCODER}`" in message
    assert "local encoder weights file" in message


def test_prefetch_asks_the_endpoint_of_hf_endpoint(endpoint: Endpoint, tmp_path: Path) -> None:
    # A mirror without the weights: the request arrives there, not at huggingface.co, and the
    # command stops with one line naming the endpoint, the prefetch command and the local-file option.
    run = _aerialseg("prefetch-weights", ENCODER, env=_env(tmp_path, HF_ENDPOINT=endpoint.url))
    assert ("HEAD", WEIGHTS_PATH) in endpoint.requests
    assert run.returncode == 2, run.stdout + run.stderr
    error = run.stderr.strip()
    assert error.startswith("error: ")
    assert f"cannot be downloaded from {endpoint.url}" in error
    assert "404" in error
    _assert_one_actionable_line(error)


def test_a_mirror_that_has_the_weights_passes_the_check(endpoint: Endpoint, tmp_path: Path) -> None:
    endpoint.status = 200
    verdict, _, message = _check(_env(tmp_path, HF_ENDPOINT=endpoint.url))
    assert verdict == "OK", message
    # One HEAD of the weights file, nothing downloaded (the hub may add its own small API calls).
    assert [r for r in endpoint.requests if r[1] == WEIGHTS_PATH] == [("HEAD", WEIGHTS_PATH)]


def test_the_check_goes_through_the_proxy(endpoint: Endpoint, tmp_path: Path) -> None:
    # The test server plays the proxy: it receives the absolute URL of a mirror it does not host.
    mirror = "http://hub-mirror.invalid"
    env = _env(tmp_path, HF_ENDPOINT=mirror, HTTP_PROXY=endpoint.url, http_proxy=endpoint.url)
    verdict, _, message = _check(env)
    assert ("HEAD", mirror + WEIGHTS_PATH) in endpoint.requests
    assert verdict == "FAILED"
    _assert_one_actionable_line(message)


def test_offline_without_cache_fails_at_once_without_a_request(endpoint: Endpoint, tmp_path: Path) -> None:
    env = _env(tmp_path, HF_ENDPOINT=endpoint.url, HF_HUB_OFFLINE="1")
    verdict, seconds, message = _check(env)
    assert verdict == "FAILED"
    assert seconds < 1.0, f"the offline check took {seconds:.1f} s"
    assert "HF_HUB_OFFLINE is set" in message
    _assert_one_actionable_line(message)
    # Through the real entry point too: one line, and nothing asked of the endpoint.
    run = _aerialseg("prefetch-weights", ENCODER, env=env)
    assert run.returncode == 2
    assert len(run.stderr.strip().splitlines()) == 1
    assert "HF_HUB_OFFLINE is set" in run.stderr
    assert endpoint.requests == []


def test_a_silent_endpoint_fails_within_the_timeout(tmp_path: Path) -> None:
    # A port that accepts connections and never answers (a black-holing firewall or a dead proxy).
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        verdict, seconds, message = _check(_env(tmp_path, HF_ENDPOINT=url), timeout=1.0)
    assert verdict == "FAILED"
    # 1 s for the HEAD, after huggingface_hub's own first call to a new endpoint (its user-agent
    # registry, /api/agent-harnesses, 3 s at most); no retries.
    assert seconds < 1.0 + 3.0 + 1.5, f"a 1 s check took {seconds:.1f} s (retries?)"
    assert "Timeout" in message
    _assert_one_actionable_line(message)
