"""Apply parallelism to a plain HF model, one function per kind, in a fixed order (torchtitan's style):

    PipelineStage(model, ...)    pipeline parallel (p > 1): the decoder-layer list rewritten into this rank's
                                 stage (pipeline.py): other stages' layers become parameter-free PassThrough
    apply_tp(model, tp_mesh)     DTensor tensor parallel: q/k/v and gate/up column-wise, o and down row-wise
    apply_fsdp(model, dp_mesh)   FSDP2 `fully_shard` per decoder layer, then the root
Tensor parallel and FSDP2 see only the layers the rank runs (`stage_layers`), so every layout dXtYpZ
combines the three: each pipeline stage is a d x t grid of ranks sharding that stage's layers.
`parallelize(..., shard_data=False)` leaves out FSDP2: data-parallel ranks then hold replicas (for
models that only run forward: generation and inference).
The model file knows nothing about parallelism: Llama/Qwen2 attention reshapes with `view(..., -1, head_dim)`,
so column-wise q/k/v projections leave each rank with its own heads and the module runs unchanged.
Embeddings, norms and the output head stay replicated across tensor-parallel ranks.
"""

from __future__ import annotations

import warnings

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    return model.base_model.layers


def layer_tp_plan() -> dict:
    return {
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(),
    }


def stage_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers this rank runs: all of them, or under pipeline parallel the stage's own layers,
    unwrapped from their Recv/Send wrappers (the PassThrough placeholders of other stages' layers left out)."""
    from reflow.parallel.pipeline import unwrap_layer

    return [layer for layer in map(unwrap_layer, decoder_layers(model)) if layer is not None]


def apply_tp(model: torch.nn.Module, tp_mesh: DeviceMesh) -> torch.nn.Module:
    if tp_mesh.size() == 1:
        return model
    for layer in stage_layers(model):
        parallelize_module(layer, tp_mesh, layer_tp_plan())
    return model


# The root returns its hidden-state tuple (views); reflow never modifies them in place, which is what
# this FSDP2 warning is about.
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


def apply_fsdp(model: torch.nn.Module, dp_mesh: DeviceMesh, reshard_after_forward: bool = True) -> torch.nn.Module:
    if dp_mesh.size() == 1:
        return model
    layers = stage_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
    # The root stays gathered after its forward: the engines apply the output head to the returned hidden
    # states themselves, after the root forward (see models/packing.py), and backward needs it right away.
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=False)
    # Losses are already sums divided by a global normaliser, so gradients must be summed, not averaged,
    # with plain SUM collectives (gloo has no PREMUL_SUM). Both settings are per FSDP unit: set each one.
    for unit in [*layers, model]:
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    return model


def parallelize(model: torch.nn.Module, ctx, shard_data: bool = True) -> torch.nn.Module:
    """The layout's parallelism on a plain model, in order: pipeline stage, tensor parallel, FSDP2 over data parallel.

    `shard_data=False`: the data-parallel ranks hold full replicas (no FSDP2) — for models that only run
    forward (generation, inference), where every data-parallel rank keeps its whole stage's weights.
    """
    if ctx is None:
        return model
    if ctx.layout.p > 1:
        from reflow.parallel.pipeline import PipelineStage

        # this rank's pipeline peers: the ranks with its data- and tensor-parallel coordinates, one per stage
        pp_mesh = ctx.sub_mesh("pp")
        model._reflow_stage = PipelineStage(model, ctx.pp_rank, ctx.layout.p, pp_mesh.mesh.flatten().tolist(),
                                            pp_mesh.get_group())
    apply_tp(model, ctx.sub_mesh("tp"))
    if shard_data:
        apply_fsdp(model, ctx.sub_mesh("dp"))
    return model
