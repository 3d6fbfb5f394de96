"""Asynchronous training (rollout.max_staleness): a schedule of the same calls in which generation runs ahead
of training by at most k updates; the same numbers in this process and on Ray workers, exact resumes, and no
sample older than k is ever trained on."""

import pytest
import torch

from reflow.data.batch import SampleBatch
from reflow.data.datasets import PromptExample
from reflow.engines.generate import Generation, GenerationEngine, SamplingParams
from reflow.engines.rollout import batch_from_generations, continue_generations
from reflow.experiments.rl import RLExperiment
from reflow.models.load import load_policy, load_tokenizer
from reflow.models.packing import token_logprobs
from reflow.algorithms.aggregation import Norm
from reflow.runtime.calls.policy import correct_rollout, in_step_correction, staleness

from rl_runs import assert_same_steps, rl_config, run


# partial rollout with ReMax: the greedy baseline (not cut) is decoded whole after the sampled segments
@pytest.mark.parametrize("k,partial,estimator", [(1, False, "grpo"), (2, True, "remax")],
                         ids=["k1", "k2-partial-remax"])
def test_samples_are_at_most_k_updates_old_and_the_same_in_process_and_on_two_workers(
        ray_session, tmp_path, debug_model, addition_data, k, partial, estimator):
    def cfg(out, w):
        c = rl_config(out, debug_model, addition_data, w, rollout_correction="tis", adv_estimator=estimator)
        c.rollout.max_staleness, c.rollout.partial, c.trainer.steps = k, partial, 3
        return c

    local = run(RLExperiment, cfg(tmp_path / "local", 0))
    ray = run(RLExperiment, cfg(tmp_path / "ray", 2))
    assert_same_steps(local, ray)
    assert [m["staleness/max"] for m in local] == [0.0, 1.0, float(k)]  # the first window starts fresh
    for m in (local, ray):
        if partial:  # step 2's generation started with version 0 and continued with version 1 after its 2nd token
            assert 1.0 <= m[2]["staleness/token_mean"] < m[2]["staleness/mean"] == 2.0
        else:
            assert [r["staleness/token_mean"] for r in m] == [r["staleness/mean"] for r in m]
    if partial:
        return
    sync = rl_config(tmp_path / "sync", debug_model, addition_data, 0, rollout_correction="tis")
    sync.trainer.steps = 3
    # step 2's samples really came from older weights: the generator's log-probs differ from the trainer's
    mismatch = "rollout_correction/mismatch_kl"
    assert abs(local[1][mismatch]) > 1e-4 > 10 * abs(run(RLExperiment, sync)[1][mismatch])


def test_a_pipeline_that_restarts_every_step_or_has_staleness_0_is_the_synchronous_run(
        tmp_path, debug_model, addition_data):
    sync = run(RLExperiment, rl_config(tmp_path / "sync", debug_model, addition_data, 0, rollout_correction="tis"))
    for k, partial, save_every in ((1, False, 1), (2, True, 1), (0, True, 0)):  # windows of one step: none runs ahead
        other = rl_config(tmp_path / f"k{k}{partial}", debug_model, addition_data, 0, rollout_correction="tis")
        other.rollout.max_staleness, other.rollout.partial, other.trainer.save_every = k, partial, save_every
        assert_same_steps(sync, run(RLExperiment, other))


def test_an_asynchronous_run_resumes_exactly_from_a_checkpoint(tmp_path, debug_model, addition_data):
    cfg = rl_config(tmp_path / "whole", debug_model, addition_data, 0)
    cfg.rollout.max_staleness, cfg.trainer.steps, cfg.trainer.save_every = 2, 4, 2
    whole = run(RLExperiment, cfg)
    assert max(m["staleness/max"] for m in whole) == 1.0  # windows of 2 steps: at most 1 update old
    again = rl_config(tmp_path / "resumed", debug_model, addition_data, 0)
    again.rollout.max_staleness, again.trainer.steps, again.trainer.save_every = 2, 4, 2
    resumed = run(RLExperiment, again, resume=str(tmp_path / "whole" / "checkpoints" / "step_000002"))
    assert_same_steps(whole[2:], resumed)


def test_a_sample_older_than_max_staleness_is_refused(debug_model, addition_data, tmp_path):
    cfg = rl_config(tmp_path, debug_model, addition_data)
    cfg.rollout.max_staleness = 1
    batch = SampleBatch.from_sequences([7, 8], {"input_ids": [torch.arange(3), torch.arange(2)]},
                                       samples={"policy_version": torch.tensor([4, 3])})
    with pytest.raises(RuntimeError, match="sample 8 was generated 2 updates ago, more than rollout.max_staleness=1"):
        staleness(cfg, batch, step=5)
    assert staleness(cfg, batch, step=4) == {"staleness/max": 1.0, "staleness/mean": 0.5}


def test_dynamic_sampling_keeps_the_first_groups_with_reward_spread(debug_model, addition_data, tmp_path):
    from reflow.runtime.calls.policy import keep_groups

    cfg = rl_config(tmp_path, debug_model, addition_data)
    cfg.rollout.prompts_per_step = 2
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    score = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.7, 0.7, 1.0, 0.0])  # groups 1 and 3 have spread, 0 and 2 none
    batch = SampleBatch.from_sequences(range(8), {"input_ids": [torch.arange(2)] * 8},
                                       samples={"group_id": groups, "score": score})
    assert keep_groups(cfg, batch).ids == [2, 3, 6, 7]
    cfg.rollout.prompts_per_step = 1
    assert keep_groups(cfg, batch).ids == [2, 3]


