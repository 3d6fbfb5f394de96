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

Schedule: the engine runs the stage's forwards and backwards in the order of `schedules.stage_order` (GPipe or
1F1B); `hold` keeps what a forward leaves for its backward (the Recv leaf, the sent activation, the loss), and
`backward_one` runs one micro-batch's backward and drops them. Stage s (not last) receives the gradient of
what it sent, backpropagates it, and sends its Recv leaf's gradient back. Sends are `isend`s (an `Outbox`
waits for them at the end of the step), receives block: so no order of the schedules can deadlock two
stages that both send (1F1B's steady state sends an activation while the next stage sends a gradient).

With data and tensor parallel (any dXtYpZ): the stage is built first, on the ranks of this rank's
pipeline sub-mesh (the ranks sharing its data- and tensor-parallel coordinates, one per stage), so every
(dp, tp) coordinate runs its own pipeline and sends activations only to its peers. Then tensor parallel
and FSDP2 apply to the stage's own layers (unwrapped from Recv/Send: `unwrap_layer`) and the root, as
without pipeline (parallelize.py). Activations between stages are plain tensors, replicated over the
tensor-parallel ranks. Data-parallel peers run the same number of micro-batches (the engines pad with
zero-weighted ones), as every stage's FSDP2 collectives need. Under FSDP2 the backwards (either schedule) keep the
parameters unsharded and the gradients unreduced until the last micro-batch, whose backward
reduce-scatters their sum; the shared parameters' gradients are then data-parallel shards (DTensors),
and `sync_shared_grads` sums the local shards over the pipeline group (every stage's rank with the same
data-parallel coordinate holds the same shard).
"""

from __future__ import annotations

import time
import zlib

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


class Outbox:
    """Sends that do not wait for the receiver (`isend`); each tensor is kept alive until its send completes."""

    def __init__(self, tag: int = 0):
        self.tag = tag
        self.pending: list[tuple[dist.Work, torch.Tensor]] = []

    def send(self, x: torch.Tensor, dst: int, group) -> None:
        x = x.detach().contiguous()
        self.pending = [(w, t) for w, t in self.pending if not w.is_completed()]
        self.pending.append((dist.isend(x, dst=dst, group=group, tag=self.tag), x))

    def wait(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending.clear()


def send_activation(x: torch.Tensor, dst: int, group, outbox: Outbox) -> None:
    """Shape header, then the data: the receiver checks the shape instead of aborting inside gloo."""
    outbox.send(torch.tensor(list(x.shape) + [0] * (4 - x.dim()), dtype=torch.long), dst, group)
    outbox.send(x, dst, group)


def recv_activation(like: torch.Tensor, src: int, group, tag: int = 0) -> torch.Tensor:
    header = torch.empty(4, dtype=torch.long)
    dist.recv(header, src=src, group=group, tag=tag)
    shape = tuple(int(v) for v in header[: like.dim()])
    buf = torch.empty(shape, dtype=like.dtype, device=like.device)
    dist.recv(buf, src=src, group=group, tag=tag)
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

    def __init__(self, layer: torch.nn.Module, src: int, group, tag: int = 0):
        super().__init__()
        self.layer, self.src, self.group, self.tag = layer, src, group, tag
        self.received: list[torch.Tensor] = []
        self.waited_s = 0.0  # time blocked in receives (the stage's idle time: its bubble)

    def forward(self, hidden_states, *args, **kwargs):
        t0 = time.perf_counter()
        buf = recv_activation(hidden_states, self.src, self.group, self.tag)
        self.waited_s += time.perf_counter() - t0
        buf.requires_grad_(torch.is_grad_enabled())
        self.received.append(buf)
        return self.layer(buf, *args, **kwargs)


class Send(torch.nn.Module):
    """Runs the stage's last layer, ships its output to the next stage (and remembers it for backward)."""

    def __init__(self, layer: torch.nn.Module, dst: int, group, outbox: Outbox):
        super().__init__()
        self.layer, self.dst, self.group, self.outbox = layer, dst, group, outbox
        self.sent: list[torch.Tensor] = []

    def forward(self, hidden_states, *args, **kwargs):
        out = self.layer(hidden_states, *args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        send_activation(out, self.dst, self.group, self.outbox)
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
        # the pipeline's own message tag: two pipelines over the same ranks in different orders (a fused
        # actor and critic) interleave their messages between the same two ranks
        self.tag = zlib.crc32(repr(list(ranks)).encode()) % (1 << 24)
        self.outbox = Outbox(self.tag)
        # micro-batch -> (Recv leaf, sent activation, loss): what its backward needs, dropped by that backward
        self.held: dict[int, tuple] = {}
        self.peak_in_flight = 0  # most micro-batches held at once during the last step
        self.grad_wait_s = 0.0  # time blocked receiving gradients during the last step
        for i in range(n):
            if not self.a <= i < self.b:
                layers[i] = PassThrough()
        if stage > 0:
            self.recv = layers[self.a] = Recv(layers[self.a], ranks[stage - 1], group, self.tag)
        if stage < p - 1:
            last = layers[self.b - 1]
            self.send = layers[self.b - 1] = Send(last, ranks[stage + 1], group, self.outbox) \
                if not isinstance(last, Recv) else _RecvSend(last, ranks[stage + 1], group, self.outbox)
            if isinstance(self.send, _RecvSend):
                self.recv = self.send

    @property
    def is_last(self) -> bool:
        return self.stage == self.p - 1

    def owned(self, name: str) -> bool:
        """Whether parameter `name` belongs to this stage's layers (else it is shared by all stages)."""
        return ".layers." in f".{name}"

    def reset(self) -> None:
        """Forget the forwards' activations (inference) and wait for the sends still in flight."""
        for m in (self.recv, self.send):
            if m is not None:
                getattr(m, "received", []).clear()
                getattr(m, "sent", []).clear()
        self.held.clear()
        self.outbox.wait()

    def start_step(self) -> None:
        """Zero the step's measurements: micro-batches held at once, time blocked in receives."""
        self.peak_in_flight = 0
        self.grad_wait_s = 0.0
        if self.recv is not None:
            (self.recv.recv_mod if isinstance(self.recv, _RecvSend) else self.recv).waited_s = 0.0

    @property
    def wait_s(self) -> float:
        """Seconds this stage spent blocked in receives since `start_step` (activations and gradients)."""
        recv = self.recv.recv_mod if isinstance(self.recv, _RecvSend) else self.recv
        return self.grad_wait_s + (recv.waited_s if recv is not None else 0.0)

    def hold(self, mb: int, loss: torch.Tensor | None) -> None:
        """Keep what micro-batch `mb`'s forward (just run) leaves for its backward: the Recv leaf (stage > 0),
        the sent activation (stage < p-1), the loss (last stage)."""
        leaf = self.recv.received.pop() if self.recv is not None else None
        out = self.send.sent.pop() if self.send is not None else None
        self.held[mb] = (leaf, out, loss)
        self.peak_in_flight = max(self.peak_in_flight, len(self.held))

    def backward_one(self, mb: int, last: bool) -> None:
        """Backward of held micro-batch `mb`; `last`: the step's final backward on this stage.

        Under FSDP2 the parameters stay unsharded and the gradients accumulate unreduced until the last
        backward, which reduce-scatters their sum and reshards (as torch's pipelining does): forwards of later
        micro-batches run between backwards (1F1B) or before them (GPipe), and the output head, applied by
        the engines outside the root's forward, needs the root's unsharded weights in every backward."""
        if isinstance(self.model, FSDPModule):
            self.model.set_requires_gradient_sync(last)
            self.model.set_reshard_after_backward(last)
            self.model.set_is_last_backward(last)
        leaf, out, loss = self.held.pop(mb)
        if self.is_last:
            loss.backward()
        else:
            grad = torch.empty_like(out)
            t0 = time.perf_counter()
            dist.recv(grad, src=self.ranks[self.stage + 1], group=self.group, tag=self.tag)
            self.grad_wait_s += time.perf_counter() - t0
            torch.autograd.backward(out, grad)
        if self.stage > 0:
            self.outbox.send(leaf.grad if leaf.grad is not None else torch.zeros_like(leaf),
                             self.ranks[self.stage - 1], self.group)

    def run(self, order: list[tuple[str, int]], forward) -> None:
        """Run a schedule's `order` ([("F" | "B", micro_batch)], schedules.stage_order); forward(mb) runs
        micro-batch mb's forward and returns its loss on the last stage (None elsewhere)."""
        self.start_step()
        last_b = max(i for i, (kind, _) in enumerate(order) if kind == "B") if order else -1
        for i, (kind, mb) in enumerate(order):
            if kind == "F":
                self.hold(mb, forward(mb))
            else:
                self.backward_one(mb, last=i == last_b)
        self.outbox.wait()

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

    def __init__(self, recv: Recv, dst: int, group, outbox: Outbox):
        super().__init__()
        self.recv_mod, self.dst, self.group, self.outbox = recv, dst, group, outbox
        self.sent: list[torch.Tensor] = []

    @property
    def received(self):
        return self.recv_mod.received

    def forward(self, hidden_states, *args, **kwargs):
        out = self.recv_mod(hidden_states, *args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        send_activation(out, self.dst, self.group, self.outbox)
        self.sent.append(out)
        return out
