"""docker-compose.yml cannot run here (no Docker engine); this checks it agrees with the code and the images.

tests/test_compose_services.py runs each service's command and health check; the helpers it shares
(compose's variable interpolation, what a Dockerfile sets) are here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine_daemon.__main__ import serve_settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
REDIS_SERVICES = ("portal", "worker", "beat", "engine")  # every service that talks to Redis
# What an operator puts in .env: the required secrets, and a deployment behind a TLS proxy.
DEPLOYMENT = {
    "POSTGRES_PASSWORD": "pg-secret-0123",
    "REDIS_PASSWORD": "redis-secret-4567",
    "DJANGO_SECRET_KEY": "compose-test-secret-key",
    "DJANGO_ALLOWED_HOSTS": ".lorafleet.example",
    "DJANGO_CSRF_TRUSTED_ORIGINS": "https://portal.lorafleet.example",
    "DJANGO_BEHIND_TLS_PROXY": "1",
}

_VARIABLE = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|(?P<named>\w+))")


class MissingVariable(Exception):
    """compose refuses to start: a ${VAR:?message} is unset."""


def interpolate(value: Any, variables: dict[str, str]) -> Any:
    """Compose's interpolation of every string in ``value``: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR:?error}."""
    if isinstance(value, dict):
        return {key: interpolate(item, variables) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, variables) for item in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        if match["escaped"]:
            return "$"
        name, op, arg = match["braced"] or match["named"], match["op"] or "", match["arg"] or ""
        found = variables.get(name)
        unset = found is None or (op.startswith(":") and found == "")
        if unset and op.endswith("?"):
            raise MissingVariable(f"{name}: {arg}")
        if unset and op.endswith("-"):
            return arg
        return found or ""

    return _VARIABLE.sub(one, value)


def deployed(variables: dict[str, str] = DEPLOYMENT) -> dict[str, Any]:
    """docker-compose.yml as compose reads it with these variables (anchors resolved, variables substituted)."""
    return interpolate(COMPOSE, variables)


def dockerfile(service: str) -> Path:
    build = SERVICES[service]["build"]
    return ROOT / build["context"] / build["dockerfile"]


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comment lines dropped, as Docker reads them."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def image_environment(service: str) -> dict[str, str]:
    """The ENV the service's image sets (KEY=VALUE form); PATH is the image's own business."""
    found = {}
    for instruction, arguments in dockerfile_instructions(dockerfile(service)):
        if instruction == "ENV":
            found.update(item.split("=", 1) for item in arguments.split())
    found.pop("PATH", None)
    return found


def image_cmd(service: str) -> list[str]:
    """The CMD of the service's image: what the container runs unless the service sets a command."""
    cmds = [arguments for instruction, arguments in dockerfile_instructions(dockerfile(service)) if instruction == "CMD"]
    assert cmds, f"{dockerfile(service)} has no CMD"
    return json.loads(cmds[-1])  # the exec form; the last CMD wins


def environment(service: str) -> dict[str, str]:
    return {k: str(v) for k, v in SERVICES[service].get("environment", {}).items()}


def mounts(service: str) -> dict[str, str]:
    """container path → volume name"""
    found = {}
    for entry in SERVICES[service].get("volumes", []):
        volume, path, *_ = entry.split(":")
        found[path] = volume
    return found


def settings_environment_names() -> set[str]:
    text = (ROOT / "portal" / "settings.py").read_text()
    names = set(re.findall(r'(?:environ\.get|_env_\w+)\(\s*"([A-Z_]+)"', text))
    if "dj_database_url.config(" in text:
        names.add("DATABASE_URL")  # dj_database_url's own variable
    return names


def test_every_part_of_the_product_is_a_service_with_a_health_check():
    assert {"postgres", "redis", "portal", "worker", "engine"} <= set(SERVICES)
    for name, service in SERVICES.items():
        assert "healthcheck" in service, f"{name} has no health check"
        assert service.get("restart") == "unless-stopped", name


def test_portal_and_worker_read_only_settings_that_exist():
    known = settings_environment_names()
    for service in ("portal", "worker"):
        unknown = set(environment(service)) - known
        assert not unknown, f"{service} sets {unknown}, which portal/settings.py never reads"
        assert environment(service)["DATABASE_URL"].startswith("postgres://")


def test_engine_environment_matches_the_daemon_flags():
    flags = {setting.env for setting in serve_settings()}
    unknown = set(environment("engine")) - flags
    assert not unknown, f"engine sets {unknown}, which python -m engine_daemon serve never reads"
    assert environment("engine")["LORAFLEET_DEVICE"] == "cuda"


def test_the_adapter_cache_is_one_volume_at_the_configured_path_everywhere():
    for service in ("portal", "worker", "engine"):
        cache = environment(service)["ADAPTER_CACHE_DIR"]
        assert mounts(service).get(cache) == "adapter-cache", f"{service} does not mount the cache at {cache}"
    for service in ("portal", "worker"):
        assert mounts(service)[environment(service)["MEDIA_ROOT"]] == "media"
    volumes = {v for s in SERVICES.values() for v in (entry.split(":")[0] for entry in s.get("volumes", []))}
    assert volumes <= set(COMPOSE["volumes"])


