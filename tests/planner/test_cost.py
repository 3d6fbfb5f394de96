"""Cost model: monotonic in the obvious directions; model shapes match HF and published sizes."""

import math

import pytest
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForTokenClassification

from reflow.planner.cost import Workload, _sum_max_linear, call_cost, placement
from reflow.planner.hardware import HardwareError, hardware
from reflow.planner.models import ModelShape, llama_config, param_shapes

HW = hardware("a100-80g")
M7 = ModelShape.of(llama_config("7b"))
KINDS = ("generate", "infer", "train")


def t(kind, m=M7, layout="d8t1p1", n=8, wl=Workload(), part=None):
    c = call_cost(kind, m, placement(layout, range(n)), HW, wl)
    return c.parts[part] if part else c.time


def test_published_parameter_counts():
    got = {s: ModelShape.of(llama_config(s)).params / 1e9 for s in ("7b", "13b", "34b", "70b")}
    for s, want in {"7b": 6.74, "13b": 13.02, "34b": 33.74, "70b": 68.98}.items():
        assert got[s] == pytest.approx(want, abs=0.01)


@pytest.mark.parametrize("family", ["debug-llama", "debug-qwen2"])
def test_param_shapes_match_hf_models(family):
    from reflow.models.empty import empty_model
    from reflow.models.presets import preset_config
    from reflow.models.tokenizer import build_byte_tokenizer
    from reflow.parallel.shards import param_shapes as hf_shapes

    cfg = preset_config(family, build_byte_tokenizer())
    cfg.num_labels = 1
    for cls, head in ((AutoModelForCausalLM, "lm"), (AutoModelForTokenClassification, "value"),
                      (AutoModelForSequenceClassification, "score")):
        real = hf_shapes(empty_model(cls, cfg))
        assert param_shapes(cfg, head) == real
        assert ModelShape.of(cfg, head).params == sum(math.prod(s) for s in real.values())


@pytest.mark.parametrize("kind", KINDS)
def test_more_tokens_more_time(kind):
    base = Workload(batch=256, prompt_len=256, gen_len=256)
    for more in (Workload(batch=512, prompt_len=256, gen_len=256), Workload(batch=256, prompt_len=512, gen_len=256),
                 Workload(batch=256, prompt_len=256, gen_len=512)):
        assert t(kind, wl=more) > t(kind, wl=base)


@pytest.mark.parametrize("kind", KINDS)
def test_more_data_parallel_devices_less_compute(kind):
    part = "decode" if kind == "generate" else "compute"
    times = [t(kind, layout=f"d{n}t1p1", n=n, part=part) for n in (1, 2, 4, 8)]
    assert all(a > b for a, b in zip(times, times[1:])), times


@pytest.mark.parametrize("kind", KINDS)
def test_larger_model_more_time(kind):
    times = [t(kind, m=ModelShape.of(llama_config(s)), layout="d1t8p1") for s in ("7b", "13b", "34b", "70b")]
    assert all(a < b for a, b in zip(times, times[1:])), times


def test_pipeline_bubble_and_tensor_collectives():
    wl = Workload(batch=64)
    assert t("train", layout="d1t1p4", n=4, wl=wl, part="pp_bubble") > 0
    assert t("train", layout="d4t1p1", n=4, wl=wl, part="pp_bubble") == 0
    assert t("train", layout="d1t4p1", n=4, wl=wl, part="tp_comm") > 0
    assert t("train", layout="d4t1p1", n=4, wl=wl, part="fsdp") > 0
    # more micro-batches: a smaller bubble fraction
    few = call_cost("train", M7, placement("d1t1p4", range(4)), HW, Workload(batch=64, micro_tokens=1 << 20))
    many = call_cost("train", M7, placement("d1t1p4", range(4)), HW, Workload(batch=64, micro_tokens=2048))
    assert few.parts["pp_bubble"] / few.time > many.parts["pp_bubble"] / many.time


