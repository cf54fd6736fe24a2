"""The prefix cache on and off: time to first token and throughput on prompts that share a prefix.

Two workloads, both greedy with ``ignore_eos`` (every request makes exactly --output-tokens tokens):

- ``shared prompt``: --tenants tenants, each with a system prompt of its own (~--system-tokens
  tokens of seeded text), and --requests-per-tenant short chats each (a question of 10-30 tokens
  after that tenant's system prompt), arriving at seeded times spread uniformly over
  --arrival-seconds (a Poisson process, given how many arrive). The default, 64 chats over 32 s,
  is a rate the cached engine keeps up with on a 2-core CPU and the uncached one does not (each
  of its chats brings ~530 prompt tokens to compute); at a rate neither keeps up with, time to
  first token measures the queue more than the cache;
- ``multi-turn``: --conversations conversations of --turns turns; each turn sends the previous
  turn's prompt, the model's answer to it (its token ids, verbatim) and a new question, and
  arrives as soon as the previous answer is done. First turns find nothing in the cache, so this
  workload's p99 is a first turn's.

Each runs on two engines built once, one with ``enable_prefix_caching`` and one without, taking
turns of --turn-steps steps as ``throughput.py``'s runs do, so that a slow stretch of a shared host
slows both; --repeats times, and the medians are reported. A run keeps its own clock, the sum of
its steps' wall times, which jumps ahead to the next arrival when its engine is idle; requests are
added between steps once their arrival time has passed. Time to first token is the first
token's time minus the arrival time; throughput is output tokens over the run's clock. Each
workload and repetition runs under tenant names of its own, so no run finds another's blocks.

With a tokenizer, prompts go through the model's chat template (``Engine.encode`` with messages,
as ``add_request(messages=...)`` does); a model without one (``random:<preset>``) gets seeded
token ids. Either way the workload is token ids from then on.

The issue's goals, on the shared-prompt workload: TTFT p50 at least 4x lower and throughput at
least 1.5x higher with the cache on. Writes ``prefix.json`` and ``prefix.png`` under --out.

    python benchmarks/prefix.py                          # the bundled SmolLM2-135M on CPU (~9 minutes on 2 cores)
    python benchmarks/prefix.py --out benchmarks/results # the run behind README and RESULTS.md
    python benchmarks/prefix.py --model random:tiny --requests-per-tenant 4 --system-tokens 64 --turns 3 --repeats 1
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout

from benchmarks.throughput import _percentile as percentile  # noqa: E402
from benchmarks.throughput import run_interleaved  # noqa: E402
from engine_daemon import Engine, EngineConfig, SamplingParams  # noqa: E402

CONFIGS = {"cache on": True, "cache off": False}
WORKLOADS = ("shared prompt", "multi-turn")
GOALS = {"ttft_p50": 4.0, "tokens_per_second": 1.5}  # on the shared-prompt workload
WORDS = (
    "account order refund shipping policy customer invoice warranty delivery return window support agent "
    "product price discount store region tax receipt payment card bank transfer limit balance statement "
    "travel booking flight hotel room date change cancel fee member level points reward partner service "
    "contract clause notice period renewal term device repair battery screen model serial update version"
).split()


# ---- prompts as token ids ---------------------------------------------------------------------


class ChatTurns:
    """Chat turns through the model's chat template; the tokenizer only turns text into ids."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.tokenizer = engine, engine.tokenizer

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.backend.encode(text, add_special_tokens=False).ids  # no BOS: text inside a chat

    def content(self, rng: random.Random, tokens: int, end: str = ".") -> str:
        """Seeded sentences of about `tokens` tokens."""
        words: list[str] = []
        text = ""
        while len(self._ids(text)) < tokens:
            words.append(rng.choice(WORDS))
            sentences = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
            text = " ".join(s[0].upper() + s[1:] + "." for s in sentences)[:-1] + end
        return text

    def first_turn(self, system: str, user: str) -> list[int]:
        return self.engine.encode(None, [{"role": "system", "content": system}, {"role": "user", "content": user}])

    def next_turn(self, user: str) -> list[int]:
        """What follows the assistant's answer: the template's end of that turn, the new user turn, and
        the assistant's header; read off the template by rendering a probe conversation."""
        render = self.tokenizer.apply_chat_template
        probe = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
        asked = render(probe)
        answered = render([*probe, {"role": "assistant", "content": "A"}], add_generation_prompt=False)
        followed = render([*probe, {"role": "assistant", "content": "A"}, {"role": "user", "content": user}])
        if not answered.startswith(asked + "A") or not followed.startswith(answered):
            raise SystemExit("this model's chat template does not extend a conversation by appending; use --model random:tiny")
        return self._ids(answered[len(asked) + 1 :] + followed[len(answered) :])


