"""docker-compose.yml cannot run here (no Docker engine); this checks it agrees with the code."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from engine_daemon.__main__ import SERVE_FLAGS

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


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
        assert environment(service)["REDIS_URL"] == "redis://redis:6379/0"


def test_engine_environment_matches_the_daemon_flags():
    flags = {env for _flag, env, *_ in SERVE_FLAGS}
    unknown = set(environment("engine")) - flags
    assert not unknown, f"engine sets {unknown}, which python -m engine_daemon serve never reads"
    assert environment("engine")["REDIS_URL"] == environment("portal")["REDIS_URL"]
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
