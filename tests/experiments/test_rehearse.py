"""`reflow rehearse` (reflow/experiments/rehearse.py): k-means on prompt embeddings, SFT responses ranked by the
advantage model, and the files PPO reads (ppo_prompts.jsonl as data.train, rehearsal.jsonl as rehearsal.data)."""

import json
import sys

import pytest
import torch

from reflow.cli import main
from reflow.config.loader import ConfigError
from reflow.experiments.rehearse import kmeans, policy_embeddings


def test_kmeans_puts_two_separated_blobs_in_two_clusters_the_same_way_every_time():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(10, 4, generator=g) * 0.1 + 5, torch.randn(10, 4, generator=g) * 0.1 - 5])
    labels = kmeans(x, 2, seed=0)
    assert len(set(labels[:10].tolist())) == 1 and len(set(labels[10:].tolist())) == 1 and labels[0] != labels[10]
    assert torch.equal(labels, kmeans(x, 2, seed=0))
    with pytest.raises(ConfigError, match="clusters=21"):
        kmeans(x, 21, seed=0)


def test_without_scikit_learn_kmeans_fails_with_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)
    with pytest.raises(ConfigError, match=r"pip install 'reflow\[rehearsal\]'"):
        kmeans(torch.zeros(3, 2), 2, seed=0)


def test_policy_embeddings_are_unit_mean_hidden_states_that_do_not_depend_on_the_other_prompts(debug_model):
    from reflow.models.load import load_policy

    model = load_policy(debug_model).eval()
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]
    together = policy_embeddings(model, prompts)
    alone = torch.cat([policy_embeddings(model, [p]) for p in prompts])
    assert together.shape == (3, model.config.hidden_size)
    assert torch.allclose(together.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(together, alone, atol=1e-5)


@pytest.fixture
def two_task_prompts(tmp_path):
    from reflow.data.tasks import write_task

    rows = []
    for task in ("addition", "reverse"):
        write_task(task, tmp_path / task, n_train=12, n_test=1, seed=0)
        rows += [{**json.loads(line), "task": task} for line in open(tmp_path / task / "train.jsonl")]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_reflow_rehearse_writes_ppo_prompts_a_rehearsal_set_and_a_summary_per_cluster(
        tmp_path, debug_model, two_task_prompts, capsys):
    from reflow.data.datasets import load_prompts, load_sft
    from reflow.models.load import load_tokenizer

    out = tmp_path / "rehearse"
    assert main(["rehearse", f"policy.path={debug_model}", f"am={debug_model}", f"data.train={two_task_prompts}",
                 f"output_dir={out}", "clusters=3", "samples_per_prompt=3", "max_new_tokens=4",
                 "rehearse_per_cluster=2", "ppo_per_cluster=3", "min_advantage=-1"]) == 0
    summary = json.loads((out / "clusters.json").read_text())
    assert summary["prompts"] == 24 and len(summary["clusters"]) == 3
    assert sum(c["size"] for c in summary["clusters"]) == 24
    for c in summary["clusters"]:
        assert c["rehearsed"] == min(2, c["size"]) and c["ppo"] == min(3, c["size"] - c["rehearsed"])
        assert sum(c["tasks"].values()) == c["size"]
    tok = load_tokenizer(debug_model)
    rehearsal = [json.loads(line) for line in open(out / "rehearsal.jsonl")]
    ppo = [json.loads(line) for line in open(out / "ppo_prompts.jsonl")]
    assert len(rehearsal) == summary["rehearsal_rows"] == sum(c["rehearsed"] for c in summary["clusters"])
    assert len(ppo) == summary["ppo_prompts"]
    assert not {r["prompt"] for r in rehearsal} & {r["prompt"] for r in ppo}
    for c in {r["cluster"] for r in rehearsal}:  # best first within a cluster
        adv = [r["advantage"] for r in rehearsal if r["cluster"] == c]
        assert adv == sorted(adv, reverse=True)
    assert all(r["task"] in ("addition", "reverse") and "answer" in r for r in ppo)
    assert len(load_sft(out / "rehearsal.jsonl", tok, max_len=512)[0]) == len(rehearsal)  # rehearsal.data reads it
    assert len(load_prompts(out / "ppo_prompts.jsonl", tok, max_prompt_len=64)[0]) == len(ppo)  # data.train too
    assert "3 clusters" in capsys.readouterr().out


def test_rehearse_config_errors_name_the_key_in_one_line(tmp_path, debug_model, two_task_prompts, capsys):
    assert main(["rehearse", f"policy.path={debug_model}", f"data.train={two_task_prompts}"]) == 2
    assert "am is required" in capsys.readouterr().err
    assert main(["rehearse", f"policy.path={debug_model}", f"am={debug_model}", f"data.train={two_task_prompts}",
                 "clusters=100", f"output_dir={tmp_path}/x"]) == 2
    err = capsys.readouterr().err
    assert "clusters=100" in err and len(err.strip().splitlines()) == 1
