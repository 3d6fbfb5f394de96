"""Graphs of calls and execution plans: derived dependencies, errors when built, YAML, built-in plans."""

import pytest

from reflow.parallel.layout import Layout
from reflow.runtime import graphs
from reflow.runtime.graph import Call, Graph, GraphError
from reflow.runtime.plan import Placement, Plan, PlanError, colocate, parse_ranks, resolve_plan, separate


def test_ppo_is_six_calls_in_dependency_order():
    g = graphs.ppo()
    assert len(g.calls) == 6
    assert g.order[0] == "actor_gen" and set(g.order[-2:]) == {"actor_train", "critic_train"}
    assert g.deps["actor_train"] == ["actor_gen", "reward", "ref_inf", "critic_inf"]
    assert g.call("critic_inf").outputs == ("values", "last_values")  # keys are the batch fields
    assert g.trained_roles() == ["actor", "critic"]
    assert g.roles["actor"] == ["actor_gen", "actor_train"]


@pytest.mark.parametrize("name", sorted(graphs.GRAPHS))
def test_every_algorithm_is_a_valid_graph(name):
    g = graphs.GRAPHS[name](ref=True, old_logprobs=True)
    assert g.order[-1].endswith("_train") and "actor_gen" in g.order
    assert "actor_inf" in g.order


def test_remax_adds_a_greedy_generation_keyed_by_group_and_dpo_is_two_calls(tmp_path):
    from reflow.config.schema import DPOConfig

    g = graphs.remax()
    assert g.call("actor_gen_greedy").options == {"greedy": True} and g.call("actor_gen_greedy").prefix == "greedy_"
    assert g.call("reward_greedy").inputs == ("greedy_prompt", "greedy_response", "greedy_answer", "greedy_response_len")
    assert "greedy_score" in g.call("actor_train").inputs
    d = graphs.graph_for(DPOConfig(model={"path": "m"}, output_dir=str(tmp_path)))
    assert [c.kind for c in d.calls] == ["infer", "train"] and d.dataset_keys == ("examples",)
    assert d.call("actor_train").inputs == ("examples", "ref_logp")


def test_graph_errors_name_the_call_and_key():
    gen = Call("gen", "actor", "generate", "generate", ("prompts",), ("responses",))
    with pytest.raises(GraphError, match="call 'train' needs 'scores', which no call produces"):
        Graph("g", [gen, Call("train", "actor", "train", "train_policy", ("responses", "scores"))])
    with pytest.raises(GraphError, match="output 'extra' of call 'gen2' is never consumed"):
        Graph("g", [gen, Call("gen2", "actor", "generate", "generate", ("prompts",), ("extra",)),
                    Call("train", "actor", "train", "train_policy", ("responses",))])
    with pytest.raises(GraphError, match="key 'responses' is produced by both 'gen' and 'again'"):
        Graph("g", [gen, Call("again", "actor", "generate", "generate", ("prompts",), ("responses",)),
                    Call("train", "actor", "train", "train_policy", ("responses",))])
    with pytest.raises(GraphError, match="calls a, b form a cycle"):
        Graph("g", [Call("a", "x", "infer", "logprobs", ("kb",), ("ka",)),
                    Call("b", "x", "infer", "logprobs", ("ka",), ("kb",)),
                    Call("t", "x", "train", "train_policy", ("ka",))])
    with pytest.raises(GraphError, match="kind 'score' is not one of"):
        Call("r", "reward", "score", "score_fn")
    with pytest.raises(GraphError, match="call implementation 'no_such_call' is not registered"):
        from reflow.runtime.calls import get_call

        get_call("no_such_call")


def test_ranks_and_yaml_round_trip(tmp_path):
    assert parse_ranks("0-3") == (0, 1, 2, 3) and parse_ranks("0,2") == (0, 2) and parse_ranks([1, 3]) == (1, 3)
    g = graphs.grpo()
    plan = separate(g, 4)
    plan.save(tmp_path / "p.yaml")
    again = Plan.load(tmp_path / "p.yaml", 4)
    assert again.calls == plan.calls


