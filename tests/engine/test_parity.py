"""The engine against HF transformers + PEFT on the same weights and adapters.

Tiny random models cover the architecture variants quickly; one slower test runs the bundled
SmolLM2 with several adapters in one batch.
"""

from __future__ import annotations

import pytest
import torch

from engine_daemon import Engine, EngineConfig, SamplingParams
from tests.engine.builders import (
    PeftReference,
    cast_adapter_file,
    pool_bytes,
    write_adapter,
    write_tiny_model,
)

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPTS = [
    [5, 17, 300, 42, 8, 99, 100, 3],
    [7, 7, 7, 250, 1, 2],
    [400, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31],
    [11, 3],
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17],
]


def capture_logits(engine: Engine) -> dict[str, torch.Tensor]:
    """Record the next-token logits of each request's first sampled step (a spy on the forward)."""
    seen: dict[str, torch.Tensor] = {}
    forward = engine._forward

    def spy(batch, sampled):
        logits = forward(batch, sampled)
        for item, row in zip(sampled, logits, strict=True):
            seen.setdefault(item.seq.request_id.rsplit("-", 1)[-1], row.clone())
        return logits

    engine._forward = spy
    return seen


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


VARIANTS = {
    "llama-gqa-untied": ("llama", {}),
    "llama-mha-tied": ("llama", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    "qwen2-bias": ("qwen2", {}),
    "mistral": ("mistral", {"sliding_window": None}),
    "llama3-rope-scaling": (
        "llama",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            }
        },
    ),
}


# Every kernel backend inside the whole engine: native (the CPU default where a C compiler
# exists), torch (without one), and Triton through its interpreter (what CUDA compiles).
KERNELS = ["native", "torch", "triton"]


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_mixed_adapter_batch_matches_peft(tmp_path, variant, kernels):
    """Several adapters of different ranks (rank and alpha patterns, rsLoRA) and a base request
    in one batch, prefilled together, then decoded."""
    arch, overrides = VARIANTS[variant]
    base = write_tiny_model(tmp_path / "base", arch, **overrides)
    adapters = {
        "r1-all": write_adapter(base, tmp_path / "a1", r=1, target_modules=ALL, seed=1),
        "r8-qv": write_adapter(base, tmp_path / "a2", r=8, target_modules=("q_proj", "v_proj"), seed=2),
        "r64-mlp-rslora": write_adapter(
            base, tmp_path / "a3", r=64, target_modules=("gate_proj", "up_proj", "down_proj"), use_rslora=True, seed=3
        ),
        "patterns": write_adapter(
            base,
            tmp_path / "a4",
            r=8,
            target_modules=ALL,
            rank_pattern={"model.layers.1.self_attn.o_proj": 2, "down_proj": 16},
            alpha_pattern={"k_proj": 3.0},
            seed=4,
        ),
    }
    reference = PeftReference.from_dir(base, adapters)
    engine = Engine(EngineConfig(model=str(base), device="cpu", dtype="float32", max_loras=4, max_lora_rank=64,
                                 kernels=kernels))
    assert engine.kernels.name == kernels
    for name, path in adapters.items():
        engine.add_adapter(name, str(path))
        engine.prefetch_adapter(name)
    engine.wait_for_adapters()
    names = [*adapters, None]  # the last prompt runs on the base model, in the same batch
    logits = capture_logits(engine)
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True), adapters=names)

    # All five prompts were prefilled together in the first step.
    assert engine.stats.recent[0].num_seqs == len(PROMPTS)
    assert engine.stats.max_adapters_in_step == len(adapters)
    for i, (prompt, adapter) in enumerate(zip(PROMPTS, names, strict=True)):
        want = reference.next_token_logits(prompt, adapter)
        assert relative_error(logits[str(i)], want) < 1e-4, (variant, adapter)
        assert outs[i].token_ids == reference.greedy(prompt, adapter, 6), (variant, adapter)
    # The adapters really change the output, so matching is not matching the base model.
    base_logits = reference.next_token_logits(PROMPTS[0], None)
    assert relative_error(logits["0"], base_logits) > 1e-3
    engine.close()


