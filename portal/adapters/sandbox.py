"""Upload validation in a child process with limits, so that no upload can take the worker down.

The worker (parent) hands the child a ``ValidationJob`` as JSON on stdin; the child caps its own
address space and CPU time (``setrlimit``), writes the upload's two files into ``job.dest``,
checks them (``portal.adapters.checks``) and answers one JSON line on stdout. The parent enforces
the wall clock. Whatever the child meets (a bomb, a pathological header, a slow pattern key), the
worker only ever sees an answer or a dead child, and turns either into an ``AdapterError`` whose
message names the limit that was hit.

Nothing here imports Django: the child must start fast and small, and read no settings.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from engine_daemon.lora_patterns import MATCH_BUDGET_SECONDS
from engine_daemon.peft_format import (
    CONFIG_FILE,
    PICKLE_SUFFIXES,
    WEIGHTS_FILE,
    AdapterError,
    AdapterManifest,
    ModelDescriptor,
    adapter_content_sha256,
)

_ROOT = Path(__file__).resolve().parents[2]
_MIB = 1 << 20
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ValidationLimits:
    memory_bytes: int  # the child's address space (RLIMIT_AS)
    cpu_seconds: int  # the child's CPU time (RLIMIT_CPU)
    wall_seconds: float  # the parent kills the child after this long


@dataclass(frozen=True)
class ValidationJob:
    """One upload to check: an archive, or the two PEFT files; written out into ``dest``."""

    dest: str
    base: dict[str, Any]  # ModelDescriptor.to_dict()
    max_lora_rank: int
    archive_limits: dict[str, int]  # ArchiveLimits' fields
    archive: str | None = None
    config: str | None = None
    weights: str | None = None
    weights_name: str = WEIGHTS_FILE  # the uploaded file's own name, for the pickle-suffix check
    pattern_budget_seconds: float = MATCH_BUDGET_SECONDS  # for all rank/alpha pattern keys together


class UploadRefused(AdapterError):
    """The checks refused the upload (the message says why), after a run that took ``peak_rss_bytes``."""

    def __init__(self, message: str, *, peak_rss_bytes: int) -> None:
        super().__init__(message)
        self.peak_rss_bytes = peak_rss_bytes


@dataclass(frozen=True)
class ValidationResult:
    sha256: str
    manifest: AdapterManifest
    peak_rss_bytes: int  # the child's peak resident memory (VmHWM)


def validate_in_child(job: ValidationJob, limits: ValidationLimits) -> ValidationResult:
    """Run the checks of one upload in a child under ``limits``; AdapterError says why it was refused."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": os.pathsep.join(p for p in (str(_ROOT), os.environ.get("PYTHONPATH", "")) if p),
        # One thread each: a thread pool's stacks and buffers would count against the address-space limit.
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    request = json.dumps({"job": asdict(job), "limits": asdict(limits)})
    cpu_before = _children_cpu_seconds()
    child = subprocess.Popen(
        [sys.executable, "-m", "portal.adapters.sandbox"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=_ROOT,
        start_new_session=True,  # so that the kill below takes any grandchild with it
    )
    try:
        out, err = child.communicate(request.encode(), timeout=limits.wall_seconds)
    except subprocess.TimeoutExpired:
        _kill_group(child)
        child.communicate()
        raise AdapterError(
            f"validation took longer than {limits.wall_seconds:g} s (LORAFLEET_VALIDATION_WALL_SECONDS) and was "
            "stopped; an adapter's two files check in seconds: upload the folder that save_pretrained wrote"
        ) from None
    return _answer(child.returncode, out, err, _children_cpu_seconds() - cpu_before, limits)


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _kill_group(child: subprocess.Popen) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _answer(returncode: int, out: bytes, err: bytes, cpu_seconds: float, limits: ValidationLimits) -> ValidationResult:
    reply = _last_json_line(out)
    if reply is not None and returncode == 0:
        if reply.get("error"):
            raise UploadRefused(reply["error"], peak_rss_bytes=int(reply["peak_rss_bytes"]))
        if reply.get("limit") == "memory":
            raise _memory_error(limits)
        return ValidationResult(
            sha256=reply["sha256"],
            manifest=AdapterManifest.from_dict(reply["manifest"]),
            peak_rss_bytes=int(reply["peak_rss_bytes"]),
        )
    if returncode == -signal.SIGXCPU or (returncode == -signal.SIGKILL and cpu_seconds >= limits.cpu_seconds):
        raise _cpu_error(limits)
    if returncode in (-signal.SIGSEGV, -signal.SIGABRT, -signal.SIGKILL) or b"MemoryError" in err:
        raise _memory_error(limits)  # an allocation inside C code failed, or the kernel's OOM killer
    tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
    raise RuntimeError(f"the validation child exited with status {returncode}: {tail[0]}")


def _memory_error(limits: ValidationLimits) -> AdapterError:
    return AdapterError(
        f"validation needed more than {limits.memory_bytes // _MIB} MiB (LORAFLEET_VALIDATION_MAX_MEMORY_BYTES) "
        "and was stopped; a real adapter checks in far less: upload the folder that save_pretrained wrote"
    )


def _cpu_error(limits: ValidationLimits) -> AdapterError:
    return AdapterError(
        f"validation needed more than {limits.cpu_seconds} s of CPU time (LORAFLEET_VALIDATION_CPU_SECONDS) and "
        "was stopped; an adapter's two files check in seconds: upload the folder that save_pretrained wrote"
    )


def _last_json_line(out: bytes) -> dict[str, Any] | None:
    for line in reversed(out.splitlines()):
        try:
            reply = json.loads(line)
        except ValueError:
            continue
        if isinstance(reply, dict):
            return reply
    return None


# ---------------------------------------------------------------------------------------------
# The child


def _apply_limits(limits: ValidationLimits) -> None:
    """The memory limit is on what the checks allocate: the address space beyond the started child's."""
    address_space = _address_space_bytes() + limits.memory_bytes
    resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    # SIGXCPU at the soft limit; the hard limit (SIGKILL) a little later, should it be caught.
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 5))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _address_space_bytes() -> int:
    return _proc_status_bytes("VmSize")


