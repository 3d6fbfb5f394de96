"""Packed and padded forwards equal per-sample forwards; log-probs, values and scores are what they claim."""

import os

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

from reflow.checks.layouts import group_batch
from reflow.data.batch import SampleBatch
from reflow.models import packing
from reflow.models.load import load_critic, load_policy, load_reward_model, load_tokenizer, save_model
from reflow.models.presets import init_model

FAMILIES = ["debug-llama", "debug-qwen2"]
LENS = [5, 9, 3, 7]




@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("packing_models")
    return {name: init_model(name, root / name, seed=1) for name in FAMILIES}


@pytest.fixture(scope="session")
def policies(model_dirs):
    return {name: load_policy(path).eval() for name, path in model_dirs.items()}


def make_batch(lens=LENS, prompt_lens=None, seed=0) -> SampleBatch:
    """Random non-special token ids; actions after each sample's prompt (default: the first 2 tokens)."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(5, 261, (n,), generator=g) for n in lens]
    prompt_lens = prompt_lens or [2] * len(lens)
    masks = [(torch.arange(n) >= p).long() for n, p in zip(lens, prompt_lens)]
    return SampleBatch.from_sequences(range(len(lens)), {"input_ids": seqs, "action_mask": masks})


def per_sample(model, batch):
    """Per-sample forwards of the full model, one sequence at a time (no packing, no padding)."""
    with torch.no_grad():
        return [model(input_ids=s[None]) for s in batch.unpack("input_ids")]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attention", ["packed", "padded"])
def test_packed_and_padded_forward_equal_per_sample_forward(policies, family, attention):
    model = policies[family]
    batch = make_batch()
    backbone, head = packing.backbone_and_head(model)
    with torch.no_grad():
        h = packing.hidden_states(model, batch, attention)
        ref_h = torch.cat([backbone(input_ids=s[None]).last_hidden_state[0] for s in batch.unpack("input_ids")])
        ref_logits = torch.cat([o.logits[0] for o in per_sample(model, batch)])
        logits = head(h)
    assert h.shape == (batch.num_tokens, model.config.hidden_size)
    torch.testing.assert_close(h, ref_h, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)


def test_unknown_attention_raises(policies):
    with pytest.raises(ValueError, match="unknown attention"):
        packing.hidden_states(policies["debug-llama"], make_batch(), "ragged")


@pytest.mark.parametrize("family", FAMILIES)
def test_position_ids_alone_do_not_separate_packed_samples(policies, family):
    """Why packing builds its own block mask: with only position_ids, sample 2 attends to sample 1."""
    model = policies[family]
    batch = make_batch()
    with torch.no_grad():
        plain = model(input_ids=batch.tokens["input_ids"][None],
                      position_ids=batch.position_in_sample()[None]).logits[0]
    ref = [o.logits[0] for o in per_sample(model, batch)]
    parts = torch.split(plain, LENS)
    torch.testing.assert_close(parts[0], ref[0], atol=1e-5, rtol=0)  # the first sample sees nothing else
    assert (parts[1] - ref[1]).abs().max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_token_logprobs_and_entropy_match_manual_log_softmax(policies, family):
    model = policies[family]
    batch = make_batch(prompt_lens=[2, 4, 1, 3])
    T = 0.7
    with torch.no_grad():
        logp, ent = packing.token_logprobs(model, batch, temperature=T, with_entropy=True)
    ref_logp, ref_ent = [], []
    for s, o in zip(batch.unpack("input_ids"), per_sample(model, batch)):
        lsm = F.log_softmax(o.logits[0, :-1].float() / T, dim=-1)  # predicts tokens 1..n-1
        ref_logp.append(torch.cat([torch.zeros(1), lsm.gather(-1, s[1:, None])[:, 0]]))
        ref_ent.append(torch.cat([torch.zeros(1), -(lsm.exp() * lsm).sum(-1)]))
    mask = batch.tokens["action_mask"].bool()
    ref_logp, ref_ent = torch.cat(ref_logp) * mask, torch.cat(ref_ent) * mask
    assert logp.shape == ent.shape == (batch.num_tokens,)
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=0)
    assert (logp[~mask] == 0).all() and (ent[~mask] == 0).all()
    assert (logp[mask] < 0).all() and (ent[mask] > 0).all()


def test_token_logprobs_entropy_is_none_unless_asked(policies):
    with torch.no_grad():
        _, ent = packing.token_logprobs(policies["debug-llama"], make_batch())
    assert ent is None


def test_action_on_first_token_of_a_sample_is_an_error(policies):
    batch = make_batch(prompt_lens=[2, 0, 1, 3])  # sample 1 has an action at its first token
    with pytest.raises(ValueError, match="first token"):
        packing.token_logprobs(policies["debug-llama"], batch)


def _randomise_head(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=g))
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_token_values_are_the_critic_head_on_the_previous_hidden_state(model_dirs, family):
    critic = _randomise_head(load_critic(model_dirs[family]).eval(), seed=3)
    batch = make_batch(prompt_lens=[2, 4, 1, 3])
    with torch.no_grad():
        v = packing.token_values(critic, batch)
    ref = torch.cat([torch.cat([torch.zeros(1), o.logits[0, :-1, 0]]) for o in per_sample(critic, batch)])
    mask = batch.tokens["action_mask"].bool()
    assert v.shape == (batch.num_tokens,)
    torch.testing.assert_close(v, ref * mask, atol=1e-5, rtol=0)
    assert v[mask].abs().min() > 0


def test_critic_inference_runs_the_backbone_once_for_token_and_sequence_values(model_dirs):
    from reflow.engines.infer import InferenceEngine

    critic = _randomise_head(load_critic(model_dirs["debug-llama"]).eval(), seed=5)
    batch = make_batch(prompt_lens=[2, 4, 1, 3])
    calls = []
    hook = critic.model.register_forward_hook(lambda *a: calls.append(1))
    tok, seq = InferenceEngine(critic, micro_batch_tokens=10_000).values(batch)
    hook.remove()
    assert len(calls) == 1  # one micro-batch, one backbone pass for both outputs
    with torch.no_grad():
        torch.testing.assert_close(tok, packing.token_values(critic, batch, "padded"), atol=0, rtol=0)
        torch.testing.assert_close(seq, packing.sequence_scores(critic, batch, "padded"), atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attention", ["packed", "padded"])
def test_sequence_scores_are_the_reward_head_on_the_last_token(model_dirs, family, attention):
    rm = _randomise_head(load_reward_model(model_dirs[family]).eval(), seed=4)
    batch = make_batch()
    backbone, head = packing.backbone_and_head(rm)
    with torch.no_grad():
        scores = packing.sequence_scores(rm, batch, attention)
        ref = torch.stack([head(backbone(input_ids=s[None]).last_hidden_state[0, -1])[0]
                           for s in batch.unpack("input_ids")])
        hf = torch.stack([o.logits[0, 0] for o in per_sample(rm, batch)])  # HF's own last-token pooling
    assert scores.shape == (len(batch),)
    torch.testing.assert_close(scores, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores, hf, atol=1e-5, rtol=0)
    assert len(set(scores.tolist())) == len(batch)


@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_heads_from_a_causal_lm_folder_output_zero(model_dirs, policies, family):
    critic, rm = load_critic(model_dirs[family]), load_reward_model(model_dirs[family])
    batch = make_batch()
    with torch.no_grad():
        assert torch.equal(packing.token_values(critic, batch), torch.zeros(batch.num_tokens))
        assert torch.equal(packing.sequence_scores(rm, batch), torch.zeros(len(batch)))
    # ... while the backbone is the causal LM's
    lm_state = policies[family].base_model.state_dict()
    for k, v in critic.base_model.state_dict().items():
        assert torch.equal(v, lm_state[k]), k


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("role", ["critic", "reward"])
def test_saved_scalar_head_model_loads_back_with_plain_transformers(model_dirs, tmp_path, family, role):
    loader, cls = {"critic": (load_critic, AutoModelForTokenClassification),
                   "reward": (load_reward_model, AutoModelForSequenceClassification)}[role]
    model = _randomise_head(loader(model_dirs[family]), seed=5)
    out = save_model(model, load_tokenizer(model_dirs[family]), tmp_path / role)
    back = cls.from_pretrained(out)
    ours = model.state_dict()
    theirs = back.state_dict()
    assert set(theirs) == set(ours)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    assert back.config.num_labels == 1
    # reflow's own loader keeps a trained head instead of zeroing it again
    again = loader(out)
    assert torch.equal(again.score.weight, model.score.weight)


# ----------------------------------------------------------------- prefix sharing
PLAIN = packing.AttentionSpec("padded", binned=False)  # a right-padded row per sample: separate sequences
SHARED = packing.AttentionSpec("padded", share_prefix=True)  # groups binned into rows
PER_GROUP = packing.AttentionSpec("padded", share_prefix=True, binned=False)  # a row per group
SHARED_SPECS = [SHARED, PER_GROUP, packing.AttentionSpec("packed", share_prefix=True)]  # ... or one row for all
SHARED_IDS = ["binned", "row-per-group", "one-row"]
# (prompt length, response lengths) per group; as units: 6 + 20 + 3 + 2 = 31, 5 + 2 + 3 = 10,
# 4 + 4 + 2 + 3 = 13, and the lone sample 13 (a group of one shares nothing)
RAGGED = ((6, (20, 3, 2)), (5, (2, 3)), (4, (4, 2, 3)), (8, (5,)))


def ragged_groups(groups=RAGGED, seed=0) -> SampleBatch:
    """Groups of different sizes and response lengths (group_id = the group's index), the groups' samples
    interleaved in the batch so that a row's flat order differs from the batch's; actions = the responses."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for gid, (p, responses) in enumerate(groups):
        prompt = torch.randint(5, 261, (p,), generator=g)
        samples += [(i, gid, torch.cat([prompt, torch.randint(5, 261, (r,), generator=g)]), p)
                    for i, r in enumerate(responses)]
    samples.sort(key=lambda s: (s[0], s[1]))  # first responses of every group, then the second ones, ...
    return SampleBatch.from_sequences(range(len(samples)), {
        "input_ids": [s[2] for s in samples],
        "action_mask": [(torch.arange(len(s[2])) >= s[3]).long() for s in samples]},
        {"group_id": [s[1] for s in samples]})


def test_first_fit_bins_units_by_decreasing_length_into_rows_as_long_as_the_longest_unit():
    lens = [9, 2, 5, 4, 7, 3, 1]  # lone samples: 9 | 7 2 | 5 4 | 3 1
    batch = make_batch(lens)
    binned = packing.packed_rows(batch, arrange="first_fit")
    assert binned.input_ids.shape == (4, 9) and packing.packed_rows(batch, arrange="per_unit").input_ids.shape == (7, 9)
    rows = [[lens[s] for s in torch.unique_consecutive(r[r >= 0]).tolist()] for r in binned.segment]
    assert rows == [[9], [7, 2], [5, 4], [3, 1]]  # segment s = sample s here
    assert binned.num_tokens == sum(lens)
    torch.testing.assert_close(binned.input_ids.flatten()[binned.gather], batch.tokens["input_ids"], atol=0, rtol=0)
    # shared groups: units 31, 10, 13, 13 -> 31 | 13 13 | 10 (3 rows of 31 instead of 4)
    batch = ragged_groups()
    binned = packing.packed_rows(batch, group_key="group_id", arrange="first_fit")
    assert binned.input_ids.shape == (3, 31) and (binned.segment >= 0).sum(1).tolist() == [31, 26, 10]
    assert packing.packed_rows(batch, group_key="group_id", arrange="per_unit").input_ids.shape == (4, 31)
    for key in ("input_ids", "position_ids"):
        ref = batch.tokens["input_ids"] if key == "input_ids" else batch.position_in_sample()
        torch.testing.assert_close(getattr(binned, key).flatten()[binned.gather], ref, atol=0, rtol=0)
    with pytest.raises(ValueError, match="unknown row arrangement"):
        packing.packed_rows(batch, arrange="best_fit")


def test_first_fit_rows_are_the_same_for_the_same_batch_and_break_ties_by_unit_order():
    lens = [4, 6, 4, 2, 6]  # capacity 6: 6 (sample 1) | 6 (sample 4) | 4 (sample 0) 2 | 4 (sample 2)
    batch = make_batch(lens)
    a, b = (packing.packed_rows(batch, arrange="first_fit") for _ in range(2))
    for f in ("input_ids", "position_ids", "segment", "sees", "gather"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert [torch.unique_consecutive(r[r >= 0]).tolist() for r in a.segment] == [[1], [4], [0, 3], [2]]
    ragged = ragged_groups()
    a, b = (packing.packed_rows(ragged, group_key="group_id", arrange="first_fit") for _ in range(2))
    assert torch.equal(a.gather, b.gather) and torch.equal(a.segment, b.segment)


def test_packed_rows_hold_each_group_prefix_once_with_positions_continuing_after_it():
    batch = group_batch((7, 4), (3, 4, 5))
    one = packing.packed_rows(batch, group_key="group_id")
    per_group = packing.packed_rows(batch, group_key="group_id", arrange="per_unit")
    # 7 + (3 + 4 + 5) and 4 + (3 + 4 + 5) row tokens instead of 3 * 7 + 12 + 3 * 4 + 12
    assert one.input_ids.shape == (1, 7 + 12 + 4 + 12) and per_group.input_ids.shape == (2, 7 + 12)
    assert one.shared and per_group.shared and one.num_tokens == per_group.num_tokens == 35
    for rows in (one, per_group):
        ids, pos = rows.input_ids.flatten()[rows.gather], rows.position_ids.flatten()[rows.gather]
        torch.testing.assert_close(ids, batch.tokens["input_ids"], atol=0, rtol=0)
        torch.testing.assert_close(pos, batch.position_in_sample(), atol=0, rtol=0)
        # every response of group 0 reads the same 7 prefix tokens of row 0
        assert all(rows.gather[s:s + 7].tolist() == list(range(7)) for s in batch.offsets[:3].tolist())
        mask = packing.row_mask(rows, torch.float32)[0, 0] == 0
        own1, own2 = slice(7 + 3, 7 + 7), slice(7 + 7, 7 + 12)  # the second and third responses of group 0
        assert mask[own2, :7].all() and not mask[own2, own1].any() and not mask[own2, 19:].any()
    assert (per_group.segment[1, 16:] == -1).all()  # group 1's row is padded from 16 to 19 tokens
    # without a group key (or a one-token common prefix) it is the plain block-diagonal packing
    plain = packing.packed_rows(batch)
    assert not plain.shared and torch.equal(plain.gather, torch.arange(batch.num_tokens))
    assert torch.equal(packing.row_mask(plain, torch.float32), packing.block_causal_mask(batch.seqlens, torch.float32))


@pytest.mark.parametrize("family", FAMILIES)
def test_binned_rows_hidden_states_equal_a_row_per_group_and_separate_sequences(policies, family):
    batch = ragged_groups()
    with torch.no_grad():
        binned = packing.hidden_states(policies[family], batch, SHARED)
        per_group = packing.hidden_states(policies[family], batch, PER_GROUP)
        separate = packing.hidden_states(policies[family], batch, PLAIN)
    torch.testing.assert_close(binned, per_group, atol=1e-5, rtol=0)
    torch.testing.assert_close(binned, separate, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shared", SHARED_SPECS, ids=SHARED_IDS)
def test_shared_prefix_logprobs_values_and_scores_equal_separate_sequences(policies, model_dirs, family, shared):
    batch = ragged_groups()  # binned: 3 rows for 4 units
    with torch.no_grad():
        logp, ent = packing.token_logprobs(policies[family], batch, with_entropy=True, attention=shared)
        ref_logp, ref_ent = packing.token_logprobs(policies[family], batch, with_entropy=True, attention=PLAIN)
        critic = _randomise_head(load_critic(model_dirs[family]).eval(), seed=3)
        tok, seq = packing.token_and_sequence_values(critic, batch, shared)
        ref_tok, ref_seq = packing.token_and_sequence_values(critic, batch, PLAIN)
    mask = batch.tokens["action_mask"].bool()
    assert (logp[mask] < 0).all()  # the first response token's log-prob comes from the prompt's last state
    for got, ref in ((logp, ref_logp), (ent, ref_ent), (tok, ref_tok), (seq, ref_seq)):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shared", SHARED_SPECS, ids=SHARED_IDS)
def test_shared_prefix_gradients_equal_separate_sequences(model_dirs, family, shared):
    batch = ragged_groups()  # binned: 3 rows for 4 units
    grads = {}
    for name, attention in (("separate", PLAIN), ("shared", shared)):
        model = load_policy(model_dirs[family])
        logp, _ = packing.token_logprobs(model, batch, attention=attention)
        (logp * torch.linspace(-1, 1, batch.num_tokens)).sum().backward()  # a different weight per token
        grads[name] = {n: p.grad for n, p in model.named_parameters()}
    for n, g in grads["separate"].items():
        torch.testing.assert_close(grads["shared"][n], g, atol=1e-5, rtol=1e-4)
    assert max(float(g.abs().max()) for g in grads["shared"].values()) > 1e-3


# ----------------------------------------------------------------- binning without sharing
# long-tailed lone samples, capacity 33: 33 | 17 12 4 | 9 8 6 5 3 | 3 -> 4 rows instead of 10
LONG_TAIL = [33, 4, 9, 3, 17, 6, 5, 12, 3, 8]
# "padded" without group ids, and with sharing asked for but no group ids in the batch: both bin the samples
UNSHARED = [packing.AttentionSpec("padded"), packing.AttentionSpec("padded", share_prefix=True)]
UNSHARED_IDS = ["no-sharing", "sharing-without-group-ids"]


def model_inputs(model, fn):
    """(fn(), [(input_ids shape, attention_mask dims) of every forward of `model` that fn ran])."""
    seen = []
    hook = model.register_forward_pre_hook(
        lambda m, args, kw: seen.append((tuple(kw["input_ids"].shape), kw["attention_mask"].dim())), with_kwargs=True)
    try:
        return fn(), seen
    finally:
        hook.remove()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("spec", UNSHARED, ids=UNSHARED_IDS)
def test_without_sharing_a_long_tailed_batch_bins_into_fewer_rows_with_hidden_states_equal_plain_padding_and_per_sample(
        policies, family, spec):
    model = policies[family]
    batch = make_batch(LONG_TAIL)
    backbone, _ = packing.backbone_and_head(model)
    with torch.no_grad():
        binned, seen = model_inputs(model, lambda: packing.hidden_states(model, batch, spec))
        plain, seen_plain = model_inputs(model, lambda: packing.hidden_states(model, batch, PLAIN))
        ref = torch.cat([backbone(input_ids=s[None]).last_hidden_state[0] for s in batch.unpack("input_ids")])
    assert seen == [((4, 33), 4)] and seen_plain == [((10, 33), 2)]  # 4 binned rows, 4-D mask; 10 padded rows
    torch.testing.assert_close(binned, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(binned, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("spec", UNSHARED, ids=UNSHARED_IDS)
def test_without_sharing_binned_logprobs_entropy_values_and_scores_equal_plain_padding_and_per_sample_forwards(
        policies, model_dirs, family, spec):
    model = policies[family]
    batch = make_batch(LONG_TAIL, prompt_lens=[5, 2, 3, 1, 4, 2, 3, 6, 1, 2])
    mask = batch.tokens["action_mask"].bool()
    critic = _randomise_head(load_critic(model_dirs[family]).eval(), seed=3)
    rm = _randomise_head(load_reward_model(model_dirs[family]).eval(), seed=4)
    with torch.no_grad():
        (logp, ent), seen = model_inputs(model, lambda: packing.token_logprobs(
            model, batch, with_entropy=True, attention=spec))
        ref_logp, ref_ent = packing.token_logprobs(model, batch, with_entropy=True, attention=PLAIN)
        sample_logp = torch.cat([torch.cat([torch.zeros(1), F.log_softmax(o.logits[0, :-1], -1).gather(
            -1, s[1:, None])[:, 0]]) for s, o in zip(batch.unpack("input_ids"), per_sample(model, batch))]) * mask
        tok, seq = packing.token_and_sequence_values(critic, batch, spec)
        ref_tok, ref_seq = packing.token_and_sequence_values(critic, batch, PLAIN)
        sample_tok = torch.cat([torch.cat([torch.zeros(1), o.logits[0, :-1, 0]]) for o in per_sample(critic, batch)])
        scores, seen_rm = model_inputs(rm, lambda: packing.sequence_scores(rm, batch, spec))
        ref_scores = packing.sequence_scores(rm, batch, PLAIN)
        sample_scores = torch.stack([o.logits[0, 0] for o in per_sample(rm, batch)])
    assert seen == seen_rm == [((4, 33), 4)]
    assert (logp[mask] < 0).all() and len(set(scores.tolist())) == len(batch)
    for got, ref in ((logp, ref_logp), (ent, ref_ent), (tok, ref_tok), (scores, ref_scores),
                     (logp, sample_logp), (tok, sample_tok * mask), (scores, sample_scores)):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(seq, ref_seq, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_without_sharing_binned_gradients_equal_plain_padding(model_dirs, family):
    batch = make_batch(LONG_TAIL)
    grads, seen = {}, {}
    for name, attention in (("plain", PLAIN), ("binned", packing.AttentionSpec("padded"))):
        model = load_policy(model_dirs[family])
        logp, seen[name] = model_inputs(model, lambda: packing.token_logprobs(model, batch, attention=attention)[0])
        (logp * torch.linspace(-1, 1, batch.num_tokens)).sum().backward()  # a different weight per token
        grads[name] = {n: p.grad for n, p in model.named_parameters()}
    assert seen == {"plain": [((10, 33), 2)], "binned": [((4, 33), 4)]}
    for n, g in grads["plain"].items():
        torch.testing.assert_close(grads["binned"][n], g, atol=1e-5, rtol=1e-4)
    assert max(float(g.abs().max()) for g in grads["binned"].values()) > 1e-3


def test_a_batch_where_binning_saves_no_row_takes_the_plain_padded_path(policies):
    model = policies["debug-llama"]
    batch = make_batch([9, 8, 5, 6])  # the two shortest (5 + 6) do not fit in 9: a row per sample either way
    assert packing.packed_rows(batch, arrange="first_fit").input_ids.shape == (4, 9)
    with torch.no_grad():
        h, seen = model_inputs(model, lambda: packing.hidden_states(model, batch, "padded"))
        plain = packing.hidden_states(model, batch, PLAIN)
    assert seen == [((4, 9), 2)]  # transformers' 2-D padding mask, no [R, 1, L, L] row mask
    torch.testing.assert_close(h, plain, atol=0, rtol=0)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_block_mask_attends_exactly_as_the_dense_row_mask():
    """flex_attention under the rows' BlockMask (eager: torch's reference implementation) equals sdpa under
    the dense mask: one row with shared prefixes, one without, a padded row per group, and binned rows."""
    from torch.nn.attention.flex_attention import flex_attention

    batch = group_batch((7, 4), (3, 4, 5))
    g = torch.Generator().manual_seed(0)
    for rows in (packing.packed_rows(batch, group_key="group_id"), packing.packed_rows(batch),
                 packing.packed_rows(batch, group_key="group_id", arrange="per_unit"),
                 packing.packed_rows(ragged_groups(), group_key="group_id", arrange="first_fit")):
        q, k, v = (torch.randn(*rows.input_ids.shape[:1], 2, rows.input_ids.shape[1], 8, generator=g) for _ in range(3))
        dense = F.scaled_dot_product_attention(q, k, v, attn_mask=packing.row_mask(rows, torch.float32))
        flex = flex_attention(q, k, v, block_mask=packing.row_block_mask(rows))
        torch.testing.assert_close(flex, dense, atol=1e-5, rtol=0)


def test_flex_kernel_under_autograd_on_cpu_runs_the_dense_mask_with_equal_gradients(model_dirs):
    flex = packing.AttentionSpec("padded", share_prefix=True, kernel="flex")
    assert packing.use_flex(flex, "cuda") and not packing.use_flex(flex, "cpu")  # autograd is on here
    with torch.no_grad():
        assert packing.use_flex(flex, "cpu") and not packing.use_flex(SHARED, "cpu")
    # flex_attention itself raises on a CPU backward, so equal gradients mean the dense mask ran
    batch = group_batch((7, 4), (3, 4, 5))
    grads = []
    for attention in (SHARED, flex):
        model = load_policy(model_dirs["debug-llama"])
        logp, _ = packing.token_logprobs(model, batch, attention=attention)
        logp.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=0)


@pytest.mark.skipif(not os.environ.get("REFLOW_TEST_FLEX"),
                    reason="compiles flex_attention (15-45 s on a 2-core CPU); set REFLOW_TEST_FLEX=1")
def test_flex_kernel_forward_equals_the_dense_mask(policies):
    batch = group_batch((7, 4), (3, 4, 5))
    flex = packing.AttentionSpec("packed", share_prefix=True, kernel="flex")
    with torch.no_grad():
        got, _ = packing.token_logprobs(policies["debug-llama"], batch, attention=flex)
        ref, _ = packing.token_logprobs(policies["debug-llama"], batch, attention=PLAIN)
        plain, _ = packing.token_logprobs(policies["debug-llama"], batch, attention=packing.AttentionSpec(
            "packed", kernel="flex"))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(plain, ref, atol=1e-5, rtol=0)


def test_attention_spec_of_a_role_config_shares_prefixes_by_default_and_reads_its_keys():
    from reflow.config.schema import ModelConfig

    assert packing.attention_spec(ModelConfig()) == packing.AttentionSpec("padded", share_prefix=True)
    cfg = ModelConfig(attention="packed", prefix_sharing=False, attention_kernel="flex")
    assert packing.attention_spec(cfg) == packing.AttentionSpec("packed", share_prefix=False, kernel="flex")
    assert packing.attention_spec("packed") == packing.AttentionSpec("packed")  # a bare layout: no sharing
    with pytest.raises(ValueError, match="unknown attention kernel 'flash'"):
        packing.AttentionSpec("packed", kernel="flash")
