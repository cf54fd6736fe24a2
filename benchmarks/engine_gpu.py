"""The whole engine on one GPU: output tok/s, TTFT, ITL and memory with 0, 8 and 32 adapters.

The last step of ``benchmarks/gpu_check.sh``. One engine (``random:llama-3-8b`` in bfloat16 by
default: random weights drawn on the device, no download) serves the same workload once per
adapter count:

- ``--requests`` requests, prompt lengths drawn from ``--prompt-tokens`` (seeded), exactly
  ``--output-tokens`` each (greedy, ``ignore_eos``), all arriving at t=0, spread round-robin over
  the adapters (none for the count 0);
- random PEFT adapters of rank ``--rank`` on all seven projections, drawn on the device and saved
  as PEFT folders (bfloat16 safetensors) in a temporary folder;
- ``--warmup-runs`` discarded runs of the same workload before each measured one, so that
  Triton's compiles and the adapters' first loads stay out of the figures.

TTFT and ITL are read off the engine's incremental API (``add_request`` + ``step()``): each
request's tokens are stamped with the run's clock when the step that produced them returns
(``benchmarks.throughput.EngineRun``). Each adapter count runs on its own: an error is recorded
with its traceback and the next count still runs. ``results.json`` and ``RESULTS-gpu.md`` are
rewritten under ``--out`` after every count, so a run cut short keeps what it measured.

    python benchmarks/engine_gpu.py --out /tmp/gpu                 # the GPU run (CUDA, ~2-4 minutes)
    python benchmarks/engine_gpu.py --model random:tiny --device cpu --dtype float32 \\
        --adapters 0,2 --requests 4 --prompt-tokens 8-24 --output-tokens 4 --warmup-runs 0   # a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zlib
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a bare checkout

from benchmarks.throughput import ALL_PROJECTIONS, make_workload, run_engine, with_adapters  # noqa: E402
from engine_daemon import Engine, EngineConfig, SamplingParams  # noqa: E402
from engine_daemon.peft_format import CONFIG_FILE, WEIGHTS_FILE, module_path  # noqa: E402

GIB = 1024**3

HEADER = """\
# GPU results: the kernels and the whole engine

Written by `benchmarks/gpu_check.sh` on a CUDA machine (its last step, `benchmarks/engine_gpu.py`,
writes this file into the results folder, `$OUT`, and the script copies it here); rerun the script
to refresh it, never edit it by hand. From a clean clone, without internet, in under 8 minutes:

1. the environment: GPU, driver, Python packages, what is missing;
2. `tests/kernels` compiled on CUDA (`TRITON_INTERPRET=0`: fp32, fp16 and bf16);
3. `benchmarks/kernels.py --check`: Triton against the specification
   (`kernels/reference.py`), then the kernel table at Llama-3-8B shapes;
4. the whole engine on `random:llama-3-8b` in bfloat16: output tok/s, TTFT and ITL with 0, 8 and
   32 adapters (rank 16, all seven projections), and its memory breakdown.

