"""TrainEngine and InferenceEngine: micro-batching does not change the result; clipping, LR schedule, resume."""

import copy
import math

import pytest
import torch

from reflow.algorithms.losses import sequence_nll
from reflow.checks.layouts import group_batch
from reflow.data.batch import SampleBatch
from reflow.engines.infer import InferenceEngine
from reflow.engines.train import Norm, TrainEngine, lr_lambda
from reflow.models.load import load_critic, load_policy, load_reward_model
from reflow.models.packing import token_logprobs
from reflow.models.presets import init_model

# Adam's first step is lr * g / (|g| + eps): with eps far above |g| the update is lr/eps * g, proportional
# to the gradient, so comparing updated weights compares gradients (with a tiny eps it would be sign(g)).
LR, EPS = 1.0, 10.0




@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return init_model("debug-llama", tmp_path_factory.mktemp("train") / "llama", seed=3)


def make_batch(lens=(6, 9, 4, 11, 7, 5), prompt=3, seed=0) -> SampleBatch:
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(5, 261, (n,), generator=g) for n in lens]
    masks = [(torch.arange(n) >= prompt).long() for n in lens]
    return SampleBatch.from_sequences(range(len(lens)), {"input_ids": seqs, "action_mask": masks})


def nll_loss(model, mb, norm: Norm):
    """Token-mean NLL: a micro-batch sum over the mini-batch-wide token count."""
    logp, _ = token_logprobs(model, mb, attention="padded")
    loss = sequence_nll(logp, mb.tokens["action_mask"], norm.tokens)
    return loss, {"micro_batches": torch.tensor(1.0)}


def params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def delta(before, model):
    return torch.cat([(v.detach() - before[k]).flatten() for k, v in model.named_parameters()])


def test_step_is_independent_of_the_micro_batch_cut(model_dir):
    batch = make_batch()
    tiny, huge = 12, 10_000
    assert len(batch.micro_batches(tiny)) >= 4 and len(batch.micro_batches(huge)) == 1
    results = {}
    for mbt in (tiny, huge):
        model = load_policy(model_dir)
        before = params(model)
        eng = TrainEngine(model, lr=LR, eps=EPS, grad_clip=0.0, micro_batch_tokens=mbt)
        stats = eng.step(batch, nll_loss)
        results[mbt] = (delta(before, model), stats)
    (d_tiny, s_tiny), (d_huge, s_huge) = results[tiny], results[huge]
    assert d_huge.abs().max() > 1e-3  # the step moved the weights
    torch.testing.assert_close(d_tiny, d_huge, atol=1e-6, rtol=0)
    assert s_tiny["micro_batches"] == len(batch.micro_batches(tiny)) and s_huge["micro_batches"] == 1
    assert s_tiny["loss"] == pytest.approx(s_huge["loss"], abs=1e-5)
    assert s_tiny["grad_norm"] == pytest.approx(s_huge["grad_norm"], rel=1e-5)
    # the loss is the token-mean NLL of the mini-batch
    with torch.no_grad():
        logp, _ = token_logprobs(load_policy(model_dir), batch)
    mask = batch.tokens["action_mask"].bool()
    assert s_huge["loss"] == pytest.approx(-logp[mask].mean().item(), abs=1e-5)


def test_default_norm_counts_action_tokens(model_dir):
    batch = make_batch()
    seen = []

    def loss_fn(model, mb, norm):
        seen.append(norm)
        return nll_loss(model, mb, norm)

    TrainEngine(load_policy(model_dir), lr=1e-3, micro_batch_tokens=12).step(batch, loss_fn)
    n_action = float(batch.tokens["action_mask"].sum())
    assert all(n == Norm(tokens=n_action, samples=float(len(batch))) for n in seen)


def test_grad_clip_scales_the_update_down(model_dir):
    batch = make_batch()
    clip = 1e-3
    out = {}
    for c in (0.0, clip):
        model = load_policy(model_dir)
        before = params(model)
        stats = TrainEngine(model, lr=LR, eps=EPS, grad_clip=c, micro_batch_tokens=10_000).step(batch, nll_loss)
        out[c] = (delta(before, model).norm().item(), stats["grad_norm"])
    (free, grad_norm), (clipped, grad_norm_reported) = out[0.0], out[clip]
    assert grad_norm > 100 * clip
    assert grad_norm_reported == pytest.approx(grad_norm, rel=1e-5)  # the pre-clip norm is reported
    # update ~ lr/eps * g, so clipping shrinks it by clip / ||g||
    assert clipped == pytest.approx(free * clip / grad_norm, rel=2e-2)


