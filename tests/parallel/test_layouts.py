"""Layouts: parsing and validation, and equivalence with the one-process engines on several gloo processes."""

import os

import pytest

from reflow.checks.layouts import check_layouts
from reflow.parallel.launch import WorkerError, launch
from reflow.parallel.layout import Layout, LayoutError, validate_layout


def test_parse_and_coordinates():
    layout = Layout.parse("d2t2p2")
    assert (layout.d, layout.t, layout.p, layout.size) == (2, 2, 2, 8)
    # tensor peers adjacent, then data, then pipeline
    assert [layout.coords(i) for i in (0, 1, 2, 3, 4)] == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0)]
    assert str(layout) == "d2t2p2"
    with pytest.raises(LayoutError, match="dXtYpZ"):
        Layout.parse("dp2")


@pytest.mark.parametrize("text,ranks,needle", [
    ("d1t3p1", [0, 1, 2], "t=3 does not divide num_attention_heads=4"),
    ("d1t4p1", [0, 1, 2, 3], "num_key_value_heads=2"),
    ("d1t1p3", [0, 1, 2], "p=3 exceeds the 2 layers"),
    ("d2t1p1", [0, 1, 2], "needs d*t*p = 2 ranks but 3"),
    ("d2t1p1", [0, 7], "ranks [7] do not exist"),
    ("d2t1p1", [1, 1], "repeats a rank"),
])
def test_bad_layouts_fail_before_anything_starts(debug_model, text, ranks, needle):
    from transformers import AutoConfig

    with pytest.raises(LayoutError) as e:
        validate_layout(Layout.parse(text), AutoConfig.from_pretrained(debug_model), ranks, world_size=4)
    assert needle in str(e.value)
    if "divide" in needle:
        assert "would fit" in str(e.value) and "[1, 2]" in str(e.value)


def _assert_equivalent(results: list[dict]):
    for rank_result in results:
        for layout, diff in rank_result.items():
            assert diff["moved"] > 1e-3, layout  # the step really changed the weights
            assert diff["loss"] < 1e-5, (layout, diff)
            assert diff["grad_norm"] < 1e-4, (layout, diff)
            assert diff["weights"] < 1e-5, (layout, diff)
            assert diff["logprobs"] < 1e-5, (layout, diff)
            assert diff["replica_logprobs"] < 1e-5, (layout, diff)
            assert not diff["replica_sharded"], layout


def test_two_process_layouts_match_one_process_and_1f1b_holds_at_most_p_minus_s_micro_batches(debug_model):
    # d1t1p2 under both schedules, 12-token micro-batches cut the batch into more than p of them;
    # "d2t1p1:shared": groups' prompts computed once, whole groups per data-parallel part, against the
    # unshared one-process engines
    results = launch(check_layouts, 2, args=(str(debug_model), ["d2t1p1", "d1t2p1", "d1t1p2:1f1b", "d1t1p2:gpipe",
                                                                "d2t1p1:shared"], 12))
    _assert_equivalent(results)
    for r in results:
        one_f_one_b, gpipe = r["d1t1p2:1f1b"]["in_flight"], r["d1t1p2:gpipe"]["in_flight"]
        m, s = gpipe["micro_batches"], gpipe["stage"]
        assert m > 2
        assert gpipe["peak"] == m  # GPipe holds every micro-batch's activations before the first backward
        assert one_f_one_b["peak"] == 2 - s  # 1F1B: at most p - s on stage s of p = 2


def test_four_process_layouts_match_one_process(debug_model):
    _assert_equivalent(launch(check_layouts, 4, args=(str(debug_model), ["d2t2p1", "d4t1p1"])))


def test_a_failing_worker_reports_its_rank_and_error(debug_model):
    with pytest.raises(WorkerError, match="rank 0: LayoutError: layout d1t3p1"):
        launch(check_layouts, 3, args=(str(debug_model), ["d1t3p1"]))


def test_generation_under_tensor_parallel_matches_one_process(debug_model):
    from reflow.checks.layouts import check_generation

    for result in launch(check_generation, 2, args=(str(debug_model), "d1t2p1")):
        for mode, r in result.items():
            assert r["same_tokens"], mode
            assert r["logprob_diff"] < 1e-4, (mode, r)


