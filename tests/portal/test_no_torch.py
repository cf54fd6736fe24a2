import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import importlib, os, pkgutil, sys
os.environ["DJANGO_SETTINGS_MODULE"] = "portal.settings"
import django
django.setup()
import portal
for module in pkgutil.walk_packages(portal.__path__, "portal."):
    importlib.import_module(module.name)
from portal.base_models.services import base_model_register_by_name  # describes models without torch
from engine_daemon.peft_format import describe_base_model
describe_base_model("random:tiny")
heavy = sorted(m for m in ("torch", "transformers", "peft", "triton") if m in sys.modules)
print("heavy:", heavy)
sys.exit(1 if heavy else 0)
"""


def test_the_portal_never_imports_torch(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "LORAFLEET_VAR_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
