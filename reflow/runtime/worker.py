"""A worker: one per device, all in one torch.distributed world; holds the shards of every role the plan
places on it and runs calls on them (as a Ray actor, see controller.py; plain Python underneath).

Per role it keeps the *owner copy*: for a trained role, the model under its train call's layout (FSDP2 +
tensor/pipeline parallel) with its optimizer; for a frozen role (ref, reward model), the model under its
first call's layout (data-parallel replicas). A call placed elsewhere (another layout or mesh) gets a
temporary copy built by reallocation (reflow.realloc) and dropped after the call; generation always runs
on replicas (FSDP2 would all-gather on every decode step, and replicas decode different prompts).

Data: a call's output is the batch with its new fields, returned by the call's first rank (the others
return None); Ray moves it worker to worker. Every rank of a call first merges its inputs by sample id.
Collectives: every group (meshes, reallocation broadcasts) is created at start-up, in the same order on
every worker, so calls on disjoint meshes never need the whole world.
"""

from __future__ import annotations

import datetime
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from reflow.config.schema import RLConfig
from reflow.data.batch import SampleBatch
from reflow.data.datasets import load_prompts
from reflow.engines.generate import GenerationEngine, SamplingParams, sample_seed
from reflow.engines.infer import InferenceEngine
from reflow.engines.train import TrainEngine
from reflow.experiments.common import batch_from_generations, exact_match_accuracy, seed_everything
from reflow.models.load import load_critic, load_policy, load_reward_model, load_tokenizer
from reflow.parallel.context import ParallelContext
from reflow.parallel.parallelize import parallelize
from reflow.parallel.shards import Sharding
from reflow.realloc.execute import group_for
from reflow.realloc.model import Offloaded, build_destination, reallocate_model
from reflow.realloc.plan import ReallocPlan, plan_reallocation
from reflow.rewards.registry import compute_rewards, load_reward_fn
from reflow.runtime.checkpoint import load_optimizer, save_role
from reflow.runtime.graph import Graph
from reflow.runtime.graphs import graph_for
from reflow.runtime.math import StepMath
from reflow.runtime.plan import Placement, Plan, needs_copy

LOADERS = {"actor": load_policy, "ref": load_policy, "critic": load_critic, "reward": load_reward_model}


def merge(inputs: list[list[SampleBatch | None]]) -> SampleBatch:
    """Outputs of earlier calls -> one batch. inputs[k]: the parts key k's producer returned (None from
    ranks that return nothing; several parts when data-parallel replicas each returned theirs). The first
    key's parts, concatenated in id order, hold all samples; later keys add their new fields by sample id."""
    keyed = []
    for parts in inputs:
        parts = sorted((p for p in parts if p is not None), key=lambda p: p.ids[0])
        keyed.append(parts[0] if len(parts) == 1 else SampleBatch.concat(parts))
    batch = keyed[0]
    for p in keyed[1:]:
        p = p.select(batch.ids) if p.ids != batch.ids else p
        for k, v in p.tokens.items():
            batch.tokens.setdefault(k, v)
        for k, v in p.samples.items():
            batch.samples.setdefault(k, v)
    return batch


class Role:
    """One role on this worker: its owner copy (None off the owner's ranks) and how to build copies."""

    def __init__(self, name: str, path: str | None, owner: Placement, trained: bool):
        self.name, self.path, self.owner, self.trained = name, path, owner, trained
        self.model = self.engine = self.parked = None
        self.sharding: Sharding | None = None
        self.model_cls = self.config = self.dtype = None


