"""The engine's way in for uploads: staged folders load from their manifest, and failed loads are retried."""

from __future__ import annotations

import json
import shutil
import time

import pytest
from safetensors.torch import load_file, save_file

from engine_daemon import AdapterError, Engine, EngineConfig, SamplingParams
from engine_daemon import adapters as adapters_module
from engine_daemon.peft_format import MANIFEST_FILE, describe_base_model, validate_adapter_dir
from tests.engine.builders import write_adapter
from tests.engine.test_lora_patterns import SLOW_KEY

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PROMPT = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def patterned(tmp_path_factory, tiny_llama):
    """A PEFT-written adapter whose ranks and alphas come from rank_pattern / alpha_pattern."""
    return write_adapter(
        tiny_llama, tmp_path_factory.mktemp("patterned") / "a", r=8,
        rank_pattern={"model.layers.1.self_attn.o_proj": 2, "down_proj": 4}, alpha_pattern={"k_proj": 3.0}, seed=7,
    )


def stage(source, target, tiny_llama):
    """What the upload validation writes into the cache: the files plus manifest.json."""
    shutil.copytree(source, target)
    manifest = validate_adapter_dir(source, describe_base_model(str(tiny_llama)), max_lora_rank=64)
    (target / MANIFEST_FILE).write_text(json.dumps(manifest.to_dict()))
    return target


def make_engine(tiny_llama) -> Engine:
    return Engine(EngineConfig(model=str(tiny_llama), device="cpu", dtype="float32", max_lora_rank=64))


def test_a_staged_adapter_loads_from_its_manifest_and_never_reads_its_patterns(tmp_path, tiny_llama, patterned):
    staged = stage(patterned, tmp_path / "staged", tiny_llama)
    # Were the engine to evaluate this key it would refuse the adapter after the matching budget.
    config = json.loads((staged / "adapter_config.json").read_text())
    config["rank_pattern"] = {SLOW_KEY: 2, **config["rank_pattern"]}
    (staged / "adapter_config.json").write_text(json.dumps(config))
    engine = make_engine(tiny_llama)
    started = time.monotonic()
    engine.add_adapter("staged", str(staged))
    assert time.monotonic() - started < 0.5
    engine.add_adapter("peft", str(patterned))  # the PEFT folder itself, validated here (test_parity checks it)
    staged_out, peft_out = engine.generate([PROMPT, PROMPT], GREEDY, adapters=["staged", "peft"])
    assert staged_out.error is None and staged_out.token_ids == peft_out.token_ids
    ranks = {(m.layer, m.module): m.rank for m in engine.residency.get("staged").manifest.modules}
    assert ranks[1, "o_proj"] == 2 and ranks[0, "down_proj"] == 4 and ranks[0, "q_proj"] == 8
    engine.close()


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda m: m.update(base_fingerprint="0" * 16), "was validated for base model"),
        (lambda m: m["modules"][0].update(rank=3), "does not fit this engine"),
        (lambda m: m["modules"][0].update(a_name="nope"), "does not match its weights"),
        (lambda m: m["modules"][0].update(rank="8"), "fields of the wrong type"),
        (lambda m: m.update(modules=[]), "lists no modules"),
    ],
    ids=["other-base", "rank", "tensor-name", "type", "empty"],
)
def test_a_manifest_that_disagrees_with_the_files_is_refused(tmp_path, tiny_llama, patterned, edit, words):
    staged = stage(patterned, tmp_path / "staged", tiny_llama)
    manifest = json.loads((staged / MANIFEST_FILE).read_text())
    edit(manifest)
    (staged / MANIFEST_FILE).write_text(json.dumps(manifest))
    engine = make_engine(tiny_llama)
    with pytest.raises(AdapterError, match=words):
        engine.add_adapter("staged", str(staged))
    engine.close()


def test_a_failed_load_is_retried_after_its_back_off(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setattr(adapters_module, "LOAD_RETRY_FIRST_SECONDS", 1.0)
    good = write_adapter(tiny_llama, tmp_path / "good", r=4, seed=3)
    flaky = tmp_path / "flaky"
    shutil.copytree(good, flaky)
    tensors = load_file(str(good / "adapter_model.safetensors"))
    broken = {name: t.clone() for name, t in tensors.items()}
    broken[next(n for n in broken if "lora_B" in n)][0, 0] = float("nan")
    save_file(broken, str(flaky / "adapter_model.safetensors"))

    engine = make_engine(tiny_llama)
    engine.add_adapter("flaky", str(flaky))
    first = engine.generate([PROMPT], GREEDY, adapters=["flaky"])[0]
    assert first.finish_reason == "error" and "NaN or Inf" in first.error
    row = next(r for r in engine.residency.snapshot() if r["name"] == "flaky")
    assert row["tier"] == "failed" and "NaN or Inf" in row["error"] and row["retry_at"] > time.time()

    save_file(tensors, str(flaky / "adapter_model.safetensors"))  # the operator repairs the file
    soon = engine.generate([PROMPT], GREEDY, adapters=["flaky"])[0]
    assert "tries loading it again in" in soon.error  # still inside the back-off: no load is tried
    time.sleep(1.1)
    later = engine.generate([PROMPT], GREEDY, adapters=["flaky"])[0]
    assert later.error is None and len(later.token_ids) == 6
    row = next(r for r in engine.residency.snapshot() if r["name"] == "flaky")
    assert row["tier"] == "gpu" and row["error"] is None and row["retry_at"] is None
    engine.close()


def test_the_back_off_doubles_up_to_its_cap(tmp_path, tiny_llama, monkeypatch):
    engine = make_engine(tiny_llama)
    engine.add_adapter("a", str(write_adapter(tiny_llama, tmp_path / "a", r=4)))
    record = engine.residency.get("a")
    waits = []
    for _ in range(9):
        engine.residency._load_failed(record, "boom")
        waits.append(round(record.retry_at - time.monotonic()))
    assert waits[:4] == [5, 10, 20, 40] and waits[-1] == adapters_module.LOAD_RETRY_MAX_SECONDS
    engine.close()
