"""Multi-LoRA kernel benchmark.

CPU:  the native backend (`kernels.backend("native")`, the C kernels the CPU engine runs where a
      C compiler exists) and the torch backend (`kernels.backend("torch")`: the specification's
      segment loop) against the loop over adapters that HF PEFT runs for a mixed batch (for
      each adapter: select its tokens, two matmuls, scatter-add), and against the even plainer
      masked loop (for each adapter: full matmul over every token, masked). Prints the ratios.
CUDA: the Triton backend vs the torch backend (the specification's segment loop,
      `kernels.reference`) vs the base GEMM at Llama-3-8B shapes, decode and prefill,
      reporting (a) LoRA time / base GEMM time, (b) achieved bandwidth vs the H200's
      4.8 TB/s, (c) speed-up over the torch backend. `--check` first verifies Triton (and the
      torch backend's attention) against the specification.

    python benchmarks/kernels.py --small            # CPU, quarter-size shapes
    python benchmarks/kernels.py --check            # CUDA: correctness, then the full table

Writes kernels.json and kernels.md under --out (default: $OUT, else benchmarks/out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout

import kernels  # noqa: E402
from kernels import reference  # noqa: E402

H200_BYTES_PER_S = 4.8e12
# (name, in_features, out_features) of the Llama-3-8B projections.
LLAMA3_8B_SHAPES = [
    ("q/o 4096->4096", 4096, 4096),
    ("k/v 4096->1024", 4096, 1024),
    ("gate/up 4096->14336", 4096, 14336),
    ("down 14336->4096", 14336, 4096),
]


@dataclass
class Case:
    mode: str  # "decode" (adapters interleaved token by token) | "prefill" (one run per sequence)
    shape: str
    in_features: int
    out_features: int
    tokens: int
    adapters: int
    rank: int


@dataclass
class Batch:
    token_slots: torch.Tensor
    ranks: torch.Tensor
    scalings: torch.Tensor
    x: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    base: torch.Tensor
    weight: torch.Tensor  # the base layer, for the GEMM the LoRA term rides on


def make_batch(case: Case, num_slots: int, dtype: torch.dtype, device: torch.device) -> Batch:
    # Generated on the device itself: an adapter pool at Llama shapes is ~10^8 numbers.
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator, device=device) * std).to(dtype)

    # Adapters occupy random slots of a pool of num_slots, as in the engine.
    used = torch.randperm(num_slots, generator=generator, device=device)[: case.adapters]
    if case.mode == "decode":
        slots = used[torch.randperm(case.tokens, generator=generator, device=device) % case.adapters]
    else:
        slots = used.repeat_interleave(math.ceil(case.tokens / case.adapters))[: case.tokens]
    return Batch(
        token_slots=slots.to(torch.int32),
        ranks=torch.full((num_slots,), case.rank, dtype=torch.int32, device=device),
        scalings=torch.full((num_slots,), 0.5, device=device),
        x=randn(case.tokens, case.in_features),
        lora_a=randn(num_slots, case.rank, case.in_features, std=case.in_features**-0.5),
        lora_b=randn(num_slots, case.out_features, case.rank, std=1e-3),
        base=torch.zeros(case.tokens, case.out_features, device=device, dtype=dtype),
        weight=randn(case.out_features, case.in_features, std=0.02),
    )


def peft_loop(batch: Batch) -> None:
    """HF PEFT's mixed-batch forward: per adapter, select its tokens, A then B, scatter-add."""
    slots = batch.token_slots
    for slot in slots.unique().tolist():
        if slot < 0:
            continue
        rank = int(batch.ranks[slot])
        rows = (slots == slot).nonzero().squeeze(1)
        sub = batch.x[rows]
        out = (sub @ batch.lora_a[slot, :rank].t()) @ batch.lora_b[slot, :, :rank].t() * batch.scalings[slot]
        batch.base.index_add_(0, rows, out.to(batch.base.dtype))


def masked_loop(batch: Batch) -> None:
    """Per adapter, the full matmul over every token, kept only where the token uses it."""
    slots = batch.token_slots
    for slot in slots.unique().tolist():
        if slot < 0:
            continue
        rank = int(batch.ranks[slot])
        out = (
            (batch.x @ batch.lora_a[slot, :rank].t())
            @ batch.lora_b[slot, :, :rank].t()
            * batch.scalings[slot]
        )
        batch.base += out * (slots == slot).unsqueeze(1).to(out.dtype)


def lora_step(batch: Batch, backend: kernels.Backend) -> Callable[[], None]:
    """One shrink and expand on `backend`, over the meta its own lora_meta plans (once, untimed)."""
    meta = backend.lora_meta(batch.token_slots, batch.ranks, batch.scalings)

    def run() -> None:
        y = backend.lora_shrink(batch.x, batch.lora_a, meta)
        backend.lora_expand(y, batch.lora_b, meta, batch.base)

    return run


