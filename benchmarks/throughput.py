"""End-to-end throughput: the engine without adapters, the engine with multi-LoRA, and HF + PEFT.

One run, one machine, one workload. Each multi-LoRA configuration takes turns of a few steps
with a no-adapter run of the same workload, each timed on its own clock, so its ratio to the
no-adapter engine holds even while a shared host speeds up and slows down:

- requests with prompt lengths 16-512 and output lengths 16-256 (seeded), all arriving at t=0;
- adapters with ranks {8, 16, 32, 64} on all seven projections, made by PEFT, 8 and 32 distinct;
- systems: lorafleet without adapters, lorafleet with the mixed adapters, and HF transformers +
  PEFT generating mixed-adapter batches with ``adapter_names=`` (static batches, the way a user
  would serve adapters with PEFT today);
- the multi-LoRA runs again with the adapters stored in bfloat16 (``lora_dtype="bfloat16"``:
  files cast to bf16, as bf16 training saves them; half the bytes a decode step reads);
- plus the pure matrix-multiply limit of the same model at the same batch size: the time of
  the model's GEMMs alone, the physical ceiling of this machine;
- with --guided, structured output: --guided-requests (32) requests constrained to a JSON schema
  (``GUIDED_SCHEMA``, which never closes within max_tokens, so every step of every request pays
  for its mask) interleaved with the same requests unconstrained: the cost of the masks.

Reports output tokens/s, time to first token and inter-token latency (p50/p99), writes
``throughput.json`` and ``throughput.png`` under --out.

    python benchmarks/throughput.py                      # the full comparison (~30-50 minutes on 2 cores; HF is most of it)
    python benchmarks/throughput.py --requests 16 --max-output 32 --adapters 8   # a quick look
    python benchmarks/throughput.py --skip-hf            # the engine's ratios only (~15 minutes)
    python benchmarks/throughput.py --skip-hf --aa-rounds 3   # and first how far 1.0 reads from 1.0
    python benchmarks/throughput.py --skip-hf --adapters "" --guided   # only the json_schema row (~5 minutes)
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout

import kernels  # noqa: E402
from engine_daemon import Engine, EngineConfig, SamplingParams  # noqa: E402

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANKS = (8, 16, 32, 64)
# A list of records longer than any output here: the grammar stays open, so the mask is built at every step.
GUIDED_SCHEMA = {"type": "array", "minItems": 10_000, "items": {
    "type": "object", "properties": {"id": {"type": "integer"}, "name": {"type": "string", "maxLength": 24},
                                     "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}}},
    "required": ["id", "name", "tags"], "additionalProperties": False}}


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    adapter: str | None = None


@dataclass
class Result:
    system: str
    adapters: int
    output_tokens: int
    seconds: float
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    phases: dict | None = None  # the engine's step time split by kind of step (engine runs only)
    paired_no_adapters: float | None = None  # tok/s of the no-adapter run interleaved with this one

    @property
    def tokens_per_second(self) -> float:
        return self.output_tokens / self.seconds

    def summary(self) -> dict:
        return {
            "system": self.system,
            "adapters": self.adapters,
            "output_tokens": self.output_tokens,
            "seconds": round(self.seconds, 2),
            "tokens_per_second": round(self.tokens_per_second, 1),
            "ttft_p50_s": _percentile(self.ttft, 50),
            "ttft_p99_s": _percentile(self.ttft, 99),
            "itl_p50_ms": _ms(_percentile(self.itl, 50)),
            "itl_p99_ms": _ms(_percentile(self.itl, 99)),
        } | ({"phases": self.phases} if self.phases else {})


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return round(ordered[index], 4)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def make_workload(count: int, vocab: int, seed: int, min_prompt: int, max_prompt: int, min_out: int, max_out: int):
    rng = random.Random(seed)
    return [
        Request([rng.randrange(100, vocab) for _ in range(rng.randint(min_prompt, max_prompt))], rng.randint(min_out, max_out))
        for _ in range(count)
    ]


def with_adapters(workload: list[Request], names: list[str | None]) -> list[Request]:
    return [Request(r.prompt, r.max_tokens, names[i % len(names)]) for i, r in enumerate(workload)]


# ---- lorafleet -------------------------------------------------------------------------------


class EngineRun:
    """One engine working through one workload, timed on its own clock: the sum of its own steps'
    wall times. Runs that take turns (`run_interleaved`) then each read as if they ran alone."""

    def __init__(self, engine: Engine, workload: list[Request], label: str, adapters: int,
                 guided_json: dict | None = None) -> None:
        self.engine, self.label, self.adapters = engine, label, adapters
        for request in workload:
            if request.adapter:
                engine.prefetch_adapter(request.adapter)
        engine.wait_for_adapters()
        self.first_step = engine.stats.steps
        self.clock = 0.0
        self.token_times: dict[str, list[float]] = {}
        for i, request in enumerate(workload):
            params = SamplingParams(max_tokens=request.max_tokens, temperature=0.0, ignore_eos=True,
                                    guided_json=guided_json)
            engine.add_request(request.prompt, params, request_id=f"{label}-{i}", adapter=request.adapter,
                               tenant=f"tenant-{i % 4}")
        self.bar = tqdm(total=sum(r.max_tokens for r in workload), desc=label, unit="tok")

    @property
    def done(self) -> bool:
        return not self.engine.has_unfinished()

    def step(self) -> None:
        started = time.perf_counter()
        outputs = self.engine.step()
        self.clock += time.perf_counter() - started
        for out in outputs:
            self.token_times.setdefault(out.request_id, []).append(self.clock)
            if out.finished:
                self.engine.pop_finished(out.request_id)
        self.bar.update(len(outputs))

    def result(self) -> Result:
        self.bar.close()
        result = Result(self.label, self.adapters, sum(len(t) for t in self.token_times.values()), self.clock)
        steps = self.engine.stats.steps - self.first_step
        result.phases = step_phases(list(self.engine.stats.recent)[-steps:] if steps else [])
        for times in self.token_times.values():
            result.ttft.append(times[0])
            result.itl += [b - a for a, b in zip(times, times[1:], strict=False)]
        return result


def run_engine(engine: Engine, workload: list[Request], label: str, adapters: int) -> Result:
    return run_interleaved([EngineRun(engine, workload, label, adapters)])[0]


def run_interleaved(runs: list, turn_steps: int = 8, after_turn: Callable[[Any], None] | None = None) -> list:
    """Step the runs in turns of `turn_steps` steps each until all are done.

    Same workload, same schedule: turn k of every run does the same token work within seconds of
    the others', so a slow stretch of a shared host slows them alike and their ratio holds. Turns
    of several steps, not one: a run keeps its own weights warm in the cache within a turn, as
    it would alone (one-step turns would flush them between every two steps). `after_turn(run)`,
    if given, closes each run's turn."""
    while not all(run.done for run in runs):
        for run in runs:
            for _ in range(turn_steps):
                if run.done:
                    break
                run.step()
            if after_turn is not None:
                after_turn(run)
    return [run.result() for run in runs]


