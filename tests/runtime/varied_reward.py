"""A reward that varies between samples of an untrained model (so advantages and gradients are not zero)."""


def varied(prompts, responses, answers):
    return [(sum(map(ord, r)) % 7) / 6.0 for r in responses]


varied.correct_at = 0.5  # so `accuracy` (which travels as the `correct` field) is a number both transports compare


def dies(prompts, responses, answers):
    """Kills the process that scores a step, as an out-of-memory kill or a segfault would: the worker itself
    with reward.sandbox=false. The checks at start pass (the controller tries 2 prompts, a worker 1)."""
    import os

    if len(responses) > 2:
        os._exit(3)
    return [0.0] * len(responses)


def raises(prompts, responses, answers):
    raise ValueError("reward server unreachable")
