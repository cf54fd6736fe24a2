"""The native CPU kernels' library: the C sources in ``c/``, compiled on first use for the machine at hand.

The CPU engine's multi-LoRA and decode-attention work is memory-bound on a few tokens per
adapter; as torch calls it is thousands of tiny ops per step, each paying dispatcher overhead
and, for attention, a gathered copy of every context. These kernels do one call per projection
(or per layer) and read each weight and cache byte once.

The library is built with the system C compiler (``$CC``, else ``cc``) and ``-march=native``,
then cached under ``$LORAFLEET_KERNEL_CACHE`` (default ``~/.cache/lorafleet/kernels``) by a hash
of the sources, flags and CPU. It links the same OpenMP runtime torch has already loaded
(``libgomp.so.1``), so both share one thread pool. Without a compiler, ``library()`` raises
`NativeUnavailable` with the compiler's message (``kernels="auto"`` then chooses the torch backend).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch  # noqa: F401  (loads torch's libgomp first: the library then shares it)

logger = logging.getLogger(__name__)

SOURCES = ("lora.c", "attention.c")
HEADERS = ("vectors.h",)
# -ffp-contract=fast: ISO C mode would otherwise keep every `acc += x * w` a multiply and an add
# (twice the arithmetic instructions of one FMA; the decode LoRA kernels ran ~10% slower).
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC", "-std=c11")
_HERE = Path(__file__).resolve().parent / "c"

P, I64 = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    # Each LoRA kernel comes twice: float32 weights (_f32) and bfloat16 weights (_bf16w).
    **{f"lorafleet_lora_shrink_{w}": (ctypes.c_int, [P, I64, I64, P, I64, I64, P, I64, I64, P, P, P, P])
       for w in ("f32", "bf16w")},
    **{f"lorafleet_lora_expand_{w}": (ctypes.c_int, [P, I64, I64, P, I64, I64, I64, I64, P, I64, I64, P, P, P, P, P])
       for w in ("f32", "bf16w")},
    **{f"lorafleet_lora_apply_{w}": (ctypes.c_int, [P, I64, I64, P, I64, I64, P, I64, I64, P, P, I64, P, P, P, P, P])
       for w in ("f32", "bf16w")},
    "lorafleet_lora_apply_by_segment": (ctypes.c_int, [I64, P, P]),
    "lorafleet_paged_decode_attention_f32": (
        ctypes.c_int,
        [P, I64, P, I64, P, P, I64, I64, I64, I64, I64, I64, P, I64, P, P, P, I64, ctypes.c_float],
    ),
    "lorafleet_attention_limits": (I64, [I64]),
}


class NativeUnavailable(RuntimeError):
    """The native kernels cannot be built or loaded here."""


def available() -> bool:
    """Whether the native kernels load (compiling them on first use)."""
    loaded = _load()
    if isinstance(loaded, NativeUnavailable):
        _warn_once(str(loaded))
        return False
    return True


def library() -> ctypes.CDLL:
    """The loaded kernel library, compiled first if this machine has no cached build of it."""
    loaded = _load()
    if isinstance(loaded, NativeUnavailable):
        raise NativeUnavailable(str(loaded))
    return loaded


@functools.cache
def _load() -> ctypes.CDLL | NativeUnavailable:
    """Build and load once per process; a failure is remembered too (no compiler run per call)."""
    try:
        path = _build()
        lib = ctypes.CDLL(str(path))
    except NativeUnavailable as error:
        return error
    except OSError as error:
        return NativeUnavailable(f"cannot build or load the native kernels: {error}")
    for name, (result, arguments) in _SIGNATURES.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = result, arguments
    return lib


@functools.cache
def _warn_once(reason: str) -> None:
    logger.warning("native CPU kernels unavailable (kernels='auto' chooses the torch backend): %s", reason)


def _compiler() -> str:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise NativeUnavailable("no C compiler (set CC, or install gcc)")
    return compiler


def _cpu_signature() -> str:
    """The CPU's feature flags: a build for one machine's -march=native never runs on another's."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build() -> Path:
    compiler = _compiler()
    digest = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        digest.update((_HERE / name).read_bytes())
    digest.update(" ".join((compiler, *FLAGS, _cpu_signature())).encode())
    cache = Path(os.environ.get("LORAFLEET_KERNEL_CACHE") or Path.home() / ".cache" / "lorafleet" / "kernels")
    target = cache / f"liblorafleet_kernels-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    # Build beside the target, then rename: concurrent builders never load a half-written file.
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        built = Path(scratch) / target.name
        command = [compiler, *FLAGS, "-o", str(built), *(str(_HERE / name) for name in SOURCES)]
        try:
            subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as error:
            detail = getattr(error, "stderr", "") or str(error)
            raise NativeUnavailable(f"compiling the native kernels failed: {detail.strip()[:2000]}") from error
        os.replace(built, target)
    logger.info("built native CPU kernels at %s", target)
    return target
