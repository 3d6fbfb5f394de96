"""ema_update: a role's weights follow another's ("Is DPO Superior to PPO for LLM Alignment?": the
reference follows the actor),

    target <- decay * target + (1 - decay) * source        every options["every"] steps

The call's role is the target (its owner copy on this rank is updated in place); it runs on a copy of the
source role's weights (`Call.weights`) reallocated to the target's layout, so both hold the same slices.
"""

from __future__ import annotations

from reflow.models.ema import ema_update_
from reflow.runtime.calls import CallContext, register_call


@register_call("ema_update")
def ema_update(cc: CallContext, batch) -> dict:
    target = cc.role
    if target.parked is not None:
        target.parked.reload()
    ema_update_(target.model, cc.model, cc.call.options["decay"])
    if target.parked is not None:
        target.parked.offload()
    return {}
