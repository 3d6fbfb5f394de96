"""The memory model against a real train step: the bytes a rank holds for its trained role (weights,
Adam moments, gradients) as memory.py predicts them, vs the storage of the tensors TrainEngine keeps.

What is compared: per rank, the storage bytes of the local (FSDP-sharded) parameters + the AdamW state
(exp_avg, exp_avg_sq; the scalar step counters are left out) after an optimizer step, against the
model's resident bytes for a trained role (W/d x 12: fp32 weights + m + v), and the local gradients after
a backward against its gradient bytes (W/d x 4). Activations are not compared: on CPU there is no
allocator high-water mark to read (torch.cuda.max_memory_allocated has no CPU counterpart), and the
model's activation term is an estimate for flash attention kernels that the CPU path does not use.
Tolerance: 2% (FSDP pads shards to equal sizes: d x ceil(rows / d) rows)."""

import torch

from reflow.parallel.launch import launch
from reflow.planner.cost import placement
from reflow.planner.memory import GRAD_BYTES, MASTER_ADAM_BYTES, weight_elems
from reflow.planner.models import ModelShape


def _local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def train_step_bytes(rank: int, world: int, model_path: str) -> dict:
    from reflow.engines.train import TrainEngine
    from reflow.models.load import load_policy
    from reflow.parallel.context import ParallelContext
    from reflow.parallel.layout import Layout

    model = load_policy(model_path, "float32")
    ctx = ParallelContext(Layout(world, 1, 1), list(range(world))) if world > 1 else None
    engine = TrainEngine(model, lr=1e-3, parallel=ctx)
    ids = torch.randint(5, model.config.vocab_size, (2, 16))
    engine.model(ids).logits.float().log_softmax(-1).mean().backward()
    grads = sum(_local_bytes(p.grad) for p in engine.model.parameters() if p.grad is not None)
    engine.optimizer.step()
    params = sum(_local_bytes(p) for p in engine.model.parameters())
    state = sum(_local_bytes(v) for s in engine.optimizer.state.values() for k, v in s.items()
                if k != "step" and torch.is_tensor(v))
    return {"params": params, "state": state, "grads": grads}


def _predicted(model_path, world):
    from transformers import AutoConfig

    m = ModelShape.of(AutoConfig.from_pretrained(model_path), "lm", dtype_bytes=4)
    pl = placement(f"d{world}t1p1", range(world))
    return [weight_elems(m, pl, r, sharded=True) for r in range(world)]


def _check(measured: dict, elems: float):
    assert abs(measured["params"] + measured["state"] - elems * MASTER_ADAM_BYTES) <= 0.02 * elems * MASTER_ADAM_BYTES
    assert abs(measured["grads"] - elems * GRAD_BYTES) <= 0.02 * elems * GRAD_BYTES


def test_memory_model_matches_one_process_train_step(debug_model):
    _check(train_step_bytes(0, 1, str(debug_model)), _predicted(str(debug_model), 1)[0])


def test_memory_model_matches_fsdp_shards_per_rank(debug_model):
    results = launch(train_step_bytes, 2, args=(str(debug_model),))
    for r, elems in zip(results, _predicted(str(debug_model), 2)):
        _check(r, elems)