@pytest.mark.parametrize("kernels", KERNELS)
def test_adapter_churn_in_a_pool_smaller_than_the_adapters_matches_peft(tmp_path, kernels):
    """Six adapters of ranks 1-64 (142 rows) through a pool of 80 rows, two adapters per step:
    adapters are evicted and loaded into other rows between steps, next to their neighbours'
    rows, and every request still matches HF + PEFT."""
    base = write_tiny_model(tmp_path / "base", "llama")
    ranks = {"r1": 1, "r3": 3, "r8": 8, "r17": 17, "r49": 49, "r64": 64}
    adapters = {name: write_adapter(base, tmp_path / name, r=rank, target_modules=ALL, seed=10 + rank)
                for name, rank in ranks.items()}
    reference = PeftReference.from_dir(base, adapters)
    engine = Engine(EngineConfig(model=str(base), device="cpu", dtype="float32", max_loras=2, max_lora_rank=64,
                                 max_num_seqs=3, lora_pool_bytes=pool_bytes(base, [80]), kernels=kernels))
    for name, path in adapters.items():
        engine.add_adapter(name, str(path))
    greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    for order in (["r64", "r1", "r17", "r3", "r49", "r8"], ["r1", "r64", "r8", "r17", "r3", "r49"]):
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(order))]
        logits = capture_logits(engine)
        outs = engine.generate(prompts, greedy, adapters=order)
        for i, (prompt, adapter) in enumerate(zip(prompts, order, strict=True)):
            assert relative_error(logits[str(i)], reference.next_token_logits(prompt, adapter)) < 1e-4, adapter
            assert outs[i].token_ids == reference.greedy(prompt, adapter, 4), adapter
    stats = engine.residency.snapshot()
    assert sum(row["evictions"] for row in stats) >= 4 and sum(row["slot_loads"] for row in stats) > len(ranks) + 2
    engine.close()


@pytest.mark.parametrize("kernels", KERNELS)
def test_chunked_prefill_beside_decodes_matches_peft(tmp_path, kernels):
    """A step budget of 8 tokens: the long prompts are prefilled in chunks over a cached prefix
    while the short ones already decode in the same steps (GQA, adapters of ranks 2 and 16, and
    the base model side by side)."""
    base = write_tiny_model(tmp_path / "base", "llama")
    adapters = {
        "r2-all": write_adapter(base, tmp_path / "a1", r=2, target_modules=ALL, seed=5),
        "r16-attn": write_adapter(base, tmp_path / "a2", r=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
                                  seed=6),
    }
    reference = PeftReference.from_dir(base, adapters)
    engine = Engine(EngineConfig(model=str(base), device="cpu", dtype="float32", max_loras=2, max_lora_rank=16,
                                 max_num_batched_tokens=8, kernels=kernels))
    for name, path in adapters.items():
        engine.add_adapter(name, str(path))
        engine.prefetch_adapter(name)
    engine.wait_for_adapters()
    prompts = [PROMPTS[3], PROMPTS[2], PROMPTS[4], PROMPTS[1]]  # 2, 21, 17 and 6 tokens
    names = ["r2-all", "r16-attn", None, "r2-all"]
    outs = engine.generate(prompts, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True), adapters=names)
    mixed = [r for r in engine.stats.recent if r.num_sampled and r.num_tokens > r.num_sampled]
    assert mixed, "no step mixed decode tokens with a prefill chunk"
    assert max(r.num_tokens for r in engine.stats.recent) <= 8
    for out, prompt, adapter in zip(outs, prompts, names, strict=True):
        assert out.token_ids == reference.greedy(prompt, adapter, 5), adapter
    engine.close()


