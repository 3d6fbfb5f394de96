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
"""

from __future__ import annotations

import torch
import torch.distributed as dist

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
        for i in range(n):
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

    def sync_shared_grads(self) -> None:
        """Sum the gradients of the parameters every stage holds (embeddings, final norm, head)."""
        if self.p == 1:
            return
        for name, param in self.model.named_parameters():
            if self.owned(name) or not param.requires_grad:
                continue
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad, group=self.group)


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