def aa_ratios(first: Engine, second: Engine, workload: list[Request], turn_steps: int, rounds: int) -> list[float]:
    """The method's own spread: two identically configured engines, no adapters, interleaved as
    the configurations are; each round's second-over-first throughput (1.0 but for the noise)."""
    ratios = []
    for i in range(rounds):
        a, b = run_interleaved([EngineRun(first, workload, f"A/A {i} first", 0),
                                EngineRun(second, workload, f"A/A {i} second", 0)], turn_steps)
        ratios.append(round(b.tokens_per_second / a.tokens_per_second, 3))
    return ratios


def _median_result(results: list[Result]) -> Result:
    """The run of median throughput among runs of one configuration (its latencies come along)."""
    return sorted(results, key=lambda r: r.tokens_per_second)[len(results) // 2]


def step_phases(records: list) -> dict:
    """Seconds (and LoRA-kernel seconds) of the steps that carried prefill tokens and of the
    decode-only ones: where a ratio is lost, prefill or decode."""
    phases = {}
    for name, steps in (("prefill", [r for r in records if r.num_tokens > r.num_sampled]),
                        ("decode", [r for r in records if r.num_tokens == r.num_sampled])):
        phases[f"{name}_steps"] = len(steps)
        phases[f"{name}_tokens"] = sum(r.num_tokens for r in steps)
        phases[f"{name}_s"] = round(sum(r.seconds for r in steps), 2)
        phases[f"{name}_lora_s"] = round(sum(r.lora_seconds or 0.0 for r in steps), 2)
    return phases


# ---- HF transformers + PEFT ------------------------------------------------------------------


class _StepClock:
    """A logits processor that only records when each generation step happens."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def run_hf_peft(peft_model, workload: list[Request], batch_size: int, label: str, adapters: int) -> Result:
    from transformers import LogitsProcessorList

    result = Result(label, adapters, 0, 0.0)
    start = time.perf_counter()
    batches = [workload[i : i + batch_size] for i in range(0, len(workload), batch_size)]
    with tqdm(total=sum(r.max_tokens for r in workload), desc=label, unit="tok") as bar:
        for batch in batches:
            width = max(len(r.prompt) for r in batch)
            input_ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, request in enumerate(batch):  # left padding, as HF wants for generation
                input_ids[row, width - len(request.prompt) :] = torch.tensor(request.prompt)
                mask[row, width - len(request.prompt) :] = 1
            clock = _StepClock()
            with torch.no_grad():
                peft_model.generate(
                    input_ids=input_ids,
                    attention_mask=mask,
                    adapter_names=[r.adapter or "__base__" for r in batch],
                    max_new_tokens=max(r.max_tokens for r in batch),
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=0,
                    logits_processor=LogitsProcessorList([clock]),
                )
            # A static batch runs until its longest request is done; each request's useful output
            # is its own max_tokens, produced at the first max_tokens steps.
            for request in batch:
                times = clock.times[: request.max_tokens]
                result.ttft.append(times[0] - start)
                result.itl += [b - a for a, b in zip(times, times[1:], strict=False)]
                result.output_tokens += request.max_tokens
                bar.update(request.max_tokens)
    result.seconds = time.perf_counter() - start
    return result


# ---- the matrix-multiply limit -----------------------------------------------------------------


def matmul_limit(engine: Engine, batch: int, repeats: int = 5) -> float:
    """Tokens/s if a decode step cost only the model's GEMMs (every linear layer and the LM head)."""
    model = engine.model
    x = torch.randn(batch, engine.model_config.hidden_size, dtype=model.dtype)
    inter = torch.randn(batch, engine.model_config.intermediate_size, dtype=model.dtype)
    attn_out = torch.randn(batch, engine.model_config.q_size, dtype=model.dtype)

    def one_step() -> None:
        for layer in model.layers:
            x @ layer["qkv_proj"].T
            attn_out @ layer["o_proj"].T
            x @ layer["gate_up_proj"].T
            inter @ layer["down_proj"].T
        x @ model.lm_head.T

    one_step()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        one_step()
        best = min(best, time.perf_counter() - started)
    return batch / best


# ---- adapters ----------------------------------------------------------------------------------


def make_adapters(hf_model, count: int, folder: Path) -> dict[str, Path]:
    """PEFT-written adapters of mixed ranks on all seven projections, cached between runs."""
    from peft import LoraConfig, get_peft_model

    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for i in tqdm(range(count), desc="adapters", unit="adapter"):
        name, rank = f"bench-{i}", RANKS[i % len(RANKS)]
        path = folder / name
        if not (path / "adapter_model.safetensors").exists():
            torch.manual_seed(i)
            config = LoraConfig(r=rank, lora_alpha=rank, target_modules=ALL_PROJECTIONS, lora_dropout=0.0)
            peft_model = get_peft_model(copy.deepcopy(hf_model), config)
            with torch.no_grad():
                for param_name, param in peft_model.named_parameters():
                    if "lora_B" in param_name:
                        param.normal_(0, 0.01)
            peft_model.save_pretrained(path, safe_serialization=True)
        paths[name] = path
    return paths


def cast_adapters(paths: dict[str, Path], dtype: str, folder: Path) -> dict[str, Path]:
    """Copies of the adapters with their weights saved in `dtype`, cached between runs."""
    from safetensors.torch import load_file, save_file

    cast = {}
    for name, source in paths.items():
        target = folder / name
        if not (target / "adapter_model.safetensors").exists():
            target.mkdir(parents=True, exist_ok=True)
            (target / "adapter_config.json").write_text((source / "adapter_config.json").read_text())
            tensors = load_file(source / "adapter_model.safetensors")
            save_file({k: v.to(getattr(torch, dtype)) for k, v in tensors.items()}, target / "adapter_model.safetensors")
        cast[name] = target
    return cast


def make_engine(args, adapter_paths: dict[str, Path], count: int, lora_dtype: str = "auto") -> Engine:
    engine = Engine(EngineConfig(model=args.model, device="cpu", dtype="float32", lora_dtype=lora_dtype,
                                 max_loras=max(count, 1), max_cpu_loras=max(count, 1), max_lora_rank=max(RANKS),
                                 max_num_seqs=args.max_num_seqs, kernels=args.kernels))
    for name, path in adapter_paths.items():
        engine.add_adapter(name, str(path))
    # Warm-up: the first forward passes pay for allocator growth and lazy initialisation.
    warm = make_workload(8, engine.model_config.vocab_size, args.seed + 1, 16, 64, 4, 8)
    run_engine(engine, with_adapters(warm, [None, *list(adapter_paths)[:7]]), "warm-up", 0)
    return engine


def load_hf_model(model: str):
    import transformers

    from engine_daemon.model_source import resolve_model

    source = resolve_model(model)
    if source.kind == "gguf":
        return transformers.AutoModelForCausalLM.from_pretrained(
            str(source.path.parent), gguf_file=source.path.name, dtype=torch.float32
        )
    if source.kind == "hf":
        return transformers.AutoModelForCausalLM.from_pretrained(str(source.path), dtype=torch.float32)
    raise SystemExit("HF + PEFT needs real weights: use an HF directory, a GGUF file or the bundled model")


# ---- report ------------------------------------------------------------------------------------


def _chart_label(row: dict) -> str:
    """Short enough that seven bars side by side do not overlap."""
    system = "HF + PEFT" if row["system"].startswith("HF") else "lorafleet"
    if "bfloat16" in row["system"]:
        return f"{system}\n{row['adapters']} adapters\nbf16 storage"
    return f"{system}\n{row['adapters']} adapters" if row["adapters"] else f"{system}\nno adapters"


def write_chart(rows: list[dict], limits: dict[int, float], path: Path) -> None:
    """Throughput and ITL bars from the report's rows (so `--replot` can redraw a saved run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 4.8))
    labels = [_chart_label(row) for row in rows]
    colours = ["#c44e52" if row["system"].startswith("HF") else "#8fb0d9" if "bfloat16" in row["system"]
               else "#4c72b0" for row in rows]
    left.bar(labels, [row["tokens_per_second"] for row in rows], color=colours)
    for batch, limit in limits.items():
        left.axhline(limit, linestyle="--", color="grey", linewidth=1)
        left.text(len(rows) - 0.5, limit, f"GEMM limit, batch {batch}", ha="right", va="bottom", fontsize=8)
    left.set_ylabel("output tokens / s")
    left.set_title("Throughput")
    left.tick_params(axis="x", labelsize=8)
    x = range(len(rows))
    right.bar([i - 0.2 for i in x], [row["itl_p50_ms"] or 0 for row in rows], width=0.4, label="ITL p50")
    right.bar([i + 0.2 for i in x], [row["itl_p99_ms"] or 0 for row in rows], width=0.4, label="ITL p99")
    right.set_xticks(list(x), labels, fontsize=8)
    right.set_ylabel("ms")
    right.set_title("Inter-token latency")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--adapters", default="8,32", help="comma-separated distinct adapter counts")
    parser.add_argument("--min-prompt", type=int, default=16)
    parser.add_argument("--max-prompt", type=int, default=512)
    parser.add_argument("--min-output", type=int, default=16)
    parser.add_argument("--max-output", type=int, default=256)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--hf-batch-size", type=int, default=32)
    parser.add_argument("--lora-dtypes", default="auto,bfloat16",
                        help="adapter storage dtypes to run multi-LoRA with ('auto' = the model's float32)")
    parser.add_argument("--turn-steps", type=int, default=8,
                        help="engine steps per turn when a multi-LoRA run and its no-adapter run take turns")
    parser.add_argument("--aa-rounds", type=int, default=0,
                        help="first run this many A/A rounds (two no-adapter engines interleaved): the ratios' own spread")
    parser.add_argument("--replot", type=Path, metavar="JSON",
                        help="only redraw the chart of a saved throughput.json (beside it, as .png)")
    parser.add_argument("--skip-hf", action="store_true", help="leave out HF + PEFT (the slowest part)")
    parser.add_argument("--guided", action="store_true", help="add the row of json_schema requests vs unconstrained")
    parser.add_argument("--guided-requests", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kernels", default="auto", choices=kernels.KINDS, help="the engines' kernel backend")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--adapter-cache", type=Path, default=Path("var/bench-adapters"))
    args = parser.parse_args()
    if args.replot:
        report = json.loads(args.replot.read_text())
        limits = {int(b): v for b, v in report["matmul_limit_tokens_per_second"].items()}
        write_chart(report["results"], limits, args.replot.with_suffix(".png"))
        return
    counts = [int(c) for c in args.adapters.split(",") if c]
    args.out.mkdir(parents=True, exist_ok=True)

    hf_model = load_hf_model(args.model)
    hf_model.eval()
    adapter_paths = make_adapters(hf_model, max(counts, default=0), args.adapter_cache / args.model.replace("/", "_"))
    lora_dtypes = [d for d in args.lora_dtypes.split(",") if d]
    engine = make_engine(args, adapter_paths, max(counts, default=0))
    workload = make_workload(args.requests, engine.model_config.vocab_size, args.seed, args.min_prompt,
                             args.max_prompt, args.min_output, args.max_output)
    aa = []
    if args.aa_rounds:
        twin = make_engine(args, adapter_paths, max(counts, default=0))
        aa = aa_ratios(engine, twin, workload, args.turn_steps, args.aa_rounds)
        twin.close()
    # Each multi-LoRA configuration runs interleaved with its own no-adapter run of the same
    # workload (turns of --turn-steps steps), so its ratio is measured under the same host load.
    # The no-adapter engine is configured exactly like the others; only its requests carry no adapter.
    results = []
    no_adapter_runs: list[Result] = []
    for lora_dtype in lora_dtypes:
        paths = adapter_paths if lora_dtype == "auto" else cast_adapters(
            adapter_paths, lora_dtype, args.adapter_cache / f"{args.model.replace('/', '_')}-{lora_dtype}")
        runner = make_engine(args, paths, max(counts, default=0), lora_dtype)
        label = "lorafleet, multi-LoRA" + ("" if lora_dtype == "auto" else f", {lora_dtype} adapters")
        for count in counts:
            names = [f"bench-{i}" for i in range(count)]
            alone, multi = run_interleaved([EngineRun(engine, workload, "lorafleet, no adapters", 0),
                                            EngineRun(runner, with_adapters(workload, names), label, count)],
                                           args.turn_steps)
            multi.paired_no_adapters = alone.tokens_per_second
            no_adapter_runs.append(alone)
            results.append(multi)
        runner.close()
    if args.guided:
        guided_workload = workload[: args.guided_requests]
        twin = make_engine(args, adapter_paths, max(counts, default=0))  # configured alike; its requests guided
        free, guided = run_interleaved([
            EngineRun(engine, guided_workload, "lorafleet, no adapters, unconstrained", 0),
            EngineRun(twin, guided_workload, "lorafleet, no adapters, json_schema", 0, guided_json=GUIDED_SCHEMA)],
            args.turn_steps)
        twin.close()
        guided.paired_no_adapters = free.tokens_per_second
        no_adapter_runs = no_adapter_runs or [free]
        results.append(guided)
    results.insert(0, _median_result(no_adapter_runs))
    if not args.skip_hf:
        from peft import PeftModel

        for count in counts:
            names = [f"bench-{i}" for i in range(count)]
            peft_model = PeftModel.from_pretrained(copy.deepcopy(hf_model), adapter_paths[names[0]], adapter_name=names[0])
            for name in names[1:]:
                peft_model.load_adapter(adapter_paths[name], adapter_name=name)
            peft_model.eval()
            results.append(run_hf_peft(peft_model, with_adapters(workload, names), args.hf_batch_size,
                                       "HF + PEFT", count))
    limits = {b: matmul_limit(engine, b) for b in sorted({32, args.max_num_seqs, 256})}
    # Every prompt token also passes through the GEMMs: the ceiling of this workload's output rate.
    prompt_tokens = sum(len(r.prompt) for r in workload)
    output_tokens = sum(r.max_tokens for r in workload)
    workload_ceiling = output_tokens / ((prompt_tokens + output_tokens) / limits[max(limits)])

    base = results[0].tokens_per_second
    rows = [r.summary() for r in results]
    for row, result in zip(rows, results, strict=True):
        # An engine row's ratio is against its own interleaved no-adapter run; HF's against the median one.
        paired = result.paired_no_adapters or base
        row["vs_engine_no_adapters"] = round(result.tokens_per_second / paired, 3)
        if result.paired_no_adapters:
            row["paired_no_adapters_tokens_per_second"] = round(paired, 1)
        hf = next((h for h in results if h.system == "HF + PEFT" and h.adapters == result.adapters), None)
        if hf is not None and result.system.startswith("lorafleet"):
            row["vs_hf_peft"] = round(result.tokens_per_second / hf.tokens_per_second, 2)
    report = {
        "model": args.model,
        "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__,
                    # Which kernel backend the engines ran ("auto": native where a C compiler is at hand).
                    "cpu_kernels": kernels.backend(args.kernels, "cpu").name},
        "workload": {k: getattr(args, k) for k in ("requests", "min_prompt", "max_prompt", "min_output", "max_output",
                                                    "max_num_seqs", "hf_batch_size", "seed", "lora_dtypes", "turn_steps")},
        "results": rows,
        "matmul_limit_tokens_per_second": {str(b): round(v, 1) for b, v in limits.items()},
        "workload_gemm_ceiling_output_tokens_per_second": round(workload_ceiling, 1),
        "workload_tokens": {"prompt": prompt_tokens, "output": output_tokens},
        "engine": {"steps": engine.stats.steps, "preemptions": engine.scheduler.num_preemptions},
        "aa_ratios": aa,
    }
    (args.out / "throughput.json").write_text(json.dumps(report, indent=2))
    write_chart(rows, limits, args.out / "throughput.png")
    print_table(rows, limits)
    print(f"GEMM ceiling of this workload ({prompt_tokens} prompt + {output_tokens} output tokens): "
          f"{workload_ceiling:.0f} output tok/s")
    if aa:
        print(f"A/A (two identical no-adapter engines interleaved), second over first: {aa}")
    engine.close()


def print_table(rows: list[dict], limits: dict[int, float]) -> None:
    header = "| system | adapters | tok/s | vs no-adapter | vs HF+PEFT | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) |"
    print(header)
    print("|" + "---|" * 7)
    for row in rows:
        print(
            f"| {row['system']} | {row['adapters'] or '-'} | {row['tokens_per_second']} | {row['vs_engine_no_adapters']} "
            f"| {row.get('vs_hf_peft', '-')} | {row['ttft_p50_s']} / {row['ttft_p99_s']} "
            f"| {row['itl_p50_ms']} / {row['itl_p99_ms']} |"
        )
    print("GEMM limit (tok/s): " + ", ".join(f"batch {b}: {v:.0f}" for b, v in limits.items()))
    for row in rows:
        if "paired_no_adapters_tokens_per_second" in row:
            print(f"{row['system']} ({row['adapters']} adapters): its interleaved no-adapter run "
                  f"{row['paired_no_adapters_tokens_per_second']} tok/s")
    for row in rows:
        if "phases" in row:
            p = row["phases"]
            print(f"{row['system']} ({row['adapters'] or 'no'} adapters): prefill steps {p['prefill_s']} s "
                  f"(LoRA {p['prefill_lora_s']} s), decode steps {p['decode_s']} s (LoRA {p['decode_lora_s']} s)")


if __name__ == "__main__":
    main()
