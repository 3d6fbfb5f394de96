"""Reallocation on several gloo processes: bit-exact weights for every layout pair and placement, the shard
map against real parallelized modules, train -> generate -> train, memory, offload."""

import pytest
import torch

from reflow.parallel.launch import launch
from reflow.checks.realloc import (check_memory, check_module_slices, check_pairs, check_train_generate_train)

LAYOUTS = ["d1t1p1", "d2t1p1", "d1t2p1", "d2t2p1", "d1t1p2", "d2t1p2", "d4t1p1"]


@pytest.fixture(scope="module")
def shapes(debug_model):
    from transformers import AutoConfig, AutoModelForCausalLM

    from reflow.models.empty import empty_model
    from reflow.parallel.shards import param_shapes

    config = AutoConfig.from_pretrained(debug_model)
    return param_shapes(empty_model(AutoModelForCausalLM, config)), config.num_hidden_layers


def test_every_layout_pair_and_placement_arrives_bit_exactly_and_round_trips(shapes):
    # 8 ranks: identical, overlapping and disjoint meshes for every pair; train (sharded) -> generation
    # (replicated) and train -> train, each followed by the way back
    results = launch(check_pairs, 8, args=(*shapes, LAYOUTS))
    assert all(r["failures"] == [] for r in results), [r["failures"][:5] for r in results]
    assert results[0]["checked"] == 2 * 7 * 7 * 3 - 2 * 7  # d1t1p1 sources have no overlapping placement


def test_shard_map_matches_really_parallelized_modules(debug_model):
    results = launch(check_module_slices, 4, args=(str(debug_model), LAYOUTS + ["d1t2p2"]))
    for r in results:
        assert all(v == 0.0 for v in r.values()), r
    assert len(results[0]) == 2 * len(LAYOUTS + ["d1t2p2"])


def test_train_then_generate_then_train_equals_one_process(debug_model):
    results = launch(check_train_generate_train, 4, args=(str(debug_model),))
    seen = set()
    for rank, r in enumerate(results):
        for key, (same_tokens, logprob_diff) in r["generation"].items():
            assert same_tokens and logprob_diff < 1e-5, (rank, key, logprob_diff)
            seen.add(key.split("/")[1])
        assert r["round_trip"]
        if rank < 2:  # the trainers: the trained copy stayed in place and went on training correctly
            assert len(r["weights_after_train"]) == 2 and max(r["weights_after_train"]) < 1e-6
    assert seen == {"disjoint", "identical", "overlapping"}
    # a destination on the trainers' own ranks reuses their shards: less traffic than a disjoint one
    assert results[0]["bytes"]["0/identical"] < results[2]["bytes"]["0/disjoint"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from reflow.models.presets import init_model

    return init_model("tiny-llama", tmp_path_factory.mktemp("tiny-llama"), seed=0)


def test_zero_redundancy_reuses_own_shards_and_stays_below_one_model_copy(tiny_model):
    pairs = [("d4t1p1", "d2t2p1"), ("d2t2p1", "d2t2p1"), ("d2t2p1", "d1t2p2")]
    for r in (case for rank in launch(check_memory, 4, args=(str(tiny_model), pairs)) for case in rank.values()):
        assert r["exact"]
        assert r["received_bytes"] == r["expected_received_bytes"]  # nothing it already holds is sent to it
        assert r["resident_bytes"] + r["buffer_peak_bytes"] < r["full_bytes"], r


def test_offload_frees_the_weights_and_reload_restores_them(debug_model):
    from reflow.models.load import load_policy
    from reflow.realloc.model import Offloaded

    model = load_policy(debug_model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    parked = Offloaded(model)
    full = parked.device_bytes
    parked.offload()
    assert parked.device_bytes == 0
    parked.reload()
    assert parked.device_bytes == full
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_lora_adapter_only_reallocation_keeps_the_replica_bit_exact_and_moves_only_the_adapters(debug_model):
    pytest.importorskip("peft")
    from reflow.checks.realloc import check_lora_adapter_moves

    results = launch(check_lora_adapter_moves, 3, args=(str(debug_model),))
    for r in results[1:]:  # the replica's ranks
        assert r["mismatches"] == [[], [], []]
    received = results[2]["received"]  # rank 2 holds no shard of the source: everything it has arrives
    assert received[0] > 0 and received[1] == received[2] > 0
    assert received[1] < received[0] / 10  # the adapters are a small fraction of the model