def time_it(fn: Callable[[], None], device: torch.device, budget_s: float) -> float:
    """Median seconds per call."""
    if device.type == "cuda":
        import triton.testing

        return (
            triton.testing.do_bench(fn, warmup=5, rep=max(1, int(budget_s * 1000)), return_mode="median")
            / 1e3
        )
    fn()  # warm-up
    samples: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(samples) < 3 or (time.perf_counter() < deadline and len(samples) < 200):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def lora_bytes(case: Case, dtype: torch.dtype) -> int:
    """Minimum traffic of shrink + expand: x, the used A and B, y out and in, base in and out."""
    e = torch.finfo(dtype).bits // 8
    weights = case.adapters * case.rank * (case.in_features + case.out_features) * e
    activations = case.tokens * (case.in_features * e + 2 * case.rank * 4 + 2 * case.out_features * e)
    return weights + activations


def cases(device: torch.device, small: bool, quick: bool) -> list[Case]:
    shapes = LLAMA3_8B_SHAPES
    if small:  # a quarter of every dimension: the same shape of problem, CPU-sized
        shapes = [(name + " /4", i // 4, o // 4) for name, i, o in shapes]
    if device.type == "cuda":
        decode = [(t, a) for t in (1, 16, 64, 256) for a in (1, 8, 32, 128) if a <= t]
        prefill = [(256, 1), (2048, 1), (2048, 8)]
        ranks = (8, 16, 64)
    else:
        decode = [(16, 8), (64, 8), (64, 32), (256, 32)]
        prefill = [(512, 1), (512, 4)]
        ranks = (16, 64)
    if quick:
        decode, prefill, ranks, shapes = [(64, 32)], [(512, 4)], (16,), shapes[:1]
    out = []
    for name, i, o in shapes:
        for rank in ranks:
            out += [Case("decode", name, i, o, t, a, rank) for t, a in decode]
            out += [Case("prefill", name, i, o, t, a, rank) for t, a in prefill]
    return out


def bench_cpu(case_list: list[Case], budget_s: float) -> list[dict]:
    from tqdm import tqdm

    device = torch.device("cpu")
    twins, native = kernels.backend("torch", device), kernels.backend("native", device)
    rows = []
    for case in tqdm(case_list, desc="cpu lora", file=sys.stderr):
        batch = make_batch(case, num_slots=max(32, case.adapters), dtype=torch.float32, device=device)
        twin = time_it(lora_step(batch, twins), device, budget_s)
        fast = time_it(lora_step(batch, native), device, budget_s)
        peft = time_it(lambda b=batch: peft_loop(b), device, budget_s)
        masked = time_it(lambda b=batch: masked_loop(b), device, budget_s)
        gemm = time_it(lambda b=batch: torch.matmul(b.x, b.weight.t()), device, budget_s)
        # What the CPU engine builds once per step: the meta with the native backend's plan.
        build = time_it(lambda b=batch: native.lora_meta(b.token_slots, b.ranks, b.scalings), device, budget_s)
        rows.append(
            asdict(case)
            | {
                "twin_ms": twin * 1e3,
                "native_ms": fast * 1e3,
                "peft_loop_ms": peft * 1e3,
                "masked_loop_ms": masked * 1e3,
                "base_gemm_ms": gemm * 1e3,
                "meta_build_ms": build * 1e3,
                "speedup_vs_peft_loop": peft / twin,
                "speedup_vs_masked_loop": masked / twin,
                "native_vs_twin": twin / fast,
                "native_vs_peft_loop": peft / fast,
                "lora_over_gemm": twin / gemm,
                "native_over_gemm": fast / gemm,
            }
        )
    return rows


def bench_cuda(case_list: list[Case], budget_s: float, dtype: torch.dtype) -> list[dict]:
    from tqdm import tqdm

    device = torch.device("cuda")
    triton_backend, twins = kernels.backend("triton", device), kernels.backend("torch", device)
    rows = []
    num_slots = 128
    for case in tqdm(case_list, desc="cuda lora", file=sys.stderr):
        batch = make_batch(case, num_slots=num_slots, dtype=dtype, device=device)
        fast = time_it(lora_step(batch, triton_backend), device, budget_s)
        twin = time_it(lora_step(batch, twins), device, budget_s)
        gemm = time_it(lambda b=batch: torch.matmul(b.x, b.weight.t()), device, budget_s)
        rows.append(
            asdict(case)
            | {
                "triton_us": fast * 1e6,
                "twin_us": twin * 1e6,
                "base_gemm_us": gemm * 1e6,
                "lora_over_gemm": fast / gemm,
                "bandwidth_tb_s": lora_bytes(case, dtype) / fast / 1e12,
                "bandwidth_of_peak": lora_bytes(case, dtype) / fast / H200_BYTES_PER_S,
                "speedup_vs_twin": twin / fast,
            }
        )
    return rows


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30))


