"""RL training calls: advantages, then the actor's (PPO-clip) or the critic's (value) optimizer steps.

Both train calls compute the advantages themselves, on the whole batch, so every plan gives the same ones:

    r_t    = score on the last action + PRM step rewards + env turn rewards - beta * k1(gen, ref) (KL in the reward)
    A, R   = estimator(r, groups, values, ...)        (reflow.algorithms.advantages, algo.adv_estimator)
             with GAE, A is whitened over the batch's action tokens (algo.whiten_advantages)

    actor  : policy loss (algo.policy_loss: PPO-clip, GSPO, CISPO, Clip-Cov, KL-Cov) of (logp, old, A)
             [x rollout-correction weights (TIS / MIS)] [+ beta * KL(pi || ref) in the loss] - entropy_coef * H
             [+ ptx_coef * SFT NLL on a batch of data.ptx in the same optimizer step (PPO-ptx)]
             [+ rehearsal.coef * SFT NLL on a batch of rehearsal.data in the same step (selective rehearsal)]
    critic : clipped value loss against R

Each runs algo.ppo_epochs x algo.mini_batches optimizer steps and returns the mean of their stats under
`actor/` or `critic/`. The actor call also reports the rollout's metrics (reward, accuracy, lengths) and,
with algo.actor_ema, updates the EMA shadow of its weights after its steps.
"""

from __future__ import annotations

import torch

from reflow.algorithms import advantages as adv_lib
from reflow.algorithms.aggregation import Norm, aggregate
from reflow.algorithms.losses import kl_loss, kl_penalty, sequence_nll, value_loss
from reflow.algorithms.advantages import groups_with_spread
from reflow.algorithms.registry import get_advantage, get_policy_loss
from reflow.algorithms.rollout_correction import rollout_correction
from reflow.data.batch import SampleBatch
from reflow.engines.generate import sample_seed
from reflow.engines.rollout import correct_count
from reflow.models.packing import attention_spec, token_logprobs, token_values
from reflow.rewards.registry import RewardError
from reflow.runtime.calls import CallContext, register_call

# metrics response_len/<name>: the quantiles of a step's response lengths at levels 0, 0.1, ..., 0.9, 1
LENGTH_QUANTILES = ("min", "p10", "p20", "p30", "p40", "p50", "p60", "p70", "p80", "p90", "max")


def grpovi_bounds(cfg, reward_fn) -> tuple[float, float] | None:
    """GRPOVI's reward bounds [low, high]: algo.grpovi_low/high, else the reward function's `reward_range`;
    None for other estimators. A ConfigError (before anything is loaded) when neither gives low < high."""
    from reflow.config.loader import ConfigError
    from reflow.rewards.registry import reward_range

    a = cfg.algo
    if a.estimator != "grpovi":
        return None
    declared = reward_range(reward_fn) if reward_fn is not None else None
    low = a.grpovi_low if a.grpovi_low is not None else (declared[0] if declared else None)
    high = a.grpovi_high if a.grpovi_high is not None else (declared[1] if declared else None)
    if low is None or high is None or not low < high:
        raise ConfigError("algo.adv_estimator=grpovi needs reward bounds: set algo.grpovi_low and "
                          "algo.grpovi_high (low < high), or give the reward function a reward_range attribute")
    return float(low), float(high)


def ref_seq_logprobs(batch: SampleBatch) -> torch.Tensor | None:
    """[B] reference log-prob of each whole response (GRPOVI weights the group by its softmax)."""
    if "ref_logprobs" not in batch.tokens:
        return None
    return torch.zeros(len(batch)).index_add_(0, batch.sample_index(), batch.tokens["ref_logprobs"])