Each step's log lies beside `results.json` in the results folder (`summary.txt`,
`kernel_tests.txt`, `kernels_log.txt`, `kernels.md`, `kernels.json`, `engine_log.txt`).
"""


class CutShort(BaseException):
    """SIGTERM (the step's time limit): stop, keeping what was measured."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise CutShort


# ---- set-up ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:llama-3-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--kernels", default=None,
                        help="EngineConfig.kernels, where this engine has that setting (default: its own default)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="any other EngineConfig field, e.g. --set max_num_seqs=32 (repeatable)")
    parser.add_argument("--adapters", default="0,8,32", help="comma-separated adapter counts, one run each")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-tokens", default="128-512", help="MIN-MAX (or one length) of the prompts")
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--warmup-runs", type=int, default=1, help="discarded runs of the workload before each count")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "benchmarks" / "out"))
    parser.add_argument("--steps", type=Path, help="a text file of earlier steps' summary lines, quoted in the report")
    parser.add_argument("--kernel-table", type=Path, help="a markdown file (kernels.md) appended to the report")
    parser.add_argument("--commit", default=os.environ.get("LORAFLEET_COMMIT"),
                        help="the commit measured (default: $LORAFLEET_COMMIT, else git)")
    args = parser.parse_args(argv)
    args.counts = [int(c) for c in args.adapters.split(",") if c.strip()]
    low, _, high = args.prompt_tokens.partition("-")
    args.prompt_range = (int(low), int(high or low))
    if not args.counts or min(args.counts) < 0 or args.prompt_range[0] < 1 or args.prompt_range[0] > args.prompt_range[1]:
        parser.error("--adapters takes counts >= 0 and --prompt-tokens MIN-MAX with 1 <= MIN <= MAX")
    return args


def engine_config(args: argparse.Namespace) -> tuple[EngineConfig, list[str]]:
    """The EngineConfig of this run, and notes on settings this engine does not have."""
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    settings: dict[str, Any] = dict(
        model=args.model, device=args.device, dtype=args.dtype,
        max_loras=max(1, *args.counts), max_lora_rank=args.rank, seed=args.seed,
    )
    notes = []
    if args.kernels is not None:
        if "kernels" in fields:
            settings["kernels"] = args.kernels
        else:
            notes.append(f"--kernels {args.kernels} ignored: this EngineConfig has no 'kernels' field")
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in fields:
            raise SystemExit(f"--set {item}: EngineConfig has no field {name!r}; fields: {sorted(fields)}")
        settings[name] = _literal(value)
    return EngineConfig(**settings), notes


def _literal(text: str) -> Any:
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return {"none": None, "true": True, "false": False}.get(text.lower(), text)


def git_commit(given: str | None) -> str:
    if given:
        return given
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+local changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git checkout here; set LORAFLEET_COMMIT)"


def environment(args: argparse.Namespace) -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(args.commit),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as exc:  # the engine still runs (the torch backend); the report says why
        env["triton"] = f"not importable: {exc}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = props.name
        env["gpu_memory_gib"] = round(props.total_memory / GIB, 1)
        env["compute_capability"] = f"{props.major}.{props.minor}"
    else:
        env["gpu"] = "none visible to torch"
    return env


# ---- adapters ----------------------------------------------------------------------------------


def write_random_adapters(engine: Engine, names: list[str], rank: int, folder: Path, seed: int) -> dict[str, Path]:
    """PEFT LoRA folders of rank `rank` on all seven projections of every layer, in bfloat16.

    Drawn on the engine's device (an 8B adapter is 42M numbers), moved to the host once per tensor."""
    from safetensors.torch import save_file

    shapes = engine.descriptor
    generator = torch.Generator(device=engine.device)
    paths = {}
    for name in names:
        generator.manual_seed(seed * 2**32 + zlib.crc32(name.encode()))  # one stream per name, whenever written
        tensors = {}
        for layer in range(shapes.num_layers):
            for module in ALL_PROJECTIONS:
                in_features, out_features = shapes.projection_shape(module)
                prefix = f"base_model.model.{module_path(layer, module)}"
                a = torch.randn(rank, in_features, generator=generator, device=engine.device) * in_features**-0.5
                b = torch.randn(out_features, rank, generator=generator, device=engine.device) * 0.01
                tensors[f"{prefix}.lora_A.weight"] = a.to(torch.bfloat16).cpu()
                tensors[f"{prefix}.lora_B.weight"] = b.to(torch.bfloat16).cpu()
        path = folder / name
        path.mkdir(parents=True, exist_ok=True)
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank,
                  "target_modules": ALL_PROJECTIONS, "lora_dropout": 0.0, "bias": "none",
                  "base_model_name_or_path": engine.model_name}
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=1))
        save_file(tensors, str(path / WEIGHTS_FILE))
        paths[name] = path
    return paths


# ---- one adapter count ---------------------------------------------------------------------------


