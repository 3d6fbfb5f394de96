"""Pipeline parallel: a model's decoder layers split into p stages, activations sent stage to stage.

Each stage keeps the plain HF model object, so every forward path and loss function of the engines
runs unchanged; only its decoder-layer list is rewritten:

    stage s owns layers [a_s, b_s)        (layers split as evenly as possible)
    layers[i] for i < a_s or i >= b_s  -> PassThrough  (no parameters; returns its input)
    at a_s (s > 0)                      -> Recv: replaces the incoming hidden state with the one received
                                           from stage s-1 (shape = the shape of the local input), a leaf
                                           that requires grad, so backward yields the gradient to send back
    after b_s - 1 (s < p-1)             -> Send: ships the hidden state to stage s+1

Embeddings, the final norm and the output head (often tied to the embeddings) live on every stage;
their gradients are summed over the pipeline group after backward, so all copies stay identical.

Schedule (GPipe): all micro-batches forward, then all backward in the same order. Stage s (not last)
receives the gradient of what it sent, backpropagates it, and sends its Recv leaf's gradient back.

With data and tensor parallel (any dXtYpZ): the stage is built first, on the ranks of this rank's
pipeline sub-mesh (the ranks sharing its data- and tensor-parallel coordinates, one per stage), so every
(dp, tp) coordinate runs its own pipeline and sends activations only to its peers. Then tensor parallel
and FSDP2 apply to the stage's own layers (unwrapped from Recv/Send: `unwrap_layer`) and the root, as
without pipeline (parallelize.py). Activations between stages are plain tensors, replicated over the
tensor-parallel ranks. Data-parallel peers run the same number of micro-batches (the engines pad with
zero-weighted ones), as every stage's FSDP2 collectives need. Under FSDP2 the GPipe backward keeps the
parameters unsharded and the gradients unreduced until the last micro-batch, whose backward
reduce-scatters their sum; the shared parameters' gradients are then data-parallel shards (DTensors),
and `sync_shared_grads` sums the local shards over the pipeline group (every stage's rank with the same
data-parallel coordinate holds the same shard).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from reflow.parallel.parallelize import decoder_layers


def stage_bounds(num_layers: int, p: int, stage: int) -> tuple[int, int]:
    """[a, b) layers of `stage` when num_layers are split into p nearly equal contiguous stages."""
    base, extra = divmod(num_layers, p)
    a = stage * base + min(stage, extra)
    return a, a + base + (1 if stage < extra else 0)


def send_activation(x: torch.Tensor, dst: int, group) -> None:
    """Shape header, then the data: the receiver checks the shape instead of aborting inside gloo."""
    dist.send(torch.tensor(list(x.shape) + [0] * (4 - x.dim()), dtype=torch.long), dst=dst, group=group)
    dist.send(x.detach().contiguous(), dst=dst, group=group)


def recv_activation(like: torch.Tensor, src: int, group) -> torch.Tensor:
    header = torch.empty(4, dtype=torch.long)
    dist.recv(header, src=src, group=group)
    shape = tuple(int(v) for v in header[: like.dim()])
    buf = torch.empty(shape, dtype=like.dtype, device=like.device)
    dist.recv(buf, src=src, group=group)
    if shape != tuple(like.shape):
        raise ValueError(f"pipeline stage received activations of shape {shape} from rank {src} but its own forward "
                         f"has shape {tuple(like.shape)}: every stage must use the same micro-batches and attention "
                         "layout (the loss function's `layout` must equal the engine's)")
    return buf


def unwrap_layer(module: torch.nn.Module) -> torch.nn.Module | None:
    """The decoder layer inside a stage's layer-list entry (None for another stage's PassThrough)."""
    if isinstance(module, PassThrough):
        return None
    if isinstance(module, _RecvSend):
        return module.recv_mod.layer
    if isinstance(module, (Recv, Send)):
        return module.layer
    return module


class PassThrough(torch.nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class Recv(torch.nn.Module):
    """Swaps in the activation of the previous stage (and remembers it for backward)."""

    def __init__(self, layer: torch.nn.Module, src: int, group):
        super().__init__()
        self.layer, self.src, self.group = layer, src, group
        self.received: list[torch.Tensor] = []

    def forward(self, hidden_states, *args, **kwargs):
        buf = recv_activation(hidden_states, self.src, self.group)
        buf.requires_grad_(torch.is_grad_enabled())
        self.received.append(buf)
        return self.layer(buf, *args, **kwargs)


class Send(torch.nn.Module):
    """Runs the stage's last layer, ships its output to the next stage (and remembers it for backward)."""

    def __init__(self, layer: torch.nn.Module, dst: int, group):
        super().__init__()
        self.layer, self.dst, self.group = layer, dst, group
        self.sent: list[torch.Tensor] = []

    def forward(self, hidden_states, *args, **kwargs):
        out = self.layer(hidden_states, *args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        send_activation(out, self.dst, self.group)
        self.sent.append(out)
        return out


class PipelineStage:
    """Rewrites `model` in place into pipeline stage `stage` of `p`; `ranks[s]` is the global rank of stage s."""

    def __init__(self, model: torch.nn.Module, stage: int, p: int, ranks: list[int], group=None):
        self.model, self.stage, self.p, self.ranks, self.group = model, stage, p, ranks, group
        layers = decoder_layers(model)
        n = len(layers)
        self.a, self.b = stage_bounds(n, p, stage)
        self.recv = self.send = None
        for i in range(n):
            if not self.a <= i < self.b:
                layers[i] = PassThrough()
        if stage > 0:
            self.recv = layers[self.a] = Recv(layers[self.a], ranks[stage - 1], group)
        if stage < p - 1:
            last = layers[self.b - 1]
            self.send = layers[self.b - 1] = Send(last, ranks[stage + 1], group) if not isinstance(last, Recv) \
                else _RecvSend(last, ranks[stage + 1], group)
            if isinstance(self.send, _RecvSend):
                self.recv = self.send

    @property
    def is_last(self) -> bool:
        return self.stage == self.p - 1

    def owned(self, name: str) -> bool:
        """Whether parameter `name` belongs to this stage's layers (else it is shared by all stages)."""
        return ".layers." in f".{name}"

    def reset(self) -> None:
        for m in (self.recv, self.send):
            if m is not None:
                getattr(m, "received", []).clear()
                getattr(m, "sent", []).clear()

    def backward(self, losses: list[torch.Tensor]) -> None:
        """GPipe backward over the micro-batches of the last forward pass (in forward order)."""
        n = len(self.send.sent) if self.send is not None else len(losses)
        fsdp = self.model if isinstance(self.model, FSDPModule) else None
        for i in range(n):
            if fsdp is not None:
                # FSDP2 under GPipe: all forwards ran before the first backward, and the output head (applied
                # by the engines outside the root's forward) needs the root's unsharded weights in every
                # backward; so parameters stay unsharded and gradients accumulate unreduced until the last
                # micro-batch, whose backward reduce-scatters the sum and reshards (as torch's pipelining does)
                last = i == n - 1
                fsdp.set_requires_gradient_sync(last)
                fsdp.set_reshard_after_backward(last)
                fsdp.set_is_last_backward(last)
            if self.is_last:
                losses[i].backward()
            else:
                out = self.send.sent[i]
                grad = torch.empty_like(out)
                dist.recv(grad, src=self.ranks[self.stage + 1], group=self.group)
                torch.autograd.backward(out, grad)
            if self.stage > 0:
                leaf = self.recv.received[i]
                g = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
                dist.send(g.contiguous(), dst=self.ranks[self.stage - 1], group=self.group)
        self.reset()

    @torch.no_grad()
    def sync_shared_grads(self) -> None:
        """Sum the gradients of the parameters every stage holds (embeddings, final norm, head).

        Under FSDP2 these are DTensors sharded over the data-parallel group: every stage's rank with the
        same data-parallel coordinate holds the same shard, so the local shards are summed."""
        if self.p == 1:
            return
        for name, param in self.model.named_parameters():
            if self.owned(name) or not param.requires_grad:
                continue
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            g = param.grad
            dist.all_reduce(g.to_local() if isinstance(g, DTensor) else g, group=self.group)


class _RecvSend(torch.nn.Module):
    """A middle stage of a single layer: receive, run the layer, send."""

    def __init__(self, recv: Recv, dst: int, group):
        super().__init__()
        self.recv_mod, self.dst, self.group = recv, dst, group
        self.sent: list[torch.Tensor] = []

    @property
    def received(self):
        return self.recv_mod.received

    def forward(self, hidden_states, *args, **kwargs):
        out = self.recv_mod(hidden_states, *args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        send_activation(out, self.dst, self.group)
        self.sent.append(out)
        return out