@pytest.mark.parametrize("kernels", KERNELS)
def test_forked_choices_match_peft(tmp_path, kernels):
    """n choices forked from one prompt (small blocks: shared full ones, a copied partial one), with
    and without the prefix cache: each greedy choice is HF + PEFT's greedy answer."""
    base = write_tiny_model(tmp_path / "base", "llama")
    adapters = {"r4-all": write_adapter(base, tmp_path / "a1", r=4, target_modules=ALL, seed=7)}
    reference = PeftReference.from_dir(base, adapters)
    prompts, names = [PROMPTS[2], PROMPTS[0]], ["r4-all", None]  # 21 and 8 tokens
    for caching in (True, False):
        engine = Engine(EngineConfig(model=str(base), device="cpu", dtype="float32", max_loras=2, max_lora_rank=8,
                                     block_size=4, kernels=kernels, enable_prefix_caching=caching))
        engine.add_adapter("r4-all", str(adapters["r4-all"]))
        outputs = engine.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, n=3),
                                  adapters=names)
        for out, prompt, adapter in zip(outputs, prompts, names, strict=True):
            want = reference.greedy(prompt, adapter, 4)
            assert [choice.token_ids for choice in out.choices] == [want] * 3, (adapter, caching)
        engine.close()


@pytest.mark.parametrize("kernels", KERNELS)
def test_prefills_over_cached_prefixes_match_peft(tmp_path, kernels):
    """The prefix cache on (the default), small blocks: the second round of the same prompts finds
    their full blocks cached and prefills only the rest, attending over the cached K/V."""
    base = write_tiny_model(tmp_path / "base", "llama")
    adapters = {
        "r4-all": write_adapter(base, tmp_path / "a1", r=4, target_modules=ALL, seed=7),
        "r8-qv": write_adapter(base, tmp_path / "a2", r=8, target_modules=("q_proj", "v_proj"), seed=8),
    }
    reference = PeftReference.from_dir(base, adapters)
    engine = Engine(EngineConfig(model=str(base), device="cpu", dtype="float32", max_loras=2, max_lora_rank=8,
                                 block_size=4, kernels=kernels))
    for name, path in adapters.items():
        engine.add_adapter(name, str(path))
    prompts = [PROMPTS[2], PROMPTS[4], PROMPTS[0]]  # 21, 17 and 8 tokens
    names = ["r4-all", "r8-qv", None]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    first = engine.generate(prompts, params, adapters=names)
    second = engine.generate(prompts, params, adapters=names)
    assert [out.num_cached_tokens for out in first] == [0, 0, 0]
    assert [out.num_cached_tokens for out in second] == [20, 16, 4]
    for out, prompt, adapter in zip(second, prompts, names, strict=True):
        assert out.token_ids == reference.greedy(prompt, adapter, 4), adapter
    engine.close()


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("file_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_a_bfloat16_adapter_pool_under_a_float32_model(tmp_path, file_dtype, kernels):
    """lora_dtype="bfloat16": adapters sit in slots and host RAM as bf16, sums stay fp32. A file
    saved in bf16 (scalings 2, 0.5 and 1: powers of two) loses nothing, so PEFT's fp32 result is
    matched as tightly as with an fp32 pool; an fp32 file is rounded once, to bf16 accuracy."""
    base = write_tiny_model(tmp_path / "base", "llama")
    adapters = {
        "r8-all": write_adapter(base, tmp_path / "a1", r=8, lora_alpha=16, seed=1),
        "r16-qv": write_adapter(base, tmp_path / "a2", r=16, lora_alpha=8, target_modules=("q_proj", "v_proj"), seed=2),
        "r64-mlp": write_adapter(base, tmp_path / "a3", r=64, lora_alpha=64,
                                 target_modules=("gate_proj", "up_proj", "down_proj"), seed=3),
    }
    for path in adapters.values():
        cast_adapter_file(path, file_dtype)
    reference = PeftReference.from_dir(base, adapters)
    engine = Engine(EngineConfig(model=str(base), device="cpu", dtype="float32", lora_dtype="bfloat16",
                                 max_loras=4, max_lora_rank=64, kernels=kernels))
    pool = engine.residency.pool
    assert pool.a["q_proj"][0].dtype == pool.b["down_proj"][0].dtype == torch.bfloat16
    assert engine.snapshot().lora_dtype == "bfloat16"
    for name, path in adapters.items():
        engine.add_adapter(name, str(path))
        engine.prefetch_adapter(name)
    engine.wait_for_adapters()
    names = [*adapters, None]
    prompts = PROMPTS[: len(names)]
    logits = capture_logits(engine)
    outs = engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True), adapters=names)
    for i, (prompt, adapter) in enumerate(zip(prompts, names, strict=True)):
        want = reference.next_token_logits(prompt, adapter)
        if file_dtype == torch.bfloat16 or adapter is None:
            assert relative_error(logits[str(i)], want) < 1e-4, adapter
            assert outs[i].token_ids == reference.greedy(prompt, adapter, 6), adapter
        else:
            assert 1e-7 < relative_error(logits[str(i)], want) < 1e-2, adapter  # rounded, and only that
    engine.close()


