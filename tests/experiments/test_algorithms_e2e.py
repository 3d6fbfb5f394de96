"""Every RL algorithm runs through `reflow train` by changing one config key; DPO through `reflow dpo`;
PPO-ptx, EMA reference and EMA actor are wired into the loop."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from reflow.cli import main
from reflow.utils.metrics import read_metrics


def by_step(rows):
    out = {}
    for r in rows:
        out.setdefault(r["step"], {}).update(r)
    return out


def rl_args(model, data, out, *extra):
    # a graded reward (shared prefix with the answer, in [0, 1]) so groups have variance on a random model
    return ["train", f"actor.path={model}", f"data.train={data}/train.jsonl", f"data.eval={data}/test.jsonl",
            f"output_dir={out}", "rollout.prompts_per_step=3", "rollout.n=4", "rollout.max_new_tokens=4",
            "trainer.progress=false", "trainer.eval_every=0", "data.eval_size=4", "actor.optim.lr=1e-3",
            "trainer.steps=2", f"reward.fn={data}/prefix_reward.py:reward", *extra]


@pytest.fixture(scope="module")
def data(addition_data):
    (addition_data / "prefix_reward.py").write_text(
        "def reward(prompts, responses, answers):\n"
        "    out = []\n"
        "    for r, a in zip(responses, answers):\n"
        "        k = 0\n"
        "        while k < min(len(r), len(a)) and r[k] == a[k]:\n"
        "            k += 1\n"
        "        out.append(k / len(a) - 0.05 * len(r) / 4)\n"
        "    return out\n"
        "reward.reward_range = (-0.05, 1.0)\n")
    return addition_data


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo", "rloo", "reinforce++", "reinforce++-baseline", "remax",
                                       "grpovi", "gae"])
def test_every_estimator_trains_by_one_config_key(debug_model, data, tmp_path, estimator):
    out = tmp_path / estimator
    assert main(rl_args(debug_model, data, out, f"algo.adv_estimator={estimator}")) == 0
    rows = by_step(read_metrics(out / "metrics.jsonl"))
    assert rows[2]["actor/grad_norm"] > 0  # a real update
    if estimator == "remax":
        assert rows[2]["time/actor_gen_greedy"] > 0
    if estimator == "gae":
        assert rows[2]["critic/loss"] > 0
    start = AutoModelForCausalLM.from_pretrained(debug_model)
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    assert not torch.equal(start.lm_head.weight, final.lm_head.weight)


def test_loss_aggregation_and_dual_clip_options(debug_model, data, tmp_path):
    for agg in ["seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]:
        out = tmp_path / agg
        assert main(rl_args(debug_model, data, out, f"algo.loss_agg={agg}", "algo.dual_clip=3.0",
                            "algo.clip_high=0.28", "algo.mini_batches=2", "algo.ppo_epochs=2")) == 0
        assert by_step(read_metrics(out / "metrics.jsonl"))[2]["actor/grad_norm"] > 0


def test_ptx_ema_reference_and_ema_actor(debug_model, data, tmp_path):
    out = tmp_path / "extras"
    assert main(rl_args(debug_model, data, out, "algo.ptx_coef=0.5", f"data.ptx={data}/sft.jsonl",
                        "algo.ptx_batch_size=4", "algo.ref_ema=0.5", "algo.ref_ema_every=1", "algo.actor_ema=0.9",
                        "trainer.save_every=1", "algo.kl_coef=0.01")) == 0
    rows = by_step(read_metrics(out / "metrics.jsonl"))
    assert rows[2]["actor/ptx_nll"] > 0
    ckpt = out / "checkpoints" / "step_000002"
    actor = AutoModelForCausalLM.from_pretrained(ckpt / "actor").lm_head.weight
    ref = AutoModelForCausalLM.from_pretrained(ckpt / "ref").lm_head.weight
    ema = AutoModelForCausalLM.from_pretrained(ckpt / "ema_actor").lm_head.weight
    start = AutoModelForCausalLM.from_pretrained(debug_model).lm_head.weight
    # the EMA reference moved toward the actor but is not the actor; the EMA actor lies between start and actor
    assert not torch.equal(ref, start) and not torch.equal(ref, actor)
    assert not torch.equal(ema, actor) and (out / "final_ema" / "config.json").is_file()


def test_resume_with_an_ema_reference_matches(debug_model, data, tmp_path):
    import shutil

    out = tmp_path / "ema_resume"
    args = rl_args(debug_model, data, out, "algo.ref_ema=0.5", "algo.kl_coef=0.05", "trainer.steps=3",
                   "trainer.save_every=1")
    assert main(args) == 0
    full = by_step(read_metrics(out / "metrics.jsonl"))
    shutil.rmtree(out / "checkpoints" / "step_000003")
    assert main(args + ["--resume"]) == 0
    resumed = by_step(read_metrics(out / "metrics.jsonl"))
    for k in ["actor/kl", "actor/loss", "reward/mean"]:
        assert resumed[3][k] == pytest.approx(full[3][k], rel=1e-5, abs=1e-7), k


def test_grpovi_without_bounds_is_a_config_error(debug_model, addition_data, tmp_path, capsys):
    fn = tmp_path / "unbounded.py"
    fn.write_text("def reward(prompts, responses, answers):\n    return [float(len(r)) for r in responses]\n")
    assert main(["train", f"actor.path={debug_model}", f"data.train={addition_data}/train.jsonl", "data.eval=null",
                 f"output_dir={tmp_path}/run", "algo.adv_estimator=grpovi", f"reward.fn={fn}:reward"]) == 2
    assert "grpovi_low" in capsys.readouterr().err


@pytest.mark.parametrize("loss,smoothing", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0)])
def test_dpo_trains_from_preference_pairs(debug_model, addition_data, tmp_path, loss, smoothing):
    out = tmp_path / f"dpo_{loss}_{smoothing}"
    assert main(["dpo", f"model.path={debug_model}", f"data.train={addition_data}/pairs.jsonl",
                 f"data.eval={addition_data}/test.jsonl", "data.eval_size=4", f"output_dir={out}", "max_steps=3",
                 "batch_size=8", "progress=false", f"loss={loss}", f"label_smoothing={smoothing}",
                 "model.optim.lr=1e-3", "eval_fraction=0.1", "eval_max_new_tokens=3"]) == 0
    rows = by_step(read_metrics(out / "metrics.jsonl"))
    assert rows[0]["eval/pair_accuracy"] == pytest.approx(0.5)  # policy == reference: every margin is 0
    assert rows[1]["loss"] > 0 and rows[3]["grad_norm"] > 0
    assert rows[3]["eval/pair_accuracy"] != pytest.approx(0.5)  # training moved the implicit reward
    AutoModelForCausalLM.from_pretrained(out / "final")


def test_reward_outside_the_grpovi_bounds_is_a_one_line_error(debug_model, addition_data, tmp_path, capsys):
    fn = tmp_path / "too_big.py"
    fn.write_text("def reward(prompts, responses, answers):\n    return [2.0 for _ in responses]\n"
                  "reward.reward_range = (0.0, 1.0)\n")
    assert main(["train", f"actor.path={debug_model}", f"data.train={addition_data}/train.jsonl", "data.eval=null",
                 f"output_dir={tmp_path}/run", "algo.adv_estimator=grpovi", f"reward.fn={fn}:reward",
                 "rollout.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=2", "trainer.progress=false"]) == 2
    err = capsys.readouterr().err
    assert "outside the GRPOVI bounds" in err and len(err.strip().splitlines()) == 1


def test_process_rewards_land_on_step_ends_and_train(debug_model, data, tmp_path):
    """A PRM function scores each newline-separated step; Clip refines; the rewards reach the token rewards."""
    prm = tmp_path / "prm.py"
    prm.write_text("def prm(prompts, responses, steps):\n    return [[0.5] * len(s) for s in steps]\n")
    out = tmp_path / "prm_run"
    assert main(rl_args(debug_model, data, out, "algo.adv_estimator=reinforce++", f"reward.prm={prm}:prm",
                        "reward.prm_refine=clip", "reward.prm_eta=1.0")) == 0
    rows = by_step(read_metrics(out / "metrics.jsonl"))
    # Clip: every step scores min(0.5 - 1.0, 0) = -0.5; every non-empty response has at least one step
    assert rows[1]["reward/prm_sum"] < 0 and rows[2]["actor/grad_norm"] > 0


def test_process_rewards_need_a_token_level_estimator(debug_model, data, tmp_path, capsys):
    assert main(rl_args(debug_model, data, tmp_path / "x", "reward.prm=digit_match")) == 2
    assert "reinforce++" in capsys.readouterr().err


def test_process_reward_placement_unit(debug_model):
    """Step ends map to the right packed positions: a response "1\\n2\\n3" has steps ending at tokens 0, 2, 4."""
    from reflow.data.batch import SampleBatch
    from reflow.models.load import load_tokenizer
    from reflow.rewards.process import ProcessReward

    tok = load_tokenizer(debug_model)
    prompt = tok("9+9=", add_special_tokens=False)["input_ids"]
    resp = tok("1\n2\n3", add_special_tokens=False)["input_ids"]
    batch = SampleBatch.from_sequences([0], {"input_ids": [prompt + resp],
                                             "action_mask": [[0] * len(prompt) + [1] * len(resp)]},
                                       samples={"prompt_len": [len(prompt)]},
                                       meta={"prompt": ["9+9="], "response": ["1\n2\n3"]})
    p = ProcessReward("digit_match", refine_mode="none", eta=0.0, sep="\n", coef=1.0, load_model=None)
    p.fn = lambda prompts, responses, steps: [[float(len(s)) * 10 + k for k, _ in enumerate(s)] for s in steps]
    r = p.token_rewards(batch, tok)
    expected = torch.zeros(len(prompt) + len(resp))
    expected[len(prompt) + torch.tensor([0, 2, 4])] = torch.tensor([30.0, 31.0, 32.0])
    assert torch.equal(r, expected)


def test_process_reward_model_folder_is_read_at_step_ends(debug_model, data, tmp_path):
    """A PRM folder: a fresh (zero) score head gives 0 per step, so Clip with eta gives exactly -eta per step."""
    out = tmp_path / "prm_model"
    assert main(rl_args(debug_model, data, out, "algo.adv_estimator=gae", f"reward.prm={debug_model}",
                        "reward.prm_refine=clip", "reward.prm_eta=0.5", "trainer.steps=1")) == 0
    row = by_step(read_metrics(out / "metrics.jsonl"))[1]
    steps_per_response = -row["reward/prm_sum"] / 0.5
    assert steps_per_response >= 1 and abs(steps_per_response - round(steps_per_response * 12) / 12) < 1e-6