def test_the_engine_reserves_a_gpu_and_drains_on_stop():
    devices = SERVICES["engine"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert SERVICES["engine"]["stop_grace_period"]


def test_the_images_exist():
    for service in ("portal", "worker", "engine"):
        build = SERVICES[service]["build"]
        assert (ROOT / build["context"] / build["dockerfile"]).is_file()


def test_compose_refuses_to_start_without_each_secret():
    for name in ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "DJANGO_SECRET_KEY"):
        with pytest.raises(MissingVariable, match=name):
            deployed({k: v for k, v in DEPLOYMENT.items() if k != name})


def test_redis_has_a_password_that_every_service_uses():
    services = deployed()["services"]
    command = services["redis"]["command"]
    assert command[command.index("--requirepass") + 1] == DEPLOYMENT["REDIS_PASSWORD"]
    for service in REDIS_SERVICES:
        assert services[service]["environment"]["REDIS_URL"] == f"redis://:{DEPLOYMENT['REDIS_PASSWORD']}@redis:6379/0"
    # the health check authenticates (redis-cli reads REDISCLI_AUTH) and accepts only a PONG
    assert services["redis"]["environment"]["REDISCLI_AUTH"] == DEPLOYMENT["REDIS_PASSWORD"]
    assert "PONG" in " ".join(services["redis"]["healthcheck"]["test"])


def test_redis_is_bounded_and_never_evicts():
    command = deployed()["services"]["redis"]["command"]
    assert command[command.index("--maxmemory") + 1] == "1gb"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    command = deployed({**DEPLOYMENT, "LORAFLEET_REDIS_MAXMEMORY": "8gb"})["services"]["redis"]["command"]
    assert command[command.index("--maxmemory") + 1] == "8gb"


def test_the_portal_is_told_about_its_tls_proxy():
    portal = deployed()["services"]["portal"]["environment"]
    assert portal["DJANGO_BEHIND_TLS_PROXY"] == "1"
    assert portal["DJANGO_CSRF_TRUSTED_ORIGINS"] == DEPLOYMENT["DJANGO_CSRF_TRUSTED_ORIGINS"]
    direct = deployed({k: v for k, v in DEPLOYMENT.items() if not k.startswith(("DJANGO_BEHIND", "DJANGO_CSRF"))})
    assert direct["services"]["portal"]["environment"]["DJANGO_BEHIND_TLS_PROXY"] == "0"
    assert direct["services"]["portal"]["ports"] == ["8000:8000"]
    assert deployed({**DEPLOYMENT, "LORAFLEET_PORTAL_PUBLISH": "127.0.0.1:8000"})["services"]["portal"]["ports"] == [
        "127.0.0.1:8000:8000"]


@pytest.mark.parametrize("behind_proxy, expected", [("1", ["HTTP_X_FORWARDED_PROTO", "https"]), ("0", None)])
def test_settings_trust_the_proxy_scheme_only_when_told(behind_proxy, expected, tmp_path):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LORAFLEET_VAR_DIR": str(tmp_path),
           "DJANGO_SECRET_KEY": "x", "DJANGO_BEHIND_TLS_PROXY": behind_proxy,
           "DJANGO_CSRF_TRUSTED_ORIGINS": "https://a.example,https://b.example"}
    script = ("import json, portal.settings as s; "
              "print(json.dumps([getattr(s, 'SECURE_PROXY_SSL_HEADER', None), s.CSRF_TRUSTED_ORIGINS]))")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert json.loads(result.stdout) == [expected, ["https://a.example", "https://b.example"]]


def test_each_image_owns_the_volumes_mounted_in_it():
    """A fresh named volume takes the ownership of the image directory it is mounted on: each mount point
    must exist in the image, owned by the user the container runs as (else the worker cannot write the cache)."""
    uids = set()
    for service in ("portal", "worker", "beat", "engine"):
        instructions = dockerfile_instructions(dockerfile(service))
        runs = " && ".join(arguments for instruction, arguments in instructions if instruction == "RUN")
        (user,) = [arguments for instruction, arguments in instructions if instruction == "USER"]
        assert user != "root", f"{service} runs as root"
        uids.add(re.search(rf"useradd --uid (\d+) --gid (\d+) [^&]*\b{user}\b", runs).groups())
        created = {path for found in re.findall(r"mkdir -p ([^&]+)", runs) for path in found.split()}
        for path in mounts(service):
            if path.startswith("/var/lib/lorafleet/"):
                assert path in created, f"{dockerfile(service)} does not create {path}, where {service} mounts a volume"
        assert f"chown -R {user}:{user} /var/lib/lorafleet" in runs
    assert len(uids) == 1, f"the images run as different users {uids}: the engine must read what the worker writes"
