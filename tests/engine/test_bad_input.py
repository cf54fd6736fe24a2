"""Bad adapters and bad requests: a clear error, for that request only; nothing else is disturbed."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine_daemon import AdapterError, Engine, EngineConfig, SamplingParams
from tests.engine.builders import write_adapter, write_tiny_model

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
PROMPT = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def engine(tiny_llama):
    engine = Engine(EngineConfig(model=str(tiny_llama), device="cpu", dtype="float32", max_lora_rank=16))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory, tiny_llama):
    return write_adapter(tiny_llama, tmp_path_factory.mktemp("good") / "a", r=4)


def test_unknown_adapter_fails_only_its_request(engine):
    outs = engine.generate([PROMPT, PROMPT], GREEDY, adapters=["nobody", None])
    assert outs[0].finish_reason == "error" and "unknown adapter 'nobody'" in outs[0].error
    assert outs[1].error is None and len(outs[1].token_ids) == 4
    with pytest.raises(AdapterError, match="unknown adapter"):
        engine.add_request(PROMPT, GREEDY, adapter="nobody")


def test_rank_above_max_lora_rank_is_refused(engine, tmp_path, tiny_llama):
    path = write_adapter(tiny_llama, tmp_path / "big", r=32)
    with pytest.raises(AdapterError, match="rank 32, above this engine's max_lora_rank 16"):
        engine.add_adapter("big", str(path))
    assert not engine.has_adapter("big")


def test_adapter_for_another_base_model_is_refused(engine, tmp_path):
    other = write_tiny_model(tmp_path / "other", hidden_size=32, intermediate_size=64)
    path = write_adapter(other, tmp_path / "other-adapter", r=4)
    with pytest.raises(AdapterError, match=r"do not fit .*trained on another base model"):
        engine.add_adapter("other", str(path))


def write_nan_adapter(folder, good_adapter):
    """An adapter whose header is fine: the NaN is found only when its data loads."""
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes((good_adapter / "adapter_config.json").read_bytes())
    tensors = load_file(str(good_adapter / "adapter_model.safetensors"))
    name = next(n for n in tensors if "lora_B" in n)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def test_nan_weights_fail_the_request_not_the_batch(engine, tmp_path, good_adapter):
    engine.add_adapter("nan", str(write_nan_adapter(tmp_path / "nan", good_adapter)))
    outs = engine.generate([PROMPT, PROMPT], GREEDY, adapters=["nan", None])
    assert outs[0].finish_reason == "error" and "NaN or Inf" in outs[0].error
    assert outs[1].error is None and len(outs[1].token_ids) == 4
    later = engine.generate([PROMPT], GREEDY, adapters=["nan"])[0]
    assert "NaN or Inf" in later.error


def test_an_adapter_load_failure_reaches_the_step_output_with_its_code(engine, tmp_path, good_adapter):
    engine.add_adapter("nan-code", str(write_nan_adapter(tmp_path / "nan", good_adapter)))
    engine.add_request(PROMPT, GREEDY, request_id="needs-nan", adapter="nan-code")
    engine.add_request(PROMPT, GREEDY, request_id="base")
    outputs = []
    while engine.has_unfinished():
        outputs += [out for out in engine.step() if out.finished]
    failed = {out.request_id: out for out in outputs}
    assert failed["needs-nan"].finish_reason == "error" and "NaN or Inf" in failed["needs-nan"].error
    assert failed["needs-nan"].error_code == AdapterError.code == "adapter_unavailable"
    assert failed["base"].error is None and failed["base"].error_code is None
    for request_id in failed:
        engine.pop_finished(request_id)


def test_prompt_longer_than_the_context_fails_only_its_request(engine):
    too_long = [7] * engine.max_model_len
    outs = engine.generate([too_long, PROMPT], GREEDY)
    assert outs[0].finish_reason == "error" and "context is 512 tokens" in outs[0].error
    assert outs[1].error is None


@pytest.mark.parametrize(
    "config_change, message",
    [
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"use_dora": True}, "DoRA"),
        ({"bias": "lora_only"}, "bias='none'"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, "embed_tokens"),
        ({"target_modules": ["lm_head"]}, "lm_head"),
        ({"peft_type": "IA3"}, "only LORA"),
        ({"r": 0}, "r must be a positive integer"),
    ],
)
def test_unsupported_adapter_settings_are_named(engine, tmp_path, good_adapter, config_change, message):
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((good_adapter / "adapter_config.json").read_text())
    config.update(config_change)
    (bad / "adapter_config.json").write_text(json.dumps(config))
    (bad / "adapter_model.safetensors").write_bytes((good_adapter / "adapter_model.safetensors").read_bytes())
    with pytest.raises(AdapterError, match=message):
        engine.add_adapter("bad", str(bad))


def test_extra_tensors_are_named_not_ignored(engine, tmp_path, good_adapter):
    bad = tmp_path / "extra"
    bad.mkdir()
    (bad / "adapter_config.json").write_bytes((good_adapter / "adapter_config.json").read_bytes())
    tensors = load_file(str(good_adapter / "adapter_model.safetensors"))
    tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(4, 512)
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="embedding LoRA"):
        engine.add_adapter("extra", str(bad))


def test_pickled_adapter_is_refused_with_the_fix(engine, tmp_path, tiny_llama):
    path = write_adapter(tiny_llama, tmp_path / "pickled", r=4, safe=False)
    assert (path / "adapter_model.bin").exists()
    with pytest.raises(AdapterError, match=r"adapter_model.bin is a pickle.*safe_serialization=True"):
        engine.add_adapter("pickled", str(path))


def test_dora_adapter_written_by_peft_is_refused(engine, tmp_path, tiny_llama):
    path = write_adapter(tiny_llama, tmp_path / "dora", r=4, use_dora=True)
    with pytest.raises(AdapterError, match="DoRA"):
        engine.add_adapter("dora", str(path))


def test_text_prompt_without_a_tokenizer_is_refused(engine):
    outs = engine.generate(["hello"], GREEDY)
    assert "ships no tokenizer" in outs[0].error
