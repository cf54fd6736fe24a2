"""The rank-packed device pool: rows by true rank, exact byte accounting, placement and eviction,
and each adapter's weights intact while its neighbours come and go."""

from __future__ import annotations

import random

import pytest
import torch

from engine_daemon.adapter_pool import AdapterPool, Placement, PoolLayout, pool_bytes_for
from engine_daemon.peft_format import LORA_MODULES, ModelDescriptor, descriptor_from_config
from tests.engine.builders import TINY

MAX_RANK = 64


@pytest.fixture(scope="module")
def descriptor() -> ModelDescriptor:
    return descriptor_from_config("tiny", dict(TINY, architectures=["LlamaForCausalLM"]))


def random_weights(descriptor: ModelDescriptor, rank: int, seed: int, skip: frozenset = frozenset()):
    """Host weights of one adapter: every projection of every layer but those in `skip`."""
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for module in LORA_MODULES:
        fan_in, fan_out = descriptor.projection_shape(module)
        for layer in range(descriptor.num_layers):
            if (module, layer) not in skip:
                weights[(module, layer)] = (torch.randn(rank, fan_in, generator=g), torch.randn(fan_out, rank, generator=g))
    return weights


def read_back(pool: AdapterPool, start: int, rank: int, descriptor: ModelDescriptor):
    return {
        (module, layer): (pool.a[module][layer][start, :rank].clone(), pool.b[module][layer][start, :, :rank].clone())
        for module in LORA_MODULES
        for layer in range(descriptor.num_layers)
    }


def test_a_row_costs_one_rank_row_of_every_projection_and_the_pool_stays_in_its_budget(descriptor):
    layout = PoolLayout(descriptor, torch.float32)
    widths = sum(sum(descriptor.projection_shape(m)) for m in LORA_MODULES) * descriptor.num_layers
    assert layout.row_bytes == widths * 4
    budget = pool_bytes_for(descriptor, [8] * 16, MAX_RANK, torch.float32)
    assert budget == 128 * layout.row_bytes + layout.padding_bytes(MAX_RANK)
    pool = AdapterPool(descriptor, budget, MAX_RANK, torch.float32, torch.device("cpu"))
    assert pool.capacity == 128 and pool.nbytes == budget
    odd = AdapterPool(descriptor, budget + layout.row_bytes - 1, MAX_RANK, torch.float32, torch.device("cpu"))
    assert odd.capacity == 128 and odd.nbytes <= budget + layout.row_bytes - 1
    with pytest.raises(ValueError, match="holds no adapter row"):
        AdapterPool(descriptor, layout.padding_bytes(MAX_RANK), MAX_RANK, torch.float32, torch.device("cpu"))


def test_choose_best_fits_free_rows_then_evicts_the_least_recently_used_run(descriptor):
    pool = AdapterPool(descriptor, pool_bytes_for(descriptor, [32], MAX_RANK, torch.float32), MAX_RANK,
                       torch.float32, torch.device("cpu"))
    for start, rows, owner in ((0, 8, "a"), (8, 4, "b"), (16, 8, "c"), (28, 4, "d")):
        pool.occupy(start, rows, owner)  # free: rows 12..16 (4) and 24..28 (4)
    everyone = lambda owner: True  # noqa: E731
    recency = {"a": 1, "b": 4, "c": 2, "d": 3}.__getitem__
    assert pool.choose(4, everyone, recency).start == 12  # the first of two exact fits, no eviction
    placement = pool.choose(8, everyone, recency)
    assert placement.victims == ("a",) and placement.start == 0  # a (8 rows) was used least recently
    assert pool.choose(8, lambda o: o != "a", recency).victims == ("c",)
    # Only a and c may go: 16 rows are c's and the free rows on both sides of it; 20 rows are not
    # to be had, for b and d are in the way.
    assert pool.choose(16, lambda o: o in ("a", "c"), recency) == Placement(12, ("c",))
    assert pool.choose(20, lambda o: o in ("a", "c"), recency) is None
    assert pool.choose(33, everyone, recency) is None
    with pytest.raises(ValueError, match="overlap"):
        pool.occupy(6, 4, "e")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_churn_keeps_every_resident_adapter_intact_and_the_bytes_exact(descriptor, seed):
    """Adapters of ranks 1-64 come and go in a pool that holds a fraction of them; each resident
    one reads back exactly what was written, though its rows' views overlap its neighbours'."""
    rng = random.Random(seed)
    pool = AdapterPool(descriptor, pool_bytes_for(descriptor, [160], MAX_RANK, torch.float32), MAX_RANK,
                       torch.float32, torch.device("cpu"))
    ranks = {f"ad{i}": rng.randint(1, MAX_RANK) for i in range(40)}
    weights = {name: random_weights(descriptor, rank, seed * 100 + i) for i, (name, rank) in enumerate(ranks.items())}
    resident: dict[str, int] = {}
    touched: dict[str, int] = {}
    pinned = set(rng.sample(sorted(ranks), 3))
    for clock in range(300):
        name = rng.choice(sorted(ranks))
        touched[name] = clock
        if name in resident:
            continue
        placement = pool.choose(ranks[name], lambda o: o not in pinned, touched.__getitem__)
        if placement is None:  # pinned adapters split the rows it needs
            continue
        for victim in placement.victims:
            assert victim not in pinned
            pool.vacate(resident.pop(victim))
        pool.occupy(placement.start, ranks[name], name)
        pool.fill(placement.start, weights[name], ranks[name])
        pool.activate(placement.start, ranks[name], frozenset(weights[name]))
        resident[name] = placement.start
        assert pool.used_bytes == sum(ranks[n] for n in resident) * pool.row_bytes
        assert int(pool.ranks.sum()) == sum(ranks[n] for n in resident)
    assert len(resident) > 3
    for name, start in resident.items():
        got = read_back(pool, start, ranks[name], descriptor)
        for key, (a, b) in weights[name].items():
            assert got[key][0].equal(a) and got[key][1].equal(b), (name, key)
    spans = sorted((start, start + ranks[name]) for name, start in resident.items())
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:], strict=False))


def test_fill_zeroes_the_projections_an_adapter_leaves_alone(descriptor):
    pool = AdapterPool(descriptor, pool_bytes_for(descriptor, [16], MAX_RANK, torch.float32), MAX_RANK,
                       torch.float32, torch.device("cpu"))
    pool.fill(0, random_weights(descriptor, 16, 1), 16)
    skip = frozenset({("k_proj", 0), ("down_proj", 1)})
    pool.fill(0, random_weights(descriptor, 8, 2, skip=skip), 8)
    for module, layer in skip:
        assert not pool.a[module][layer][0, :8].any() and not pool.b[module][layer][0, :, :8].any()
    assert pool.a["q_proj"][0][0, :8].any()