def test_collectives_slower_across_nodes():
    nbytes = 1e9
    intra, inter = HW.all_reduce(nbytes, range(8)), HW.all_reduce(nbytes, range(4, 12))
    assert 0 < intra < inter
    assert HW.all_reduce(nbytes, [0]) == 0
    assert HW.all_gather(2 * nbytes, range(8)) > HW.all_gather(nbytes, range(8))
    with pytest.raises(HardwareError, match="a100-80g"):
        hardware("a100")


def test_generation_waves_when_kv_is_scarce():
    full = call_cost("generate", M7, placement("d1t1p1", [0]), HW, Workload(batch=64))
    waves = call_cost("generate", M7, placement("d1t1p1", [0]), HW, Workload(batch=64), concurrency=8)
    assert waves.parts["waves"] == 8 and waves.time > full.time


def test_sum_max_linear_is_exact():
    for a1, b1, a2, b2, n in [(1, 0.5, 3, 0.1, 20), (5, -0.1, 1, 0.3, 50), (2, 1, 2, 1, 7), (0, 1, 10, 0, 1)]:
        brute = sum(max(a1 + b1 * k, a2 + b2 * k) for k in range(n))
        assert _sum_max_linear(a1, b1, a2, b2, n) == pytest.approx(brute)


@pytest.mark.parametrize("kind", KINDS)
def test_kind_scale_multiplies_own_work_not_collectives(kind):
    """hw.<kind>_scale (fitted by `reflow profile --config`) scales a call's passes, decode steps and optimizer
    step; tensor-parallel all-reduces and FSDP collectives stay as they are; other kinds are untouched."""
    wl = Workload(batch=64)
    one = placement("d1t1p1", [0])
    base = call_cost(kind, M7, one, HW, wl).time
    assert call_cost(kind, M7, one, HW.with_(**{f"{kind}_scale": 2.0}), wl).time == pytest.approx(2 * base)
    other = next(k for k in KINDS if k != kind)
    assert call_cost(kind, M7, one, HW.with_(**{f"{other}_scale": 2.0}), wl).time == pytest.approx(base)
    tp = placement("d1t8p1", range(8))
    for hw, collectives in ((HW, True), (HW.with_(intra_bw=1e30, intra_lat=0.0, tp_overhead=0.0), False)):
        plain = call_cost(kind, M7, tp, hw, wl).time
        scaled = call_cost(kind, M7, tp, hw.with_(**{f"{kind}_scale": 2.0}), wl).time
        if collectives:  # tensor-parallel all-reduces are not scaled
            assert plain < scaled < 2 * plain * (1 - 1e-3)
        else:
            assert scaled == pytest.approx(2 * plain)


def test_shared_prompts_cost_their_prompt_tokens_once_in_prefill_train_and_infer_and_leave_decode_alone():
    base = Workload(batch=512, prompt_len=1024, gen_len=256)
    shared = Workload(batch=512, prompt_len=1024, gen_len=256, share_prefill=8, share_prefix=8)
    assert shared.seq_tokens == 256 + 1024 / 8
    assert t("generate", wl=shared, part="prefill") < t("generate", wl=base, part="prefill") / 4
    assert t("generate", wl=shared, part="decode") == t("generate", wl=base, part="decode")
    for kind in ("train", "infer"):
        assert t(kind, wl=shared, part="compute") < t(kind, wl=base, part="compute") / 2


def test_the_workload_of_a_config_shares_prompts_by_group_and_the_prefix_sharing_key():
    from reflow.config.loader import from_dict
    from reflow.config.schema import RLConfig
    from reflow.planner.config import workload_for_config

    cfg = from_dict(RLConfig, {"actor": {"path": "x"}, "data": {"train": "t.jsonl"}, "rollout": {"n": 8}})
    wl = workload_for_config(cfg)
    assert (wl.share_prefill, wl.share_prefix) == (8, 8)
    cfg.actor.prefix_sharing = False
    assert workload_for_config(cfg).share_prefix == 1