def _peak_rss_bytes() -> int:
    # Not ru_maxrss: Linux carries that over exec from the forked worker, so it would report the worker's RSS.
    return _proc_status_bytes("VmHWM")


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def run_job(job: ValidationJob) -> tuple[str, AdapterManifest]:
    """Materialize and check one upload into ``job.dest``: (sha256, manifest), or AdapterError."""
    from portal.adapters.archives import ArchiveLimits, extract_adapter_archive
    from portal.adapters.checks import adapter_files_check, pickle_error

    dest = Path(job.dest)
    dest.mkdir(parents=True, exist_ok=True)
    if job.archive:
        extract_adapter_archive(Path(job.archive), dest, limits=ArchiveLimits(**job.archive_limits))
    else:
        if job.weights_name.lower().endswith(PICKLE_SUFFIXES):
            raise pickle_error(job.weights_name)
        if not job.config or not job.weights:
            raise AdapterError(f"upload {CONFIG_FILE} and {WEIGHTS_FILE} together, or one archive of the folder")
        shutil.copyfile(job.config, dest / CONFIG_FILE)
        shutil.copyfile(job.weights, dest / WEIGHTS_FILE)
    base = ModelDescriptor.from_dict(job.base)
    manifest = adapter_files_check(dest, base, max_lora_rank=job.max_lora_rank)
    return adapter_content_sha256(dest / CONFIG_FILE, dest / WEIGHTS_FILE), manifest


def _die_with_the_worker() -> None:
    """The child is in its own session (so its kill takes its whole group); it must not outlive the worker."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the CPU limit still ends it
        pass


def _child_main() -> int:
    _die_with_the_worker()
    request = json.loads(sys.stdin.read())
    limits = ValidationLimits(**request["limits"])
    job = ValidationJob(**request["job"])
    import numpy  # noqa: F401  (the NaN scan's; imported before the limits, which are for the upload's work)

    import engine_daemon.lora_patterns as lora_patterns
    import portal.adapters.archives  # noqa: F401
    import portal.adapters.checks  # noqa: F401

    lora_patterns.MATCH_BUDGET_SECONDS = job.pattern_budget_seconds
    _apply_limits(limits)
    try:
        sha256, manifest = run_job(job)
        reply: dict[str, Any] = {"sha256": sha256, "manifest": manifest.to_dict()}
    except AdapterError as exc:
        reply = {"error": str(exc)}
    except MemoryError:
        reply = {"limit": "memory"}
    reply["peak_rss_bytes"] = _peak_rss_bytes()
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
