"""rank_pattern / alpha_pattern keys: PEFT's matching rule, in bounded time, unused keys refused."""

from __future__ import annotations

import time

import pytest

from engine_daemon.lora_patterns import MAX_PATTERN_KEY_CHARS, MAX_PATTERN_KEYS, PatternError, pattern_values
from engine_daemon.peft_format import LORA_MODULES, AdapterError, module_path, parse_adapter_config

PATHS = [module_path(layer, module) for layer in range(12) for module in LORA_MODULES]
# Backtracks for minutes even in the `regex` engine: three overlapping loops that must all fail.
SLOW_KEY = r"(?:[\w.]|[\w.][\w.])*(?:[\w.]|[\w.][\w.])*(?:[\w.]|[\w.][\w.])*\B\b"


def get_pattern_key(keys, path):
    # Imported here: peft imports triton, which must not happen before tests/kernels sets TRITON_INTERPRET.
    from peft.utils.other import get_pattern_key

    return get_pattern_key(keys, path)


@pytest.mark.parametrize(
    "pattern",
    [
        {"q_proj": 2},
        {"model.layers.1.self_attn.o_proj": 2, "down_proj": 16},
        {"layers.1.self_attn.q_proj": 3, "q_proj": 5},  # first key wins, the second still names modules
        {r"layers\.1[01]\.mlp\..*": 7},
        {"self_attn.(q|v)_proj": 4},
        {"^model.layers.0.mlp.up_proj": 6},
    ],
    ids=["suffix", "full-and-suffix", "order", "regex", "alternation", "anchored"],
)
def test_first_match_is_pefts(pattern):
    found = pattern_values(pattern, PATHS, field="rank_pattern")
    for path in PATHS:
        key = get_pattern_key(list(pattern), path)  # PEFT's own function: the key, or the path when none
        assert found.get(path) == pattern.get(key), path


def test_a_key_that_matches_no_module_is_refused_by_name():
    with pytest.raises(PatternError, match=r"rank_pattern key 'layers\.40\.self_attn\.q_proj' matches none"):
        pattern_values({"q_proj": 2, "layers.40.self_attn.q_proj": 3}, PATHS, field="rank_pattern")
    # PEFT matches whole dotted parts: "proj" is no suffix of "q_proj" there
    assert get_pattern_key(["proj"], PATHS[0]) == PATHS[0]
    with pytest.raises(PatternError, match="rank_pattern key 'proj' matches none"):
        pattern_values({"proj": 9}, PATHS, field="rank_pattern")


def test_a_catastrophic_key_is_refused_within_the_budget():
    started = time.monotonic()
    with pytest.raises(PatternError, match="takes too long to match"):
        pattern_values({SLOW_KEY: 2}, PATHS, field="rank_pattern", budget_seconds=0.5)
    assert time.monotonic() - started < 5


def test_the_budget_is_for_all_keys_together():
    keys = {f"layers.{i}.self_attn.q_proj": 2 for i in range(12)} | {SLOW_KEY: 3}
    started = time.monotonic()
    with pytest.raises(PatternError, match="takes too long"):
        pattern_values(keys, PATHS, field="alpha_pattern", budget_seconds=0.5)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    ("pattern", "words"),
    [
        ({f"k{i}": 1 for i in range(MAX_PATTERN_KEYS + 1)}, f"at most {MAX_PATTERN_KEYS} are accepted"),
        ({"q" * (MAX_PATTERN_KEY_CHARS + 1): 1}, f"at most {MAX_PATTERN_KEY_CHARS} are accepted"),
        ({"q_proj(": 1}, "is not a valid regular expression"),
        ({"": 1}, "must be non-empty"),
    ],
    ids=["too-many", "too-long", "invalid", "empty"],
)
def test_keys_out_of_bounds_are_refused(pattern, words):
    with pytest.raises(PatternError, match=words.replace("(", r"\(")):
        pattern_values(pattern, PATHS, field="rank_pattern")


def _spec(**patterns):
    return parse_adapter_config(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], **patterns}
    )


def test_spec_gives_each_module_its_rank_and_alpha():
    spec = _spec(rank_pattern={"layers.0.self_attn.v_proj": 4}, alpha_pattern={"v_proj": 2.0})
    paths = [module_path(0, "q_proj"), module_path(0, "v_proj"), module_path(1, "v_proj")]
    assert spec.ranks_and_alphas(paths) == {paths[0]: (8, 16.0), paths[1]: (4, 2.0), paths[2]: (8, 2.0)}


def test_spec_names_the_field_of_a_refused_key():
    spec = _spec(alpha_pattern={"gate_proj": 2.0})
    with pytest.raises(AdapterError, match="adapter_config.json: alpha_pattern key 'gate_proj' matches none"):
        spec.ranks_and_alphas([module_path(0, "q_proj")])
