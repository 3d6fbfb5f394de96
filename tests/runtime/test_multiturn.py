"""Multi-turn rollouts in training: tool tokens out of the loss, env rewards into the advantages, the RL
experiment with rollout.env in process and on two Ray workers, and a failing env stopping the run."""

from pathlib import Path

import pytest
import torch

from reflow.algorithms.aggregation import Norm
from reflow.config.loader import from_dict
from reflow.config.schema import RLConfig
from reflow.engines.generate import GenerationEngine, SamplingParams
from reflow.engines.multiturn import Limits, episodes_to_batch, run_episodes, start_episodes
from reflow.envs import EnvError
from reflow.experiments.rl import RLExperiment
from reflow.models.load import load_policy, load_tokenizer
from reflow.runtime.calls import policy
from reflow.runtime.graph import GraphError
from reflow.runtime.graphs import graph_for
from rl_runs import assert_same_steps, rl_config, run

VARIED_ENV = f"{Path(__file__).parent / 'varied_env.py'}:Varied"


class Talk:
    def reset(self, row):
        self.k = 0

    def step(self, message):
        self.k += 1
        return f"tool says {self.k}\n", float(self.k == 2), self.k >= 3


def episode_batch(model, tok, n=4):
    rows = [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(10, 10 + n)]
    eps = start_episodes([Talk() for _ in rows], rows, [tok.encode(r["prompt"]) for r in rows], range(n), tok, "Talk")
    run_episodes(GenerationEngine(model, [tok.eos_token_id], tok.pad_token_id), eps,
                 SamplingParams(temperature=1.0), Limits(3, 3, 9, 64), tok, lambda k: k, "Talk")
    batch = episodes_to_batch(eps, [r["prompt"] for r in rows], [r["answer"] for r in rows], [0, 0, 1, 1], 0, tok)
    batch.with_samples(score=torch.tensor([1.0, 0.0, 0.5, 0.0]))
    return batch


def config(**algo):
    return from_dict(RLConfig, {"actor": {"path": "m"}, "rollout": {"env": "calculator", "max_new_tokens": 9},
                                "algo": {"kl_coef": 0.1, **algo}})


@pytest.mark.parametrize("algo", [{"adv_estimator": "grpo", "kl_in": "loss", "entropy_coef": 0.01},
                                  {"adv_estimator": "reinforce++", "kl_in": "reward"}], ids=["grpo", "reinforce++"])
def test_tool_tokens_get_no_gradient_and_their_logprobs_do_not_change_the_policy_loss(debug_model, monkeypatch, algo):
    model, tok = load_policy(debug_model), load_tokenizer(debug_model)
    batch = episode_batch(model, tok)
    mask = batch.tokens["action_mask"]
    p = batch.samples["prompt_len"]
    tool = torch.zeros_like(mask, dtype=torch.bool)
    for i, (start, end) in enumerate(zip(batch.offsets[:-1], batch.offsets[1:])):
        tool[start + p[i]:end] = mask[start + p[i]:end] == 0
    assert tool.sum() > 0 and mask.sum() > 0
    cfg = config(**algo)
    noise = torch.randn(batch.num_tokens) * 3
    batch.with_tokens(ref_logprobs=batch.tokens["gen_logprobs"] - 0.1 * mask)
    batch = policy.advantages(cfg, batch, 0.1, None)
    assert (batch.tokens["advantages"][~mask.bool()] == 0).all() and batch.tokens["advantages"][mask.bool()].abs().sum() > 0
    norm = Norm(float(mask.sum()), float(len(batch)), 9.0)
    seen = {}

    def losses(shift_tool_logprobs: bool):
        real = policy.token_logprobs

        def wrapped(*a, **kw):  # the model's log-probs, shifted on tool tokens, kept for their gradient
            logp, ent = real(*a, **kw)
            logp = logp + noise * tool if shift_tool_logprobs else logp
            logp.retain_grad()
            seen["logp"] = logp
            return logp, ent

        monkeypatch.setattr(policy, "token_logprobs", wrapped)
        mb = batch
        if shift_tool_logprobs:  # and every other log-prob input on the tool tokens
            mb = batch.index(range(len(batch)))
            mb.with_tokens(**{k: mb.tokens[k] + noise * tool for k in ("gen_logprobs", "ref_logprobs")})
        model.zero_grad()
        loss, _ = policy.actor_loss(cfg, 0.1, 0)(model, mb, norm)
        loss.backward()
        return loss.detach(), seen["logp"].grad.clone()

    loss, grad = losses(False)
    shifted, shifted_grad = losses(True)
    assert (grad[tool] == 0).all() and grad[mask.bool()].abs().sum() > 0
    assert torch.equal(loss, shifted) and torch.equal(grad, shifted_grad)