class TokenIdTurns:
    """Turns as seeded token ids, for a model without a tokenizer; ids 1 and 2 frame the turns."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def content(self, rng: random.Random, tokens: int, end: str = ".") -> list[int]:
        return [rng.randrange(3, self.vocab_size) for _ in range(tokens)]

    def first_turn(self, system: list[int], user: list[int]) -> list[int]:
        return [1, *system, 2, *user, 2]

    def next_turn(self, user: list[int]) -> list[int]:
        return [2, *user, 2]


Turns = ChatTurns | TokenIdTurns


def turns_for(engine: Engine) -> Turns:
    return ChatTurns(engine) if engine.tokenizer is not None else TokenIdTurns(engine.model_config.vocab_size)


# ---- workloads --------------------------------------------------------------------------------


@dataclass
class Conversation:
    tenant: int
    start: float  # when the first turn arrives, seconds on the run's clock
    turns: list[list[int]]  # the first turn's prompt, then what each later turn appends after the answer before it


def system_prompts(turns: Turns, tenants: int, tokens: int, seed: int) -> list[str] | list[list[int]]:
    rng = random.Random(seed)
    return [turns.content(rng, tokens) for _ in range(tenants)]


def shared_prompt_workload(turns: Turns, *, tenants: int, per_tenant: int, system_tokens: int, arrival_seconds: float,
                           seed: int) -> list[Conversation]:
    """One-turn chats after each tenant's system prompt, arriving in a seeded order over `arrival_seconds`."""
    rng = random.Random(seed)
    systems = system_prompts(turns, tenants, system_tokens, seed)
    owners = [t for t in range(tenants) for _ in range(per_tenant)]
    rng.shuffle(owners)
    arrivals = sorted(rng.uniform(0, arrival_seconds) for _ in owners)
    return [Conversation(t, at, [turns.first_turn(systems[t], turns.content(rng, rng.randint(10, 30), "?"))])
            for t, at in zip(owners, arrivals, strict=True)]


def multi_turn_workload(turns: Turns, *, tenants: int, conversations: int, turn_count: int, system_tokens: int,
                        seed: int) -> list[Conversation]:
    """Conversations of `turn_count` questions, one per tenant in turn, starting within the first second."""
    rng = random.Random(seed + 1)
    systems = system_prompts(turns, tenants, system_tokens, seed)
    made = []
    for i in range(conversations):
        tenant = i % tenants
        questions = [turns.content(rng, rng.randint(10, 30), "?") for _ in range(turn_count)]
        made.append(Conversation(tenant, rng.uniform(0, 1.0), [turns.first_turn(systems[tenant], questions[0]),
                                                               *(turns.next_turn(q) for q in questions[1:])]))
    return made


# ---- one run ----------------------------------------------------------------------------------


@dataclass
class RunResult:
    ttft: list[float]
    prompt_tokens: int
    cached_tokens: int
    scheduler_cached_tokens: int  # the scheduler's own count for the run's tenants, as a cross-check
    output_tokens: int
    seconds: float

    def summary(self) -> dict:
        return {
            "requests": len(self.ttft),
            "ttft_p50_s": percentile(self.ttft, 50),
            "ttft_p99_s": percentile(self.ttft, 99),
            "tokens_per_second": round(self.output_tokens / self.seconds, 1),
            "hit_rate": round(self.cached_tokens / self.prompt_tokens, 3),
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "scheduler_cached_tokens": self.scheduler_cached_tokens,
            "output_tokens": self.output_tokens,
            "seconds": round(self.seconds, 2),
        }


