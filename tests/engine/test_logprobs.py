"""logprobs and top_logprobs: the model's own distribution at every generated position, as HF computes it."""

from __future__ import annotations

import pytest
import torch

from engine_daemon import Engine, EngineConfig, SamplingParams
from tests.engine.builders import PeftReference, write_adapter

PROMPTS = [[5, 17, 300, 42, 8, 99, 100, 3], [7, 7, 7, 250, 1, 2], [400, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [11, 3]]


@torch.no_grad()
def reference_log_softmax(reference: PeftReference, prompt: list[int], output: list[int],
                          adapter: str | None) -> torch.Tensor:
    """HF's log_softmax at the positions that produced each output token: [len(output), V]."""
    with reference._context(adapter):
        logits = reference.model(input_ids=torch.tensor([prompt + output])).logits[0].float()
    return torch.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + len(output)], dim=-1)


def assert_matches_reference(out, want: torch.Tensor, width: int) -> None:
    assert len(out.logprobs) == len(out.token_ids) == len(want)
    for position, (token, logprob) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        assert logprob == pytest.approx(float(want[position, token]), abs=1e-4)
        if width:
            values, tokens = want[position].topk(width)
            alternatives = out.top_logprobs[position]
            assert list(alternatives.values()) == pytest.approx(values.tolist(), abs=1e-4)
            # Ties aside, the same tokens in the same order.
            assert set(alternatives) == set(tokens.tolist()) or len(set(values.tolist())) < width


def test_sampled_tokens_and_alternatives_carry_hf_log_softmax_with_and_without_an_adapter(tmp_path, tiny_llama):
    adapter = write_adapter(tiny_llama, tmp_path / "a", r=4)
    reference = PeftReference.from_dir(tiny_llama, {"a": adapter})
    engine = Engine(EngineConfig(model=str(tiny_llama), device="cpu", dtype="float32"))
    engine.add_adapter("a", str(adapter))
    params = [
        SamplingParams(max_tokens=8, temperature=1.0, seed=3, ignore_eos=True, logprobs=True, top_logprobs=5),
        SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=2),
        SamplingParams(max_tokens=8, temperature=0.7, seed=4, ignore_eos=True, logprobs=True),
        SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True),  # asks for none, in the same batch
    ]
    adapters = ["a", None, "a", None]
    outputs = engine.generate(PROMPTS[:4], params, adapters)
    for out, prompt, sampling, name in zip(outputs[:3], PROMPTS, params, adapters, strict=False):
        want = reference_log_softmax(reference, prompt, out.token_ids, name)
        assert_matches_reference(out, want, sampling.top_logprobs)
        assert (out.top_logprobs is None) == (sampling.top_logprobs == 0)
    assert outputs[3].logprobs is None and outputs[3].top_logprobs is None
    engine.close()


def test_the_reported_logprob_is_the_models_not_the_penalised_or_masked_one(tiny_llama):
    engine = Engine(EngineConfig(model=str(tiny_llama), device="cpu", dtype="float32"))
    plain = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True,
                                                         logprobs=True, top_logprobs=3))[0]
    forced = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=3,
                                                          logit_bias={7: 100.0}))[0]
    assert forced.token_ids == [7]
    # The alternatives are the model's top 3, whatever the bias did to the choice.
    assert forced.top_logprobs[0] == pytest.approx(plain.top_logprobs[0], abs=1e-6)
    assert forced.logprobs[0] < max(plain.top_logprobs[0].values())
    engine.close()


def test_stream_entries_name_each_token_by_its_text_and_bytes(tmp_path):
    from tests.engine.builders import write_tiny_model

    model = write_tiny_model(tmp_path / "m", with_tokenizer=True)
    engine = Engine(EngineConfig(model=str(model), device="cpu", dtype="float32"))
    request = engine.add_request("café, naïve 🎉", SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True,
                                                                    logprobs=True, top_logprobs=2))
    entries, logprobs = [], []
    while engine.has_unfinished():
        for out in engine.step():
            assert len(out.logprob_content) == len(out.new_token_ids)
            entries += out.logprob_content
            logprobs += out.new_logprobs
    result = engine.pop_finished(request)
    assert [entry["logprob"] for entry in entries] == logprobs
    raw = b"".join(bytes(entry["bytes"]) for entry in entries)
    assert raw.decode("utf-8", errors="replace") == engine.tokenizer.decode(result.token_ids)
    for entry in entries:
        assert entry["token"] == bytes(entry["bytes"]).decode("utf-8", errors="replace")
        assert len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][1]["logprob"]
    engine.close()


@pytest.mark.slow
def test_smollm2_logprobs_match_hf_on_the_bundled_model():
    import transformers

    from engine_daemon.model_source import bundled_gguf_path

    gguf = bundled_gguf_path()
    base = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    base.eval()
    engine = Engine(EngineConfig(model="smollm2-135m-instruct", device="cpu", dtype="float32"))
    prompt = engine.tokenizer.encode("The capital of France is")
    out = engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0.8, seed=11, ignore_eos=True,
                                                   logprobs=True, top_logprobs=4))[0]
    with torch.no_grad():
        logits = base(input_ids=torch.tensor([prompt + out.token_ids])).logits[0].float()
    want = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    assert_matches_reference(out, want, 4)
    engine.close()


def test_logprobs_k_is_vllms_spelling_of_top_logprobs():
    from engine_daemon.protocol import SamplingParams as Params

    params = Params(logprobs=3)
    assert (params.logprobs, params.top_logprobs) == (True, 3)
    assert Params.from_wire(params.to_wire()) == params
    assert (Params(logprobs=0).logprobs, Params(logprobs=0).top_logprobs) == (True, 0)
    with pytest.raises(ValueError, match="top_logprobs"):
        Params(logprobs=21)