def test_env_turn_rewards_add_to_the_score_in_the_outcome_reward(debug_model):
    model, tok = load_policy(debug_model), load_tokenizer(debug_model)
    batch = episode_batch(model, tok)
    assert batch.samples["env_return"].tolist() == [1.0] * 4  # Talk rewards its 2nd turn
    out = policy.advantages(config(adv_estimator="drgrpo", kl_coef=0.0), batch, 0.0, None)
    # Dr.GRPO: r_i - mean of its group, r_i = score_i + 1.0 -> groups (2, 1) and (1.5, 1)
    first = [out.unpack("advantages")[i][out.unpack("action_mask")[i].bool()][0].item() for i in range(4)]
    assert first == pytest.approx([0.5, -0.5, 0.25, -0.25])


def test_an_unknown_env_fails_when_the_graph_is_built(tmp_path, debug_model, addition_data):
    cfg = rl_config(tmp_path, debug_model, addition_data)
    cfg.rollout.env = "nowhere.py:Env"
    with pytest.raises(GraphError, match=r"rollout.env 'nowhere.py:Env': file .* not found"):
        graph_for(cfg)


def multi_turn_config(out, model, data, workers, env="calculator"):
    cfg = rl_config(out, model, data, workers, adv_estimator="grpo")
    cfg.rollout.env, cfg.rollout.max_turns, cfg.rollout.max_new_tokens, cfg.rollout.max_turn_tokens = env, 3, 9, 4
    cfg.reward.fn = None
    cfg.trainer.eval_every = 2
    return cfg


def test_an_env_that_raises_during_training_stops_the_run_naming_the_episode(tmp_path, debug_model, addition_data):
    f = tmp_path / "bad_env.py"
    f.write_text("class Bad:\n    def reset(self, row):\n        self.prompt = row['prompt']\n"
                 "    def step(self, message):\n        raise RuntimeError('tool is down')\n")
    cfg = multi_turn_config(tmp_path / "out", debug_model, addition_data, 0, env=f"{f}:Bad")
    with pytest.raises(EnvError, match=r"^rollout.env '.*bad_env.py:Bad': step raised RuntimeError: tool is down "
                                       r"on sample 0 \(prompt '\d+\+\d+='\), turn 1$"):
        run(RLExperiment, cfg)


def test_a_multi_turn_run_gives_the_same_metrics_in_process_and_on_two_workers(ray_session, tmp_path, debug_model,
                                                                               addition_data):
    from reflow.utils.metrics import read_metrics

    local = run(RLExperiment, multi_turn_config(tmp_path / "local", debug_model, addition_data, 0, VARIED_ENV))
    ray = run(RLExperiment, multi_turn_config(tmp_path / "ray", debug_model, addition_data, 2, VARIED_ENV))
    assert_same_steps(local, ray)
    for rows in (local, ray):
        assert all(r["env/turns"] > 1 and 0 < r["time/env_tool_fraction"] < 1 and r["reward/std"] > 0 for r in rows)
    evals = [[r for r in read_metrics(tmp_path / side / "metrics.jsonl") if "eval/turns" in r] for side in ("local", "ray")]
    assert len(evals[0]) == len(evals[1]) == 2
    for a, b in zip(*evals):
        assert all(a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6) for k in a if k.startswith("eval/"))
