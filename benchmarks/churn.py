"""Adapter churn: many adapters through a device pool a quarter of their size, against all of them resident.

The workload of issue #19, on one stream of requests served by two engines:

- --adapters adapters (256) on all seven projections, written by PEFT, ranks 8, 16, 32 and 64 a
  quarter each, shuffled (seeded) so that an adapter's rank says nothing of its popularity;
  adapter i is asked for with probability proportional to 1/(i+1) (Zipf, s=1.0), and belongs to
  tenant i mod --tenants;
- requests of --prompt-tokens seeded token ids and --output-tokens tokens each (greedy,
  ``ignore_eos``), arriving as a seeded Poisson process at --load (0.7) times the engine's
  capacity: the all-resident engine's requests per second on a closed burst of
  --capacity-requests requests;
- ``churn``: an engine whose adapter pool (``lora_pool_bytes``) is --pool-fraction (a quarter)
  of what all the adapters need at once (``pool_bytes_for``: each takes rows by its own rank);
  ``all resident``: a pool that holds them all, every adapter loaded into it before the runs.
  Both take --max-loras distinct adapters per step and keep every adapter in host RAM
  (``max_cpu_loras``), all read from disk before the runs: the churn is host → device loads,
  as on a GPU box with host RAM to spare.

The model is a random Llama written to a temp dir: --hidden 256 wide, --layers 2 deep
(intermediate 3x hidden, heads of 64, vocab 8192). An adapter's bytes grow with width times depth:
256 of them take ~300 MB in float32 here (held twice in host RAM, one copy per engine, and once
more in the all-resident pool), where the bundled SmolLM2-135M's would take ~9 GB. Its steps take
about twice as long as ``random:tiny``'s shapes at the same batch: the model's arithmetic, not
Python, is about half of a step. On a CPU a load is a copy from host RAM into the pool.

The two runs take turns of --turn-steps steps, as ``prefix.py``'s do, --repeats times, and the
medians are reported. A run keeps its own clock, the sum of its steps' wall times, which jumps
ahead to the next arrival when its engine is idle. A turn ends once its engine's adapter loads
are done, that wait on its clock: the other run's turn neither hides a load nor shares the CPU
with one. The churn engine's pool is as the run before left it (a steady state, not a cold
start); each repetition runs under tenant names of its own, so no request finds the blocks of
the same prompt in the prefix cache. Time to first token is the first token's time minus the
arrival time; throughput is output tokens over the run's clock; loads/s is the slot loads the run
caused over its clock.

The issue's goals on this CPU: churn's TTFT p99 at most 2x and its throughput at least 0.9x the
all-resident run's. Writes ``churn.json`` and ``churn.png`` under --out.

    python benchmarks/churn.py                           # the issue's run (~4 minutes on 2 cores)
    python benchmarks/churn.py --out benchmarks/results  # the run behind README and RESULTS.md
    python benchmarks/churn.py --hidden 64 --adapters 16 --requests 24 --capacity-requests 8 --repeats 1
"""

from __future__ import annotations

import argparse
import copy
import heapq
import json
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout

from benchmarks.prefix import median_summary  # noqa: E402
from benchmarks.throughput import ALL_PROJECTIONS, RANKS, run_interleaved  # noqa: E402
from benchmarks.throughput import _percentile as percentile  # noqa: E402
from engine_daemon import Engine, EngineConfig, SamplingParams  # noqa: E402
from engine_daemon.adapter_pool import pool_bytes_for  # noqa: E402
from engine_daemon.model_source import resolve_model  # noqa: E402
from engine_daemon.peft_format import descriptor_from_config  # noqa: E402

CONFIGS = ("churn", "all resident")
# churn / all resident: TTFT p99 at most 2x, throughput at least 0.9x.
GOALS = {"ttft_p99": ("<=", 2.0), "tokens_per_second": (">=", 0.9)}
VOCAB = 8192


# ---- the model and its adapters -----------------------------------------------------------------