def test_an_unknown_lora_dtype_is_refused(tiny_llama):
    with pytest.raises(ValueError, match="lora_dtype must be one of"):
        Engine(EngineConfig(model=str(tiny_llama), device="cpu", lora_dtype="int8"))


def test_logprobs_are_the_model_distribution(tmp_path, tiny_llama):
    reference = PeftReference.from_dir(tiny_llama, {"a": write_adapter(tiny_llama, tmp_path / "a", r=4)})
    engine = Engine(EngineConfig(model=str(tiny_llama), device="cpu", dtype="float32"))
    out = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=1, temperature=0.0, logprobs=True))[0]
    want = torch.log_softmax(reference.next_token_logits(PROMPTS[0], None), -1)[out.token_ids[0]]
    assert out.logprobs == pytest.approx([float(want)], abs=1e-5)
    engine.close()


@pytest.mark.slow
def test_smollm2_gguf_several_adapters_in_one_batch_match_peft(tmp_path):
    """The bundled SmolLM2 (GGUF, dequantized by transformers as the reference) with 3 adapters + base."""
    import copy

    import transformers
    from peft import LoraConfig

    from engine_daemon.model_source import bundled_gguf_path
    from tests.engine.builders import save_random_adapter

    gguf = bundled_gguf_path()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    specs = {
        "pirate": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        "mlp": LoraConfig(r=16, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"]),
        "all-r4": LoraConfig(r=4, lora_alpha=8, target_modules=list(ALL), use_rslora=True),
    }
    adapters = {
        name: save_random_adapter(copy.deepcopy(hf_model), spec, tmp_path / name, seed=i, b_std=0.02)
        for i, (name, spec) in enumerate(specs.items())
    }
    reference = PeftReference(hf_model, adapters)
    engine = Engine(EngineConfig(model="smollm2-135m-instruct", device="cpu", dtype="float32", max_loras=4))
    for name, path in adapters.items():
        engine.add_adapter(name, str(path))
        engine.prefetch_adapter(name)
    engine.wait_for_adapters()
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "user", "content": "Write one sentence about the sea."}],
        [{"role": "user", "content": "List three colours."}],
        [{"role": "user", "content": "How many legs does a spider have?"}],
    ]
    names = [*adapters, None]
    outs = engine.chat(conversations, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True), adapters=names)
    assert engine.stats.recent[0].num_seqs == 4 and engine.stats.max_adapters_in_step == 3
    for out, adapter in zip(outs, names, strict=True):
        assert out.token_ids == reference.greedy(out.prompt_token_ids, adapter, 32), adapter
    engine.close()
