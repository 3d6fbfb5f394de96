"""The Advantage Model's loss (Peng et al. 2023, "Stabilizing RLHF through Advantage Model and Selective
Rehearsal"): a reward model whose score of a response is its advantage over the SFT policy,

    a(x, y) = r(x, y) - E_{y' ~ pi_SFT(. | x)} [r(x, y')]

so that scores are centred per prompt and comparable across prompts and tasks. The paper gives the goal
(centred, calibrated, bounded scores, regulated per task), not the loss; this is ours:

    L = L_BT + centre_coef * L_centre + bound_coef * L_bound

    L_BT     = (1 / P) sum_{pairs i} -log sigmoid(s(x_i, y_i^chosen) - s(x_i, y_i^rejected))
               the pairwise (Bradley-Terry) term of any reward model: only score differences matter to it
    L_centre = (1 / P) sum_{prompts i} ( (1 / K) sum_k s(x_i, y'_ik) )^2,   y'_ik ~ pi_SFT(. | x_i)
               the Monte-Carlo estimate of E_{pi_SFT}[s(x, .)] driven to zero per prompt: it fixes the
               per-prompt offset that L_BT leaves free, which is what makes s an advantage
    L_bound  = (1 / |T|) sum_{tasks t} (1 / n_t) sum_{sequences j of task t} s_j^2
               an L2 penalty on every score of the step (chosen, rejected and the SFT samples), averaged
               within each task and then over tasks, so a frequent task does not set the scale alone; with
               L_centre, E[s^2] under pi_SFT is the score variance, so this bounds each task's spread

(sums over a micro-batch; P = pairs of the whole step, so micro-batches add up to the step's loss). Choices
and why: a penalty, not a squash (tanh), because the saved folder must score as it trained (`reward.model=`
reads the raw head); the squared mean of K samples (K >= 2) rather than a running baseline, because it needs
no state across steps and every plan computes it from the same samples; per-task averaging of the bound,
because the paper regulates scores per task and a task column is the only per-task signal the data has.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from reflow.algorithms.losses import pair_accuracy

CHOSEN, REJECTED, SAMPLED = 0, 1, 2  # `kind` of a sequence in an advantage-model batch


def bound_weights(tasks: list) -> torch.Tensor:
    """[N] weight of each sequence of the step in L_bound: 1 / (|T| n_t), t its task (rows without a task
    column share the task None), so that sum_j w_j s_j^2 = (1 / |T|) sum_t mean_{j in t} s_j^2."""
    counts: dict = {}
    for t in tasks:
        counts[t] = counts.get(t, 0) + 1
    return torch.tensor([1.0 / (len(counts) * counts[t]) for t in tasks], dtype=torch.float32)


def advantage_model_loss(scores: torch.Tensor, kind: torch.Tensor, group: torch.Tensor, bound_w: torch.Tensor, *,
                         pairs: float, centre_coef: float, bound_coef: float) -> tuple[torch.Tensor, dict]:
    """The AM loss on a micro-batch (module docstring).

    scores [N] float: s of each sequence; kind [N]: CHOSEN, REJECTED or SAMPLED; group [N]: the prompt (pair)
    each sequence belongs to, whole groups only (a group's chosen, rejected and K samples are in this
    micro-batch), chosen and rejected in the same group order; bound_w [N]: bound_weights of the step.
    pairs: P of the whole step (the normaliser of L_BT and L_centre).
    Returns (loss, stats) with stats bt_loss, centre, bound, accuracy, margin, each this micro-batch's share
    of the step's value (they add up over micro-batches)."""
    chosen, rejected = scores[kind == CHOSEN], scores[kind == REJECTED]
    diff = chosen - rejected
    bt = -F.logsigmoid(diff).sum() / pairs
    sampled = kind == SAMPLED
    centre = scores.new_zeros(())
    if sampled.any():
        g = group[sampled]
        uniq, inv = torch.unique(g, return_inverse=True)
        sums = scores.new_zeros(len(uniq)).index_add(0, inv, scores[sampled])
        counts = torch.zeros(len(uniq), dtype=scores.dtype, device=scores.device).index_add(
            0, inv, torch.ones_like(scores[sampled]))
        centre = ((sums / counts) ** 2).sum() / pairs
    bound = (bound_w.to(scores) * scores ** 2).sum()
    loss = bt + centre_coef * centre + bound_coef * bound
    return loss, {"bt_loss": bt.detach(), "centre": centre.detach(), "bound": bound.detach(),
                  "accuracy": pair_accuracy(diff.detach()).sum() / pairs, "margin": diff.detach().sum() / pairs}