def check_cuda(device: torch.device | None = None) -> list[str]:
    """The Triton backend against the specification (`kernels.reference`) on CUDA at Llama shapes
    and awkward ones, and the torch backend's attention too; returns failure lines."""
    failures = []
    device = device or torch.device("cuda")
    fast_backend, twins = kernels.backend("triton", device), kernels.backend("torch", device)
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

    def report(line: str, err: float, dtype: torch.dtype) -> None:
        line = f"{line}: rel err {err:.2e}"
        print(("ok   " if err <= tolerance[dtype] else "FAIL ") + line, flush=True)
        if err > tolerance[dtype]:
            failures.append(line)

    for dtype in tolerance:
        for case in [
            Case("decode", "awkward", 100, 70, 33, 16, 64),
            Case("decode", "q/o", 4096, 4096, 64, 32, 16),
            Case("prefill", "gate/up", 4096, 14336, 300, 3, 64),
            Case("decode", "down", 14336, 4096, 7, 7, 8),
        ]:
            batch = make_batch(case, num_slots=max(16, case.adapters), dtype=dtype, device=device)
            # Base and LoRA term of one magnitude, so that rounding base cannot hide the term.
            batch.base.normal_()
            batch.lora_b.normal_(std=case.rank**-0.5)
            batch.token_slots[::5] = -1
            spec = kernels.LoraMeta.build(batch.token_slots, batch.ranks, batch.scalings)  # no plan: the spec's
            meta = fast_backend.lora_meta(batch.token_slots, batch.ranks, batch.scalings)
            y_spec = reference.lora_shrink(batch.x, batch.lora_a, spec)
            y_fast = fast_backend.lora_shrink(batch.x, batch.lora_a, meta)
            out_spec = reference.lora_expand(y_spec, batch.lora_b, spec, batch.base.clone())
            out_fast = fast_backend.lora_expand(y_fast, batch.lora_b, meta, batch.base.clone())
            report(f"lora shrink {case.shape} T={case.tokens} {dtype}", relative_error(y_fast, y_spec), dtype)
            report(f"lora expand {case.shape} T={case.tokens} {dtype}", relative_error(out_fast, out_spec), dtype)
    # Paged attention at Llama-3-8B head geometry: decode and chunked prefill together.
    for dtype in (torch.float16, torch.bfloat16):
        generator = torch.Generator().manual_seed(1)
        block_size, n_kv, group, head_dim = 16, 8, 4, 128
        spec = [(1000, 1), (37, 1), (300, 300), (700, 200), (4097, 1)]
        blocks_needed = [math.ceil(length / block_size) for length, _ in spec]
        num_blocks = sum(blocks_needed) + 50
        perm = torch.randperm(num_blocks, generator=generator)
        tables = torch.full((len(spec), max(blocks_needed)), -1, dtype=torch.int32)
        used = 0
        for b, n in enumerate(blocks_needed):
            tables[b, :n] = perm[used : used + n].to(torch.int32)
            used += n
        k_cache = torch.randn(num_blocks, block_size, n_kv, head_dim, generator=generator).to(device, dtype)
        v_cache = torch.randn(num_blocks, block_size, n_kv, head_dim, generator=generator).to(device, dtype)
        q_lens = [q for _, q in spec]
        qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
        q = torch.randn(sum(q_lens), n_kv * group, head_dim, generator=generator).to(device, dtype)
        seq_lens = torch.tensor([length for length, _ in spec], dtype=torch.int32, device=device)
        args = (q, k_cache, v_cache, tables.to(device), seq_lens, qsl, head_dim**-0.5)
        want = reference.paged_attention(*args)
        for name, be in (("triton", fast_backend), ("torch", twins)):
            report(f"paged_attention decode+chunked prefill {name} {dtype}",
                   relative_error(be.paged_attention(*args), want), dtype)
    return failures


