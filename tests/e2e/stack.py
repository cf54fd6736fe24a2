"""The running product for end-to-end tests: the engine daemon and the portal (uvicorn) as subprocesses.

Both talk to the test session's Redis and (the portal) to its test database; the Celery worker is
``tests.portal.celery_worker``. Logs go to files that a failing assertion shows.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import redis

from engine_daemon import protocol
from engine_daemon.protocol import Heartbeat

ROOT = Path(__file__).resolve().parents[2]


def wait_for(check: Callable[[], object], what: str, timeout: float, log: Path | None = None) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = log.read_text()[-4000:] if log and log.exists() else ""
            raise AssertionError(f"{what} did not happen within {timeout:.0f} s\n{tail}")
        time.sleep(0.05)


def log_tail(path: Path, chars: int = 4000) -> str:
    return path.read_text()[-chars:] if path.exists() else ""


class Daemon:
    """``python -m engine_daemon serve`` on CPU, one thread, float32."""

    def __init__(self, *, model: str, redis_url: str, cache_dir: Path, log_dir: Path, engine_id: str) -> None:
        self.model = model
        self.redis_url = redis_url
        self.cache_dir = cache_dir
        self.engine_id = engine_id
        self.log = log_dir / f"daemon-{engine_id}.log"
        self.process: subprocess.Popen | None = None
        self.redis = redis.Redis.from_url(redis_url)

    def start(self, *extra: str, engine_id: str | None = None) -> Daemon:
        self.engine_id = engine_id or self.engine_id
        command = [sys.executable, "-m", "engine_daemon", "serve", "--model", self.model, "--device", "cpu",
                   "--dtype", "float32", "--redis-url", self.redis_url, "--adapter-cache-dir", str(self.cache_dir),
                   "--engine-id", self.engine_id, "--cpu-threads", "1", *extra]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "LORAFLEET_LOG_LEVEL": "INFO"}
        with self.log.open("a") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout: float = 120.0) -> Heartbeat:
        def beating() -> Heartbeat | None:
            assert self.process.poll() is None, f"the daemon exited:\n{log_tail(self.log)}"
            return self.heartbeat()

        return wait_for(beating, f"daemon {self.engine_id} beating", timeout, self.log)

    def heartbeat(self) -> Heartbeat | None:
        raw = self.redis.hgetall(protocol.heartbeat_key(self.engine_id))
        return Heartbeat.from_redis(raw) if raw else None

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PortalServer:
    """The portal under uvicorn on 127.0.0.1, configured only through the environment, as in production."""

    def __init__(self, *, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.env = {**env, "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost"}
        self.process: subprocess.Popen | None = None

    def start(self) -> PortalServer:
        command = [sys.executable, "-m", "uvicorn", "portal.asgi:application", "--host", "127.0.0.1",
                   "--port", str(self.port), "--log-level", "warning", "--no-access-log"]
        with self.log.open("w") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)

        def healthy() -> bool:
            assert self.process.poll() is None, f"the portal exited:\n{log_tail(self.log)}"
            try:
                return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, "the portal answering /healthz", 60, self.log)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