def measure(engine: Engine, workload: list, names: list[str], count: int, warmup_runs: int) -> dict[str, Any]:
    """Warm-up runs, then the measured run of the workload over `names` (none: the base model)."""
    started = time.perf_counter()
    for name in names:  # onto the device before the clock starts
        engine.prefetch_adapter(name)
    engine.wait_for_adapters(timeout=300)
    load_seconds = time.perf_counter() - started
    requests = with_adapters(workload, names or [None])
    for i in range(warmup_runs):
        run_engine(engine, requests, f"warm-up {count}/{i}", count)
    before = engine.snapshot()
    wall = time.perf_counter()
    result = run_engine(engine, requests, f"{count} adapters", count)
    wall = time.perf_counter() - wall
    after = engine.snapshot()
    row = {"adapters": count, "status": "ok"} | result.summary()
    row |= {
        "wall_seconds": round(wall, 2),
        "steps": after.steps - before.steps,
        "preemptions": after.preemptions - before.preemptions,
        "adapter_load_seconds": round(load_seconds, 2),
    }
    try:
        row["sanity"] = sanity(engine, workload[0].prompt, names[0] if names else None)
    except Exception:  # the measured run stands; the check's failure is reported beside it
        row["sanity"] = {"error": traceback.format_exc()}
        abort_all(engine)
    checks = row["sanity"]
    if not checks.get("finite_logprobs") or checks.get("adapter_changes_logprobs") is False:
        row["status"] = "suspect"
    return row


def sanity(engine: Engine, prompt: list[int], adapter: str | None) -> dict[str, Any]:
    """Finite log-probabilities, and an adapter that changes them: the LoRA term really ran."""
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, logprobs=True)
    base = engine.generate([prompt[:64]], params)[0]
    checks: dict[str, Any] = {"finite_logprobs": all(math.isfinite(p) for p in base.logprobs or [math.nan])}
    if adapter is not None:
        adapted = engine.generate([prompt[:64]], params, adapters=[adapter])[0]
        checks["finite_logprobs"] &= all(math.isfinite(p) for p in adapted.logprobs or [math.nan])
        checks["adapter_changes_logprobs"] = adapted.logprobs != base.logprobs
    return checks


def abort_all(engine: Engine) -> None:
    """After a failed run: drop its requests, so the next count starts from an idle engine."""
    for request_id in list(engine.sequences):
        engine.abort(request_id)


def memory(engine: Engine) -> dict[str, Any]:
    breakdown = dict(engine.memory_breakdown())
    if engine.device.type == "cuda":
        breakdown["torch_peak_allocated"] = torch.cuda.max_memory_allocated(engine.device)
        breakdown["torch_reserved"] = torch.cuda.memory_reserved(engine.device)
    return breakdown


# ---- the report ------------------------------------------------------------------------------------


def write_report(report: dict[str, Any], args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=1))
    (args.out / "RESULTS-gpu.md").write_text(markdown(report, args))


