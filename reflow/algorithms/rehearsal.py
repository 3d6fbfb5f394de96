"""Selective rehearsal's data selection (Peng et al. 2023): given each prompt's cluster (k-means on prompt
embeddings) and the advantage-model scores of n responses the SFT policy sampled for it, choose

    the rehearsal set  per cluster, the prompts whose best response scores highest, best first, at most
                       `rehearse_per_cluster`, each with a best score > `min_advantage`; a row is the prompt
                       and that best response (the SFT policy's own high-skill answer, to be kept)
    the PPO prompts    per cluster, the prompts not rehearsed, widest score spread (max - min over the n
                       responses) first, at most `ppo_per_cluster` (None: all)

The paper's part: clusters for representativeness (every cluster contributes), the AM ranking the SFT
policy's responses within each cluster, high-skill examples rehearsed, PPO prompts chosen from the same
ranking. Our choices, and why: the best of n responses stands for a prompt (an AM is centred per prompt, so
the mean of a prompt's scores is ~0 by construction and ranks nothing); PPO prompts are ranked by spread
because a prompt whose responses all score alike gives PPO's advantage no signal; the two sets are disjoint
so that rehearsal anchors what PPO does not train on; a fixed count per cluster keeps every meaning in both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Selection:
    """rehearsal: [(prompt index, response index)], ppo: [prompt index], both grouped by cluster (ascending),
    in rank order within it; clusters: one summary dict per cluster."""

    rehearsal: list[tuple[int, int]] = field(default_factory=list)
    ppo: list[int] = field(default_factory=list)
    clusters: list[dict] = field(default_factory=list)


def select(clusters: torch.Tensor, scores: torch.Tensor, *, rehearse_per_cluster: int, ppo_per_cluster: int | None,
           min_advantage: float = 0.0) -> Selection:
    """clusters [N] int: each prompt's cluster; scores [N, n]: AM scores of its n sampled responses.
    Ties keep prompt order (stable sorts), so the selection is a pure function of its inputs."""
    if scores.dim() != 2 or len(scores) != len(clusters):
        raise ValueError(f"scores must be [N, n] for N = {len(clusters)} prompts, got {tuple(scores.shape)}")
    best, best_j = scores.max(dim=1)
    spread = best - scores.min(dim=1).values
    out = Selection()
    for c in sorted(set(clusters.tolist())):
        members = (clusters == c).nonzero(as_tuple=True)[0]
        by_best = members[torch.sort(-best[members], stable=True).indices].tolist()
        rehearsed = [i for i in by_best if float(best[i]) > min_advantage][:rehearse_per_cluster]
        taken = set(rehearsed)
        rest = [i for i in members.tolist() if i not in taken]
        rest_t = torch.tensor(rest, dtype=torch.long)
        ppo = rest_t[torch.sort(-spread[rest_t], stable=True).indices].tolist() if rest else []
        ppo = ppo if ppo_per_cluster is None else ppo[:ppo_per_cluster]
        out.rehearsal += [(i, int(best_j[i])) for i in rehearsed]
        out.ppo += ppo
        out.clusters.append({
            "cluster": c, "size": len(members), "rehearsed": len(rehearsed), "ppo": len(ppo),
            "mean_score": float(scores[members].mean()), "mean_best": float(best[members].mean()),
            "mean_spread": float(spread[members].mean()),
            "rehearsed_mean_best": float(best[rehearsed].mean()) if rehearsed else None})
    return out