def advantages(cfg, batch: SampleBatch, kl_coef: float, bounds: tuple[float, float] | None) -> SampleBatch:
    """tokens["advantages"], tokens["returns"] [T] of the whole batch (see the module docstring)."""
    a = cfg.algo
    mask = batch.tokens["action_mask"]
    score_tok = torch.zeros(batch.num_tokens)
    score_tok[batch.offsets[1:] - 1] = batch.samples["score"]  # the score lands on the last action
    token_rewards = score_tok * mask
    for dense in ("prm_rewards", "env_rewards"):  # placed on action tokens by their producers
        if dense in batch.tokens:
            token_rewards = token_rewards + batch.tokens[dense]
    if "ref_logprobs" in batch.tokens and a.kl_placement == "reward":
        kl = kl_penalty(batch.tokens["gen_logprobs"], batch.tokens["ref_logprobs"], "k1")
        token_rewards = token_rewards - kl_coef * kl * mask
    if bounds is not None:
        low, high = bounds
        bad = ((batch.samples["score"] < low - 1e-4) | (batch.samples["score"] > high + 1e-4)).nonzero()
        if len(bad):
            i = int(bad[0])
            raise RewardError(f"reward {float(batch.samples['score'][i]):g} of sample {i} is outside the GRPOVI "
                              f"bounds [{low:g}, {high:g}]; fix the reward function's reward_range or set "
                              "algo.grpovi_low / algo.grpovi_high")
    adv, ret = get_advantage(a.estimator)(
        rewards=batch.samples["score"], group_ids=batch.samples["group_id"], seqlens=batch.seqlens,
        action_mask=mask, token_rewards=token_rewards, values=batch.tokens.get("values"),
        last_values=batch.samples.get("last_values"), truncated=batch.samples["truncated"],
        gamma=a.gamma, lam=a.lam, norm_std=a.norm_std, baseline_rewards=batch.samples.get("greedy_score"),
        ref_seq_logprobs=ref_seq_logprobs(batch),
        reward_low=bounds[0] if bounds else None, reward_high=bounds[1] if bounds else None)
    if a.estimator == "gae" and a.whiten_advantages:
        adv = adv_lib.masked_whiten(adv, mask)
    return batch.with_tokens(advantages=adv, returns=ret)


IN_STEP = "rollout_correction:"  # prefix of the loss stats that in_step_correction reports


def in_step_correction(a, old: torch.Tensor, mb: SampleBatch, norm: Norm) -> tuple[torch.Tensor | None, dict]:
    """TIS inside the train forward, for a train call of one optimizer step (no actor_inf call): the proximal
    policy's log-probs are this forward's, detached, so the weights min(pi_prox / pi_gen, threshold) per token
    or per sequence (rollout_correction) come from the micro-batch at hand (sequences are never split across
    micro-batches). Returns (weights [T] or None without correction, stats): each rollout_correction stat,
    a mean over the micro-batch's action tokens, scaled by its share of the mini-batch's (norm.tokens), so
    that summed over micro-batches and ranks it is the mean over the batch, as correct_rollout reports it.
    MIS changes which tokens count, hence the normaliser, before the loss: it needs actor_inf (graph_for)."""
    if a.rollout_correction == "none":
        return None, {}
    if a.rollout_correction != "tis":
        raise RuntimeError(f"algo.rollout_correction={a.rollout_correction} needs the actor's log-probs before the "
                           "train call (an actor_inf call producing old_logprobs); add it to the graph")
    mask = mb.tokens["action_mask"]
    weights, _, stats = rollout_correction(old, mb.tokens["gen_logprobs"], mask, mb.seqlens, mode="tis",
                                           level=a.rollout_correction_level, threshold=a.rollout_is_threshold)
    share = mask.sum() / norm.tokens
    return weights, {f"{IN_STEP}{k}": v * share for k, v in stats.items()}


