"""Train engine: one optimizer step over a mini-batch, cut into micro-batches by a token budget.

    loss_fn(model, micro_batch, norm) -> (loss, stats)
The loss of a micro-batch is a sum divided by a mini-batch-wide normaliser (`norm`), so the
accumulated gradient equals the gradient of the mini-batch loss whatever the micro-batch cut; the
engine knows nothing about the algorithm, so any loss trains under it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from reflow.algorithms.aggregation import Norm  # noqa: F401  (re-exported: `from reflow.engines.train import Norm`)
from reflow.data.batch import SampleBatch
from reflow.parallel.context import equal_micro_batches
from reflow.parallel.device import place
from reflow.parallel.grad_norm import clip_grad_norm_
from reflow.models.packing import Attention, attention_spec, hidden_states, sharing_group_key
from reflow.parallel.parallelize import parallelize
from reflow.parallel.schedules import SCHEDULES, stage_order

log = logging.getLogger("reflow")


class NonFiniteError(ValueError):
    """A NaN / inf loss or gradient norm with on_nonfinite=stop; the update was not applied."""


def lr_lambda(schedule: str, warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Multiplier of the base LR at optimizer step s: linear warm-up, then constant / linear / cosine decay."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant" or total <= warmup:
            return 1.0
        frac = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return min_ratio + (1 - min_ratio) * (1 - frac)
        if schedule == "cosine":
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
        raise ValueError(f"unknown lr schedule '{schedule}'")

    return f


class TrainEngine:
    def __init__(self, model: torch.nn.Module, *, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999),
                 eps: float = 1e-8, grad_clip: float = 1.0, warmup_steps: int = 0, total_steps: int = 1,
                 schedule: str = "constant", min_lr_ratio: float = 0.0, micro_batch_tokens: int = 4096,
                 attention: Attention = "padded", gradient_checkpointing: bool = False, parallel=None,
                 precision: str = "fp32", on_nonfinite: str = "skip", pipeline_schedule: str = "1f1b"):
        """`parallel`: a ParallelContext; the model (a plain HF model) is then parallelized here under its layout.
        `precision`: "fp32", or "bf16" = mixed precision (forward and backward under bf16 autocast, fp32
        master weights, gradients and optimizer state).
        `on_nonfinite`: a NaN / inf loss statistic or gradient norm never reaches the weights: "skip" drops
        the update (no optimizer or LR-schedule step; reported as nonfinite_skipped = 1), "stop" raises
        NonFiniteError.
        `pipeline_schedule`: "1f1b" or "gpipe", the order of micro-batch forwards and backwards under a layout
        with p > 1 (parallel/schedules.py): the same gradients, 1F1B holds at most p micro-batches'
        activations instead of all of them."""
        if pipeline_schedule not in SCHEDULES:
            raise ValueError(f"pipeline schedule must be one of {', '.join(SCHEDULES)}, got {pipeline_schedule!r}")
        self.pipeline_schedule = pipeline_schedule
        if on_nonfinite not in ("skip", "stop"):
            raise ValueError(f"on_nonfinite must be 'skip' or 'stop', got {on_nonfinite!r}")
        self.on_nonfinite = on_nonfinite
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        self.precision = precision
        self.ctx = parallel
        self.model = parallelize(model, parallel)
        self.micro_batch_tokens = micro_batch_tokens
        self.attention = attention_spec(attention)
        self.grad_clip = grad_clip
        if gradient_checkpointing:
            model.gradient_checkpointing_enable()
            if not all(p.requires_grad for p in model.parameters()):
                # frozen embeddings (LoRA) give checkpointed layers inputs without grad, and a reentrant
                # checkpoint then returns no gradient for the adapters inside
                model.enable_input_require_grads()
        # no weight decay on norms and biases, as is usual for transformers
        decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=lr, betas=tuple(betas), eps=eps,
            # foreach kernels refuse lists that mix DTensor (sharded) and plain (replicated) parameters
            foreach=None if parallel is None else False)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(schedule, warmup_steps, total_steps, min_lr_ratio))

    def step(self, batch: SampleBatch, loss_fn, norm: Norm | None = None, group_key: str | None = None,
             extra: Sequence[tuple[SampleBatch, Callable, Norm]] = (), local: bool = False) -> dict[str, float]:
        """One optimizer step on `batch`; returns the summed loss stats, grad norm and LR.

        `group_key`: samples sharing it stay in one micro-batch (losses over pairs or groups).
        `extra`: further (batch, loss_fn, norm) terms whose gradients join the same step (PPO-ptx's SFT
        term); their stats are reported under their own names, their losses are not added to "loss".
        Under a layout, every rank passes the same whole mini-batch and takes its data-parallel share
        (or, with `local=True`, its share only, and the normaliser is summed over the data-parallel group).
        Stats are summed over the data-parallel group, so every rank returns the mini-batch's values.
        """
        self.model.train()
        totals: dict[str, float] = {}
        self._accumulate(batch, loss_fn, norm, group_key, totals, "loss", local)
        for b, fn, n in extra:
            self._accumulate(b, fn, n, None, totals, None, local)
        return self.finish_step(totals)

    def finish_step(self, totals: dict[str, float]) -> dict[str, float]:
        """After the backwards of a step: gradients synced and clipped, the optimizer step; returns the stats."""
        stage = getattr(self.model, "_reflow_stage", None)
        if stage is not None:  # shared parameters' gradients summed over stages; stats live on the last stage
            stage.sync_shared_grads()
            box = [totals]
            dist.broadcast_object_list(box, src=stage.ranks[-1], group=stage.group)
            totals = box[0]
        if self.ctx is not None and self.ctx.layout.d > 1 and totals:
            keys = sorted(totals)
            t = torch.tensor([totals[k] for k in keys], dtype=torch.float64)
            self.ctx.all_reduce(t, dim="dp")
            totals = dict(zip(keys, t.tolist()))
        grad_norm = clip_grad_norm_(self.model, self.grad_clip, self.ctx)
        totals["grad_norm"] = float(grad_norm)
        totals["lr"] = self.scheduler.get_last_lr()[0]
        # the loss stats and the norm are the same on every rank of the layout (summed / all-reduced above),
        # so every rank takes the same decision and no collective is left waiting
        bad = sorted(k for k, v in totals.items() if not math.isfinite(v))
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            if self.on_nonfinite == "stop":
                raise NonFiniteError("non-finite " + ", ".join(f"{k}={totals[k]}" for k in bad))
            log.warning("non-finite %s: update skipped (on_nonfinite=skip)", ", ".join(bad))
            totals["nonfinite_skipped"] = 1.0
            return totals
        totals["nonfinite_skipped"] = 0.0
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return totals

    def _accumulate(self, batch: SampleBatch, loss_fn, norm: Norm | None, group_key, totals: dict, loss_name,
                    local: bool = False) -> None:
        """Backward over the micro-batches of this rank's part of `batch` (gradients add up in .grad)."""
        norm, part, group_key, shared = self.norm_and_part(batch, norm, group_key, local)
        stage = getattr(self.model, "_reflow_stage", None)
        if stage is not None:
            mbs, forward = self.pipeline_forward(stage, part, loss_fn, norm, group_key, totals, loss_name, shared)
            stage.run(stage_order(self.pipeline_schedule, stage.stage, stage.p, len(mbs)), forward)
            return
        for mb, real in equal_micro_batches(self.ctx, part, self.micro_batch_tokens, group_key, shared):
            mb = self._on_device(mb)
            with self._autocast():
                loss, stats = loss_fn(self.model, mb, norm)
            if not real:  # padding micro-batch: runs FSDP's collectives, contributes nothing
                (loss * 0.0).backward()
                continue
            loss.backward()
            items = {loss_name: loss, **stats} if loss_name else stats
            for k, v in items.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)

    def norm_and_part(self, batch: SampleBatch, norm: Norm | None, group_key, local: bool):
        """(the loss normaliser of the whole mini-batch, this rank's part of the batch, the key its micro-batches
        keep whole, whether they share prompt prefixes). Under prefix sharing (the attention spec) groups stay
        whole in the data-parallel parts and micro-batches, and the token budget counts a prefix once."""
        if norm is None:
            mask = batch.tokens.get("action_mask")
            counts = torch.tensor([float(mask.sum()) if mask is not None else float(batch.num_tokens), float(len(batch))])
            if local and self.ctx is not None and self.ctx.layout.d > 1:
                self.ctx.all_reduce(counts, dim="dp")
            norm = Norm(tokens=float(counts[0]), samples=float(counts[1]))
        # an empty mask must not divide by zero; every other field (max_tokens, ...) is kept as given
        norm = dataclasses.replace(norm, tokens=max(norm.tokens, 1.0), samples=max(norm.samples, 1.0))
        parts = 1 if (local or self.ctx is None) else self.ctx.layout.d
        share = sharing_group_key(self.attention, batch, parts)
        group_key = group_key or share
        shared = share is not None and group_key == share  # the token budget counts a shared prefix once
        part = batch if (local or self.ctx is None) else self.ctx.local_part(batch, group_key)
        return norm, part, group_key, shared

    def _on_device(self, mb: SampleBatch) -> SampleBatch:
        """A micro-batch on the device of the weights (a no-op on CPU), so losses mix no devices."""
        device = next(self.model.parameters()).device
        return mb if device.type == "cpu" else place(mb, device)

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        device = "cuda" if next(self.model.parameters()).is_cuda else "cpu"
        return torch.autocast(device, dtype=torch.bfloat16)

    def pipeline_forward(self, stage, part, loss_fn, norm, group_key, totals, loss_name, shared: bool = False):
        """(micro-batches, forward): forward(j) runs micro-batch j's forward on this stage and returns its loss
        on the last stage (None elsewhere), adding its stats to `totals`; the stage's `run` (or a fused
        schedule) calls it in its order. `shared`: the micro-batches keep groups whole and their token budget
        counts a shared prefix once (norm_and_part says when)."""
        # the same count on every data-parallel rank (FSDP2 collectives); each stage of a data-parallel
        # rank holds the same part, so its stages agree on the micro-batches too
        mbs = equal_micro_batches(self.ctx, part, self.micro_batch_tokens, group_key, shared)

        def forward(j: int) -> torch.Tensor | None:
            mb, real = mbs[j]
            mb = self._on_device(mb)
            if not stage.is_last:  # runs this stage's layers and sends the activation on
                with self._autocast():
                    hidden_states(self.model, mb, self.attention)
                return None
            with self._autocast():
                loss, stats = loss_fn(self.model, mb, norm)
            if not real:  # padding micro-batch: runs the collectives, contributes nothing
                return loss * 0.0
            items = {loss_name: loss, **stats} if loss_name else stats
            for k, v in items.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
            return loss

        return mbs, forward

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
