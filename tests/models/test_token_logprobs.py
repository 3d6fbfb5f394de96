"""token_logprobs: the logged (no-grad, blocked) entropy and the in-place temperature equal their direct forms."""

import pytest
import torch
import torch.nn.functional as F

from reflow.data.batch import SampleBatch
from reflow.models import packing
from reflow.models.load import load_policy
from reflow.models.presets import init_model


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return load_policy(init_model("debug-llama", tmp_path_factory.mktemp("logprobs") / "m", seed=1)).eval()


def batch(lens=(6, 9, 4), seed=0) -> SampleBatch:
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(5, 261, (n,), generator=g) for n in lens]
    masks = [(torch.arange(n) >= 2).long() for n in lens]
    return SampleBatch.from_sequences(range(len(lens)), {"input_ids": seqs, "action_mask": masks})


def direct(policy, b: SampleBatch, temperature: float):
    """The definition, one sample at a time: log softmax(lm_head(h) / T) and its entropy."""
    logps, ents = [], []
    offs = b.offsets.tolist()
    for a, z in zip(offs[:-1], offs[1:]):
        ids, mask = b.tokens["input_ids"][a:z], b.tokens["action_mask"][a:z]
        logits = policy(input_ids=ids[None]).logits[0, :-1].float() / temperature
        logp_all = F.log_softmax(logits, -1)
        lp = torch.zeros(len(ids)); ent = torch.zeros(len(ids))
        lp[1:] = logp_all.gather(-1, ids[1:, None])[:, 0]
        ent[1:] = -(logp_all.exp() * logp_all).sum(-1)
        logps.append(lp * mask); ents.append(ent * mask)
    return torch.cat(logps), torch.cat(ents)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logged_entropy_in_small_blocks_equals_the_entropy_with_autograd_and_the_definition(policy, monkeypatch,
                                                                                           temperature):
    b = batch()
    monkeypatch.setattr(packing, "ENTROPY_BLOCK_BYTES", 3 * policy.config.vocab_size * 4)  # blocks of 3 rows
    lp_grad, ent_grad = packing.token_logprobs(policy, b, temperature=temperature, with_entropy=True)
    lp_log, ent_log = packing.token_logprobs(policy, b, temperature=temperature, with_entropy=True,
                                             entropy_grad=False)
    want_lp, want_ent = direct(policy, b, temperature)
    assert ent_grad.requires_grad and not ent_log.requires_grad
    torch.testing.assert_close(ent_log, ent_grad.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ent_log, want_ent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lp_log, want_lp, rtol=1e-5, atol=1e-5)


def test_gradient_of_the_temperature_scaled_logprobs_equals_the_out_of_place_definition(policy):
    b = batch(seed=1)
    policy.zero_grad(set_to_none=True)
    lp, _ = packing.token_logprobs(policy, b, temperature=0.7, attention="padded")
    lp.sum().backward()
    got = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad(set_to_none=True)
    want_lp, _ = direct(policy, b, 0.7)
    want_lp.sum().backward()
    for n, p in policy.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    policy.zero_grad(set_to_none=True)