def write_model(folder: Path, hidden: int, layers: int) -> Path:
    """A random Llama without a tokenizer: the engine takes token ids."""
    from tests.engine.builders import write_tiny_model

    heads = max(1, hidden // 64)
    return write_tiny_model(folder / "model", hidden_size=hidden, intermediate_size=3 * hidden,
                            num_hidden_layers=layers, num_attention_heads=heads,
                            num_key_value_heads=max(1, heads // 2), vocab_size=VOCAB, max_position_embeddings=1024)


def adapter_ranks(count: int, seed: int) -> list[int]:
    """Ranks 8-64 a quarter each, in a seeded order independent of popularity (adapter i's rank is ranks[i])."""
    ranks = [RANKS[i % len(RANKS)] for i in range(count)]
    random.Random(seed).shuffle(ranks)
    return ranks


def write_adapters(model_dir: Path, ranks: list[int], folder: Path) -> dict[str, Path]:
    """PEFT adapters of these ranks on all seven projections, random and non-zero."""
    import transformers
    from peft import LoraConfig

    from tests.engine.builders import save_random_adapter

    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    paths = {}
    for i, rank in enumerate(tqdm(ranks, desc="adapters", unit="adapter")):
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=ALL_PROJECTIONS, lora_dropout=0.0)
        paths[f"churn-{i}"] = save_random_adapter(copy.deepcopy(base), config, folder / f"churn-{i}", seed=i,
                                                  b_std=0.01)
    return paths


# ---- the stream of requests ---------------------------------------------------------------------


@dataclass
class Request:
    at: float  # arrival, seconds on the run's clock
    adapter: int  # index into the adapters, drawn by popularity
    prompt: list[int]


def zipf_adapters(count: int, requests: int, rng: random.Random) -> list[int]:
    """Adapter indices drawn with probability proportional to 1/(i+1)."""
    return rng.choices(range(count), weights=[1 / (i + 1) for i in range(count)], k=requests)


def request_stream(*, adapters: int, requests: int, rate: float, prompt_tokens: int, seed: int) -> list[Request]:
    """Poisson arrivals at `rate` per second (rate 0: all at once, a closed burst)."""
    rng = random.Random(seed)
    at, stream = 0.0, []
    for adapter in zipf_adapters(adapters, requests, rng):
        stream.append(Request(at, adapter, [rng.randrange(3, VOCAB) for _ in range(prompt_tokens)]))
        at += rng.expovariate(rate) if rate else 0.0
    return stream


# ---- one run ----------------------------------------------------------------------------------


@dataclass
class RunResult:
    ttft: list[float]
    output_tokens: int
    seconds: float  # the run's clock
    load_wait_seconds: float  # of which it waited at the ends of turns for loads to finish
    slot_loads: int
    disk_loads: int
    evictions: int

    def summary(self) -> dict:
        return {
            "requests": len(self.ttft),
            "ttft_p50_s": percentile(self.ttft, 50),
            "ttft_p99_s": percentile(self.ttft, 99),
            "tokens_per_second": round(self.output_tokens / self.seconds, 1),
            "requests_per_second": round(len(self.ttft) / self.seconds, 3),
            "loads_per_second": round(self.slot_loads / self.seconds, 3),
            "slot_loads": self.slot_loads,
            "disk_loads": self.disk_loads,
            "evictions": self.evictions,
            "output_tokens": self.output_tokens,
            "seconds": round(self.seconds, 2),
            "load_wait_seconds": round(self.load_wait_seconds, 3),
        }


def adapter_counts(engine: Engine) -> dict[str, int]:
    rows = engine.residency.snapshot()
    return {key: sum(row[key] for row in rows) for key in ("slot_loads", "disk_loads", "evictions")}


class StreamRun:
    """One engine working through a stream of requests on the run's own clock (see the module
    docstring); a step at a time, so that two runs can take turns (`throughput.run_interleaved`, each turn closed by `end_turn`)."""

    def __init__(self, engine: Engine, stream: list[Request], adapters: list[str], *, output_tokens: int,
                 tenants: int, namespace: str, label: str) -> None:
        self.engine, self.adapters, self.tenants, self.namespace = engine, adapters, tenants, namespace
        self.params = SamplingParams(max_tokens=output_tokens, temperature=0.0, ignore_eos=True)
        self.arrivals = [(r.at, i, r) for i, r in enumerate(stream)]
        heapq.heapify(self.arrivals)
        self.arrived: dict[str, float] = {}  # request id -> arrival time
        self.ttft: list[float] = []
        self.output_tokens = 0
        self.clock = self.load_wait = 0.0
        self.counts_before = adapter_counts(engine)
        self.bar = tqdm(total=len(stream) * output_tokens, desc=label, unit="tok")

    @property
    def done(self) -> bool:
        return not self.arrivals and not self.engine.has_unfinished()

    def step(self) -> None:
        self._add_arrived()
        if not self.engine.has_unfinished():
            self.clock = self.arrivals[0][0]  # idle until the next arrival
            self._add_arrived()
        started = time.perf_counter()
        outputs = self.engine.step()
        self.clock += time.perf_counter() - started
        for out in outputs:
            if out.error:
                raise SystemExit(f"request {out.request_id} failed: {out.error}")
            if out.completion_tokens == 1:
                self.ttft.append(self.clock - self.arrived[out.request_id])
            self.bar.update(len(out.new_token_ids))
            if out.finished:
                self.output_tokens += len(self.engine.pop_finished(out.request_id).token_ids)

    def end_turn(self) -> None:
        """Wait for the adapter loads in flight, on this run's clock, before another run's turn."""
        started = time.perf_counter()
        self.engine.wait_for_adapters()
        waited = time.perf_counter() - started
        self.load_wait += waited
        self.clock += waited

    def _add_arrived(self) -> None:
        while self.arrivals and self.arrivals[0][0] <= self.clock:
            at, i, request = heapq.heappop(self.arrivals)
            tenant = f"{self.namespace}-tenant-{request.adapter % self.tenants}"
            request_id = self.engine.add_request(request.prompt, self.params, request_id=f"{self.namespace}-{i}",
                                                 adapter=self.adapters[request.adapter], tenant=tenant)
            self.arrived[request_id] = at

    def result(self) -> RunResult:
        self.bar.close()
        after = adapter_counts(self.engine)
        loads = {key: after[key] - before for key, before in self.counts_before.items()}
        return RunResult(self.ttft, self.output_tokens, self.clock, self.load_wait, **loads)


# ---- the comparison ---------------------------------------------------------------------------


def build_engine(model: Path, adapters: dict[str, Path], *, pool_bytes: int, max_loras: int,
                 resident: bool) -> Engine:
    """An engine with every adapter in host RAM; `resident`: in its pool too."""
    engine = Engine(EngineConfig(model=str(model), device="cpu", dtype="float32", max_loras=max_loras,
                                 lora_pool_bytes=pool_bytes, max_cpu_loras=len(adapters), max_lora_rank=max(RANKS)))
    for name, path in adapters.items():
        engine.add_adapter(name, str(path))
        engine.prefetch_adapter(name, to_device=resident)
    engine.wait_for_adapters(timeout=600)
    return engine


def pool_budgets(model: Path, ranks: list[int], fraction: float) -> dict[str, int]:
    """`lora_pool_bytes` of each engine: what all the adapters need at once, and `fraction` of it."""
    source = resolve_model(str(model))
    descriptor = descriptor_from_config(source.name, source.config)  # as the engine reads it, before there is one
    need = pool_bytes_for(descriptor, ranks, max(RANKS), torch.float32)
    churn = int(need * fraction)
    if churn < pool_bytes_for(descriptor, [max(ranks)], max(RANKS), torch.float32):
        raise SystemExit(f"{fraction} of {len(ranks)} adapters' pool cannot hold a rank-{max(ranks)} adapter; "
                         "raise --pool-fraction or --adapters")
    return {"churn": churn, "all resident": need}


def ratios(churn: dict, resident: dict) -> dict:
    """Churn over all resident, for times and rates alike (the goals read these)."""
    return {
        "ttft_p50": round(churn["ttft_p50_s"] / resident["ttft_p50_s"], 2),
        "ttft_p99": round(churn["ttft_p99_s"] / resident["ttft_p99_s"], 2),
        "tokens_per_second": round(churn["tokens_per_second"] / resident["tokens_per_second"], 3),
    }


def goal_met(measured: float, sense: str, goal: float) -> bool:
    return measured <= goal if sense == "<=" else measured >= goal


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    ranks = adapter_ranks(args.adapters, args.seed)
    runs: dict[str, list[RunResult]] = {c: [] for c in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="lorafleet-churn-") as scratch:
        model = write_model(Path(scratch), args.hidden, args.layers)
        paths = write_adapters(model, ranks, Path(scratch) / "adapters")
        names = list(paths)
        pools = pool_budgets(model, ranks, args.pool_fraction)
        engines = {config: build_engine(model, paths, pool_bytes=pools[config], max_loras=args.max_loras,
                                        resident=config == "all resident") for config in CONFIGS}
        shape = dict(output_tokens=args.output_tokens, tenants=args.tenants)
        # Warm-up: the first steps pay for allocator growth and lazy initialisation.
        warm = request_stream(adapters=args.adapters, requests=8, rate=0.0, prompt_tokens=args.prompt_tokens,
                              seed=args.seed + 7)
        run_interleaved([StreamRun(engine, warm, names, namespace="warm-up", label=f"warm-up, {config}", **shape)
                      for config, engine in engines.items()], args.turn_steps, StreamRun.end_turn)
        # Capacity: requests per second on a closed burst, the all-resident engine's sets the arrival rate.
        burst = request_stream(adapters=args.adapters, requests=args.capacity_requests, rate=0.0,
                               prompt_tokens=args.prompt_tokens, seed=args.seed + 1)
        bursts = run_interleaved([StreamRun(engine, burst, names, namespace="capacity", label=f"capacity, {config}",
                                         **shape) for config, engine in engines.items()], args.turn_steps, StreamRun.end_turn)
        capacity = {config: result.summary() for config, result in zip(CONFIGS, bursts, strict=True)}
        rate = args.load * capacity["all resident"]["requests_per_second"]
        stream = request_stream(adapters=args.adapters, requests=args.requests, rate=rate,
                                prompt_tokens=args.prompt_tokens, seed=args.seed)
        for rep in range(args.repeats):
            order = list(CONFIGS) if rep % 2 == 0 else list(reversed(CONFIGS))  # neither always goes first
            results = run_interleaved([StreamRun(engines[config], stream, names, namespace=f"run-{rep}",
                                              label=f"{config} ({rep + 1}/{args.repeats})", **shape)
                                    for config in order], args.turn_steps, StreamRun.end_turn)
            for config, result in zip(order, results, strict=True):
                runs[config].append(result)
        allocated = {config: engine.memory_breakdown()["adapter_pool"] for config, engine in engines.items()}
        for engine in engines.values():
            engine.close()
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                 "platform": platform.platform(), "torch": torch.__version__,
                 # Other work on the host: the 1, 5 and 15-minute load averages as the run began and ended.
                 "load_average": {"before": [round(x, 2) for x in load_before],
                                  "after": [round(x, 2) for x in os.getloadavg()]}},
        "model": {"hidden": args.hidden, "layers": args.layers, "vocab": VOCAB, "dtype": "float32"},
        "adapters": {"count": args.adapters, "ranks": {str(r): ranks.count(r) for r in RANKS},
                     "zipf_s": 1.0},
        "settings": {k: getattr(args, k) for k in ("requests", "prompt_tokens", "output_tokens", "tenants", "load",
                                                    "pool_fraction", "max_loras", "capacity_requests", "repeats",
                                                    "turn_steps", "seed")},
        # What each engine was given (lora_pool_bytes) and what its pool took of it (whole rows).
        "pools": {config: {"lora_pool_bytes": pools[config], "allocated_bytes": allocated[config]}
                  for config in CONFIGS},
        "capacity": capacity,
        "arrival_rate_per_second": round(rate, 3),
        "runs": {config: median_summary(runs[config]) for config in CONFIGS},
    }
    report["ratios"] = ratios(report["runs"]["churn"], report["runs"]["all resident"])
    report["ratios_per_repetition"] = [ratios(a.summary(), b.summary()) for a, b in zip(*runs.values(), strict=True)]
    report["goals"] = {key: {"goal": f"{sense} {goal}", "measured": report["ratios"][key],
                             "met": goal_met(report["ratios"][key], sense, goal)}
                       for key, (sense, goal) in GOALS.items()}
    (args.out / "churn.json").write_text(json.dumps(report, indent=2) + "\n")
    chart(report, args.out / "churn.png")
    print(table(report))
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256, help="the random model's width (heads of 64)")
    parser.add_argument("--layers", type=int, default=2, help="the random model's depth")
    parser.add_argument("--adapters", type=int, default=256, help="distinct adapters, ranks 8-64 a quarter each")
    parser.add_argument("--requests", type=int, default=1024, help="requests in the measured stream")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=32, help="tokens each request generates")
    parser.add_argument("--tenants", type=int, default=4, help="adapter i belongs to tenant i mod this")
    parser.add_argument("--load", type=float, default=0.7, help="arrival rate as a share of the measured capacity")
    parser.add_argument("--capacity-requests", type=int, default=64, help="requests in the closed burst that measures capacity")
    parser.add_argument("--pool-fraction", type=float, default=0.25,
                        help="the churn engine's pool as a share of the bytes all the adapters need")
    parser.add_argument("--max-loras", type=int, default=8, help="distinct adapters per step, both engines")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each configuration; medians reported")
    parser.add_argument("--turn-steps", type=int, default=8, help="engine steps per turn while the two runs take turns")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    return parser.parse_args(argv)