def actor_loss(cfg, kl_coef: float, step: int):
    a = cfg.algo
    policy_loss, options = get_policy_loss(a.policy_loss), a.policy_loss_options()

    def loss_fn(model, mb: SampleBatch, norm: Norm):
        mask = mb.tokens["action_mask"]
        logp, ent = token_logprobs(model, mb, temperature=cfg.rollout.temperature, with_entropy=True,
                                   entropy_grad=bool(a.entropy_coef), attention=attention_spec(cfg.actor))
        # One update per train call: the old (proximal) policy *is* the current one, so its log-probs are
        # logp.detach() (ratio = 1, gradient = policy gradient) and the extra actor_inf forward is skipped;
        # TIS then weighs proximal / behaviour from this same forward (in_step_correction).
        if "old_logprobs" in mb.tokens:
            old, weights, correction = mb.tokens["old_logprobs"], mb.tokens.get("rollout_weights"), {}
        else:
            old = logp.detach()
            weights, correction = in_step_correction(a, old, mb, norm)
        extra = {}
        if a.policy_loss == "clip_cov":  # its random choice of tokens is keyed like sampling: (seed, step, sample)
            extra["generator"] = torch.Generator().manual_seed(sample_seed(cfg.seed, step, mb.ids[0]))
        loss, stats = policy_loss(logp, old, mb.tokens["advantages"], mask, mb.seqlens, norm, **options, **extra,
                                  rollout_weights=weights)
        stats = {"pg_loss": loss.detach(), **stats, **correction,
                 "entropy": aggregate(ent.detach(), mask, mb.seqlens, norm, "token-mean")}
        if "ref_logprobs" in mb.tokens:
            kl = kl_loss(logp, mb.tokens["ref_logprobs"], mask, mb.seqlens, norm, kind=a.kl_estimator,
                         agg=a.loss_agg)
            stats["kl"] = kl.detach()
            if a.kl_placement == "loss":
                loss = loss + kl_coef * kl
        if a.entropy_coef:
            loss = loss - a.entropy_coef * aggregate(ent, mask, mb.seqlens, norm, a.loss_agg)
        return loss, stats

    return loss_fn


def sft_term(cfg, coef: float, stat: str):
    """coef * token-mean SFT NLL on an SFT batch, added to the actor's gradient: PPO-ptx (algo.ptx_coef on
    data.ptx, stat "ptx_nll") and selective rehearsal (rehearsal.coef on rehearsal.data, "rehearsal_nll")."""

    def loss_fn(model, mb: SampleBatch, norm: Norm):
        logp, _ = token_logprobs(model, mb, attention=attention_spec(cfg.actor))
        nll = sequence_nll(logp, mb.tokens["action_mask"], norm.tokens)
        return coef * nll, {stat: nll.detach()}

    return loss_fn


def sft_terms(cc: CallContext) -> list[tuple[list, list, object]]:
    """The SFT terms that join the actor's steps: (rows, one list of row indices per optimizer step, loss_fn)
    for PPO-ptx (meta["ptx"]) and selective rehearsal (meta["rehearsal"])."""
    cfg, out = cc.cfg, []
    if cc.meta.get("ptx") is not None:
        out.append((cc.data.ptx, cc.meta["ptx"], sft_term(cfg, cfg.algo.ptx_coef, "ptx_nll")))
    if cc.meta.get("rehearsal") is not None:
        out.append((cc.data.rehearsal, cc.meta["rehearsal"], sft_term(cfg, cfg.rehearsal.coef, "rehearsal_nll")))
    return out


def critic_loss(cfg):
    def loss_fn(model, mb: SampleBatch, norm: Norm):
        values = token_values(model, mb, attention_spec(cfg.critic))
        return value_loss(values, mb.tokens["values"], mb.tokens["returns"], mb.tokens["action_mask"], mb.seqlens,
                          norm, clip=cfg.algo.value_clip, agg=cfg.algo.loss_agg)

    return loss_fn