def markdown(report: dict[str, Any], args: argparse.Namespace) -> str:
    env, config, load = report["environment"], report["config"], report["workload"]
    lines = [
        HEADER,
        f"Run of {env['date']}, commit `{env['commit']}`: {env['gpu']}"
        + (f" ({env.get('gpu_memory_gib')} GiB, sm {env.get('compute_capability')})" if "gpu_memory_gib" in env else "")
        + f", torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, Python {env['python']}.",
        "",
    ]
    if args.steps and args.steps.is_file():
        lines += ["## Steps", "", "```", args.steps.read_text().rstrip(), "```", ""]
    lines += [
        f"## The whole engine: `{config['model']}`, {config['dtype']}, {config['device']}",
        "",
        f"Status: **{report['status']}**. Workload: {load['requests']} requests, prompts of "
        f"{load['prompt_tokens'][0]}-{load['prompt_tokens'][1]} tokens ({load['total_prompt_tokens']} in all), "
        f"{load['output_tokens']} output tokens each (greedy, ignore_eos), all arriving at t=0, round-robin over "
        f"the adapters (rank {load['rank']}, {', '.join(p.removesuffix('_proj') for p in ALL_PROJECTIONS)}); "
        f"{load['warmup_runs']} discarded warm-up run(s) of the same workload before each count. TTFT counts from "
        "t=0, so it includes the queue behind earlier prompts.",
        "",
        f"Engine (kernel backend: {report['engine'].get('kernels', '?')}): "
        + ", ".join(f"{k} {v}" for k, v in config.items() if k not in ("model", "dtype", "device")) + ".",
        "",
    ]
    lines += [f"- {note}" for note in report["notes"]]
    runs = report["runs"]
    if runs:
        base = next((r["tokens_per_second"] for r in runs if r["adapters"] == 0 and "tokens_per_second" in r), None)
        lines += [
            "| adapters | output tok/s | vs 0 adapters | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) "
            "| decode ms/step | prefill s | steps | status |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in runs:
            if "tokens_per_second" not in r:
                lines.append(f"| {r['adapters']} | - | - | - | - | - | - | - | {r['status']} (see Errors) |")
                continue
            p = r["phases"]
            decode_ms = round(1000 * p["decode_s"] / p["decode_steps"], 1) if p["decode_steps"] else "-"
            ratio = round(r["tokens_per_second"] / base, 3) if base else "-"
            lines.append(
                f"| {r['adapters']} | {r['tokens_per_second']} | {ratio} | {r['ttft_p50_s']} / {r['ttft_p99_s']} "
                f"| {r['itl_p50_ms']} / {r['itl_p99_ms']} | {decode_ms} | {p['prefill_s']} | {r['steps']} "
                f"| {r['status']} |"
            )
        lines.append("")
        if any(r["status"] == "suspect" for r in runs):
            lines += ["`suspect`: the run finished, but its sanity check failed (finite log-probabilities, and an "
                      "adapter that changes them): see `sanity` in results.json.", ""]
    mem = report.get("memory", {}).get("after_runs") or report.get("memory", {}).get("after_build")
    if mem:
        engine_info = report.get("engine", {})
        names = {
            "weights": "base weights",
            "kv_cache": f"KV cache ({engine_info.get('kv_tokens', '?')} tokens)",
            "adapter_pool": f"adapter slots ({config['max_loras']} x rank {config['max_lora_rank']})",
            "free": "free on the device",
            "total": "device total",
            "torch_peak_allocated": "torch peak allocated",
            "torch_reserved": "torch reserved (at the end)",
        }
        lines += ["### Memory", "", "| | size |", "|---|---|"]
        lines += [f"| {names.get(k, k)} | {_size(v)} |" for k, v in mem.items()]
        lines.append("")
    if args.kernel_table:
        lines += ["## Kernel table (`benchmarks/kernels.py --check`, Llama-3-8B shapes)", ""]
        if args.kernel_table.is_file():
            lines.append(args.kernel_table.read_text().rstrip())
        else:
            lines.append(f"The kernel step wrote no table ({args.kernel_table.name}): see kernels_log.txt.")
        lines.append("")
    errors = [(f"{r['adapters']} adapters", r["error"]) for r in runs if "error" in r]
    errors += [(f"{r['adapters']} adapters: the sanity check", r["sanity"]["error"])
               for r in runs if "error" in r.get("sanity", {})]
    if report.get("error"):
        errors.insert(0, ("engine", report["error"]))
    if errors:
        lines += ["## Errors", ""]
        for what, text in errors:
            lines += [f"### {what}", "", "```", text.rstrip(), "```", ""]
    return "\n".join(lines)


# ---- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every adapter count; returns the report (also written under --out)."""
    args = parse_args(argv)
    config, notes = engine_config(args)
    report: dict[str, Any] = {
        "environment": environment(args),
        "config": {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
                   if f.name not in ("max_cpu_loras", "seed")},
        "workload": {"requests": args.requests, "prompt_tokens": list(args.prompt_range),
                     "output_tokens": args.output_tokens, "rank": args.rank, "warmup_runs": args.warmup_runs,
                     "seed": args.seed, "total_prompt_tokens": 0},
        "notes": notes,
        "engine": {},
        "runs": [],
        "memory": {},
        "status": "running",
    }
    print(f"engine_gpu: {report['environment']}", flush=True)
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if on_main_thread else None
    folder = Path(tempfile.mkdtemp(prefix="lorafleet-gpu-adapters-"))
    engine = None
    try:
        engine = build_engine(config, report)
        if engine is not None:
            run_counts(engine, args, report, folder)
    except CutShort:
        report["status"] = "cut short by its time limit"
        report["notes"].append(f"cut short (SIGTERM) after {len(report['runs'])} of {len(args.counts)} counts")
    finally:
        write_report(report, args)
        if engine is not None:
            engine.close()
        shutil.rmtree(folder, ignore_errors=True)
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)
    print(f"engine_gpu: {report['status']}; wrote {args.out / 'results.json'} and {args.out / 'RESULTS-gpu.md'}")
    return report