# ---- report -----------------------------------------------------------------------------------


def table(report: dict) -> str:
    fraction = report["settings"]["pool_fraction"]
    lines = ["| adapter pool | TTFT p50 (s) | TTFT p99 (s) | output tok/s | slot loads/s | evictions |",
             "|---|---|---|---|---|---|"]
    for config in CONFIGS:
        row = report["runs"][config]
        name = f"churn ({fraction:.0%} of all)" if config == "churn" else "all resident"
        lines.append(f"| {name} | {row['ttft_p50_s']} | {row['ttft_p99_s']} | {row['tokens_per_second']} "
                     f"| {row['loads_per_second']} | {row['evictions']:.0f} |")
    r = report["ratios"]
    lines.append(f"| churn / all resident | {r['ttft_p50']}x | {r['ttft_p99']}x | {r['tokens_per_second']}x | | |")
    lines.append("")
    lines.append(f"{report['adapters']['count']} adapters, arrivals at {report['arrival_rate_per_second']} requests/s "
                 f"({report['settings']['load']:.0%} of the all-resident engine's "
                 f"{report['capacity']['all resident']['requests_per_second']} on a closed burst)")
    for key, goal in report["goals"].items():
        lines.append(f"churn / all resident, {key.replace('_', ' ')}: {goal['measured']}x (goal {goal['goal']}x): "
                     f"{'met' if goal['met'] else 'NOT met'}")
    return "\n".join(lines)


def chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"churn": "#f58518", "all resident": "#4c78a8"}
    fig, (ttft, rate, loads) = plt.subplots(1, 3, figsize=(13, 4.2), width_ratios=(2, 1, 1))
    width = 0.38
    for offset, config in zip((-width / 2, width / 2), CONFIGS, strict=True):
        values = [report["runs"][config]["ttft_p50_s"], report["runs"][config]["ttft_p99_s"]]
        bars = ttft.bar([i + offset for i in range(2)], values, width, label=config, color=colours[config])
        ttft.bar_label(bars, labels=[f"{v:.3f}" for v in values], fontsize=8)
    ttft.set_xticks(range(2), ["TTFT p50", "TTFT p99"])
    ttft.set_ylabel("seconds")
    ttft.set_title("Time to first token")
    ttft.legend(fontsize=8)
    for axis, key, fmt, unit, title in ((rate, "tokens_per_second", "{:.0f}", "output tokens / s", "Throughput"),
                                        (loads, "loads_per_second", "{:.2f}", "slot loads / s", "Adapter loads")):
        values = [report["runs"][config][key] for config in CONFIGS]
        bars = axis.bar(range(len(CONFIGS)), values, 0.6, color=[colours[c] for c in CONFIGS])
        axis.bar_label(bars, labels=[fmt.format(v) for v in values], fontsize=8)
        axis.set_xticks(range(len(CONFIGS)), list(CONFIGS))
        axis.set_ylabel(unit)
        axis.set_title(title)
    r, settings = report["ratios"], report["settings"]
    fig.suptitle(f"{report['adapters']['count']} adapters (Zipf 1.0) at {settings['load']:.0%} of capacity, a pool "
                 f"{settings['pool_fraction']:.0%} of all vs all resident: TTFT p99 {r['ttft_p99']}x, "
                 f"throughput {r['tokens_per_second']}x", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