class ArrivalRun:
    """One engine working through conversations whose turns arrive over time, on the run's own clock
    (see the module docstring). A step at a time, so that two runs can take turns (`run_interleaved`)."""

    def __init__(self, engine: Engine, conversations: list[Conversation], output_tokens: int, namespace: str,
                 label: str) -> None:
        self.engine, self.conversations, self.namespace = engine, conversations, namespace
        self.params = SamplingParams(max_tokens=output_tokens, temperature=0.0, ignore_eos=True)
        self.arrivals = [(c.start, i, 0, c.turns[0]) for i, c in enumerate(conversations)]  # (time, conversation, turn, prompt)
        heapq.heapify(self.arrivals)
        self.in_flight: dict[str, tuple[float, int, int]] = {}  # request id -> (arrival, conversation, turn)
        self.ttft: list[float] = []
        self.prompt_tokens = self.cached_tokens = self.output_tokens = 0
        self.clock = 0.0
        self.bar = tqdm(total=sum(len(c.turns) for c in conversations) * output_tokens, desc=label, unit="tok")

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
            at, i, turn = self.in_flight[out.request_id]
            if out.completion_tokens == 1:
                self.ttft.append(self.clock - at)
            self.bar.update(len(out.new_token_ids))
            if out.finished:
                result = self.engine.pop_finished(out.request_id)
                self.prompt_tokens += len(result.prompt_token_ids)
                self.cached_tokens += result.num_cached_tokens
                self.output_tokens += len(result.token_ids)
                turns = self.conversations[i].turns
                if turn + 1 < len(turns):  # the next turn arrives now, with this one's answer verbatim
                    history = result.prompt_token_ids + result.token_ids + turns[turn + 1]
                    heapq.heappush(self.arrivals, (self.clock, i, turn + 1, history))

    def _add_arrived(self) -> None:
        while self.arrivals and self.arrivals[0][0] <= self.clock:
            at, i, turn, ids = heapq.heappop(self.arrivals)
            request_id = self.engine.add_request(ids, self.params, request_id=f"{self.namespace}-{i}-{turn}",
                                                 tenant=self._tenant(self.conversations[i]))
            self.in_flight[request_id] = (at, i, turn)

    def _tenant(self, conversation: Conversation) -> str:
        return f"{self.namespace}-tenant-{conversation.tenant}"

    def result(self) -> RunResult:
        self.bar.close()
        tenants = {self._tenant(c) for c in self.conversations}
        counted = sum(self.engine.scheduler.prefix_tokens[t][1] for t in tenants)
        return RunResult(self.ttft, self.prompt_tokens, self.cached_tokens, counted, self.output_tokens, self.clock)


# ---- the comparison ---------------------------------------------------------------------------


def build_engine(model: str, prefix_caching: bool) -> Engine:
    return Engine(EngineConfig(model=model, device="cpu", dtype="float32", enable_prefix_caching=prefix_caching))


def median_summary(runs: list[RunResult]) -> dict:
    summaries = [r.summary() for r in runs]
    medians = {key: round(statistics.median(s[key] for s in summaries), 4) for key in summaries[0]}
    return medians | {"runs": summaries}


def ratios(on: dict, off: dict) -> dict:
    """How many times better the cache makes each number (off / on for times, on / off for rates)."""
    return {
        "ttft_p50": round(off["ttft_p50_s"] / on["ttft_p50_s"], 2),
        "ttft_p99": round(off["ttft_p99_s"] / on["ttft_p99_s"], 2),
        "tokens_per_second": round(on["tokens_per_second"] / off["tokens_per_second"], 2),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, list[RunResult]]] = {w: {c: [] for c in CONFIGS} for w in WORKLOADS}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="lorafleet-prefix-") as scratch:
        model = args.model
        if model == "tiny":  # a tiny random model with a tokenizer: the chat-template path
            from benchmarks.tenants import tiny_model

            model = str(tiny_model(Path(scratch)))
        engines = {name: build_engine(model, caching) for name, caching in CONFIGS.items()}
        turns = turns_for(engines["cache on"])
        shapes = dict(tenants=args.tenants, system_tokens=args.system_tokens, seed=args.seed)
        workloads = {
            "shared prompt": shared_prompt_workload(turns, per_tenant=args.requests_per_tenant,
                                                    arrival_seconds=args.arrival_seconds, **shapes),
            "multi-turn": multi_turn_workload(turns, conversations=args.conversations, turn_count=args.turns, **shapes),
        }
        # Warm-up: the first steps pay for allocator growth and lazy initialisation.
        warm = shared_prompt_workload(turns, tenants=1, per_tenant=4, system_tokens=args.system_tokens,
                                      arrival_seconds=0.5, seed=args.seed + 7)
        run_interleaved([ArrivalRun(engine, warm, 4, "warm-up", f"warm-up, {name}") for name, engine in engines.items()])
        for rep in range(args.repeats):
            for workload, conversations in workloads.items():
                order = list(CONFIGS) if rep % 2 == 0 else list(reversed(CONFIGS))  # neither always goes first
                namespace = f"{workload.replace(' ', '-')}-{rep}"
                results = run_interleaved([ArrivalRun(engines[config], conversations, args.output_tokens, namespace,
                                                      f"{workload}, {config} ({rep + 1}/{args.repeats})")
                                           for config in order], args.turn_steps)
                for config, result in zip(order, results, strict=True):
                    runs[workload][config].append(result)
        for engine in engines.values():
            engine.close()
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                 "platform": platform.platform(), "torch": torch.__version__,
                 # Other work on the host: the 1, 5 and 15-minute load averages as the run began and ended.
                 "load_average": {"before": [round(x, 2) for x in load_before],
                                  "after": [round(x, 2) for x in os.getloadavg()]}},
        "model": args.model,
        "settings": {k: getattr(args, k) for k in ("tenants", "requests_per_tenant", "system_tokens", "arrival_seconds",
                                                    "conversations", "turns", "output_tokens", "repeats", "turn_steps", "seed")},
        "workloads": {},
    }
    for workload in WORKLOADS:
        on, off = (median_summary(runs[workload][c]) for c in CONFIGS)
        paired = [ratios(a.summary(), b.summary()) for a, b in zip(*runs[workload].values(), strict=True)]
        report["workloads"][workload] = {"cache on": on, "cache off": off, "ratios": ratios(on, off),
                                         "ratios_per_repetition": paired}
    measured = report["workloads"]["shared prompt"]["ratios"]
    report["goals"] = {key: {"goal": goal, "measured": measured[key], "met": measured[key] >= goal}
                       for key, goal in GOALS.items()}
    (args.out / "prefix.json").write_text(json.dumps(report, indent=2) + "\n")
    chart(report, args.out / "prefix.png")
    print(table(report))
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="a model the engine serves ('random:tiny': token ids), or 'tiny' (a tiny random model with a tokenizer)")
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--requests-per-tenant", type=int, default=16, help="shared-prompt chats per tenant")
    parser.add_argument("--system-tokens", type=int, default=500, help="length of each tenant's system prompt")
    parser.add_argument("--arrival-seconds", type=float, default=32.0,
                        help="the shared-prompt chats arrive over this many seconds of the run's clock")
    parser.add_argument("--conversations", type=int, default=4, help="multi-turn conversations (one per tenant in turn)")
    parser.add_argument("--turns", type=int, default=6, help="turns per multi-turn conversation")
    parser.add_argument("--output-tokens", type=int, default=32, help="tokens each request generates")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each workload and configuration; medians reported")
    parser.add_argument("--turn-steps", type=int, default=4, help="engine steps per turn while the two configurations take turns")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    return parser.parse_args(argv)