def build_engine(config: EngineConfig, report: dict[str, Any]) -> Engine | None:
    """The engine, or None with the traceback in the report."""
    try:
        started = time.perf_counter()
        engine = Engine(config)
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        blocks = engine.snapshot().kv_blocks_total
        report["engine"] = {
            "build_seconds": round(time.perf_counter() - started, 2),
            "kernels": getattr(engine.kernels, "name", str(engine.kernels)),  # the backend "auto" chose
            "kv_blocks": blocks,
            "kv_tokens": blocks * engine.config.block_size,
        }
        report["memory"]["after_build"] = memory(engine)
        return engine
    except Exception:
        report["error"] = traceback.format_exc()
        report["status"] = "failed"
        print(report["error"], file=sys.stderr)
        return None


def run_counts(engine: Engine, args: argparse.Namespace, report: dict[str, Any], folder: Path) -> None:
    """One measured run per adapter count; a count that raises is recorded and the next one runs."""
    workload = make_workload(args.requests, engine.model_config.vocab_size, args.seed, *args.prompt_range,
                             args.output_tokens, args.output_tokens)
    report["workload"]["total_prompt_tokens"] = sum(len(r.prompt) for r in workload)
    for count in args.counts:
        print(f"engine_gpu: {count} adapters", flush=True)
        names = [f"gpu-bench-{i}" for i in range(count)]
        try:
            missing = [name for name in names if not engine.has_adapter(name)]
            if missing:
                started = time.perf_counter()
                for name, path in write_random_adapters(engine, missing, args.rank, folder, args.seed).items():
                    engine.add_adapter(name, str(path))
                report["engine"]["adapter_write_seconds"] = round(
                    report["engine"].get("adapter_write_seconds", 0) + time.perf_counter() - started, 2)
            row = measure(engine, workload, names, count, args.warmup_runs)
        except Exception:
            row = {"adapters": count, "status": "error", "error": traceback.format_exc()}
            print(row["error"], file=sys.stderr)
            try:
                abort_all(engine)
            except Exception as exc:  # the device may be gone; the next count will say so
                row["error"] += f"\n(aborting the run's requests failed too: {exc})"
        report["runs"].append(row)
        print(f"engine_gpu: {json.dumps({k: v for k, v in row.items() if k != 'error'})}", flush=True)
        report["memory"]["after_runs"] = _safe(memory, engine)
        write_report(report, args)
    report["status"] = "ok" if all(r["status"] == "ok" for r in report["runs"]) else "failed"


def _size(value: Any) -> str:
    if not isinstance(value, int):
        return str(value)
    return f"{value / GIB:.2f} GiB" if value >= GIB else f"{value / 1024**2:.1f} MiB"


def _safe(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception as exc:
        return {"error": str(exc)}


if __name__ == "__main__":
    sys.exit(0 if main()["status"] == "ok" else 1)
