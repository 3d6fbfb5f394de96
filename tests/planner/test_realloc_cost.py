"""Reallocation cost: the analytic byte counts agree with plan_reallocation's over real parameter shapes."""

import pytest
from transformers import LlamaConfig, Qwen2Config

from reflow.planner.cost import placement as P
from reflow.planner.hardware import hardware
from reflow.planner.models import ModelShape
from reflow.planner.realloc import realloc_cost, realloc_cost_exact
from reflow.runtime.plan import needs_copy

HW = hardware("a100-80g", devices_per_node=4)
CASES = [(P("d4t1p1", range(4)), P("d1t4p1", range(4))), (P("d2t2p2", range(8)), P("d1t2p1", range(2))),
         (P("d8t1p1", range(8)), P("d2t2p1", range(4, 8))), (P("d2t1p2", range(4)), P("d1t4p1", range(4, 8))),
         (P("d1t2p4", range(8)), P("d2t2p2", range(8))), (P("d2t2p1", range(4)), P("d1t1p1", [5])),
         (P("d4t2p1", range(8)), P("d4t2p1", range(8)))]


@pytest.mark.parametrize("cls", [LlamaConfig, Qwen2Config])
@pytest.mark.parametrize("sharded", [True, False])
def test_analytic_matches_planner(cls, sharded):
    cfg = cls(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, tie_word_embeddings=False)
    m = ModelShape.of(cfg, dtype_bytes=4)
    for src, dst in CASES:
        exact = realloc_cost_exact(m, src, dst, HW, src_sharded=sharded)
        fast = realloc_cost(m, src, dst, HW, src_sharded=sharded)
        assert fast.total_bytes == pytest.approx(exact.total_bytes, rel=1e-6), (src, dst)
        assert fast.max_rank_bytes == pytest.approx(exact.max_rank_bytes, rel=0.3), (src, dst)
        assert (fast.time > 0) == (exact.total_bytes > 0)


def test_needs_copy_follows_the_runtime():
    train = P("d4t1p1", range(4))
    assert not needs_copy("train", train, train, True)
    assert not needs_copy("infer", train, train, True)  # runs on the FSDP owner copy
    assert needs_copy("generate", train, train, True)  # generation gathers a replicated copy
    assert not needs_copy("generate", P("d1t4p1", range(4)), P("d1t4p1", range(4)), True)
    assert needs_copy("infer", P("d2t2p1", range(4)), train, False)