def test_builtin_plans():
    g = graphs.ppo()
    co = colocate(g, 4)
    assert all(p == Placement((0, 1, 2, 3), Layout(4, 1, 1)) for p in co.calls.values())
    sep = separate(g, 8).validate(g)
    meshes = {g.call(c).role: p.ranks for c, p in sep.calls.items()}
    assert sorted(r for ranks in meshes.values() for r in ranks) == list(range(8))  # disjoint, all used
    assert len(meshes["actor"]) > len(meshes["ref"])  # trained roles get the larger share
    assert "actor_gen" in sep.table(g) and "d" in sep.table(g)


def test_bad_plans_fail_up_front_with_the_call(debug_model):
    from transformers import AutoConfig

    g = graphs.grpo()
    configs = {"actor": AutoConfig.from_pretrained(debug_model), "ref": AutoConfig.from_pretrained(debug_model)}
    base = {c: {"ranks": "0-1", "layout": "d2t1p1"} for c in g.order}
    with pytest.raises(PlanError, match="places no mesh for call\\(s\\) ref_inf"):
        Plan.from_dict({"calls": {k: v for k, v in base.items() if k != "ref_inf"}}, 2).validate(g, configs)
    with pytest.raises(PlanError, match="plan call 'actor_train': layout d1t3p1: tensor degree t=3 does not divide"):
        Plan.from_dict({"calls": {**base, "actor_train": {"ranks": "0-2", "layout": "d1t3p1"}}}, 4).validate(g, configs)
    with pytest.raises(PlanError, match="plan call 'actor_gen': generation under pipeline parallel"):
        Plan.from_dict({"calls": {**base, "actor_gen": {"ranks": "0-1", "layout": "d1t1p2"}}}, 2).validate(g, configs)
    with pytest.raises(PlanError, match="ranks \\[5\\] do not exist"):
        Plan.from_dict({"calls": {**base, "reward": {"ranks": "5", "layout": "d1t1p1"}}}, 4).validate(g, configs)
    with pytest.raises(PlanError, match="role 'reward' has no model"):
        Plan.from_dict({"calls": {**base, "reward": {"ranks": "0-1", "layout": "d1t2p1"}}}, 2).validate(g, configs)
    with pytest.raises(PlanError, match="plan call 'reward': give"):
        Plan.from_dict({"calls": {**base, "reward": "0-1"}}, 2)
    with pytest.raises(PlanError, match="does not exist; give a path, or 'colocate'"):
        resolve_plan("nope.yaml", g, 2)
    with pytest.raises(PlanError, match="plan call 'actor_train': schedule must be one of gpipe, 1f1b, got 'zb'"):
        Plan.from_dict({"calls": {**base, "actor_train": {"ranks": "0-1", "layout": "d1t1p2", "schedule": "zb"}}}, 2)


def test_a_pipeline_schedule_defaults_to_1f1b_and_round_trips_through_yaml(tmp_path):
    g = graphs.grpo()
    base = {c: {"ranks": "0-1", "layout": "d2t1p1"} for c in g.order}
    plan = Plan.from_dict({"calls": {**base, "actor_train": {"ranks": "0-1", "layout": "d1t1p2", "schedule": "gpipe"},
                                     "ref_inf": {"ranks": "0-1", "layout": "d1t1p2"}}}, 2)
    assert plan.calls["actor_train"].schedule == "gpipe" and plan.calls["ref_inf"].schedule == "1f1b"
    plan.save(tmp_path / "p.yaml")
    assert Plan.load(tmp_path / "p.yaml", 2).calls["actor_train"].schedule == "gpipe"
    # two train calls of one role share its engine, so they must agree on the schedule
    two = Graph("two", [Call("sft_a", "actor", "train", "train_sft", ("prompts",)),
                        Call("sft_b", "actor", "train", "train_sft", ("prompts",))])
    spec = {"ranks": "0-1", "layout": "d1t1p2"}
    with pytest.raises(PlanError, match="train calls of role 'actor' share one engine, so one pipeline schedule; "
                                        "got 1f1b, gpipe"):
        Plan.from_dict({"calls": {"sft_a": spec, "sft_b": {**spec, "schedule": "gpipe"}}}, 2).validate(two)


