"""A reward that varies between samples of an untrained model (so advantages and gradients are not zero)."""


def varied(prompts, responses, answers):
    return [(sum(map(ord, r)) % 7) / 6.0 for r in responses]
