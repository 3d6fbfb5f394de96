"""A reward that varies between samples of an untrained model (so advantages and gradients are not zero)."""


def varied(prompts, responses, answers):
    return [(sum(map(ord, r)) % 7) / 6.0 for r in responses]


def dies(prompts, responses, answers):
    """Kills the worker process that scores a step, as an out-of-memory kill or a segfault would (the
    one-response check a worker makes at start passes)."""
    import os

    if len(responses) > 1:
        os._exit(3)
    return [0.0]


def raises(prompts, responses, answers):
    raise ValueError("reward server unreachable")
