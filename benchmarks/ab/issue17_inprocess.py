"""In-process interleaved A/B: the engine before #17 (engine_daemon_old + kernels_old) against after, same
workload, steps taken in turns so both meet the same host load. Prints JSON.

Set-up (paths as used for benchmarks/results/ab-issue17-cpu.json): /tmp/lf/new holds `git archive` of the
new commit; /tmp/lf/both holds the old commit's engine_daemon and kernels copied as engine_daemon_old and
kernels_old with their imports renamed (sed 's/from kernels/from kernels_old/' and so on); the adapters
are the ones benchmarks/throughput.py makes (--adapter-cache /tmp/lf/adapters).

    python benchmarks/ab/issue17_inprocess.py 0,8,32 32
"""
import json
import random
import sys
import time
from pathlib import Path

sys.path[:0] = ["/tmp/lf/new", "/tmp/lf/both"]
import engine_daemon_old  # noqa: E402
from engine_daemon_old import Engine as OldEngine  # noqa: E402
from engine_daemon_old import EngineConfig as OldConfig  # noqa: E402
from engine_daemon_old import SamplingParams as OldParams  # noqa: E402

import engine_daemon  # noqa: E402
from engine_daemon import Engine as NewEngine  # noqa: E402
from engine_daemon import EngineConfig as NewConfig  # noqa: E402
from engine_daemon import SamplingParams as NewParams  # noqa: E402

assert engine_daemon.__file__.startswith("/tmp/lf/new") and engine_daemon_old.__file__.startswith("/tmp/lf/both")
folders = sorted(p for p in Path("/tmp/lf/adapters/smollm2-135m-instruct").iterdir() if p.is_dir())
COUNTS = [int(c) for c in sys.argv[1].split(",")] if len(sys.argv) > 1 else [0, 8, 32]
REQUESTS, TURN = int(sys.argv[2]) if len(sys.argv) > 2 else 32, 8

rng = random.Random(0)
workload = [([rng.randrange(100, 30000) for _ in range(rng.randrange(32, 200))], rng.randrange(16, 64)) for _ in range(REQUESTS)]


def build(side, count):
    Engine, Config, Params = (OldEngine, OldConfig, OldParams) if side == "old" else (NewEngine, NewConfig, NewParams)
    extra = {}
    engine = Engine(Config(model="smollm2-135m-instruct", device="cpu", dtype="float32", max_loras=max(count, 1),
                           max_cpu_loras=max(count, 1), max_lora_rank=64, max_num_seqs=64,
                           kv_cache_bytes=768 * 2**20, **extra))
    names = []
    for folder in folders[:count]:
        engine.add_adapter(folder.name, str(folder))
        engine.prefetch_adapter(folder.name)
        names.append(folder.name)
    engine.wait_for_adapters()
    for i, (prompt, max_tokens) in enumerate(workload):
        engine.add_request(prompt, Params(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                           request_id=f"r{i}", adapter=names[i % count] if count else None)
    return {"side": side, "count": count, "engine": engine, "busy": 0.0, "tokens": 0, "outputs": {}}


runs = [build(side, count) for count in COUNTS for side in ("old", "new")]
while any(r["engine"].has_unfinished() for r in runs):
    for r in runs:
        engine = r["engine"]
        for _ in range(TURN):
            if not engine.has_unfinished():
                break
            t = time.perf_counter()
            outs = engine.step()
            r["busy"] += time.perf_counter() - t
            for o in outs:
                r["tokens"] += len(o.new_token_ids)
                r["outputs"].setdefault(o.request_id, []).extend(o.new_token_ids)
report = {}
for r in runs:
    report[f"{r['side']}-{r['count']}"] = {"tok_s": r["tokens"] / r["busy"], "busy_s": r["busy"], "tokens": r["tokens"]}
for count in COUNTS:
    old, new = (next(r for r in runs if r["side"] == s and r["count"] == count) for s in ("old", "new"))
    report[f"same_tokens-{count}"] = old["outputs"] == new["outputs"]
    report[f"new_over_old-{count}"] = report[f"new-{count}"]["tok_s"] / report[f"old-{count}"]["tok_s"]
for count in COUNTS:
    if count:
        for side in ("old", "new"):
            report[f"{side}-ratio-{count}"] = report[f"{side}-{count}"]["tok_s"] / report[f"{side}-0"]["tok_s"]
print(json.dumps(report, indent=1))
