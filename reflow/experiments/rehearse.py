"""`reflow rehearse`: the data of selective rehearsal (Peng et al. 2023), made once before PPO.

    prompts (data.train) -> embeddings [N, H] -> k-means clusters [N] -> n SFT responses per prompt
        -> AM scores [N, n] -> select (reflow/algorithms/rehearsal.py) -> output_dir/
            ppo_prompts.jsonl  {"prompt", "answer", "cluster", ...the row's other columns}   data.train of PPO
            rehearsal.jsonl    {"prompt", "response", "advantage", "cluster", ...}            rehearsal.data of PPO
            clusters.json      per cluster: size, counts selected, mean / best / spread of the AM scores,
                               and the tasks of its prompts (a `task` column, where given)

Embeddings: the SFT policy's final hidden state averaged over the prompt's tokens (the paper uses SimCSE
sentence embeddings; `embedder=FOLDER` takes such a model: any HF encoder, mean-pooled over the tokens),
L2-normalised, so k-means on them clusters by cosine similarity as SimCSE's embeddings are compared.
k-means is scikit-learn's (k-means++, n_init=10, seeded). Sampling is keyed on (seed, prompt, sample), so
the same config selects the same data. This runs in one process: it is a pass over the data, not training.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from pathlib import Path

import torch

from reflow.algorithms.rehearsal import select
from reflow.config.loader import ConfigError, load_config, save_config, to_dict
from reflow.config.schema import RehearseConfig, RehearseSelection
from reflow.data.batch import SampleBatch
from reflow.data.datasets import load_prompts
from reflow.engines.generate import GenerationEngine, SamplingParams, sample_seed
from reflow.engines.infer import InferenceEngine
from reflow.engines.rollout import decode_response
from reflow.models.load import (advantage_model_info, check_model_dir, check_same_tokenizer, load_policy,
                                load_reward_model, load_tokenizer)
from reflow.models.packing import hidden_states

log = logging.getLogger("reflow")


def kmeans(embeddings: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """[N] cluster of each row of embeddings [N, H] (scikit-learn's KMeans, k-means++ with 10 restarts)."""
    KMeans = _sklearn_kmeans()
    if k > len(embeddings):
        raise ConfigError(f"clusters={k} is more than the {len(embeddings)} prompts; lower clusters")
    labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(embeddings.double().numpy())
    return torch.as_tensor(labels, dtype=torch.long)


def _sklearn_kmeans():
    try:
        from sklearn.cluster import KMeans
    except ImportError:
        raise ConfigError("reflow rehearse clusters prompts with scikit-learn's k-means: pip install "
                          "'reflow[rehearsal]'") from None
    return KMeans


def policy_embeddings(model, prompt_ids: list[list[int]], micro_batch: int = 64) -> torch.Tensor:
    """[N, H] mean over each prompt's tokens of the model's final hidden states, L2-normalised."""
    out = []
    with torch.no_grad():
        for a in range(0, len(prompt_ids), micro_batch):
            part = prompt_ids[a:a + micro_batch]
            b = SampleBatch.from_sequences(range(len(part)), {"input_ids": [torch.tensor(p) for p in part]})
            h = hidden_states(model, b, "padded").float()  # [T, H]
            sums = torch.zeros(len(part), h.shape[1]).index_add_(0, b.sample_index(), h.cpu())
            out.append(sums / b.seqlens[:, None].float())
    return torch.nn.functional.normalize(torch.cat(out), dim=1)


def encoder_embeddings(folder: str, texts: list[str], micro_batch: int = 64) -> torch.Tensor:
    """[N, H] a sentence-embedding model's last hidden states mean-pooled over each text's tokens, L2-normalised."""
    from transformers import AutoModel, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    out = []
    with torch.no_grad():
        for a in range(0, len(texts), micro_batch):
            enc = tok(texts[a:a + micro_batch], padding=True, return_tensors="pt")
            h = model(**enc).last_hidden_state.float()
            m = enc["attention_mask"][..., None].float()
            out.append((h * m).sum(1) / m.sum(1))
    return torch.nn.functional.normalize(torch.cat(out), dim=1)


def sample_and_score(cfg: RehearseConfig, policy, am, tok, prompt_ids: list[list[int]]):
    """n responses per prompt from the SFT policy and their AM scores -> (responses [N][n] token lists,
    scores [N, n])."""
    n = cfg.samples_per_prompt
    flat = [p for p in prompt_ids for _ in range(n)]
    engine = GenerationEngine(policy, [tok.eos_token_id], tok.pad_token_id, cfg.batch_size)
    gens = engine.generate(flat, SamplingParams(cfg.max_new_tokens, cfg.temperature), keys=range(len(flat)),
                           seed=sample_seed(cfg.seed, 0))
    batch = SampleBatch.from_sequences(range(len(gens)), {"input_ids": [torch.tensor(g.prompt_ids + g.tokens)
                                                                        for g in gens]})
    scores = InferenceEngine(am).scores(batch)
    responses = [[gens[i * n + j].tokens for j in range(n)] for i in range(len(prompt_ids))]
    return responses, scores.view(len(prompt_ids), n)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def run_rehearse(cfg: RehearseConfig) -> dict:
    """The whole pass (module docstring); returns the summary written to clusters.json."""
    _sklearn_kmeans()  # a missing extra fails before any model loads
    check_model_dir(cfg.policy.path, "policy.path")
    check_model_dir(cfg.am, "am")
    tok = load_tokenizer(cfg.policy.path)
    check_same_tokenizer(tok, "policy.path", cfg.policy.path, {"am": cfg.am})
    if cfg.embedder is not None:
        check_model_dir(cfg.embedder, "embedder")
    prompts, skipped = load_prompts(cfg.data.train, tok, max_prompt_len=cfg.data.max_prompt_len,
                                    on_bad_row=cfg.data.on_bad_row)
    if cfg.clusters > len(prompts):
        raise ConfigError(f"clusters={cfg.clusters} is more than the {len(prompts)} prompts of {cfg.data.train}; "
                          "lower clusters")
    if advantage_model_info(cfg.am) is None:
        log.warning("am '%s' has no advantage_model.json: a plain reward model ranks the responses", cfg.am)
    torch.manual_seed(cfg.seed)
    policy = load_policy(cfg.policy.path, cfg.policy.dtype).eval()
    ids = [p.prompt_ids for p in prompts]
    emb = (encoder_embeddings(cfg.embedder, [p.prompt_text for p in prompts]) if cfg.embedder
           else policy_embeddings(policy, ids))
    clusters = kmeans(emb, cfg.clusters, cfg.seed)
    responses, scores = sample_and_score(cfg, policy, load_reward_model(cfg.am).eval(), tok, ids)
    sel = select(clusters, scores, rehearse_per_cluster=cfg.rehearse_per_cluster, ppo_per_cluster=cfg.ppo_per_cluster,
                 min_advantage=cfg.min_advantage)

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")

    def row(i: int) -> dict:
        p = prompts[i]
        return {"prompt": p.prompt_text, **({"answer": p.answer} if p.answer is not None else {}), **p.meta,
                "cluster": int(clusters[i])}

    _write_jsonl(out / "ppo_prompts.jsonl", [row(i) for i in sel.ppo])
    _write_jsonl(out / "rehearsal.jsonl", [{**row(i), "response": decode_response(tok, responses[i][j]),
                                            "advantage": float(scores[i, j])} for i, j in sel.rehearsal])
    for c in sel.clusters:
        tasks: dict[str, int] = {}
        for i in (clusters == c["cluster"]).nonzero(as_tuple=True)[0].tolist():
            t = str(prompts[i].meta.get("task", "all"))
            tasks[t] = tasks.get(t, 0) + 1
        c["tasks"] = tasks
    summary = {"prompts": len(prompts), "skipped_rows": skipped, "ppo_prompts": len(sel.ppo),
               "rehearsal_rows": len(sel.rehearsal), "clusters": sel.clusters}
    (out / "clusters.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def select_in_train(cfg) -> dict | None:
    """`rehearsal.select` of an RL config: run the selection with the actor as the SFT policy and data.train's
    prompts into output_dir/rehearse/ (or reuse what an earlier start of the same run wrote there with the same
    settings: a resumed run trains on the same data), then point data.train at its PPO prompts and
    rehearsal.data at its rehearsal set, and clear `select`, so the config the run saves records the files
    it trained on. Returns the selection's summary (None without `select`)."""
    sel: RehearseSelection | None = cfg.rehearsal.select
    if sel is None:
        return None
    out = Path(cfg.output_dir) / "rehearse"
    rcfg = RehearseConfig(**{f.name: getattr(sel, f.name) for f in dataclasses.fields(RehearseSelection)},
                          output_dir=str(out), seed=cfg.seed, policy=copy.deepcopy(cfg.actor),
                          data=copy.deepcopy(cfg.data))
    rcfg.validate()
    done = out / "clusters.json"
    if done.is_file() and (out / "config.yaml").is_file() and \
            to_dict(load_config(RehearseConfig, out / "config.yaml")) == to_dict(rcfg):
        summary = json.loads(done.read_text())
        log.info("rehearsal.select: reusing %s (%d PPO prompts, %d rehearsal rows)", out, summary["ppo_prompts"],
                 summary["rehearsal_rows"])
    else:
        done.unlink(missing_ok=True)  # a half-written or different selection is made again
        summary = run_rehearse(rcfg)
        log.info("rehearsal.select: %d prompts in %d clusters -> %d PPO prompts, %d rehearsal rows (%s)",
                 summary["prompts"], len(summary["clusters"]), summary["ppo_prompts"], summary["rehearsal_rows"], out)
    if not summary["ppo_prompts"] or not summary["rehearsal_rows"]:
        raise ConfigError(f"rehearsal.select chose {summary['ppo_prompts']} PPO prompts and {summary['rehearsal_rows']} "
                          f"rehearsal rows ({out}/clusters.json); lower rehearsal.select.min_advantage or change "
                          "rehearse_per_cluster / ppo_per_cluster")
    cfg.data.train = str(out / "ppo_prompts.jsonl")
    cfg.rehearsal.data = str(out / "rehearsal.jsonl")
    cfg.rehearsal.select = None
    return summary
