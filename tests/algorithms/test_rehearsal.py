"""Selective rehearsal's selection (reflow/algorithms/rehearsal.py): per cluster, the best-scored prompts are
rehearsed with their best response, the rest go to PPO widest spread first, with the counts asked for."""

import pytest
import torch

from reflow.algorithms.rehearsal import select

# 6 prompts in clusters 0, 1, 0, 1, 0, 0; 3 responses each
CLUSTERS = torch.tensor([0, 1, 0, 1, 0, 0])
SCORES = torch.tensor([[0.5, -0.5, 0.0],    # 0: best 0.5 (response 0), spread 1.0
                       [0.1, 0.2, 0.0],     # 1: best 0.2 (response 1), spread 0.2
                       [-0.1, 0.9, 0.3],    # 2: best 0.9 (response 1), spread 1.0
                       [-0.2, -0.1, -0.3],  # 3: best -0.1, spread 0.2
                       [0.0, 0.0, 0.0],     # 4: best 0.0, spread 0
                       [0.3, -1.0, 0.7]])   # 5: best 0.7 (response 2), spread 1.7


def test_each_cluster_rehearses_its_best_scored_prompts_with_their_best_response_best_first():
    s = select(CLUSTERS, SCORES, rehearse_per_cluster=2, ppo_per_cluster=None)
    assert s.rehearsal == [(2, 1), (5, 2), (1, 1)]  # cluster 0: 0.9, 0.7; cluster 1: 0.2 (-0.1 is not > 0)


def test_ppo_takes_every_prompt_not_rehearsed_widest_score_spread_first_per_cluster():
    s = select(CLUSTERS, SCORES, rehearse_per_cluster=2, ppo_per_cluster=None)
    assert s.ppo == [0, 4, 3]  # cluster 0: spreads 1.0, 0; cluster 1: the one left
    assert not set(s.ppo) & {i for i, _ in s.rehearsal}
    assert sorted(s.ppo + [i for i, _ in s.rehearsal]) == list(range(6))


def test_counts_per_cluster_cap_both_sets_and_the_summary_reports_them():
    s = select(CLUSTERS, SCORES, rehearse_per_cluster=1, ppo_per_cluster=1)
    assert s.rehearsal == [(2, 1), (1, 1)]
    assert s.ppo == [5, 3]  # cluster 0 after rehearsing 2: 5 has the widest spread (1.7)
    summary = {c["cluster"]: c for c in s.clusters}
    assert summary[0]["size"] == 4 and summary[0]["rehearsed"] == 1 and summary[0]["ppo"] == 1
    assert summary[1]["size"] == 2 and summary[1]["rehearsed"] == 1 and summary[1]["ppo"] == 1
    assert summary[0]["mean_best"] == pytest.approx((0.5 + 0.9 + 0.0 + 0.7) / 4)
    assert summary[1]["rehearsed_mean_best"] == pytest.approx(0.2)


def test_min_advantage_keeps_responses_not_better_than_the_threshold_out_of_rehearsal():
    assert select(CLUSTERS, SCORES, rehearse_per_cluster=5, ppo_per_cluster=None, min_advantage=0.6).rehearsal == \
        [(2, 1), (5, 2)]
    s = select(CLUSTERS, SCORES, rehearse_per_cluster=5, ppo_per_cluster=None, min_advantage=-1.0)
    assert len(s.rehearsal) == 6 and s.ppo == []


def test_ties_keep_prompt_order_so_the_selection_is_deterministic():
    s = select(torch.zeros(4, dtype=torch.long), torch.ones(4, 2), rehearse_per_cluster=2, ppo_per_cluster=None,
               min_advantage=0.0)
    assert s.rehearsal == [(0, 0), (1, 0)] and s.ppo == [2, 3]


def test_scores_of_another_shape_are_an_error():
    with pytest.raises(ValueError, match=r"\[N, n\]"):
        select(CLUSTERS, torch.zeros(6), rehearse_per_cluster=1, ppo_per_cluster=None)