def optimizer_steps(cc: CallContext, batch: SampleBatch, loss_fn, prefix: str, sft=()) -> dict[str, float]:
    """algo.ppo_epochs x algo.mini_batches steps; `sft`: SFT terms (sft_terms) whose gradients join each step."""
    from reflow.runtime.calls.supervised import sft_batch

    a, cfg = cc.cfg.algo, cc.cfg
    steps = a.ppo_epochs * len(batch.chunks(a.mini_batches))
    for _, per_step, _ in sft:
        if len(per_step) != steps:
            raise RuntimeError(f"{len(per_step)} batches of SFT rows for {steps} optimizer steps")
    sums: dict[str, float] = {}
    n = 0
    for _ in range(a.ppo_epochs):
        for mini in batch.chunks(a.mini_batches):
            mask = mini.tokens["action_mask"]
            norm = Norm(tokens=float(mask.sum()), samples=float(len(mini)), max_tokens=float(cfg.rollout.max_new_tokens))
            extra = []
            for rows, per_step, term in sft:  # the SFT terms join the same optimizer step
                pb = sft_batch([rows[i] for i in per_step[n]])
                extra.append((pb, term, Norm(float(pb.tokens["action_mask"].sum()), float(len(pb)))))
            for k, v in cc.train_step(mini, loss_fn, norm, extra=extra).items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
    return {f"{prefix}/{k}": v / n for k, v in sums.items()}


@register_call("count_spread")
def count_spread(cc: CallContext, batch: SampleBatch) -> dict | None:
    """DAPO's dynamic sampling: {"dynamic/groups_with_spread": groups of this round whose rewards differ}."""
    if not cc.first:
        return None
    spread = groups_with_spread(batch.samples["score"], batch.samples["group_id"])
    return {"dynamic/groups_with_spread": float(len(set(batch.samples["group_id"][spread].tolist())))}


def keep_groups(cfg, batch: SampleBatch) -> SampleBatch:
    """Dynamic sampling: the first rollout.prompts_per_step groups (in id order, over all rounds) whose rewards
    differ; every train call keeps the same ones."""
    spread = groups_with_spread(batch.samples["score"], batch.samples["group_id"])
    keep = sorted({g for g, s in zip(batch.samples["group_id"].tolist(), spread.tolist()) if s})
    keep = set(keep[: cfg.rollout.prompts_per_step])
    return batch.index([i for i, g in enumerate(batch.samples["group_id"].tolist()) if g in keep])


def _advantages(cc: CallContext, batch: SampleBatch) -> SampleBatch:
    return advantages(cc.cfg, batch, cc.meta["kl_coef"], grpovi_bounds(cc.cfg, cc.worker.reward_fn))


def correct_rollout(cfg, batch: SampleBatch) -> dict:
    """Rollout correction (algo.rollout_correction): tokens["rollout_weights"] [T] from the trainer's
    (`old_logprobs`) and the generator's (`gen_logprobs`) log-probs; with MIS the dropped tokens leave the
    action mask, so they neither count in the loss nor in its normaliser. Returns its stats."""
    a = cfg.algo
    mask = batch.tokens["action_mask"]
    weights, keep, stats = rollout_correction(batch.tokens["old_logprobs"], batch.tokens["gen_logprobs"], mask,
                                              batch.seqlens, mode=a.rollout_correction,
                                              level=a.rollout_correction_level, threshold=a.rollout_is_threshold,
                                              lower=a.rollout_mis_lower, upper=a.rollout_mis_upper)
    batch.with_tokens(rollout_weights=weights, action_mask=(mask.bool() & keep).to(mask.dtype))
    return {f"rollout_correction/{k}": float(v) for k, v in stats.items()}


def staleness(cfg, batch: SampleBatch, step: int) -> dict:
    """Updates between the policy that generated each sample (its oldest token: `policy_version`) and the one
    training on it; a sample older than rollout.max_staleness is an error (the executor's schedule must never
    produce one). With per-token `versions` also staleness/token_mean: the mean age of the response tokens,
    below staleness/mean when partial rollout continued samples with newer weights."""
    age = step - batch.samples["policy_version"]
    if int(age.max()) > cfg.rollout.max_staleness:
        i = int(age.argmax())
        raise RuntimeError(f"sample {batch.ids[i]} was generated {int(age[i])} updates ago, more than "
                           f"rollout.max_staleness={cfg.rollout.max_staleness}")
    out = {"staleness/max": float(age.max()), "staleness/mean": float(age.float().mean())}
    if "versions" in batch.tokens:
        acted = batch.tokens["action_mask"].bool()
        out["staleness/token_mean"] = float((step - batch.tokens["versions"][acted]).float().mean()) \
            if acted.any() else 0.0
    return out