# ---- report -----------------------------------------------------------------------------------


def table(report: dict) -> str:
    lines = ["| workload | prefix cache | TTFT p50 (s) | TTFT p99 (s) | output tok/s | hit rate |", "|---|---|---|---|---|---|"]
    for workload, rows in report["workloads"].items():
        for config in CONFIGS:
            row = rows[config]
            lines.append(f"| {workload} | {config.removeprefix('cache ')} | {row['ttft_p50_s']} | {row['ttft_p99_s']} "
                         f"| {row['tokens_per_second']} | {row['hit_rate']:.1%} |")
        r = rows["ratios"]
        lines.append(f"| {workload} | on vs off | {r['ttft_p50']}x lower | {r['ttft_p99']}x lower "
                     f"| {r['tokens_per_second']}x higher | |")
    lines.append("")
    for key, goal in report["goals"].items():
        lines.append(f"shared prompt, {key.replace('_', ' ')}: {goal['measured']}x (goal >= {goal['goal']}x): "
                     f"{'met' if goal['met'] else 'NOT met'}")
    return "\n".join(lines)


def chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"cache on": "#4c78a8", "cache off": "#f58518"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.38
    groups = [(w, stat) for w in WORKLOADS for stat in ("p50", "p99")]
    for offset, config in zip((-width / 2, width / 2), CONFIGS, strict=True):
        values = [report["workloads"][w][config][f"ttft_{stat}_s"] for w, stat in groups]
        bars = left.bar([i + offset for i in range(len(groups))], values, width, label=config, color=colours[config])
        left.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=8)
        rates = [report["workloads"][w][config]["tokens_per_second"] for w in WORKLOADS]
        bars = right.bar([i + offset for i in range(len(WORKLOADS))], rates, width, label=config, color=colours[config])
        right.bar_label(bars, labels=[f"{v:.0f}" for v in rates], fontsize=8)
    left.set_xticks(range(len(groups)), [f"{w}\nTTFT {stat}" for w, stat in groups], fontsize=8)
    left.set_yscale("log")
    left.set_ylabel("time to first token (s, log scale)")
    left.set_title("Time to first token")
    right.set_xticks(range(len(WORKLOADS)), list(WORKLOADS))
    right.set_ylabel("output tokens / s")
    right.set_title("Throughput")
    for axis in (left, right):
        axis.legend(fontsize=8)
    r = report["workloads"]["shared prompt"]["ratios"]
    fig.suptitle(f"{report['model']}, prefix cache on vs off: shared prompt TTFT p50 {r['ttft_p50']}x lower, "
                 f"{r['tokens_per_second']}x the throughput", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
