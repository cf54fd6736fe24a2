"""In-process interleaved A/B of the engine at two commits: same workload, steps taken in turns so
that both meet the same host load (separate processes swung more than 2x on this shared host).

The old commit's ``engine_daemon`` and ``kernels`` are exported (``git archive``) into a scratch
folder and renamed ``engine_daemon_old`` / ``kernels_old`` (their imports with them), so both import
side by side; the new commit is exported as is. For each adapter count, an old and a new engine get
the same requests (greedy, ``ignore_eos``) on the same adapters and take turns of 8 steps; tok/s is
output tokens over each engine's own step time. Reports new/old per count, whether both produced
the same tokens, and each side's adapters/no-adapters ratio, as JSON.

    python benchmarks/ab/inprocess.py OLD NEW --counts 0,8,32 --requests 32 --out result.json

The adapters are those ``benchmarks/throughput.py`` makes (ranks 8-64 on all seven projections,
in its cache folder; made here if missing). The model is SmolLM2-135M float32 on the CPU.
"""

from __future__ import annotations

import argparse
import importlib
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("engine_daemon", "kernels")


def export(commit: str, folder: Path, suffix: str) -> None:
    """`commit`'s engine packages under `folder`, renamed <package><suffix> with their imports."""
    folder.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, *PACKAGES], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    if not suffix:
        return
    pattern = re.compile(r"(?<![\w.])(" + "|".join(PACKAGES) + r")\b(?=[.\s])")  # module names, not attributes
    for package in PACKAGES:
        (folder / package).rename(folder / f"{package}{suffix}")
    for path in folder.rglob("*.py"):
        text = path.read_text()
        renamed = pattern.sub(lambda m: m.group(1) + suffix, text)
        if renamed != text:
            path.write_text(renamed)


def short_hash(commit: str) -> str:
    """The commit a name (HEAD, a branch) stands for now, as the report records it."""
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", commit], check=True, capture_output=True,
                          text=True).stdout.strip()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--counts", default="0,8,32", help="adapter counts, comma-separated")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--turn-steps", type=int, default=8)
    parser.add_argument("--adapters", type=Path, default=ROOT / "var/bench-adapters/smollm2-135m-instruct")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]

    scratch = Path(tempfile.mkdtemp(prefix="lf-ab-"))
    export(args.old, scratch / "old", "_old")
    export(args.new, scratch / "new", "")
    sys.path[:0] = [str(scratch / "new"), str(scratch / "old")]
    sides = {"old": importlib.import_module("engine_daemon_old"), "new": importlib.import_module("engine_daemon")}
    assert sides["new"].__file__.startswith(str(scratch / "new")), "another engine_daemon was imported first"

    sys.path.insert(0, str(ROOT))
    from benchmarks.throughput import load_hf_model, make_adapters

    folders = list(make_adapters(load_hf_model("smollm2-135m-instruct"), max(counts), args.adapters).values())
    rng = random.Random(0)
    workload = [([rng.randrange(100, 30000) for _ in range(rng.randrange(32, 200))], rng.randrange(16, 64))
                for _ in range(args.requests)]

    def build(side: str, count: int) -> dict:
        module = sides[side]
        engine = module.Engine(module.EngineConfig(
            model="smollm2-135m-instruct", device="cpu", dtype="float32", max_loras=max(count, 1),
            max_cpu_loras=max(count, 1), max_lora_rank=64, max_num_seqs=64, kv_cache_bytes=768 * 2**20))
        names = []
        for folder in folders[:count]:
            engine.add_adapter(folder.name, str(folder))
            engine.prefetch_adapter(folder.name)
            names.append(folder.name)
        engine.wait_for_adapters()
        for i, (prompt, max_tokens) in enumerate(workload):
            engine.add_request(prompt, module.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                               request_id=f"r{i}", adapter=names[i % count] if count else None)
        return {"side": side, "count": count, "engine": engine, "busy": 0.0, "tokens": 0, "outputs": {}}

    runs = [build(side, count) for count in counts for side in ("old", "new")]
    while any(r["engine"].has_unfinished() for r in runs):
        for r in runs:
            engine = r["engine"]
            for _ in range(args.turn_steps):
                if not engine.has_unfinished():
                    break
                started = time.perf_counter()
                outs = engine.step()
                r["busy"] += time.perf_counter() - started
                for out in outs:
                    r["tokens"] += len(out.new_token_ids)
                    r["outputs"].setdefault(out.request_id, []).extend(out.new_token_ids)
    report: dict = {"old": short_hash(args.old), "new": short_hash(args.new), "requests": args.requests}
    for r in runs:
        report[f"{r['side']}-{r['count']}"] = {"tok_s": r["tokens"] / r["busy"], "busy_s": r["busy"], "tokens": r["tokens"]}
    for count in counts:
        old, new = (next(r for r in runs if r["side"] == side and r["count"] == count) for side in ("old", "new"))
        report[f"same_tokens-{count}"] = old["outputs"] == new["outputs"]
        report[f"new_over_old-{count}"] = report[f"new-{count}"]["tok_s"] / report[f"old-{count}"]["tok_s"]
    if 0 in counts:
        for count in (c for c in counts if c):
            for side in ("old", "new"):
                report[f"{side}-ratio-{count}"] = report[f"{side}-{count}"]["tok_s"] / report[f"{side}-0"]["tok_s"]
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