def test_pipeline_with_data_or_tensor_parallel_matches_one_process(debug_model):
    # 20-token micro-batches: the data-parallel halves cut into 3 and 2 micro-batches, so the GPipe schedule
    # runs several micro-batches under FSDP2 and one rank pads with a zero-weighted one
    _assert_equivalent(launch(check_layouts, 4, args=(str(debug_model), ["d2t1p2", "d1t2p2"], 20)))


@pytest.mark.skipif(not os.environ.get("REFLOW_TEST_8_PROCESSES"),
                    reason="8 processes (~30 s on 2 cores); set REFLOW_TEST_8_PROCESSES=1 to run")
def test_eight_process_3d_layout_matches_one_process(debug_model):
    _assert_equivalent(launch(check_layouts, 8, args=(str(debug_model), ["d2t2p2"], 20)))


def test_a_worker_that_dies_without_reporting_is_an_error_not_a_hang(monkeypatch):
    import pathlib
    import sys

    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).parent))  # spawned workers inherit sys.path
    import crash_worker

    with pytest.raises(WorkerError, match="exited with code 17 without reporting a result"):
        launch(crash_worker.die, 2)
    sys.modules.pop("crash_worker", None)


def test_peers_of_a_failed_worker_are_stopped_not_left_hanging(monkeypatch):
    import pathlib
    import sys
    import time

    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).parent))
    import crash_worker

    t0 = time.monotonic()
    with pytest.raises(WorkerError) as e:
        launch(crash_worker.raise_while_peer_waits, 2, timeout_s=300, grace_s=1)
    assert "rank 1: RuntimeError: bad reward function" in str(e.value)
    assert "rank 0: stopped 1 s after rank 1 failed" in str(e.value)
    assert time.monotonic() - t0 < 60  # bounded by the grace period, not the 300 s collective timeout
    sys.modules.pop("crash_worker", None)


def test_fused_actor_critic_training_on_two_ranks_matches_each_models_one_process_step_and_names_a_nonfinite_critic(
        debug_model):
    from reflow.checks.layouts import check_fused

    for r in launch(check_fused, 2, args=(str(debug_model),)):
        assert r["nonfinite"].startswith("NonFiniteError: call 'critic': non-finite"), r["nonfinite"]
        for name in ("actor", "critic"):
            diff = r[name]
            assert diff["moved"] > 1e-3, name
            assert diff["loss"] < 1e-5 and diff["grad_norm"] < 1e-4 and diff["weights"] < 1e-5, (name, diff)
        sched = r["schedule"]
        assert sched["micro_batches"] > 2 and sched["span"] < sched["sequential"]
        assert max(sched["peak"].values()) <= 2


@pytest.mark.skipif(not os.environ.get("REFLOW_TEST_8_PROCESSES"),
                    reason="two 4-process runs (~90 s on 2 cores); set REFLOW_TEST_8_PROCESSES=1 to run")
def test_four_stage_1f1b_gpipe_and_fused_actor_critic_match_one_process(tmp_path):
    from reflow.checks.layouts import check_fused
    from reflow.models.presets import init_model

    model = str(init_model("tiny-llama", tmp_path / "tiny-llama"))  # 4 layers: one per stage
    results = launch(check_layouts, 4, args=(model, ["d1t1p4:1f1b", "d1t1p4:gpipe"], 12))
    _assert_equivalent(results)
    for r in results:
        one_f_one_b, gpipe = r["d1t1p4:1f1b"]["in_flight"], r["d1t1p4:gpipe"]["in_flight"]
        assert gpipe["peak"] == gpipe["micro_batches"] > 4 and one_f_one_b["peak"] == 4 - gpipe["stage"]
    for r in launch(check_fused, 4, args=(model, 40)):
        for name in ("actor", "critic"):
            assert r[name]["moved"] > 1e-3 and r[name]["weights"] < 1e-5 and r[name]["loss"] < 1e-5, (name, r[name])
        assert r["schedule"]["span"] < r["schedule"]["sequential"]
