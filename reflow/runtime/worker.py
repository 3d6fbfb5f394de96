"""A worker: one per device; holds the shards of every role the plan places on it and runs the graph's calls
on them. The same class serves both transports: a Ray actor per device in one torch.distributed world
(runtime.workers = N), or one plain object in the controller's process (runtime.workers = 0: no Ray, no
process group, every placement is rank 0 at d1t1p1 and needs no parallel context).

Per role it keeps the *owner copy*: for a trained role, the model under its train call's layout (FSDP2 +
tensor/pipeline parallel) with its optimizer; for a frozen role (ref, reward model), the model under its
first call's layout (data-parallel replicas). A call placed elsewhere (another layout or mesh), or one that
needs whole weights where the owner is sharded (generation, updates), gets a temporary copy built by
reallocation (reflow.realloc) and dropped after the call.

A LoRA role (lora.rank > 0) trains only its adapters on a frozen base, so a copy of it keeps its base between
calls: the first reallocation moves everything, later ones only the adapters. Its generate calls run on merged
weights built for the call (`lora.generate`); a call with option `adapters: off` (the reference on a LoRA
actor's weights) runs with the adapters switched off, i.e. on the base model.

Data: a call's output is a SampleBatch of its declared output fields (from the call's first rank; from
every replica of a generate call) or a dict of metrics; each rank of a consumer merges the parts of its
producers by sample id (`merge`). Every `run` also returns a small info dict (rank, seconds, metrics),
the only thing the controller fetches. `run_fused` runs the plan's fused pair of train calls as one
(runtime/fusion.py) and returns each call's output and info as `run` would.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from functools import cached_property
from pathlib import Path

import torch
import torch.distributed as dist

from reflow.data.batch import SampleBatch, nonfinite_samples
from reflow.data.sampler import seed_everything
from reflow.engines.train import NonFiniteError, TrainEngine
from reflow.models.ema import EMAWeights
from reflow.models.load import load_tokenizer
from reflow.models.lora import adapters_off, add_adapters, inject, merged_copy, trainable_names
from reflow.models.packing import attention_spec
from reflow.parallel.context import ParallelContext
from reflow.parallel.device import backend_for, place, resolve_device
from reflow.parallel.parallelize import parallelize
from reflow.parallel.shards import Sharding, param_shapes
from reflow.realloc.execute import group_for
from reflow.realloc.model import Offloaded, build_destination, reallocate_model
from reflow.realloc.plan import ReallocPlan, plan_reallocation
from reflow.rewards.registry import compute_rewards
from reflow.rewards.sandbox import RewardSandbox, open_reward
from reflow.runtime.calls import CallContext, get_call, get_stream
from reflow.runtime.checkpoint import load_ema, load_optimizer, save_role
from reflow.runtime.data import WorkerData
from reflow.runtime.graph import Call, Graph
from reflow.runtime.plan import Placement, Plan, needs_copy, placements
from reflow.runtime.roles import config_key, loader, role_config
from reflow.utils.checkpoint import checkpoint_name
from reflow.utils.failpoint import failpoint
from reflow.utils.host_memory import tune_host_allocator


def merge(parts: list[tuple[str, list[SampleBatch | None]]]) -> SampleBatch | None:
    """The outputs of a call's producers -> one batch. parts: (prefix, the parts one producer returned: None
    from ranks that return nothing, several when data-parallel replicas each returned theirs), producers in
    the graph's declaration order.

    The first producer's parts, concatenated in sample-id order, are the batch the call works on, its fields under
    their own names (so `reward_greedy`, whose first producer is the greedy rollout, reads `response`); every
    other producer adds its fields by sample id under its prefix (`greedy_score`). A part keyed by group (its
    ids are group ids of the batch, one row each: ReMax's greedy baseline) is spread over the samples of each
    group; a part with other ids is an error. Inputs are never modified (in one process they are shared)."""
    keyed = []
    for prefix, ps in parts:
        ps = sorted((p for p in ps if p is not None), key=lambda p: p.ids[0])
        if len(ps) > 1:
            # chunks of a streamed call hold samples in finish order: the batch is in id order whatever the
            # chunking, so a fused step computes on the same batch as an unfused one
            whole = SampleBatch.concat(ps)
            ps = [whole if whole.ids == sorted(whole.ids) else whole.select(sorted(whole.ids))]
        if ps:
            keyed.append((prefix, ps[0]))
    if not keyed:
        return None
    _, base = keyed[0]
    batch = SampleBatch(list(base.ids), base.seqlens, dict(base.tokens), dict(base.samples), dict(base.meta))
    for prefix, p in keyed[1:]:
        if p.ids != batch.ids and set(p.ids) != set(batch.ids):
            groups = set(batch.samples["group_id"].tolist()) if "group_id" in batch.samples else set()
            if "group_id" not in p.samples or not set(p.ids) <= groups or len(p.ids) != len(set(groups)):
                raise RuntimeError(f"merge: a part with ids {p.ids[:4]}... is neither this batch's samples nor one row "
                                 f"per group of it")
            rows = {g: i for i, g in enumerate(p.samples["group_id"].tolist())}
            where = torch.tensor([rows[g] for g in batch.samples["group_id"].tolist()])
            for k, v in p.samples.items():
                if k != "group_id":
                    batch.samples.setdefault(prefix + k, v[where])
            continue
        p = p.select(batch.ids) if p.ids != batch.ids else p
        for kind in ("tokens", "samples", "meta"):
            mine = getattr(batch, kind)
            for k, v in getattr(p, kind).items():
                mine.setdefault(prefix + k, v)
    return batch


def only_outputs(out: SampleBatch, call: Call) -> SampleBatch:
    """The call's declared output fields of a batch (what moves on to its consumers), and the group ids,
    by which a part keyed by group is spread over the samples of a consumer's batch."""
    keep = {*call.outputs, "group_id"}
    return SampleBatch(out.ids, out.seqlens, {k: v for k, v in out.tokens.items() if k in keep},
                       {k: v for k, v in out.samples.items() if k in keep},
                       {k: v for k, v in out.meta.items() if k in keep})


class Role:
    """One role on this worker: its owner copy (None off the owner's ranks) and how to build copies."""

    def __init__(self, name: str, path: str | None, owner: Placement, trained: bool, saved: bool):
        self.name, self.path, self.owner, self.trained, self.saved = name, path, owner, trained, saved
        self.model = self.engine = self.parked = self.ema = None
        self.sharding: Sharding | None = None
        self.model_cls = self.config = self.dtype = self.generation_config = None
        # LoRA: the PeftModel around the owner copy (None off the owner's ranks), its peft.LoraConfig, the
        # trained parameters' names; the role's other copies carry the same adapter layers
        self.peft = self.lora = None
        self.trainable: list[str] = []
        self.lora_generate = "merged"


class Worker:
    def __init__(self, rank: int, world_size: int, cfg, plan: Plan, graph: Graph, optimizer_steps: int,
                 resume: str | None = None):
        """Cheap: on Ray the controller first asks rank 0 for a rendezvous address on its own node
        (`endpoint`), then every worker joins the world and loads its shards (`start`). optimizer_steps: of the
        whole run, per trained role (the LR schedules' length)."""
        self._args = (rank, world_size, cfg, plan, graph, optimizer_steps, resume)

    def endpoint(self) -> tuple[str, int]:
        """An address and free port on this worker's node, for the torch.distributed rendezvous (rank 0
        hosts the store, so the address must be its node's, which on a cluster is not the controller's)."""
        import ray

        from reflow.parallel.launch import free_port

        return ray.util.get_node_ip_address(), free_port()

    def start(self, master_addr: str | None = None, master_port: int | None = None, nodes=None) -> dict:
        """Join the world (unless in one process: master_addr None) and load this rank's shards; returns
        {"rank", "node"}. nodes: the node of every rank
        (reallocation sends from a holder on the receivers' node first)."""
        rank, world_size, cfg, plan, graph, self.optimizer_steps, resume = self._args
        self.rank, self.world_size, self.cfg, self.plan, self.graph = rank, world_size, cfg, plan, graph
        rt = cfg.runtime
        self.device = resolve_device(rt.device)
        if self.device.type == "cpu" and rt.tune_host_allocator:
            tune_host_allocator()
        self.distributed = master_addr is not None
        if self.distributed:
            os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = master_addr, str(master_port)
            torch.set_num_threads(rt.threads_per_worker)
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend_for(self.device), rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=rt.timeout_s))
        self.resume = Path(resume) if resume else None
        if getattr(cfg, "algo", None) is not None and cfg.algo.graph:  # its file may register calls
            from reflow.runtime.graphs import load_user_graph

            load_user_graph(cfg.algo.graph)
        seed_everything(cfg.seed)
        first_path = role_config(cfg, "actor" if "actor" in graph.weight_roles() else graph.weight_roles()[0]).path
        self.tokenizer = load_tokenizer(first_path)
        self.data = WorkerData(cfg, self.tokenizer)
        self.placements = placements(plan, graph)
        self.calls = {c.name: c for c in [*graph.calls, *(graph.evals.calls if graph.evals else [])]}
        # the placement test first: reading reward_fn starts the sandbox's processes, on scoring workers only
        if any(rank in self.placements[c.name].ranks for c in self.calls.values() if c.impl == "score_fn") \
                and self.reward_fn is not None:
            # a broken reward function fails now, on the worker that runs it, before any generation
            first = self.data.train_prompts[0]
            if isinstance(self.reward_fn, RewardSandbox):
                self.reward_fn.probe(first.prompt_text, first.answer or "", first.answer)
            else:
                compute_rewards(self.reward_fn, [first.prompt_text], [first.answer or ""], [first.answer])
        # every placement's mesh, created by every worker in the same order (group creation is collective)
        self.ctx = {pl: (ParallelContext(pl.layout, list(pl.ranks), self.device.type) if self.distributed else None)
                    for pl in sorted(set(self.placements.values()), key=lambda p: (p.ranks, str(p.layout)))}
        updated = {c.role for c in self.calls.values() if c.kind == "update"}
        self.roles: dict[str, Role] = {}
        for role in graph.weight_roles():
            self.roles[role] = self._load_role(role, saved=role in graph.trained_roles() or role in updated)
        # reallocation plans, made once (the same move repeats every step), and their broadcast groups,
        # created in a fixed order on every worker
        # A LoRA role's copy keeps its frozen base weights between calls (`kept`, by role and placement): the
        # first reallocation moves everything, later ones only the adapters (`adapter_plan`).
        self.realloc: dict[str, tuple[Sharding, Sharding, ReallocPlan, ReallocPlan | None]] = {}
        for name in self.calls:
            shardings = self._realloc_for(name)
            if shardings is not None:
                plans = [plan_reallocation(*shardings, world_size=world_size, node_of=nodes)]
                role = self.roles[self.calls[name].weights]
                if role.lora is not None:
                    plans.append(plan_reallocation(*(s.only(role.trainable) for s in shardings),
                                                   world_size=world_size, node_of=nodes))
                self.realloc[name] = (*shardings, plans[0], plans[1] if len(plans) > 1 else None)
                for p_ in plans:
                    for sender, receivers in p_.buckets():
                        if len(receivers) > 1:
                            group_for(tuple(sorted((sender, *receivers))))
        self.kept: dict[tuple[str, Placement], torch.nn.Module | None] = {}
        self.streaming: dict[str, tuple] = {}  # call -> (weights, temporary) its chunks share (see _setup)
        self.timeline: list[dict] = []
        node = None
        if self.distributed:
            import ray

            node = ray.get_runtime_context().get_node_id()
        return {"rank": rank, "node": node}

    @cached_property
    def reward_fn(self):
        """reward.fn: a function in this process, or a RewardSandbox (reflow.rewards.sandbox) started on the
        first use, so only the workers that score start its processes; None without one."""
        reward = getattr(self.cfg, "reward", None)
        # a batch's retries stay well inside the hang limit of a call (runtime.timeout_s)
        budget = 0.75 * self.cfg.runtime.timeout_s
        return open_reward(reward, budget_s=budget) if reward is not None and reward.fn else None

    @cached_property
    def store(self):
        """A client of the world's rendezvous store, for what the ranks of a running call tell each other without a
        collective (long-tail migration: reflow/runtime/migrate.py); made on first use."""
        from reflow.runtime.migrate import rendezvous_store

        return rendezvous_store(self.cfg.runtime.timeout_s)

    @cached_property
    def process_reward(self):
        """The process reward model or function of reward.prm, loaded by the first call that needs it."""
        from reflow.models.load import load_reward_model
        from reflow.rewards.process import ProcessReward

        r = self.cfg.reward
        return ProcessReward(r.prm, refine_mode=r.prm_refine, eta=r.prm_eta, sep=r.prm_sep, coef=r.prm_coef,
                             load_model=load_reward_model,
                             load_fn=lambda spec: open_reward(r, spec, "process", budget_s=0.75 * self.cfg.runtime.timeout_s))

    # ------------------------------------------------------------------ roles and their weights
    def role_config(self, role: str):
        return role_config(self.cfg, role)

    def _load_role(self, role: str, saved: bool) -> Role:
        trained = role in self.graph.trained_roles()
        mcfg = role_config(self.cfg, role)
        lora = mcfg.lora if trained and mcfg.path and mcfg.lora.rank else None
        path = mcfg.path
        if self.resume is not None and saved and lora is None:
            path = str(self.resume / role)
        r = Role(role, path, self.plan.owner(self.graph, role), trained, saved)
        if r.path is None:  # a reward function: no weights
            return r
        model = loader(role)(r.path, mcfg.dtype)
        r.model_cls, r.config, r.dtype = type(model), model.config, next(model.parameters()).dtype
        r.generation_config = getattr(model, "generation_config", None)
        if lora is not None:  # the base from its folder, the adapters fresh or from the checkpoint (PEFT format)
            adapters = self.resume / role if self.resume is not None and saved else None
            r.peft = add_adapters(model, lora, key=f"{config_key(self.cfg, role)}.lora", base_path=r.path,
                                  adapter_dir=adapters)
            r.lora, r.trainable, r.lora_generate = r.peft.peft_config["default"], trainable_names(model), lora.generate
            r.sharding = Sharding.of(r.owner.layout, r.owner.ranks, param_shapes(model),
                                     model.config.num_hidden_layers, shard_data=trained)
        else:
            r.sharding = Sharding.of_model(model, r.owner.layout, r.owner.ranks, shard_data=trained)
        if self.rank not in r.owner.ranks:
            r.peft = None
            return r
        ctx = self.ctx[r.owner]
        model = place(model, self.device)
        if trained:
            o = mcfg.optim
            r.engine = TrainEngine(model, lr=o.lr, weight_decay=o.weight_decay, betas=o.betas, eps=o.eps,
                                   grad_clip=o.grad_clip, warmup_steps=o.warmup_steps, total_steps=self.optimizer_steps,
                                   schedule=o.schedule, min_lr_ratio=o.min_lr_ratio,
                                   micro_batch_tokens=mcfg.micro_batch_tokens, attention=attention_spec(mcfg),
                                   gradient_checkpointing=mcfg.gradient_checkpointing, precision=mcfg.precision,
                                   parallel=ctx, on_nonfinite=getattr(self.cfg, "trainer", self.cfg).on_nonfinite,
                                   pipeline_schedule=r.owner.schedule)
            r.model = r.engine.model
            if self.resume is not None:
                load_optimizer(r, r.engine, self.resume)
            decay = next((c.options["ema"] for c in self.calls.values()
                          if c.kind == "train" and c.role == role and c.options.get("ema") is not None), None)
            if decay is not None:  # the train call keeps an EMA of the weights it trains
                r.ema = EMAWeights(r.model, decay)
                if self.resume is not None:
                    load_ema(r, self.resume)
        else:
            r.model = parallelize(model.eval().requires_grad_(False), ctx, shard_data=False)
            if self.cfg.runtime.offload_frozen:
                r.parked = Offloaded(r.model)
                r.parked.offload()
        return r

    def _realloc_for(self, name: str) -> tuple[Sharding, Sharding] | None:
        """(owner sharding, call sharding) when the call needs a temporary copy of its weights' role."""
        call, pl = self.calls[name], self.placements[name]
        role = self.roles.get(call.weights)
        if role is None or role.sharding is None or not needs_copy(call.kind, pl, role.owner, role.trained):
            return None
        return role.sharding, Sharding.of(pl.layout, pl.ranks, role.sharding.shape_of, role.sharding.num_layers,
                                          shard_data=False)

    def _weights(self, name: str):
        """The model a call runs on, on this rank (a temporary reallocated copy, or the owner copy)."""
        role = self.roles.get(self.calls[name].weights)
        if role is None:
            return None, False
        if name not in self.realloc:
            if role.parked is not None:
                role.parked.reload()
            return role.model, False
        src, dst, plan, adapter_plan = self.realloc[name]
        key = (role.name, self.placements[name])
        if key in self.kept:  # a LoRA copy whose base is in place: only the adapters move
            dst_model, plan = self.kept[key], adapter_plan
        else:
            prepare = (lambda m: inject(m, role.lora)) if role.lora is not None else None
            dst_model = build_destination(role.model_cls, role.config, self.ctx[self.placements[name]],
                                          shard_data=False, dtype=role.dtype, device=self.device, prepare=prepare)
            if role.lora is not None:
                self.kept[key] = dst_model
        if role.parked is not None:
            role.parked.reload()
        reallocate_model(role.model, src, dst_model, dst, plan=plan)
        if role.parked is not None:
            role.parked.offload()
        return dst_model, True

    # ------------------------------------------------------------------ remote methods
    def send_weights(self, step: int, name: str) -> dict:
        """This rank holds part of the owner copy but is not on the call's mesh: it only sends."""
        t0 = time.time()
        if name in self.realloc:  # a role without weights (a reward function) has nothing to send
            role = self.roles[self.calls[name].weights]
            src, dst, plan, adapter_plan = self.realloc[name]
            key = (role.name, self.placements[name])
            if key in self.kept:  # the receivers keep the base weights: only the adapters move (see _weights)
                plan = adapter_plan
            elif role.lora is not None:
                self.kept[key] = None  # this rank only sends; the mark makes its next sends adapter-only too
            if role.parked is not None:
                role.parked.reload()
            reallocate_model(role.model, src, None, dst, plan=plan)
            if role.parked is not None:
                role.parked.offload()
        self._record(step, f"{name}:send_weights", t0)
        return {"rank": self.rank, "time": time.time() - t0}

    def _setup(self, step: int, name: str, meta: dict, refs) -> tuple:
        """What running call `name` on this rank needs: (call context, its input batch, the adapters' context,
        whether the weights are a temporary copy, when the call started, when the weights were ready). A chunk
        of a streamed call (meta["chunk"]) reuses the copy its first chunk built, until `end_stream`."""
        t0 = time.time()
        call = self.calls[name]
        ctx = self.ctx[self.placements[name]]
        chunk = meta.get("chunk")
        if chunk is not None and chunk > 0 and name in self.streaming:
            model, temporary = self.streaming[name]
            role = self.roles.get(call.weights)
            if not temporary and role is not None and role.parked is not None:
                role.parked.reload()  # a no-op unless another call on this rank parked it between chunks
        else:
            model, temporary = self._weights(name)
            if chunk is not None:
                self.streaming[name] = (model, temporary)
        t1 = time.time()
        if temporary and not chunk:
            self._record(step, f"{name}:reallocate", t0, t1)
        inputs, at = [], 0
        for prefix, n in meta.get("parts", []):
            inputs.append((prefix, list(refs[at:at + n])))
            at += n
        batch = merge(inputs)
        if batch is not None:
            batch = place(batch, "cpu")
        failpoint(f"call.{name}.r{self.rank}.s{step}")
        role = self.roles.get(call.weights)
        if model is not None and role is not None and role.lora is not None and call.kind == "generate" \
                and role.lora_generate == "merged":
            model = merged_copy(model)  # the call's copy: W + alpha/r B A, dropped after the call
        cc = CallContext(call, step, meta, model, ctx, self)
        adapters = adapters_off(model) if call.options.get("adapters") == "off" else contextlib.nullcontext()
        return cc, batch, adapters, temporary, t0, t1

    def _after(self, cc: CallContext, temporary: bool) -> None:
        """A frozen owner copy parked in host memory goes back there after its call (after the last chunk of a
        streamed call: `end_stream`)."""
        role = self.roles.get(cc.call.weights)
        if not temporary and role is not None and role.parked is not None and cc.meta.get("chunk") is None:
            role.parked.offload()

    def _implement(self, cc: CallContext, batch: SampleBatch | None, adapters):
        """The call's implementation on its batch; a non-finite loss names the step, call and samples."""
        try:
            with adapters:
                return get_call(cc.call.impl)(cc, batch)
        except NonFiniteError as e:
            raise NonFiniteError(f"step {cc.step}, call '{cc.call.name}': {e}; {nonfinite_samples(batch)}; "
                                 "trainer.on_nonfinite=skip skips such updates") from None

    def _finish(self, cc: CallContext, out, temporary: bool, t0: float, t1: float):
        """A call's (output, info) after its implementation returned `out`."""
        self._after(cc, temporary)
        cc.model = None  # a temporary copy lives for its call only (the owner copy stays referenced by its role)
        self._record(cc.step, cc.call.name, t1, chunk=cc.meta.get("chunk"))
        info = {"rank": self.rank, "time": time.time() - t0}
        if isinstance(out, dict):
            info["metrics"] = {**cc.metrics, **out}
            return None, info
        return self._output(out, cc.call, cc.ctx, info, cc.metrics)

    def run(self, step: int, name: str, meta: dict, *refs):
        """Run call `name` of step `step` on this rank -> (output, info). refs: the parts returned by the call's
        producers, in the order of meta["parts"] = [(prefix, count), ...] (Ray resolves them into batches)."""
        cc, batch, adapters, temporary, t0, t1 = self._setup(step, name, meta, refs)
        out = self._implement(cc, batch, adapters)
        return self._finish(cc, out, temporary, t0, t1)

    def run_fused(self, step: int, names: list[str], metas: list[dict], *refs):
        """Run the plan's fused pair of train calls as one (runtime/fusion.py) -> (output of each call, then the
        info of each), as `run` returns them for each; refs: the first call's parts, then the second's."""
        from reflow.runtime.fusion import FusedCalls

        t0 = time.time()
        at, prepared = 0, {}
        for name, meta in zip(names, metas):
            n = sum(c for _, c in meta.get("parts", []))
            prepared[name] = self._setup(step, name, meta, refs[at:at + n])
            at += n
        fused = FusedCalls(tuple(names), self.placements[names[0]].layout.p)
        for name, (cc, *_) in prepared.items():
            cc.stepper = fused.stepper(name, cc.role.engine)
        outs = fused.run({name: (lambda cc=cc, batch=batch, adapters=adapters: self._implement(cc, batch, adapters))
                          for name, (cc, batch, adapters, *_) in prepared.items()})
        # both calls span the fused call on the timeline (they ran interleaved), each with its own metrics; a
        # third slice marks the steps that ran fused
        if fused.fused_steps:
            self._record(step, f"{'+'.join(names)}:fused", t0)
        done = [self._finish(cc, outs[name], temporary, t0, t1)
                for name, (cc, _, _, temporary, _, t1) in prepared.items()]
        return (*[d for d, _ in done], *[i for _, i in done])

    def _output(self, out, call: Call, ctx, info: dict, metrics: dict | None = None):
        if metrics:
            info["metrics"] = metrics
        if out is not None and (call.kind == "generate" or ctx is None or ctx.index == 0):
            out = only_outputs(out, call)
            info["samples"] = len(out)
            return out, info
        return None, info

    def run_stream(self, step: int, name: str, meta: dict, *refs):
        """Run the streaming version of call `name` (a generate call, under fusion.inter_stage) on this rank:
        yields {"total": the samples this rank will return}, then, for each part of `meta["chunk_size"]` finished
        samples, a small marker {"chunk": k, "samples": n} and the part itself, and at the end the call's info. The controller
        fetches the markers and the info only; the parts go on to the consumers' workers."""
        cc, batch, adapters, temporary, t0, t1 = self._setup(step, name, {**meta, "chunk": None}, refs)
        call, ctx, k, since = cc.call, cc.ctx, 0, t1
        with adapters:
            total, parts = get_stream(call.impl)(cc, batch, meta["chunk_size"])
            yield {"total": total}
            for part in parts:
                part, _ = self._output(part, call, ctx, {})
                if part is not None:
                    self._record(step, name, since, chunk=k)
                    since = time.time()
                    yield {"chunk": k, "samples": len(part)}
                    yield part
                    failpoint(f"stream.{name}.r{self.rank}.s{step}.c{k}")  # after handing on chunk k
                    k += 1
        self._after(cc, temporary)
        metrics = cc.metrics
        del cc
        if k == 0:  # a rank that returned no part (a tensor-parallel peer): the call as one slice
            self._record(step, name, since)
        yield self._output(None, call, ctx, {"rank": self.rank, "time": time.time() - t0}, metrics)[1]

    def end_stream(self, name: str) -> dict:
        """The last chunk of the streamed call `name` has run: drop the weights copy its chunks shared, or park
        the frozen owner copy they ran on again."""
        _, temporary = self.streaming.pop(name, (None, True))
        role = self.roles.get(self.calls[name].weights)
        if not temporary and role is not None and role.parked is not None:
            role.parked.offload()
        return {"rank": self.rank, "time": 0.0}

    def save(self, ckpt: str, optimizer: bool = True, roles: list[str] | None = None) -> dict:
        """Write the saved roles whole (any plan, either transport, resumes from them); the owner ranks of each
        role take part. `optimizer=False`: weights only (the run's final/ folders); `roles`: only these."""
        t0 = time.time()
        for role in self.roles.values():
            if not (role.saved and role.model is not None and self.rank in role.owner.ranks):
                continue
            if roles is not None and role.name not in roles:
                continue
            if role.parked is not None:
                role.parked.reload()
            save_role(role, role.engine if optimizer else None, self.tokenizer, Path(ckpt))
            failpoint(f"save.{role.name}.r{self.rank}.{checkpoint_name(Path(ckpt))}")
            if role.ema is not None:
                save_role(role, None, self.tokenizer, Path(ckpt), ema=True)
            if role.parked is not None:
                role.parked.offload()
        return {"rank": self.rank, "time": time.time() - t0}

    def timeline_events(self) -> list[dict]:
        events, self.timeline = self.timeline, []
        return events

    def shutdown(self) -> None:
        for name in ("reward_fn", "process_reward"):  # sandbox processes, where started
            started = self.__dict__.pop(name, None)
            close = getattr(started, "close", None)
            if close is not None:
                close()
        if dist.is_initialized():
            dist.destroy_process_group()

    def _record(self, step: int, name: str, t0: float, t1: float | None = None, chunk: int | None = None,
                args: dict | None = None) -> None:
        """One slice of the timeline; `chunk`: the part of a streamed call it is (fusion.inter_stage); `args`:
        what else the slice shows (the trace's args)."""
        event = {"step": step, "name": name, "rank": self.rank, "start": t0, "end": t1 or time.time()}
        if chunk is not None:
            event["chunk"] = chunk
        if args:
            event["args"] = args
        self.timeline.append(event)