def test_lr_lambda_warmup_then_cosine():
    f = lr_lambda("cosine", warmup=4, total=14, min_ratio=0.1)
    assert [f(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert f(4 + 10 * 0.25) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert f(14) == pytest.approx(0.1)
    assert f(100) == pytest.approx(0.1)  # stays at the floor after the last step


def test_lr_lambda_linear_and_constant():
    f = lr_lambda("linear", warmup=0, total=10, min_ratio=0.0)
    assert [f(s) for s in (0, 5, 10, 20)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    g = lr_lambda("linear", warmup=2, total=12, min_ratio=0.2)
    assert [g(s) for s in (0, 1, 2, 7, 12)] == pytest.approx([0.5, 1.0, 1.0, 0.6, 0.2])
    c = lr_lambda("constant", warmup=2, total=12, min_ratio=0.2)
    assert [c(s) for s in (0, 1, 2, 11)] == pytest.approx([0.5, 1.0, 1.0, 1.0])


def test_lr_lambda_unknown_schedule():
    with pytest.raises(ValueError, match="unknown lr schedule 'step'"):
        lr_lambda("step", warmup=0, total=10, min_ratio=0.0)(3)


def test_engine_reports_the_scheduled_lr(model_dir):
    eng = TrainEngine(load_policy(model_dir), lr=0.01, warmup_steps=2, total_steps=4, schedule="linear",
                      micro_batch_tokens=10_000)
    lrs = [eng.step(make_batch(seed=s), nll_loss)["lr"] for s in range(4)]
    assert lrs == pytest.approx([0.005, 0.01, 0.01, 0.005])


def test_state_dict_round_trip_reproduces_the_next_step(model_dir):
    kw = dict(lr=1e-2, warmup_steps=3, total_steps=10, schedule="cosine", micro_batch_tokens=16)
    b1, b2 = make_batch(seed=1), make_batch(seed=2)
    model = load_policy(model_dir)
    eng = TrainEngine(model, **kw)
    eng.step(b1, nll_loss)
    weights, state = copy.deepcopy(model.state_dict()), copy.deepcopy(eng.state_dict())
    expected_stats = eng.step(b2, nll_loss)
    expected = params(model)

    resumed = load_policy(model_dir)
    resumed.load_state_dict(weights)
    eng2 = TrainEngine(resumed, **kw)
    eng2.load_state_dict(state)
    stats = eng2.step(b2, nll_loss)
    assert stats["lr"] == expected_stats["lr"]
    for k, v in resumed.named_parameters():
        assert torch.equal(v, expected[k]), k

    # without the optimizer/scheduler state the same step lands elsewhere
    fresh = load_policy(model_dir)
    fresh.load_state_dict(weights)
    TrainEngine(fresh, **kw).step(b2, nll_loss)
    assert not torch.allclose(params(fresh)["model.norm.weight"], expected["model.norm.weight"], atol=1e-6)


@pytest.mark.parametrize("attention", ["packed", "padded"])
def test_inference_logprobs_independent_of_micro_batches(model_dir, attention):
    model = load_policy(model_dir)
    batch = make_batch(lens=(6, 9, 4, 11, 7, 5, 13, 3))
    assert len(batch.micro_batches(10)) >= 5
    small_engine = InferenceEngine(model, micro_batch_tokens=10, attention=attention)
    big_engine = InferenceEngine(model, micro_batch_tokens=10_000, attention=attention)
    small, s_ent = small_engine.logprobs(batch, 0.8, with_entropy=True)
    big, b_ent = big_engine.logprobs(batch, 0.8, with_entropy=True)
    assert small.shape == (batch.num_tokens,)
    # values near log(261) ~ 5.6, where a float32 ulp is ~5e-7: allow a few ulps of reordering
    torch.testing.assert_close(small, big, atol=1e-5, rtol=0)
    torch.testing.assert_close(s_ent, b_ent, atol=1e-5, rtol=0)
    mask = batch.tokens["action_mask"].bool()
    assert (small[mask] < 0).all() and (small[~mask] == 0).all()


def test_inference_values_and_scores_independent_of_micro_batches(model_dir):
    batch = make_batch(lens=(6, 9, 4, 11, 7, 5, 13, 3))
    g = torch.Generator().manual_seed(0)
    critic, rm = load_critic(model_dir), load_reward_model(model_dir)
    with torch.no_grad():
        critic.score.weight.normal_(generator=g)
        rm.score.weight.normal_(generator=g)
    v_small, last_small = InferenceEngine(critic, micro_batch_tokens=10).values(batch)
    v_big, last_big = InferenceEngine(critic, micro_batch_tokens=10_000).values(batch)
    torch.testing.assert_close(v_small, v_big, atol=1e-6, rtol=0)
    torch.testing.assert_close(last_small, last_big, atol=1e-6, rtol=0)
    assert last_small.shape == (len(batch),) and last_small.abs().min() > 0
    s_small = InferenceEngine(rm, micro_batch_tokens=10).scores(batch)
    s_big = InferenceEngine(rm, micro_batch_tokens=10_000).scores(batch)
    torch.testing.assert_close(s_small, s_big, atol=1e-6, rtol=0)
    assert s_small.shape == (len(batch),) and len(set(s_small.tolist())) == len(batch)


def test_norm_fields_reach_the_loss_unchanged(model_dir):
    """The engine guards against empty masks but must pass every other normaliser (max_tokens) through."""
    seen = []
    model = load_policy(model_dir)
    engine = TrainEngine(model, lr=1e-3)

    def loss_fn(m, mb, norm):
        seen.append(norm)
        logp, _ = token_logprobs(m, mb)
        return sequence_nll(logp, mb.tokens["action_mask"], norm.tokens), {}

    engine.step(make_batch(), loss_fn, Norm(tokens=10.0, samples=3.0, max_tokens=7.0))
    assert seen[0].max_tokens == 7.0 and seen[0].tokens == 10.0


def test_extra_terms_join_the_same_optimizer_step(model_dir):
    """step(a, extra=[(b, ...)]) == one step on the summed loss: gradients accumulate before the update."""
    batch_a, batch_b = make_batch(seed=1), make_batch(lens=(5, 8), seed=2)

    def nll(m, mb, norm):
        logp, _ = token_logprobs(m, mb)
        return sequence_nll(logp, mb.tokens["action_mask"], norm.tokens), {"nll": torch.tensor(0.0)}

    def summed(m, mb, norm):  # the same two terms in one loss: both batches' own normalisers
        la = nll(m, batch_a, Norm(float(batch_a.tokens["action_mask"].sum()), len(batch_a)))[0]
        lb = nll(m, batch_b, Norm(float(batch_b.tokens["action_mask"].sum()), len(batch_b)))[0]
        return la + lb, {}

    m1, m2 = load_policy(model_dir), load_policy(model_dir)
    e1 = TrainEngine(m1, lr=LR, eps=EPS, grad_clip=0)
    e2 = TrainEngine(m2, lr=LR, eps=EPS, grad_clip=0)
    e1.step(batch_a, nll, extra=[(batch_b, nll, Norm(float(batch_b.tokens["action_mask"].sum()), len(batch_b)))])
    e2.step(batch_a, summed)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.allclose(p1, p2, atol=1e-6)


def test_bf16_mixed_precision_keeps_fp32_weights_and_tracks_fp32(model_dir):
    batch = make_batch()
    m32, m16 = load_policy(model_dir), load_policy(model_dir)
    s32 = TrainEngine(m32, lr=1e-3).step(batch, nll_loss)
    s16 = TrainEngine(m16, lr=1e-3, precision="bf16").step(batch, nll_loss)
    assert all(p.dtype == torch.float32 for p in m16.parameters())  # master weights stay fp32
    assert s16["loss"] == pytest.approx(s32["loss"], rel=2e-2)  # bf16 has ~3 significant digits
    assert s16["loss"] != s32["loss"]  # autocast really ran the matmuls in bf16
    with pytest.raises(ValueError, match="precision"):
        TrainEngine(load_policy(model_dir), lr=1e-3, precision="fp8")


def test_prefix_sharing_step_and_logprobs_equal_unshared_with_groups_whole_per_micro_batch(model_dir):
    from reflow.models.packing import AttentionSpec

    batch = group_batch((6, 4, 5), (2, 3, 4), seed=1)
    shared = AttentionSpec("padded", share_prefix=True)
    rows, results = [], {}
    for name, attention, mbt in (("unshared", "padded", 10_000), ("shared", shared, 30)):
        model = load_policy(model_dir)
        hook = model.get_input_embeddings().register_forward_hook(lambda m, i, o: rows.append(tuple(i[0].shape)))

        def loss_fn(m, mb, norm, attention=attention):
            logp, _ = token_logprobs(m, mb, attention=attention)
            return sequence_nll(logp, mb.tokens["action_mask"], norm.tokens), {}

        before = params(model)
        stats = TrainEngine(model, lr=LR, eps=EPS, grad_clip=0.0, micro_batch_tokens=mbt,
                            attention=attention).step(batch, loss_fn)
        logp, _ = InferenceEngine(model, mbt, attention).logprobs(batch)
        hook.remove()
        results[name] = (stats["loss"], delta(before, model), logp)
    # groups of 27, 21 and 24 tokens are shared rows of 6 + 9, 4 + 9 and 5 + 9 tokens; the 30-token budget
    # counts those, so the first two groups share a micro-batch (a row each, padded to 15) and the third goes
    # alone (train, then inference)
    assert rows[2:] == [(2, 15), (1, 14)] * 2
    assert abs(results["shared"][0] - results["unshared"][0]) < 1e-5
    torch.testing.assert_close(results["shared"][1], results["unshared"][1], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(results["shared"][2], results["unshared"][2], atol=1e-5, rtol=0)