def _randomized(path, seed):
    """The debug model with larger random weights (std 0.3), so that its next-token distributions are peaked
    and depend on context (a fresh preset's are near uniform)."""
    model = load_policy(path).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 or name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


PROMPTS = [[40, 41, 42, 43], [100, 7], [200, 201, 202], [9], [150, 60, 70, 80, 90]]
PARAMS = SamplingParams(max_new_tokens=8, temperature=0.9)


def _cuts(engines, budgets, keys=(11, 12, 13, 14, 15), seed=5):
    """A partial rollout of PROMPTS: cut j decoded by engines[j] (policy version j) up to budgets[j] tokens."""
    gens = [Generation(i, p, [], [], False) for i, p in enumerate(PROMPTS)]
    versions = [[] for _ in gens]
    for v, (eng, budget) in enumerate(zip(engines, budgets)):
        gens, versions = continue_generations(eng, gens, versions, budget, v, PARAMS, list(keys), seed)
    return gens, versions


def test_a_generation_continued_with_the_same_weights_is_the_uninterrupted_one(debug_model):
    eng = GenerationEngine(_randomized(debug_model, 0), [2], 0, batch_size=3)
    whole = eng.generate(PROMPTS, PARAMS, keys=[11, 12, 13, 14, 15], seed=5)
    cut, versions = _cuts([eng, eng, eng], [3, 5, 8])  # re-prefilled twice, keyed draws continue at position 3, 5
    assert [(g.tokens, g.finished) for g in cut] == [(g.tokens, g.finished) for g in whole]
    for a, b in zip(cut, whole):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
    assert [0, 0, 0, 1, 1, 2, 2, 2] in versions  # cut j's tokens are recorded with version j


def test_partial_rollout_records_each_tokens_version_and_rollout_correction_uses_its_behaviour_logprob(
        debug_model, addition_data, tmp_path):
    v0, v1 = _randomized(debug_model, 0), _randomized(debug_model, 0)
    with torch.no_grad():  # the update between the two versions
        for p in v1.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    gens, versions = _cuts([GenerationEngine(v0, [2], 0), GenerationEngine(v1, [2], 0)], [3, 8])
    assert [0, 0, 0, 1, 1, 1, 1, 1] in versions  # one sample of both versions: interrupted after 3 tokens
    batch = batch_from_generations(gens, [PromptExample(0, "", list(p), None) for p in PROMPTS], [0] * 5, range(5),
                                   load_tokenizer(debug_model), versions).with_samples(policy_version=torch.zeros(5, dtype=torch.long))
    acted = batch.tokens["action_mask"].bool()
    tv = batch.tokens["versions"]
    assert tv[~acted].eq(-1).all() and tv[acted].tolist() == [v for vs in versions for v in vs]
    with torch.no_grad():
        lp0, lp1 = token_logprobs(v0, batch, temperature=0.9)[0], token_logprobs(v1, batch, temperature=0.9)[0]
    # each token's behaviour log-prob is that of the version that emitted it
    torch.testing.assert_close(batch.tokens["gen_logprobs"], torch.where(tv == 1, lp1, lp0), atol=1e-4, rtol=0)
    # TIS against the proximal policy (version 1): weight 1 on version-1 tokens, min(pi_1 / pi_0, 2) on the others
    cfg = rl_config(tmp_path, debug_model, addition_data, rollout_correction="tis")
    cfg.rollout.max_staleness = 1
    batch.with_tokens(old_logprobs=lp1)
    correct_rollout(cfg, batch)
    w = batch.tokens["rollout_weights"]
    torch.testing.assert_close(w[tv == 1], torch.ones(int((tv == 1).sum())), atol=1e-3, rtol=0)
    torch.testing.assert_close(w[tv == 0], (lp1 - lp0)[tv == 0].exp().clamp(max=2.0), atol=1e-3, rtol=1e-3)
    assert (w[tv == 0] - 1).abs().max() > 0.05  # the update changed the old tokens' probabilities
    assert staleness(cfg, batch, step=1)["staleness/token_mean"] == pytest.approx(float(tv[acted].eq(0).float().mean()))


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_tis_inside_the_train_forward_gives_per_micro_batch_the_weights_and_summed_stats_of_tis_on_the_batch(
        debug_model, addition_data, tmp_path, level):
    cfg = rl_config(tmp_path, debug_model, addition_data, rollout_correction="tis")
    cfg.algo.rollout_correction_level = level
    g = torch.Generator().manual_seed(0)
    batch = SampleBatch.from_sequences(range(4), {"input_ids": [torch.arange(n) for n in (5, 3, 7, 4)]})
    mask = (torch.rand(batch.num_tokens, generator=g) > 0.3).float()
    old = -3 * torch.rand(batch.num_tokens, generator=g)
    batch.with_tokens(action_mask=mask, old_logprobs=old, gen_logprobs=old + 2 * torch.randn(batch.num_tokens, generator=g))
    whole = correct_rollout(cfg, batch)
    norm = Norm(tokens=float(mask.sum()), samples=4.0)
    weights, summed = [], {}
    for mb in (batch.index([0, 1]), batch.index([2, 3])):  # two micro-batches of whole sequences
        w, stats = in_step_correction(cfg.algo, mb.tokens["old_logprobs"], mb, norm)
        weights.append(w)
        for k, v in stats.items():
            k = k.replace("rollout_correction:", "rollout_correction/")
            summed[k] = summed.get(k, 0.0) + float(v)
    torch.testing.assert_close(torch.cat(weights), batch.tokens["rollout_weights"])
    assert 0 < whole["rollout_correction/truncated_frac"] < 1
    assert summed == pytest.approx(whole, rel=1e-5)
