"""Reallocation planner, one process: shard map, senders, broadcasts, costs and refusals."""

import pytest
import torch

from reflow.parallel.layout import Layout, LayoutError
from reflow.parallel.shards import Box, Sharding, tensor_dim
from reflow.realloc.plan import ReallocError, naive_cost, plan_reallocation

LAYOUTS = ["d1t1p1", "d2t1p1", "d1t2p1", "d2t2p1", "d1t1p2", "d2t1p2", "d4t1p1"]


def llama_shapes(hidden=16, inter=24, layers=2, vocab=50, kv=8):
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                       p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                       p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,)})
    return shapes


def size(layout: str) -> int:
    return Layout.parse(layout).size


def sharding(layout, ranks, shard_data=True, **kw):
    return Sharding.of(layout, ranks, llama_shapes(**kw), kw.get("layers", 2), shard_data)


def test_box_chunks_follow_torch_chunk():
    for n in range(1, 12):
        for parts in range(1, 5):
            t = torch.arange(n)
            chunks = torch.chunk(t, parts)
            for i in range(parts):
                box = Box.full((n,)).narrow(0, parts, i)
                want = chunks[i] if i < len(chunks) else t[:0]
                assert torch.equal(t[box.slices()], want), (n, parts, i)


def test_tensor_parallel_dims():
    assert tensor_dim("model.layers.3.self_attn.q_proj.weight") == 0
    assert tensor_dim("model.layers.3.self_attn.k_proj.bias") == 0
    assert tensor_dim("model.layers.3.mlp.down_proj.weight") == 1
    assert tensor_dim("model.layers.3.self_attn.o_proj.weight") == 1
    assert tensor_dim("model.layers.3.input_layernorm.weight") is None
    assert tensor_dim("model.embed_tokens.weight") is None


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shard_data", [True, False])
def test_distinct_slices_partition_every_parameter(layout, shard_data):
    s = sharding(layout, range(size(layout)), shard_data)
    for name, shape in s.shape_of.items():
        cover = torch.zeros(shape, dtype=torch.int)
        for box in s.holders(name):
            cover[box.slices()] += 1
        assert bool((cover == 1).all()), (layout, name)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_same_sharding_moves_nothing(layout):
    s = sharding(layout, range(size(layout)))
    plan = plan_reallocation(s, s)
    assert plan.transfers == [] and plan.cost().total_bytes == 0
    assert len(plan.copies) == sum(1 for r in s.ranks for n in s.shape_of if s.box(r, n) is not None)


def test_sharded_to_replicated_gathers_only_the_missing_data_shards():
    src = sharding("d2t2p1", range(4), shard_data=True)
    dst = sharding("d2t2p1", range(4), shard_data=False)
    plan = plan_reallocation(src, dst)
    # every rank receives exactly its tensor slice minus the data shard it holds; a tensor-split slice
    # comes from the rank's data-parallel peer (same tp coordinate)
    for t in plan.transfers:
        if tensor_dim(t.name) is not None:
            assert [src.layout.coords(r)[2] for r in t.receivers] == [src.layout.coords(t.sender)[2]], t
    cost = plan.cost()
    for r in range(4):
        held = src.local_bytes(r)
        assert cost.received[r] == dst.local_bytes(r) - held


def test_replicas_of_a_slice_share_one_broadcast():
    src = sharding("d1t1p1", [0])
    dst = sharding("d4t1p1", [1, 2, 3, 4], shard_data=False)
    plan = plan_reallocation(src, dst)
    assert {t.receivers for t in plan.transfers} == {(1, 2, 3, 4)}
    assert plan.cost().collectives == 1  # everything fits one bucket
    assert plan_reallocation(src, dst, bucket_bytes=1024).cost().collectives > 1


def test_sender_prefers_receiver_node_then_spreads_load():
    src = sharding("d2t1p1", [0, 8], shard_data=False)  # two replicas, on nodes 0 and 1 (8 ranks per node)
    to_node1 = plan_reallocation(src, sharding("d1t1p1", [9]), ranks_per_node=8)
    assert {t.sender for t in to_node1.transfers} == {8}
    elsewhere = plan_reallocation(src, sharding("d1t1p1", [20]), ranks_per_node=8)
    sent = elsewhere.cost().sent
    assert set(sent) == {0, 8}
    biggest = max(torch.Size(s).numel() for s in src.shape_of.values()) * 4
    assert abs(sent[0] - sent[8]) <= biggest


def test_sender_prefers_the_receivers_own_rank():
    src = sharding("d2t1p1", [0, 1], shard_data=False)
    plan = plan_reallocation(src, sharding("d1t2p1", [1, 5], shard_data=False))
    assert all(t.receivers == (5,) for t in plan.transfers)  # rank 1 copies locally
    assert {c.rank for c in plan.copies} == {1}


def test_planned_traffic_is_below_the_naive_method():
    for a, b in [("d2t1p2", "d4t1p1"), ("d4t1p1", "d1t2p1"), ("d1t1p2", "d2t1p1")]:
        src = sharding(a, range(size(a)))
        dst = sharding(b, range(size(b)), shard_data=False)
        planned, naive = plan_reallocation(src, dst).cost(), naive_cost(src, dst)
        assert planned.total_bytes < naive.total_bytes and planned.collectives < naive.collectives, (a, b)


def test_tensor_degrees_that_do_not_divide_each_other_still_plan():
    # heads divisible by 6: t=2 -> t=3 re-cuts each slice by box intersection
    src = sharding("d1t2p1", [0, 1], hidden=24, inter=36, kv=12)
    dst = sharding("d1t3p1", [2, 3, 4], shard_data=False, hidden=24, inter=36, kv=12)
    plan = plan_reallocation(src, dst)
    received = plan.cost().received
    assert set(received) == {2, 3, 4} and plan.cost().total_bytes == sum(dst.local_bytes(r) for r in (2, 3, 4))


def test_bad_requests_fail_before_anything_moves(debug_model):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(debug_model)
    src = sharding("d2t1p1", [0, 1])
    with pytest.raises(ReallocError, match=r"'model.norm.weight' has shape \[16\] in the source and \[32\]"):
        plan_reallocation(src, Sharding.of("d1t1p1", [0], {**llama_shapes(), "model.norm.weight": (32,)}, 2))
    with pytest.raises(ReallocError, match="'model.extra.weight' does not exist in the source"):
        plan_reallocation(src, Sharding.of("d1t1p1", [0], {**llama_shapes(), "model.extra.weight": (2,)}, 2))
    with pytest.raises(ReallocError, match=r"destination ranks \[4\] do not exist \(world size 4\)"):
        plan_reallocation(src, sharding("d2t1p1", [3, 4]), world_size=4)
    with pytest.raises(LayoutError, match="t=3 does not divide num_attention_heads=4 of the destination model"):
        plan_reallocation(src, sharding("d1t3p1", [0, 1, 2]), world_size=4, model_config=config)
    with pytest.raises(ReallocError, match=r"destination layout d2t1p1 needs 2 ranks, got \[0\]"):
        plan_reallocation(src, sharding("d2t1p1", [0]))