def markdown(rows: list[dict], device: torch.device) -> str:
    if device.type == "cuda":
        header = "| mode | shape | tokens | adapters | rank | triton µs | twin µs | base GEMM µs | LoRA/GEMM | TB/s | % of 4.8 TB/s | × twin |"
        lines = [header, "|" + "---|" * 12]
        for r in rows:
            lines.append(
                f"| {r['mode']} | {r['shape']} | {r['tokens']} | {r['adapters']} | {r['rank']} | "
                f"{r['triton_us']:.1f} | {r['twin_us']:.1f} | {r['base_gemm_us']:.1f} | {r['lora_over_gemm']:.1%} | "
                f"{r['bandwidth_tb_s']:.2f} | {r['bandwidth_of_peak']:.0%} | {r['speedup_vs_twin']:.1f} |"
            )
    else:
        header = ("| mode | shape | tokens | adapters | rank | native ms | twin ms | PEFT loop ms | masked loop ms "
                  "| base GEMM ms | native × twin | native × PEFT loop | twin × PEFT loop | twin × masked loop "
                  "| native LoRA/GEMM |")
        lines = [header, "|" + "---|" * 15]
        for r in rows:
            lines.append(
                f"| {r['mode']} | {r['shape']} | {r['tokens']} | {r['adapters']} | {r['rank']} | "
                f"{r['native_ms']:.3f} | {r['twin_ms']:.3f} | {r['peft_loop_ms']:.3f} | {r['masked_loop_ms']:.3f} | "
                f"{r['base_gemm_ms']:.3f} | {r['native_vs_twin']:.2f} | {r['native_vs_peft_loop']:.2f} | "
                f"{r['speedup_vs_peft_loop']:.2f} | {r['speedup_vs_masked_loop']:.2f} | {r['native_over_gemm']:.1%} |"
            )
    return "\n".join(lines) + "\n"


def summary(rows: list[dict], device: torch.device) -> list[str]:
    def geomean(values: list[float]) -> float:
        return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")

    if device.type == "cuda":
        out = []
        target = [
            r
            for r in rows
            if r["mode"] == "decode" and r["tokens"] == 64 and r["adapters"] == 32 and r["rank"] == 16
        ]
        for r in target:
            out.append(
                f"target decode T=64, 32 adapters, r=16, {r['shape']}: LoRA/GEMM {r['lora_over_gemm']:.1%} (goal <= 10%)"
            )
        out.append(
            f"best bandwidth: {max((r['bandwidth_of_peak'] for r in rows), default=0):.0%} of 4.8 TB/s (goal >= 60%)"
        )
        out.append(f"geomean speed-up over the twin: {geomean([r['speedup_vs_twin'] for r in rows]):.1f}x")
        return out
    return [
        f"geomean speed-up of the native kernels over the twin: {geomean([r['native_vs_twin'] for r in rows]):.2f}x",
        f"geomean speed-up of the native kernels over the PEFT loop: {geomean([r['native_vs_peft_loop'] for r in rows]):.2f}x",
        f"geomean speed-up of the twin over the PEFT loop: {geomean([r['speedup_vs_peft_loop'] for r in rows]):.2f}x",
        f"geomean speed-up of the twin over the masked loop: {geomean([r['speedup_vs_masked_loop'] for r in rows]):.2f}x",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--small", action="store_true", help="quarter-size shapes (for a CPU)")
    parser.add_argument("--quick", action="store_true", help="one case per mode: a smoke run")
    parser.add_argument("--check", action="store_true", help="CUDA: check Triton against the specification first")
    parser.add_argument("--budget", type=float, default=0.2, help="seconds of timing per measurement")
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16", help="CUDA dtype")
    parser.add_argument(
        "--threads", type=int, default=0, help="CPU: torch intra-op threads (0: torch's default)"
    )
    parser.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).parent / "out"))
    args = parser.parse_args()

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if args.check:
        if device.type != "cuda":
            parser.error("--check needs CUDA (on CPU, run pytest tests/kernels)")
        failures = check_cuda()
        if failures:
            print(f"{len(failures)} correctness failures; not benchmarking", file=sys.stderr)
            return 1

    case_list = cases(device, args.small, args.quick)
    if device.type == "cpu":
        try:
            kernels.backend("native", device)
        except ValueError as error:
            print(f"the CPU table compares the native backend with the torch one: {error}", file=sys.stderr)
            return 2
    if device.type == "cuda":
        rows = bench_cuda(case_list, args.budget, getattr(torch, args.dtype))
    else:
        if args.threads:
            torch.set_num_threads(args.threads)
        rows = bench_cpu(case_list, args.budget)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": args.dtype if device.type == "cuda" else "float32",
    }
    lines = summary(rows, device)
    (out_dir / "kernels.json").write_text(json.dumps({"env": env, "summary": lines, "rows": rows}, indent=1))
    table = markdown(rows, device)
    (out_dir / "kernels.md").write_text(
        f"{env}\n\n{table}\n" + "\n".join(f"- {line}" for line in lines) + "\n"
    )
    print(table)
    print("\n".join(lines))
    print(f"wrote {out_dir / 'kernels.json'} and {out_dir / 'kernels.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
