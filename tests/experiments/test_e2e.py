"""End to end: init-model -> sft -> train (GRPO / PPO), rm -> train with a reward model, checkpoints, --resume."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from reflow.cli import main
from reflow.utils.metrics import read_metrics


def by_step(rows):
    """metrics.jsonl rows merged per step (a step can have a train row and an eval row)."""
    out = {}
    for r in rows:
        out.setdefault(r["step"], {}).update(r)
    return out


def length_reward_file(tmp_path):
    p = tmp_path / "length_reward.py"
    p.write_text("def reward(prompts, responses, answers):\n    return [float(len(r)) for r in responses]\n")
    return p


def rl_args(model, data, out, *extra):
    return ["train", f"actor.path={model}", f"data.train={data}/train.jsonl", f"data.eval={data}/test.jsonl",
            f"output_dir={out}", "rollout.prompts_per_step=4", "rollout.n=4", "rollout.max_new_tokens=5",
            "trainer.progress=false", "actor.optim.lr=1e-3", *extra]


def test_sft_then_grpo_writes_metrics_checkpoints_and_hf_folders(debug_model, addition_data, tmp_path):
    sft_out = tmp_path / "sft"
    assert main(["sft", f"model.path={debug_model}", f"data.train={addition_data}/sft.jsonl",
                 f"data.eval={addition_data}/test.jsonl", f"output_dir={sft_out}", "max_steps=3",
                 "batch_size=16", "progress=false"]) == 0
    rows = read_metrics(sft_out / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert any("eval/accuracy" in r for r in rows)
    assert (sft_out / "config.yaml").is_file() and (sft_out / "curves.png").is_file()
    AutoModelForCausalLM.from_pretrained(sft_out / "final")  # an HF folder transformers loads

    # a reward with variance inside each group (length), so advantages are non-zero and weights must move
    length_reward = length_reward_file(tmp_path)
    out = tmp_path / "grpo"
    assert main(rl_args(sft_out / "final", addition_data, out, "trainer.steps=4", "trainer.save_every=2",
                        "trainer.eval_every=2", "algo.kl_coef=0.01", f"reward.fn={length_reward}:reward")) == 0
    rows = read_metrics(out / "metrics.jsonl")
    steps = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert steps[-1]["accuracy"] is None  # the length reward declares no success (correct_at / reward_range)
    for key in ["reward/mean", "reward/std", "actor/kl", "actor/entropy", "response_len/mean",
                "actor/clipfrac", "time/actor_gen", "time/ref_inf", "time/actor_train", "throughput/gen_tokens_per_s"]:
        assert steps[-1][key] is not None, key
    # the length distribution the planner reads back (levels 0, 0.1, ..., 1: min, deciles, max)
    from reflow.planner.config import measured_lengths
    quantiles = measured_lengths(out / "metrics.jsonl", last=1)
    assert len(quantiles) == 11 and list(quantiles) == sorted(quantiles)
    assert quantiles[0] >= 1 and quantiles[-1] == steps[-1]["response_len/max"]
    assert [r["reward/errors"] for r in steps] == [0, 0, 0, 0]  # a file spec runs in the reward sandbox
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [0, 2, 4]
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step_000002", "step_000004"]
    saved = AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "step_000004" / "actor")
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    for a, b in zip(saved.state_dict().values(), final.state_dict().values()):
        assert torch.equal(a, b)
    # training moved the weights
    start = AutoModelForCausalLM.from_pretrained(sft_out / "final")
    assert not torch.equal(start.model.embed_tokens.weight, final.model.embed_tokens.weight)
    assert (out / "curves.png").is_file()


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_resume_continues_with_the_same_metrics_as_an_uninterrupted_run(debug_model, addition_data, tmp_path, algo):
    out = tmp_path / algo
    args = rl_args(debug_model, addition_data, out, f"algo.name={algo}", "trainer.steps=4", "trainer.save_every=2",
                   "trainer.eval_every=0", "data.eval_size=4", "algo.kl_coef=0.05", "algo.mini_batches=2",
                   "actor.optim.schedule=cosine", "actor.optim.warmup_steps=1",
                   f"reward.fn={length_reward_file(tmp_path)}:reward")
    assert main(args) == 0
    full = by_step(read_metrics(out / "metrics.jsonl"))
    assert full[3]["actor/grad_norm"] > 0  # a real update happened, so equality below means something
    # Simulate a crash after step 2: the step-4 checkpoint never happened.
    shutil.rmtree(out / "checkpoints" / "step_000004")
    assert main(args + ["--resume"]) == 0
    resumed = by_step(read_metrics(out / "metrics.jsonl"))
    assert sorted(resumed) == sorted(full)
    keys = ["reward/mean", "actor/loss", "actor/entropy", "actor/kl", "actor/grad_norm", "actor/lr"]
    if algo == "ppo":
        keys += ["critic/loss", "critic/grad_norm"]
    for step in (3, 4):
        for k in keys:
            assert resumed[step][k] == pytest.approx(full[step][k], rel=1e-5, abs=1e-7), (step, k)
    # steps before the checkpoint are kept, not rewritten
    assert resumed[1]["time/step"] == full[1]["time/step"]


def test_ppo_trains_a_critic_and_checkpoints_it(debug_model, addition_data, tmp_path):
    out = tmp_path / "ppo"
    assert main(rl_args(debug_model, addition_data, out, "algo.name=ppo", "trainer.steps=2", "trainer.eval_every=0",
                        "data.eval_size=4", "algo.kl_coef=0.05")) == 0
    last = read_metrics(out / "metrics.jsonl")[-2]  # the last row is the final eval
    assert last["critic/loss"] > 0 and last["time/critic_inf"] > 0 and last["time/critic_train"] > 0
    assert (out / "checkpoints" / "step_000002" / "critic" / "config.json").is_file()


def test_reward_model_then_rl_from_it(debug_model, addition_data, tmp_path):
    rm_out = tmp_path / "rm"
    assert main(["rm", f"model.path={debug_model}", f"data.train={addition_data}/pairs.jsonl", f"output_dir={rm_out}",
                 "max_steps=3", "batch_size=8", "progress=false", "eval_fraction=0.2"]) == 0
    rows = read_metrics(rm_out / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert 0 <= rows[-1]["eval/accuracy"] <= 1
    rm = AutoModelForSequenceClassification.from_pretrained(rm_out / "final")
    assert rm.config.num_labels == 1
    out = tmp_path / "rl_rm"
    assert main(rl_args(debug_model, addition_data, out, "reward.fn=null", f"reward.model={rm_out}/final",
                        "trainer.steps=1", "trainer.eval_every=0", "data.eval_size=4")) == 0
    step1 = read_metrics(out / "metrics.jsonl")[1]
    assert step1["reward/std"] > 0  # scores come from the model, not a 0/1 rule


def test_accuracy_is_the_reward_functions_success_in_training_eval_and_reflow_eval(debug_model, addition_data,
                                                                                  tmp_path, capsys):
    """Every response gets 1.0, which reward.clip cuts to 0.5: all count as correct (correct_at is judged on the
    function's own reward), while an untrained model's exact match against `answer` would be ~0."""
    p = tmp_path / "always.py"
    p.write_text("def reward(prompts, responses, answers):\n    return [1.0] * len(responses)\n"
                 "reward.correct_at = 1.0\n"
                 "def half(prompts, responses, answers):\n    return [0.5] * len(responses)\n"
                 "half.reward_range = (0.0, 1.0)\n")
    out = tmp_path / "grpo"
    assert main(rl_args(debug_model, addition_data, out, "trainer.steps=1", "data.eval_size=4", "reward.clip=0.5",
                        "reward.sandbox=false", f"reward.fn={p}:reward")) == 0
    rows = by_step(read_metrics(out / "metrics.jsonl"))
    assert rows[1]["reward/mean"] == 0.5 and rows[1]["accuracy"] == 1.0
    assert rows[0]["eval/accuracy"] == rows[1]["eval/accuracy"] == 1.0
    for fn, expected in (("reward", 1.0), ("half", 0.0)):  # half: below its reward_range's maximum
        assert main(["eval", "--model", str(debug_model), "--data", f"{addition_data}/test.jsonl", "--json",
                     "--max-new-tokens", "2", "--limit", "4", "--reward", f"{p}:{fn}"]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"] == expected


def test_eval_and_generate_commands(debug_model, addition_data, capsys):
    assert main(["eval", "--model", str(debug_model), "--data", f"{addition_data}/test.jsonl", "--json",
                 "--max-new-tokens", "4"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 16 and 0 <= result["accuracy"] <= 1
    assert main(["generate", "--model", str(debug_model), "--prompt", "12+34=", "--n", "2",
                 "--max-new-tokens", "3"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 2 and all(x["prompt"] == "12+34=" for x in lines)


def test_tensorboard_logs_the_step_metrics(debug_model, addition_data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    assert main(rl_args(debug_model, addition_data, out, "trainer.steps=2", "trainer.eval_every=0",
                        "data.eval_size=4", "trainer.tensorboard=true")) == 0
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("reward/mean")] == [1, 2]
    assert [e.step for e in acc.Scalars("eval/accuracy")] == [0, 2]


def test_actor_gen_samples_are_keyed_by_sample_id(debug_model, addition_data, tmp_path):
    """actor_gen's samples are a function of (run seed, step, sample id): splitting the step's prompts over
    several generation calls (as data-parallel replicas do) gives the same samples."""
    from reflow.config.loader import load_config
    from reflow.config.schema import RLConfig
    from reflow.engines.generate import GenerationEngine, SamplingParams, sample_seed
    from reflow.experiments.rl import RLExperiment

    cfg = load_config(RLConfig, None, rl_args(debug_model, addition_data, tmp_path / "keyed")[1:] +
                      ["rollout.temperature=1.5", "rollout.max_new_tokens=6"])
    with RLExperiment(cfg) as exp:
        worker = exp.executor.transport.worker  # the in-process worker

        def actor_gen(step, prompt_idx):
            return worker.run(step, "actor_gen", {"prompts": prompt_idx, "parts": []})[0]

        prompt_idx = [5, 17, 2, 9]
        batch = actor_gen(3, prompt_idx)
        n = cfg.rollout.n
        assert batch.ids == list(range(3 * 16, 4 * 16))  # sample ids: first_id + j
        responses = [s[p:].tolist() for s, p in zip(batch.unpack("input_ids"), batch.samples["prompt_len"].tolist())]
        assert len({tuple(r) for r in responses[:n]}) > 1  # the n samples of a prompt differ
        prompts = [worker.data.train_prompts[i].prompt_ids for i in prompt_idx for _ in range(n)]
        seed = sample_seed(cfg.seed, 3)
        tok = worker.tokenizer
        engine = GenerationEngine(worker.roles["actor"].model, [tok.eos_token_id], tok.pad_token_id)
        sampling = SamplingParams(6, 1.5)
        split = []
        for part in ([1, 3, 5, 7, 9, 11, 13, 15], [14, 12, 10, 8, 6, 4, 2, 0]):  # two "replicas", any order
            gens = engine.generate([prompts[j] for j in part], sampling, keys=[batch.ids[j] for j in part], seed=seed)
            split += [(j, g.tokens) for j, g in zip(part, gens)]
        assert [t for _, t in sorted(split)] == responses
        later = actor_gen(4, prompt_idx)  # another step: other samples for the same prompts
        assert [s.tolist() for s in later.unpack("input_ids")] != [s.tolist() for s in batch.unpack("input_ids")]


def test_a_reward_model_with_an_empty_held_out_share_trains_and_skips_its_evaluation(debug_model, addition_data,
                                                                                    tmp_path):
    out = tmp_path / "rm"
    assert main(["rm", f"model.path={debug_model}", f"data.train={addition_data}/pairs.jsonl", f"output_dir={out}",
                 "max_steps=1", "batch_size=4", "progress=false", "eval_fraction=0.001"]) == 0
    assert (out / "final" / "config.json").is_file()
    assert not [r for r in read_metrics(out / "metrics.jsonl") if "eval/accuracy" in r]


def test_reflow_eval_with_env_plays_greedy_episodes_and_scores_their_returns(debug_model, addition_data, tmp_path,
                                                                              capsys):
    """An env that ends every episode on turn 2 with reward 1 for an even answer, 0.5 for an odd one: turns are
    exactly 2, reward the mean return, accuracy the share of returns at 1; --show N prints N transcripts, with the
    observation."""
    f = tmp_path / "two_turns.py"
    f.write_text("class TwoTurns:\n    def reset(self, row):\n        self.answer, self.turn = int(row['answer']), 0\n"
                 "    def step(self, message):\n        self.turn += 1\n"
                 "        if self.turn < 2:\n            return '<obs>', 0.0, False\n"
                 "        return '', 1.0 if self.answer % 2 == 0 else 0.5, True\n")
    args = ["eval", "--model", str(debug_model), "--data", f"{addition_data}/test.jsonl", "--limit", "8",
            "--env", f"{f}:TwoTurns", "--max-new-tokens", "8", "--max-turn-tokens", "2", "--max-turns", "3"]
    assert main(args + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    even = [int(json.loads(line)["answer"]) % 2 == 0 for line in (addition_data / "test.jsonl").read_text().splitlines()[:8]]
    assert 0 < sum(even) < 8 and result["n"] == 8 and result["turns"] == 2.0
    assert result["accuracy"] == sum(even) / 8 and result["reward"] == pytest.approx((sum(even) + 0.5 * (8 - sum(even))) / 8)
    assert main(args + ["--show", "5"]) == 0
    assert capsys.readouterr().out.count("<obs>") == 5  # the first 5 transcripts, each with its observation
    assert main(["eval", "--model", str(debug_model), "--data", f"{addition_data}/test.jsonl", "--max-turns", "2"]) == 2
    assert capsys.readouterr().err.startswith("reflow eval: error: --max-turns is a limit of multi-turn episodes: "
                                              "add --env NAME")
    assert main(["eval", "--model", str(debug_model), "--data", f"{addition_data}/test.jsonl", "--env", "calculator",
                 "--max-turns", "0"]) == 2
    assert "--max-turns must be >= 1, got 0" in capsys.readouterr().err