def test_an_update_call_must_run_where_its_role_lives():
    g = graphs.grpo(ref_ema=(0.5, 1))
    plan = separate(g, 4)
    assert plan.calls["ref_ema"] == plan.calls["ref_inf"]  # the built-in places it on ref's ranks
    plan.validate(g)
    plan.calls["ref_ema"] = plan.calls["actor_train"]
    with pytest.raises(PlanError, match="plan call 'ref_ema': it updates role 'ref' in place"):
        plan.validate(g)


def test_a_generating_eval_folds_pipeline_stages_into_replicas(tmp_path):
    from reflow.config.schema import SFTConfig
    from reflow.runtime.plan import placements

    g = graphs.graph_for(SFTConfig(model={"path": "m"}, output_dir=str(tmp_path)))
    plan = Plan.from_dict({"calls": {"actor_train": {"ranks": "0-3", "layout": "d2t1p2"}}}, 4)
    assert placements(plan, g)["eval_generate"] == Placement((0, 1, 2, 3), Layout(4, 1, 1))


def test_an_unknown_call_implementation_fails_before_anything_starts(tmp_path, debug_model, addition_data):
    from reflow.config.loader import from_dict
    from reflow.config.schema import RLConfig
    from reflow.experiments.loop import experiment_plan

    cfg = from_dict(RLConfig, {"actor": {"path": str(debug_model)}, "data": {"train": str(addition_data / "train.jsonl")}})
    g = Graph("mine", [Call("actor_gen", "actor", "generate", "generate", ("prompts",), ("response",)),
                       Call("actor_train", "actor", "train", "trian_policy", ("response",))])
    with pytest.raises(GraphError, match="call implementation 'trian_policy' is not registered"):
        experiment_plan(cfg, g)


def test_ipo_averages_log_probs_per_completion_token_by_default():
    import torch

    from reflow.config.schema import DPOConfig
    from reflow.data.batch import SampleBatch
    from reflow.runtime.calls.supervised import dpo_inputs

    batch = SampleBatch.from_sequences([0, 1], {"input_ids": [torch.arange(4), torch.arange(3)],
                                                "action_mask": [torch.tensor([0, 1, 1, 1]), torch.tensor([0, 0, 1])]})
    logp = torch.tensor([0.0, -1.0, -2.0, -3.0, 0.0, 0.0, -4.0])
    ref = torch.tensor([-3.0, -2.0])
    seq, r = dpo_inputs(DPOConfig(model={"path": "m"}, loss="ipo"), logp, ref, batch)
    assert seq.tolist() == [-2.0, -4.0] and r.tolist() == [-1.0, -2.0]  # sums / 3 and / 1 response tokens
    seq, r = dpo_inputs(DPOConfig(model={"path": "m"}, loss="ipo", ipo_average=False), logp, ref, batch)
    assert seq.tolist() == [-6.0, -4.0] and r.tolist() == [-3.0, -2.0]
    seq, _ = dpo_inputs(DPOConfig(model={"path": "m"}), logp, ref, batch)  # DPO (sigmoid): sums
    assert seq.tolist() == [-6.0, -4.0]