class Worker:
    def __init__(self, rank: int, world_size: int, cfg: RLConfig, plan: Plan, timeout_s: float = 120.0,
                 threads: int = 1, resume: str | None = None, graph: Graph | None = None):
        """Cheap: the controller first asks rank 0 for a rendezvous address on its own node (`endpoint`),
        then every worker joins the world and loads its shards (`start`)."""
        self._args = (rank, world_size, cfg, plan, timeout_s, threads, resume, graph)

    def endpoint(self) -> tuple[str, int]:
        """An address and free port on this worker's node, for the torch.distributed rendezvous (rank 0
        hosts the store, so the address must be its node's, which on a cluster is not the controller's)."""
        import ray

        from reflow.parallel.launch import free_port

        return ray.util.get_node_ip_address(), free_port()

    def start(self, master_addr: str, master_port: int) -> int:
        rank, world_size, cfg, plan, timeout_s, threads, resume, graph = self._args
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = master_addr, str(master_port)
        torch.set_num_threads(threads)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(0)  # Ray gives each worker actor its own GPU
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
        self.rank, self.world_size, self.cfg, self.plan = rank, world_size, cfg, plan
        self.resume = Path(resume) if resume else None
        self.device_type = "cuda" if backend == "nccl" else "cpu"
        self.graph = graph or graph_for(cfg)  # the controller's graph: a user's own graph needs no registry here
        seed_everything(cfg.seed)
        self.tokenizer = load_tokenizer(cfg.actor.path)
        self.train_set, _ = load_prompts(cfg.data.train, self.tokenizer, max_prompt_len=cfg.data.max_prompt_len,
                                         on_bad_row=cfg.data.on_bad_row)
        self.reward_fn = load_reward_fn(cfg.reward.fn) if cfg.reward.fn else None
        # every placement's mesh, created by every worker in the same order (group creation is collective)
        self.ctx = {pl: ParallelContext(pl.layout, list(pl.ranks), self.device_type)
                    for pl in sorted(set(plan.calls.values()), key=lambda p: (p.ranks, str(p.layout)))}
        self.roles: dict[str, Role] = {}
        for role in self.graph.roles:
            self.roles[role] = self._load_role(role)
        # reallocation plans, made once (the same move repeats every step), and their broadcast groups,
        # created in a fixed order on every worker
        self.realloc: dict[str, tuple[Sharding, Sharding, ReallocPlan]] = {}
        for name in self.graph.order:
            shardings = self._realloc_for(name)
            if shardings is not None:
                plan_ = plan_reallocation(*shardings, world_size=world_size)
                self.realloc[name] = (*shardings, plan_)
                for sender, receivers in plan_.buckets():
                    if len(receivers) > 1:
                        group_for(tuple(sorted((sender, *receivers))))
        self.math = StepMath(cfg, has_ref="ref" in self.graph.roles)
        self.timeline: list[dict] = []
        return rank

    # ------------------------------------------------------------------ roles and their weights
    def _role_path(self, role: str) -> str | None:
        c = self.cfg
        if self.resume is not None and role in self.graph.trained_roles():
            return str(self.resume / role)
        return {"actor": c.actor.path, "ref": c.ref.path or c.actor.path, "critic": c.critic.path or c.actor.path,
                "reward": c.reward.model}[role]

    def _load_role(self, role: str) -> Role:
        trained = role in self.graph.trained_roles()
        r = Role(role, self._role_path(role), self.plan.owner(self.graph, role), trained)
        if r.path is None:  # a reward function: no weights
            return r
        ctx = self.ctx[r.owner]
        dtype = getattr(self.cfg, role).dtype if role != "reward" else "float32"
        model = LOADERS[role](r.path, dtype)
        r.model_cls, r.config, r.dtype = type(model), model.config, next(model.parameters()).dtype
        r.sharding = Sharding.of_model(model, r.owner.layout, r.owner.ranks, shard_data=trained)
        if ctx.index is None:
            return r
        if trained:
            mcfg = getattr(self.cfg, role)
            o, a = mcfg.optim, self.cfg.algo
            total = self.cfg.trainer.steps * a.ppo_epochs * a.mini_batches
            r.engine = TrainEngine(model, lr=o.lr, weight_decay=o.weight_decay, betas=o.betas, eps=o.eps,
                                   grad_clip=o.grad_clip, warmup_steps=o.warmup_steps, total_steps=total,
                                   schedule=o.schedule, min_lr_ratio=o.min_lr_ratio,
                                   micro_batch_tokens=mcfg.micro_batch_tokens, attention=mcfg.attention,
                                   gradient_checkpointing=mcfg.gradient_checkpointing, precision=mcfg.precision,
                                   parallel=ctx)
            r.model = r.engine.model
            if self.resume is not None:
                load_optimizer(r, r.engine, self.resume)
        else:
            r.model = parallelize(model.eval().requires_grad_(False), ctx, shard_data=False)
            if self.cfg.runtime.offload_frozen:
                r.parked = Offloaded(r.model)
                r.parked.offload()
        return r

    def _realloc_for(self, name: str) -> tuple[Sharding, Sharding] | None:
        """(owner sharding, call sharding) when the call needs a temporary copy of its role's weights."""
        call, pl = self.graph.call(name), self.plan.calls[name]
        role = self.roles[call.role]
        if role.sharding is None or not needs_copy(call.kind, pl, role.owner, role.trained):
            return None
        return role.sharding, Sharding.of(pl.layout, pl.ranks, role.sharding.shape_of, role.sharding.num_layers,
                                          shard_data=False)

    def _weights(self, name: str):
        """The model a call runs on, on this rank (a temporary reallocated copy, or the owner copy)."""
        call = self.graph.call(name)
        role = self.roles[call.role]
        if name not in self.realloc:
            if role.parked is not None:
                role.parked.reload()
            return role.model, False
        src, dst, plan = self.realloc[name]
        dst_model = build_destination(role.model_cls, role.config, self.ctx[self.plan.calls[name]], shard_data=False,
                                      dtype=role.dtype)
        if role.parked is not None:
            role.parked.reload()
        reallocate_model(role.model, src, dst_model, dst, plan=plan)
        if role.parked is not None:
            role.parked.offload()
        return dst_model, True

    # ------------------------------------------------------------------ remote methods
    def send_weights(self, step: int, name: str) -> None:
        """This rank holds part of the owner copy but is not on the call's mesh: it only sends."""
        t0 = time.time()
        if name not in self.realloc:  # a role without weights (a reward function): nothing to send
            return
        role = self.roles[self.graph.call(name).role]
        src, dst, plan = self.realloc[name]
        if role.parked is not None:
            role.parked.reload()
        reallocate_model(role.model, src, None, dst, plan=plan)
        if role.parked is not None:
            role.parked.offload()
        self._record(step, f"{name}:send_weights", t0)

    def run(self, step: int, name: str, meta: dict, *refs):
        """Run call `name` of step `step`. refs: the parts returned by the producers of its input keys, in
        key order (meta["parts"][k] of them for key k; Ray resolves them into batches here)."""
        t0 = time.time()
        call = self.graph.call(name)
        ctx = self.ctx[self.plan.calls[name]]
        model, temporary = self._weights(name)
        t1 = time.time()
        inputs, at = [], 0
        for n in meta.get("parts", []):
            inputs.append(list(refs[at:at + n]))
            at += n
        if call.kind == "generate":  # one part per replica (its first tensor-parallel rank returns it)
            out = self._generate(step, call, ctx, model, meta)
        else:  # the call's first rank returns the whole output
            out = (self._infer(call, ctx, model, merge(inputs), meta) if call.kind == "infer"
                   else self._train(call, ctx, merge(inputs), meta))
            out = out if ctx.index == 0 else None
        del model  # a temporary copy lives for its call only (the owner copy stays referenced by its role)
        if temporary:
            self._record(step, f"{name}:reallocate", t0, t1)
        elif self.roles[call.role].parked is not None:
            self.roles[call.role].parked.offload()
        self._record(step, name, t1)
        return out

    def save(self, ckpt: str) -> None:
        """Write the trained roles whole (any plan can resume from them); owner ranks of each role take part."""
        for role in self.roles.values():
            if role.trained and self.rank in role.owner.ranks:
                save_role(role, role.engine, self.tokenizer, Path(ckpt))

    def timeline_events(self) -> list[dict]:
        events, self.timeline = self.timeline, []
        return events

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------------ calls
    def _record(self, step: int, name: str, t0: float, t1: float | None = None) -> None:
        self.timeline.append({"step": step, "name": name, "rank": self.rank, "start": t0, "end": t1 or time.time()})

    def _generate(self, step: int, call, ctx, model, meta: dict) -> SampleBatch:
        greedy = bool(call.options.get("greedy"))
        n = 1 if greedy else self.cfg.rollout.n
        prompt_idx = meta["prompt_idx"]
        examples = [self.train_set[i] for i in prompt_idx for _ in range(n)]
        first_id = step * len(examples)
        groups = [first_id + j // n for j in range(len(examples))]
        # data-parallel replicas take contiguous shares; the keyed sampler makes samples independent of it
        d, k = ctx.layout.d, ctx.dp_rank
        size = -(-len(examples) // d)
        a, b = min(len(examples), k * size), min(len(examples), (k + 1) * size)
        r = self.cfg.rollout
        params = SamplingParams(r.max_new_tokens, greedy=True) if greedy else \
            SamplingParams(r.max_new_tokens, r.temperature, r.top_p, r.top_k)
        engine = GenerationEngine(model, [self.tokenizer.eos_token_id], self.tokenizer.pad_token_id, r.batch_size)
        gens = engine.generate([e.prompt_ids for e in examples[a:b]], params, None,
                               keys=list(range(first_id + a, first_id + b)),
                               seed=sample_seed(self.cfg.seed, step)) if b > a else []
        part = batch_from_generations(gens, examples[a:b], groups[a:b], first_id + a, self.tokenizer)
        return part if ctx.tp_rank == 0 and len(part) else None  # one part per replica

    def _infer(self, call, ctx, model, batch: SampleBatch, meta: dict) -> SampleBatch:
        cfg, role = self.cfg, call.role
        if role == "reward":
            if model is not None:
                scores = InferenceEngine(model, cfg.actor.micro_batch_tokens, parallel=ctx).scores(batch)
            else:
                scores = torch.tensor(compute_rewards(self.reward_fn, batch.meta["prompt"], batch.meta["response"],
                                                      batch.meta["answer"]), dtype=torch.float)
            if cfg.reward.clip is not None:
                scores = scores.clamp(-cfg.reward.clip, cfg.reward.clip)
            key = "baseline_score" if call.outputs == ("baseline_scores",) else "score"
            return batch.with_samples(**{key: scores})
        mcfg = getattr(cfg, role)
        engine = InferenceEngine(model, mcfg.micro_batch_tokens, mcfg.attention, parallel=ctx)
        if role == "critic":
            values, last_values = engine.values(batch)
            return batch.with_tokens(values=values).with_samples(last_values=last_values)
        logp = engine.logprobs(batch, cfg.rollout.temperature)[0]
        return batch.with_tokens(**{"ref_logprobs" if role == "ref" else "old_logprobs": logp})

    def _train(self, call, ctx, batch: SampleBatch, meta: dict) -> dict:
        role = self.roles[call.role]
        self.math.kl_value = meta["kl_coef"]
        if "baseline_score" in batch.samples and len(batch.samples["baseline_score"]) != len(batch):
            batch.samples["baseline_score"] = batch.samples["baseline_score"].repeat_interleave(self.cfg.rollout.n)
        batch = self.math.advantages(batch)
        if call.role == "critic":
            return self.math.train(role.engine, batch, self.math.critic_loss, "critic")
        metrics = self.math.train(role.engine, batch, self.math.actor_loss, "actor")
        scores, resp_len = batch.samples["score"], batch.samples["response_len"].float()
        metrics.update({
            "reward/mean": scores.mean().item(),
            "reward/std": scores.std().item() if len(scores) > 1 else 0.0,
            "accuracy": exact_match_accuracy(batch.meta["response"], batch.meta["answer"]),
            "response_len/mean": resp_len.mean().item(),
            "response_len/max": resp_len.max().item(),
            "truncated": batch.samples["truncated"].float().mean().item(),
            "samples": float(len(batch)),
            "gen_tokens": resp_len.sum().item(),
        })
        return metrics