def rollout_accuracy(batch: SampleBatch) -> float | None:
    """The share of samples the reward function counts as correct (samples["correct"], see score_fn); None when
    it declares no success. With a reward model, which has no notion of correct, exact match against `answer`."""
    if "correct" not in batch.samples:
        right, counted = correct_count(batch.meta["response"], batch.meta["answer"])
        return right / counted if counted else None
    right = batch.samples["correct"]
    return None if right.isnan().any() else right.mean().item()


@register_call("train_policy")
def train_policy(cc: CallContext, batch: SampleBatch) -> dict:
    generated = len(batch)
    if cc.cfg.algo.dynamic_sampling:
        batch = keep_groups(cc.cfg, batch)
        if not len(batch):
            return {"dynamic/kept_groups": 0.0, "dynamic/generated": float(generated)}  # nothing to learn from
    stale = staleness(cc.cfg, batch, cc.step)
    batch = _advantages(cc, batch)
    before = cc.cfg.algo.rollout_correction != "none" and "old_logprobs" in batch.tokens
    correction = correct_rollout(cc.cfg, batch) if before else {}
    metrics = optimizer_steps(cc, batch, actor_loss(cc.cfg, cc.meta["kl_coef"], cc.step), "actor",
                              sft=sft_terms(cc))
    for key in [k for k in metrics if k.startswith(f"actor/{IN_STEP}")]:  # the same names either way
        correction["rollout_correction/" + key.removeprefix(f"actor/{IN_STEP}")] = metrics.pop(key)
    metrics.update(correction)
    metrics.update(stale)
    if cc.cfg.algo.dynamic_sampling:
        metrics.update({"dynamic/kept_groups": float(len(set(batch.samples["group_id"].tolist()))),
                        "dynamic/generated": float(generated)})
    if cc.role.ema is not None:
        cc.role.ema.update(cc.role.model)
    scores, resp_len = batch.samples["score"], batch.samples["response_len"].float()
    metrics.update({
        "reward/mean": scores.mean().item(),
        "reward/std": scores.std().item() if len(scores) > 1 else 0.0,
        "accuracy": rollout_accuracy(batch),
        "response_len/mean": resp_len.mean().item(),
        "response_len/max": resp_len.max().item(),
        # the length distribution's min and deciles (with max: its quantiles at levels 0, 0.1, ..., 1), which
        # the planner models generation and inter-stage fusion from (reflow.planner.config.measured_lengths)
        **{f"response_len/{name}": v for name, v in zip(LENGTH_QUANTILES[:-1], torch.quantile(
            resp_len, torch.linspace(0, 0.9, 10, dtype=resp_len.dtype)).tolist())},
        "truncated": batch.samples["truncated"].float().mean().item(),
        "samples": float(len(batch)),
        "gen_tokens": resp_len.sum().item(),
    })
    if "prm_rewards" in batch.tokens:
        metrics["reward/prm_sum"] = (batch.tokens["prm_rewards"].sum() / len(batch)).item()
    if "env_return" in batch.samples:  # multi-turn: the reward is the final score plus the env's turn rewards
        episode = scores + batch.samples["env_return"]
        metrics.update({"reward/mean": episode.mean().item(),
                        "reward/std": episode.std().item() if len(episode) > 1 else 0.0,
                        "reward/env": batch.samples["env_return"].mean().item(),
                        "env/turns": batch.samples["turns"].float().mean().item(),
                        "accuracy": None})  # exact match of a transcript means nothing; the env's reward says
    return metrics


@register_call("train_critic")
def train_critic(cc: CallContext, batch: SampleBatch) -> dict:
    return optimizer_steps(cc, _advantages(cc, batch), critic_loss(cc.cfg), "critic")