def test_fuse_reverses_the_second_calls_stages_round_trips_and_fails_up_front_naming_the_key(tmp_path, debug_model):
    from transformers import AutoConfig

    g = graphs.ppo()
    configs = {r: AutoConfig.from_pretrained(debug_model) for r in ("actor", "critic", "ref")}
    base = {c: {"ranks": "0-3", "layout": "d4t1p1"} for c in g.order}
    pipe = {"ranks": "0-3", "layout": "d2t1p2"}
    plan = Plan.from_dict({"calls": {**base, "actor_train": pipe, "critic_train": pipe},
                           "fuse": ["actor_train", "critic_train"]}, 4).validate(g)
    # stage blocks of d=2 ranks swap: the critic's stage 0 on the actor's stage-1 ranks
    assert plan.calls["actor_train"].ranks == (0, 1, 2, 3) and plan.calls["critic_train"].ranks == (2, 3, 0, 1)
    assert "fused: actor_train + critic_train" in plan.table(g)
    plan.save(tmp_path / "p.yaml")
    again = Plan.load(tmp_path / "p.yaml", 4).validate(g)
    assert again.fuse == ("actor_train", "critic_train") and again.calls == plan.calls
    bad = [({"critic_train": {"ranks": "0-3", "layout": "d4t1p1"}}, ["actor_train", "critic_train"],
            "plan fuse: \\[actor_train, critic_train\\]: fused calls run on the same ranks with the same layout"),
           ({"critic_train": {"ranks": "0-1", "layout": "d1t1p2"}}, ["actor_train", "critic_train"], "same ranks"),
           ({"actor_train": {"ranks": "0-3", "layout": "d4t1p1"}, "critic_train": {"ranks": "0-3", "layout": "d4t1p1"}},
            ["actor_train", "critic_train"], "it needs p >= 2; got d4t1p1: use a layout like d2t1p2"),
           ({}, ["actor_train"], "plan fuse: give two train calls, like fuse: \\[actor_train, critic_train\\]"),
           ({}, ["actor_train", "nope"], "plan fuse: \\[actor_train, nope\\]: 'nope' has no placement")]
    for calls, fuse, needle in bad:
        with pytest.raises(PlanError, match=needle):
            Plan.from_dict({"calls": {**base, "actor_train": pipe, "critic_train": pipe, **calls}, "fuse": fuse}, 4)
    with pytest.raises(PlanError, match="plan fuse: \\[critic_inf, critic_train\\]: 'critic_inf' is not a train "
                                        "call \\(kind infer\\)"):
        Plan.from_dict({"calls": {**base, "critic_inf": pipe, "critic_train": pipe},
                        "fuse": ["critic_inf", "critic_train"]}, 4).validate(g, configs)


def test_a_fused_pair_needs_alike_micro_batches_and_prefix_sharing_and_no_sft_term_checked_before_anything_starts(
        tmp_path, debug_model, addition_data):
    from rl_runs import rl_config
    from transformers import AutoConfig

    from reflow.experiments.loop import experiment_plan

    configs = {r: AutoConfig.from_pretrained(debug_model) for r in ("actor", "critic", "ref")}

    pipe = {"ranks": "0-1", "layout": "d1t1p2"}
    cfg = rl_config(tmp_path, debug_model, addition_data, workers=2, name="ppo")
    cfg.runtime.plan = {"calls": {**{c: {"ranks": "0-1", "layout": "d2t1p1"} for c in graphs.ppo().order},
                                  "actor_train": pipe, "critic_train": pipe, "critic_inf": pipe},
                        "fuse": ["actor_train", "critic_train"]}
    assert experiment_plan(cfg, graphs.ppo(), configs).fuse == ("actor_train", "critic_train")
    cfg.critic.micro_batch_tokens = 32
    with pytest.raises(PlanError, match="plan fuse: \\[actor_train, critic_train\\]: actor.micro_batch_tokens=64 but "
                                        "critic.micro_batch_tokens=32; .* give both the same value"):
        experiment_plan(cfg, graphs.ppo(), configs)
    cfg.critic.micro_batch_tokens, cfg.critic.prefix_sharing = 64, False
    with pytest.raises(PlanError, match="actor.prefix_sharing=True but critic.prefix_sharing=False"):
        experiment_plan(cfg, graphs.ppo(), configs)
    cfg.critic.prefix_sharing, cfg.algo.ptx_coef = True, 0.1
    with pytest.raises(PlanError, match="algo.ptx_coef adds an SFT term to the actor's steps"):
        experiment_plan(cfg, graphs.ppo(), configs)
