"""GenerationEngine: greedy and sampled decoding, log-probs, seeding, filtering and early retirement."""

import warnings

import pytest
import torch

from reflow.data.batch import SampleBatch
from reflow.engines.generate import GenerationEngine, SamplingParams, filter_logits
from reflow.models.load import load_policy
from reflow.models.packing import token_logprobs
from reflow.models.presets import init_model

PAD, EOS = 0, 2
# a few prompts of different lengths (byte-token ids 5..260), so a batch needs left padding
PROMPTS = [
    [40, 41, 42, 43, 44, 45, 46],
    [100, 7],
    [200, 201, 202, 203],
    [9],
    [150, 60, 70, 80, 90, 33, 34, 35, 36, 37, 38],
]
# "EOS" for a quarter of the byte tokens: rows end after a few steps, at different ones, or not at all
MANY_EOS = list(range(5, 261, 4))




@pytest.fixture(scope="session", params=["debug-llama", "debug-qwen2"])
def model(request, tmp_path_factory):
    path = init_model(request.param, tmp_path_factory.mktemp("generate") / request.param, seed=2)
    model = load_policy(path).eval()
    # A fresh preset (init std 0.02, tied embeddings) greedily repeats the last prompt token forever, which
    # would make every greedy comparison vacuous; larger random weights make the output depend on context.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 or name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def engine(model, eos=(EOS,), batch_size=256):
    return GenerationEngine(model, eos_token_ids=eos, pad_token_id=PAD, batch_size=batch_size)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_greedy_batched_equals_hf_generate_per_prompt(model):
    n = 12
    outs = engine(model).generate(PROMPTS, SamplingParams(max_new_tokens=n, greedy=True))
    assert [g.index for g in outs] == list(range(len(PROMPTS)))
    for g, p in zip(outs, PROMPTS):
        ids = torch.tensor([p])
        with torch.no_grad():
            ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 do_sample=False, eos_token_id=EOS, pad_token_id=PAD)[0, len(p):]
        assert g.prompt_ids == p
        assert g.tokens == ref.tolist()
        assert len(g.logprobs) == len(g.tokens)


def _as_batch(generations):
    return SampleBatch.from_sequences(
        [g.index for g in generations],
        {"input_ids": [g.prompt_ids + g.tokens for g in generations],
         "action_mask": [[0] * len(g.prompt_ids) + [1] * len(g.tokens) for g in generations]},
    )


def _assert_logprobs_match(model, outs, T):
    """The log-probs the sampler returned equal a forward's token log-probs at temperature T."""
    batch = _as_batch(outs)
    with torch.no_grad():
        ref, _ = token_logprobs(model, batch, temperature=T)
    mine = torch.tensor([lp for g in outs for lp in [0.0] * len(g.prompt_ids) + g.logprobs])
    mask = batch.tokens["action_mask"].bool()
    torch.testing.assert_close(mine[mask], ref[mask], atol=1e-4, rtol=0)
    # log-probs are of the unfiltered distribution, so they are not all log(1) even with filtering
    assert (mine[mask] < -1e-3).all()


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (20, 0.8)])
def test_sampled_logprobs_equal_token_logprobs_at_the_same_temperature(model, top_k, top_p):
    T = 0.7
    params = SamplingParams(max_new_tokens=10, temperature=T, top_k=top_k, top_p=top_p)
    _assert_logprobs_match(model, engine(model).generate(PROMPTS, params, gen(0)), T)


def test_same_seed_same_samples_different_seed_different(model):
    params = SamplingParams(max_new_tokens=8, temperature=1.0)
    a = engine(model).generate(PROMPTS, params, gen(1))
    b = engine(model).generate(PROMPTS, params, gen(1))
    c = engine(model).generate(PROMPTS, params, gen(2))
    assert [g.tokens for g in a] == [g.tokens for g in b]
    assert [g.logprobs for g in a] == [g.logprobs for g in b]
    assert [g.tokens for g in a] != [g.tokens for g in c]


def test_top_k_1_sampling_equals_greedy(model):
    greedy = engine(model).generate(PROMPTS, SamplingParams(max_new_tokens=8, greedy=True))
    top1 = engine(model).generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=1.3, top_k=1), gen(3))
    assert [g.tokens for g in top1] == [g.tokens for g in greedy]


def test_filter_logits_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.1, 0.3, 0.05]])
    logits = probs.log()
    # sorted: 0.5, 0.3, 0.1, 0.05, 0.05 -> cumulative 0.5, 0.8, 0.9, ...
    keep = lambda p: torch.isfinite(filter_logits(logits, 0, p))[0].tolist()  # noqa: E731
    assert keep(0.5) == [False, True, False, False, False]  # the top token alone reaches 0.5
    assert keep(0.6) == [False, True, False, True, False]
    assert keep(0.85) == [False, True, True, True, False]
    assert keep(0.01) == [False, True, False, False, False]  # the top token always stays
    assert keep(1.0) == [True] * 5
    kept = filter_logits(logits, 0, 0.6)
    torch.testing.assert_close(kept.softmax(-1)[0, [1, 3]], torch.tensor([0.5, 0.3]) / 0.8)


def test_filter_logits_top_k_and_rows_are_independent():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0], [9.0, 1.0, 8.0, 7.0]])
    out = filter_logits(logits, 2, 1.0)
    assert torch.isfinite(out).tolist() == [[False, True, True, False], [True, False, True, False]]
    assert torch.equal(out[torch.isfinite(out)], torch.tensor([4.0, 3.0, 9.0, 8.0]))


def test_early_retirement_rows_end_at_their_own_eos(model):
    eos = set(MANY_EOS)
    n = 12
    outs = engine(model, eos=MANY_EOS).generate(PROMPTS, SamplingParams(max_new_tokens=n, greedy=True))
    assert [g.index for g in outs] == list(range(len(PROMPTS)))  # exactly one generation per prompt
    lengths = [len(g.tokens) for g in outs]
    assert len(set(lengths)) > 1, f"rows should end at different steps, got {lengths}"
    assert any(g.finished for g in outs) and not all(g.finished for g in outs)
    for g in outs:
        assert 1 <= len(g.tokens) <= n and len(g.logprobs) == len(g.tokens)
        assert g.finished == (g.tokens[-1] in eos)
        assert not any(t in eos for t in g.tokens[:-1])  # nothing after the first eos
        if not g.finished:
            assert len(g.tokens) == n
    # retiring rows (and their cache entries) does not change what the remaining rows decode
    for g, p in zip(outs, PROMPTS):
        alone = engine(model, eos=MANY_EOS).generate([p], SamplingParams(max_new_tokens=n, greedy=True))[0]
        assert (alone.tokens, alone.finished) == (g.tokens, g.finished)
        torch.testing.assert_close(torch.tensor(alone.logprobs), torch.tensor(g.logprobs), atol=1e-5, rtol=0)


def test_stream_yields_in_finish_order_and_generate_in_prompt_order(model):
    params = SamplingParams(max_new_tokens=12, greedy=True)
    streamed = list(engine(model, eos=MANY_EOS).stream(PROMPTS, params))
    assert sorted(g.index for g in streamed) == list(range(len(PROMPTS)))
    lengths = [len(g.tokens) for g in streamed]
    assert lengths == sorted(lengths)  # a row finishing at an earlier step is yielded earlier
    assert [g.index for g in streamed] != list(range(len(PROMPTS)))
    ordered = engine(model, eos=MANY_EOS).generate(PROMPTS, params)
    assert [g.index for g in ordered] == list(range(len(PROMPTS)))
    by_index = {g.index: g.tokens for g in streamed}
    assert [g.tokens for g in ordered] == [by_index[i] for i in range(len(PROMPTS))]


def test_chunked_batches_give_the_same_greedy_results(model):
    params = SamplingParams(max_new_tokens=10, greedy=True)
    whole = engine(model, eos=MANY_EOS).generate(PROMPTS, params)
    chunked = engine(model, eos=MANY_EOS, batch_size=2).generate(PROMPTS, params)
    assert [(g.index, g.tokens) for g in chunked] == [(g.index, g.tokens) for g in whole]


def test_max_new_tokens_cuts_unfinished_rows(model):
    never = 10_000  # an EOS id outside the vocabulary: no row can end early
    outs = engine(model, eos=[never]).generate(PROMPTS, SamplingParams(max_new_tokens=5, temperature=1.0), gen(4))
    assert len(outs) == len(PROMPTS)
    for g in outs:
        assert len(g.tokens) == len(g.logprobs) == 5
        assert g.finished is False


def test_empty_prompt_is_an_error(model):
    with pytest.raises(ValueError, match="empty prompt"):
        engine(model).generate([[5, 6], []], SamplingParams(max_new_tokens=2, greedy=True))


def test_generation_restores_training_mode(model):
    model.train()
    try:
        engine(model).generate(PROMPTS[:1], SamplingParams(max_new_tokens=2, greedy=True))
        assert model.training
    finally:
        model.eval()


def test_generation_uses_no_deprecated_transformers_arguments(model):
    # transformers warns on every forward given a deprecated keyword (e.g. the KV cache as `past_key_values`
    # where the forward takes `cache`); prefill, decode and refill must all call it the current way
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine(model, batch_size=2).generate(PROMPTS, SamplingParams(max_new_tokens=4, greedy=True))
    deprecations = [str(w.message) for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert not deprecations, deprecations


# ---------------------------------------------------------------- continuous batching (refilling freed slots)
from reflow.engines import generate as generate_mod  # noqa: E402

_g = torch.Generator().manual_seed(11)
# more prompts than slots, of very different lengths (a later long prompt widens the running cache window)
MANY_PROMPTS = [torch.randint(5, 261, (n,), generator=_g).tolist() for n in [3, 17, 1, 8, 25, 2, 12, 5, 30, 4, 9, 6]]


def hf_greedy(model, prompt, n, eos):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             do_sample=False, eos_token_id=list(eos), pad_token_id=PAD)[0, len(prompt):]
    return out.tolist()


@pytest.mark.parametrize("batch_size,refill_min", [(1, 1), (2, 1), (3, 1), (4, 3)])
@pytest.mark.parametrize("eos", [(EOS,), tuple(MANY_EOS)], ids=["eos", "many_eos"])
def test_refilled_greedy_equals_hf_generate_per_prompt(model, batch_size, refill_min, eos):
    n = 14
    eng = GenerationEngine(model, eos, PAD, batch_size, refill_min=refill_min)
    outs = eng.generate(MANY_PROMPTS, SamplingParams(max_new_tokens=n, greedy=True))
    assert [g.index for g in outs] == list(range(len(MANY_PROMPTS)))
    if len(eos) > 1:
        assert len({len(g.tokens) for g in outs}) > 2, "rows should end at different steps"
    for g, p in zip(outs, MANY_PROMPTS):
        ref = hf_greedy(model, p, n, eos)
        assert g.prompt_ids == p
        assert g.tokens == ref
        assert g.finished == (g.tokens[-1] in eos) and len(g.logprobs) == len(g.tokens)


def test_refilled_logprobs_equal_logprobs_of_each_prompt_alone(model):
    n = 12
    params = SamplingParams(max_new_tokens=n, greedy=True)
    outs = engine(model, eos=MANY_EOS, batch_size=3).generate(MANY_PROMPTS, params)
    for g, p in zip(outs, MANY_PROMPTS):
        alone = engine(model, eos=MANY_EOS).generate([p], params)[0]
        assert (alone.tokens, alone.finished) == (g.tokens, g.finished)
        torch.testing.assert_close(torch.tensor(alone.logprobs), torch.tensor(g.logprobs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (20, 0.8)])
def test_refilled_sampled_logprobs_equal_token_logprobs(model, top_k, top_p):
    T = 0.8
    params = SamplingParams(max_new_tokens=10, temperature=T, top_k=top_k, top_p=top_p)
    outs = engine(model, eos=MANY_EOS, batch_size=3).generate(MANY_PROMPTS, params, gen(5))
    assert len({len(g.tokens) for g in outs}) > 1
    batch = _as_batch(outs)
    with torch.no_grad():
        ref, _ = token_logprobs(model, batch, temperature=T)
    mine = torch.tensor([lp for g in outs for lp in [0.0] * len(g.prompt_ids) + g.logprobs])
    mask = batch.tokens["action_mask"].bool()
    torch.testing.assert_close(mine[mask], ref[mask], atol=1e-4, rtol=0)


def test_refilled_sampling_is_deterministic_given_the_seed(model):
    params = SamplingParams(max_new_tokens=9, temperature=1.0)
    run = lambda seed: engine(model, eos=MANY_EOS, batch_size=3).generate(MANY_PROMPTS, params, gen(seed))  # noqa: E731
    a, b, c = run(7), run(7), run(8)
    assert [(g.tokens, g.logprobs, g.finished) for g in a] == [(g.tokens, g.logprobs, g.finished) for g in b]
    assert [g.tokens for g in a] != [g.tokens for g in c]
    # top-k 1 sampling with refills is greedy decoding
    top1 = engine(model, eos=MANY_EOS, batch_size=3).generate(
        MANY_PROMPTS, SamplingParams(max_new_tokens=9, temperature=1.3, top_k=1), gen(3))
    greedy = engine(model, eos=MANY_EOS, batch_size=3).generate(MANY_PROMPTS, SamplingParams(max_new_tokens=9, greedy=True))
    assert [g.tokens for g in top1] == [g.tokens for g in greedy]


def simulate(budgets, batch_size, refill_min, refill=True):
    """Reference schedule: live rows at each sampling step, and the step at which each prompt ends."""
    queue, live, occupancy, end_step, got = list(range(len(budgets))), [], [], {}, {}
    step = 0
    while queue or live:
        free = batch_size - len(live)
        if queue and free and (not live or (refill and free >= min(refill_min, len(queue)))):
            take, queue = queue[:free], queue[free:]
            live += take
            got.update({i: 0 for i in take})
        occupancy.append(len(live))
        for i in live:
            got[i] += 1
        for i in [i for i in live if got[i] == budgets[i]]:
            end_step[i] = step
            live.remove(i)
        step += 1
    return occupancy, end_step


@pytest.mark.parametrize("refill,refill_min", [(True, 1), (True, 2), (False, 1)])
def test_freed_slots_are_refilled_from_the_queue(model, monkeypatch, refill, refill_min):
    budgets = [9, 2, 3, 1, 4, 2, 5, 7, 1, 3]
    prompts = [MANY_PROMPTS[i % len(MANY_PROMPTS)] for i in range(len(budgets))]
    eng = GenerationEngine(model, [10_000], PAD, batch_size=3, refill=refill, refill_min=refill_min)
    occupancy = []
    real_sample = eng._sample
    monkeypatch.setattr(eng, "_sample", lambda logits, *a: (occupancy.append(logits.shape[0]), real_sample(logits, *a))[1])
    streamed = list(eng.stream(prompts, SamplingParams(max_new_tokens=99, temperature=1.0), gen(0), max_new_tokens=budgets))
    expected, end_step = simulate(budgets, 3, refill_min, refill)
    assert occupancy == expected
    assert [len(g.tokens) for g in sorted(streamed, key=lambda g: g.index)] == budgets
    # stream yields each sample at the step it ends
    steps = [end_step[g.index] for g in streamed]
    assert steps == sorted(steps)
    if refill and refill_min == 1:  # the batch is full for as long as prompts are waiting
        static, _ = simulate(budgets, 3, refill_min, refill=False)
        assert len(occupancy) < len(static)
        assert occupancy[:len(occupancy) - max(budgets)] == [3] * (len(occupancy) - max(budgets))


def test_stream_yields_before_later_prompts_are_started(model):
    prompts = MANY_PROMPTS[:6]
    seen = []  # input shapes of the model calls
    hook = model.register_forward_pre_hook(lambda m, a, kw: seen.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    try:
        it = engine(model, eos=[10_000], batch_size=2).stream(
            prompts, SamplingParams(max_new_tokens=20, greedy=True), max_new_tokens=[1, 20, 20, 20, 20, 20])
        first = next(it)
        assert first.index == 0 and len(first.tokens) == 1
        assert seen == [(2, 17)]  # only the prefill of the first two prompts has run when the first one is yielded
        rest = list(it)
    finally:
        hook.remove()
    assert sorted(g.index for g in rest) == [1, 2, 3, 4, 5]


def test_per_prompt_budgets(model):
    budgets = [3, 0, 7, 1, 12, 5, 2, 9, 4, 6, 11, 8]
    outs = engine(model, eos=[EOS], batch_size=4).generate(MANY_PROMPTS, SamplingParams(max_new_tokens=2, greedy=True),
                                                           max_new_tokens=budgets)
    assert [g.index for g in outs] == list(range(len(MANY_PROMPTS)))
    for g, p, m in zip(outs, MANY_PROMPTS, budgets):
        if m == 0:
            assert (g.tokens, g.logprobs, g.finished) == ([], [], False)
            continue
        assert g.tokens == hf_greedy(model, p, m, (EOS,))
        assert len(g.tokens) == m or g.finished
    with pytest.raises(ValueError, match="entries"):
        engine(model).generate(MANY_PROMPTS, SamplingParams(), max_new_tokens=[1, 2])
    with pytest.raises(ValueError, match=">= 0"):
        engine(model).generate(MANY_PROMPTS[:2], SamplingParams(), max_new_tokens=[1, -1])
    assert engine(model).generate(MANY_PROMPTS[:2], SamplingParams(max_new_tokens=0)) == [
        generate_mod.Generation(i, p, [], [], False) for i, p in enumerate(MANY_PROMPTS[:2])]


def test_cache_window_moves_back_when_the_buffer_is_full(model, monkeypatch):
    """Many short rows through one slot: the right-aligned window reaches the buffer's end and is moved."""
    moves = []
    real = generate_mod._SlotCache._window

    def spy(self, width):
        if not (self.end >= width and self.end < self.cap):
            moves.append((self.rows, self.end, width))
        return real(self, width)

    monkeypatch.setattr(generate_mod._SlotCache, "_window", spy)
    n = 10
    outs = engine(model, eos=[10_000], batch_size=2).generate(MANY_PROMPTS, SamplingParams(max_new_tokens=n, greedy=True))
    assert any(rows > 0 for rows, _, _ in moves), moves  # a move with live rows (not only the first admission)
    for g, p in zip(outs, MANY_PROMPTS):
        assert g.tokens == hf_greedy(model, p, n, (10_000,))


# ---------------------------------------------------------------- keyed (batch-invariant) sampling
from reflow.engines.generate import gumbel_sample, keyed_uniforms, sample_seed  # noqa: E402

KEYS = [1000 + 7 * i for i in range(len(MANY_PROMPTS))]  # e.g. sample ids: distinct, not 0..n-1
KEYED = SamplingParams(max_new_tokens=10, temperature=0.9, top_k=50, top_p=0.95)


def keyed(model, prompts, keys, seed=17, params=KEYED, batch_size=8, eos=(EOS,)):
    return GenerationEngine(model, eos, PAD, batch_size).generate(prompts, params, keys=keys, seed=seed)


def assert_same_samples(a, b):
    """Same tokens (exactly) and log-probs (up to the model's float rounding, which the batch's padding and
    size change: a row's logits are not bitwise the same alone and in a batch)."""
    assert [(g.prompt_ids, g.tokens, g.finished) for g in a] == [(g.prompt_ids, g.tokens, g.finished) for g in b]
    for x, y in zip(a, b):
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("eos", [(EOS,), tuple(MANY_EOS)], ids=["eos", "many_eos"])
def test_keyed_sampling_is_batch_invariant(model, eos):
    P, K = MANY_PROMPTS, KEYS
    whole = keyed(model, P, K, eos=eos)  # 12 prompts through 8 slots: refills too
    assert len({tuple(g.tokens) for g in whole}) == len(P)
    if len(eos) > 1:
        assert len({len(g.tokens) for g in whole}) > 2, "rows should end at different steps"
    one_by_one = [keyed(model, [p], [k], eos=eos)[0] for p, k in zip(P, K)]
    reversed_ = keyed(model, P[::-1], K[::-1], eos=eos)[::-1]
    halves = keyed(model, P[:6], K[:6], eos=eos) + keyed(model, P[6:], K[6:], eos=eos)
    interleaved = keyed(model, P[1::2], K[1::2], eos=eos)  # another split, and a small batch with refills
    interleaved = [g for pair in zip(keyed(model, P[::2], K[::2], batch_size=3, eos=eos), interleaved) for g in pair]
    for other in (one_by_one, reversed_, halves, interleaved):
        assert_same_samples(whole, other)


def test_keyed_sampling_depends_on_seed_and_key_only(model):
    P, K = MANY_PROMPTS, KEYS
    a, b = keyed(model, P, K), keyed(model, P, K)
    assert [(g.tokens, g.logprobs) for g in a] == [(g.tokens, g.logprobs) for g in b]  # same call: bitwise
    other_seed = keyed(model, P, K, seed=18)
    other_keys = keyed(model, P, [k + 1 for k in K])
    for c in (other_seed, other_keys):
        differ = [x.tokens != y.tokens for x, y in zip(a, c)]
        assert sum(differ) >= len(P) // 2, differ
    # one prompt under n keys (a GRPO group): n different samples
    group = keyed(model, [P[1]] * 6, list(range(40, 46)))
    assert len({tuple(g.tokens) for g in group}) == 6
    # sample_seed mixes its parts: a run seed and a step give distinct seeds
    assert len({sample_seed(s, t) for s in range(3) for t in range(50)}) == 150
    assert sample_seed(1, 2) == sample_seed(1, 2) != sample_seed(2, 1)


def test_keyed_sampling_argument_errors(model):
    eng = engine(model)
    with pytest.raises(ValueError, match="either a generator or keys"):
        eng.generate(PROMPTS, KEYED, gen(0), keys=range(len(PROMPTS)))
    with pytest.raises(ValueError, match="entries"):
        eng.generate(PROMPTS, KEYED, keys=[1, 2])
    with pytest.raises(ValueError, match="distinct"):
        eng.generate(PROMPTS[:3], KEYED, keys=[4, 5, 4])
    # greedy ignores the keys; keys may be any (big, negative) Python ints
    greedy = SamplingParams(max_new_tokens=6, greedy=True)
    ks = [-1, 2 ** 64 + 3, 2 ** 63, 0, 12345]
    plain = eng.generate(PROMPTS, greedy)
    assert [g.tokens for g in eng.generate(PROMPTS, greedy, keys=ks)] == [g.tokens for g in plain]
    assert len(eng.generate(PROMPTS, KEYED, keys=ks, seed=-(2 ** 70))) == len(PROMPTS)


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (20, 0.8)])
def test_keyed_sampled_logprobs_equal_token_logprobs(model, top_k, top_p):
    T = 0.7
    params = SamplingParams(max_new_tokens=10, temperature=T, top_k=top_k, top_p=top_p)
    _assert_logprobs_match(model, keyed(model, MANY_PROMPTS, KEYS, params=params, batch_size=3, eos=MANY_EOS), T)


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.5), (8, 0.7)])
def test_keyed_sampling_never_picks_a_filtered_token(model, top_k, top_p):
    T = 1.5  # a flat distribution: without the filter, tokens outside it would be picked often
    params = SamplingParams(max_new_tokens=10, temperature=T, top_k=top_k, top_p=top_p)
    outs = keyed(model, MANY_PROMPTS, KEYS, params=params)
    picked = 0
    for g in outs:
        ids = torch.tensor([g.prompt_ids + g.tokens])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(g.prompt_ids) - 1:-1].float() / T
        kept = torch.isfinite(filter_logits(logits, top_k, top_p))
        assert kept[torch.arange(len(g.tokens)), torch.tensor(g.tokens)].all()
        picked += int((logits.argmax(-1) != torch.tensor(g.tokens)).sum())
    assert picked > 0  # not greedy: the filter keeps more than one token and others are drawn
    # top-k 1 keyed sampling is greedy decoding
    top1 = keyed(model, MANY_PROMPTS, KEYS, params=SamplingParams(max_new_tokens=9, temperature=1.3, top_k=1))
    greedy = engine(model).generate(MANY_PROMPTS, SamplingParams(max_new_tokens=9, greedy=True))
    assert [g.tokens for g in top1] == [g.tokens for g in greedy]


def splitmix64(state, n):
    """Reference SplitMix64 in Python ints: the first n outputs of `state`."""
    M, out = (1 << 64) - 1, []
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & M
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
        out.append(z ^ (z >> 31))
    return out


def test_int64_hash_is_splitmix64():
    """The torch int64 hash (wrapping multiply, emulated logical shifts) gives SplitMix64's outputs."""
    assert hex(splitmix64(0, 1)[0]) == "0xe220a8397b1dcdaf"  # the published first output of seed 0
    for state in [0, 1, 1234567, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 5]:
        signed = state - 2 ** 64 if state >= 2 ** 63 else state
        mine = generate_mod._fmix(torch.tensor(signed) + torch.arange(1, 6) * generate_mod._GAMMA)
        assert [int(x) % 2 ** 64 for x in mine] == splitmix64(state, 5)


def test_keyed_uniforms_are_per_entry_pure_functions():
    keys, pos = torch.tensor([5, -3, 2 ** 40, 7]), torch.tensor([0, 3, 9, 0])
    u = keyed_uniforms(11, keys, pos, 50)
    assert u.dtype == torch.float64 and ((u > 0) & (u < 1)).all()
    # a row's noise does not depend on the other rows, the vocabulary size or the column range asked for
    torch.testing.assert_close(keyed_uniforms(11, keys[2:3], pos[2:3], 80)[:, :50], u[2:3], atol=0, rtol=0)
    torch.testing.assert_close(keyed_uniforms(11, keys, pos, 50, lo=20, hi=30), u[:, 20:30], atol=0, rtol=0)
    # and changes with the seed, the key and the position
    assert not torch.equal(keyed_uniforms(12, keys, pos, 50), u)
    assert not torch.equal(keyed_uniforms(11, keys + 1, pos, 50), u)
    assert not torch.equal(keyed_uniforms(11, keys, pos + 1, 50), u)
    # roughly uniform, uncorrelated neighbours (a broken shift or multiply shows here)
    big = keyed_uniforms(3, torch.arange(400), torch.zeros(400, dtype=torch.long), 500).flatten()
    assert abs(big.mean().item() - 0.5) < 0.005 and abs(big.var().item() - 1 / 12) < 0.002
    assert abs(torch.corrcoef(torch.stack([big[:-1], big[1:]]))[0, 1].item()) < 0.01
    counts = torch.histc(big.float(), bins=20, min=0, max=1)
    assert ((counts - big.numel() / 20).abs() < 0.03 * big.numel() / 20).all()


def test_keyed_uniforms_are_the_top_53_bits_of_splitmix64_outputs():
    """Entry [b, v] is the (v+1)-th SplitMix64 output of row b's state, its top 53 bits m mapped to (m + 0.5) / 2^53."""
    keys, pos = torch.tensor([5, -3, 2 ** 40]), torch.tensor([0, 3, 9])
    u = keyed_uniforms(11, keys, pos, 6)
    for b, state in enumerate(generate_mod._row_states(11, keys, pos).tolist()):
        ref = [((z >> 11) + 0.5) / 2 ** 53 for z in splitmix64(state % 2 ** 64, 6)]
        assert u[b].tolist() == ref


def test_gumbel_sample_is_the_float64_argmax_of_logits_plus_gumbel_noise(monkeypatch):
    """argmax(float64(logits) + G), G = -log(-log u) of keyed_uniforms, bit for bit, whatever the row blocks."""
    g = torch.Generator().manual_seed(1)
    logits = filter_logits(torch.randn(9, 1000, generator=g) * 3, 0, 0.95)
    keys, pos = torch.arange(9) * 7 - 20, torch.arange(9) % 4
    gumbel = keyed_uniforms(5, keys, pos, 1000).log().neg().log().neg()
    expected = (logits.double() + gumbel).argmax(-1)
    for block in (1000, 2500, 1 << 18):  # one row, two rows, all rows per block
        monkeypatch.setattr(generate_mod, "_NOISE_ELEMENTS", block)
        assert torch.equal(gumbel_sample(logits, 5, keys, pos), expected)


@pytest.mark.parametrize("over", ["keys", "positions"])
def test_gumbel_max_frequencies_match_softmax(over):
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.5, -3.0, float("-inf")])
    probs = logits.softmax(-1)
    n = 60_000
    counter = torch.arange(n) * 3 + 1
    zero = torch.zeros(n, dtype=torch.long)
    keys, positions = (counter, zero) if over == "keys" else (zero + 42, counter)
    tok = gumbel_sample(logits.expand(n, -1), 2024, keys, positions)
    counts = torch.bincount(tok, minlength=len(logits)).double()
    assert counts[-1] == 0  # a -inf (filtered) token is never drawn
    expected = n * probs[:-1].double()
    chi2 = ((counts[:-1] - expected) ** 2 / expected).sum().item()
    assert chi2 < 22.5, (chi2, counts.tolist(), expected.tolist())  # 5 degrees of freedom: p ~ 0.0004


def test_gumbel_sample_rows_are_independent_of_the_batch(monkeypatch):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 300, generator=g) * 2
    logits = filter_logits(logits, 30, 0.9)
    keys, pos = torch.arange(40) * 11, torch.arange(40) % 7
    whole = gumbel_sample(logits, 9, keys, pos)
    assert torch.isfinite(logits.gather(-1, whole[:, None])).all()  # only kept tokens
    perm = torch.randperm(40, generator=g)
    assert torch.equal(gumbel_sample(logits[perm], 9, keys[perm], pos[perm]), whole[perm])
    assert torch.equal(torch.cat([gumbel_sample(logits[i:i + 1], 9, keys[i:i + 1], pos[i:i + 1]) for i in range(40)]),
                       whole)
    monkeypatch.setattr(generate_mod, "_NOISE_ELEMENTS", 700)  # noise made two rows at a time
    assert torch.equal(gumbel_sample(logits, 9, keys, pos), whole)


# ---------------------------------------------------------------- shared prompts (one prefill per distinct prompt)
# GRPO-shaped: groups of identical prompts (of different lengths), one group bigger than the slots, and a prompt
# that comes back later in the call (its earlier rows have all been admitted by then)
GROUPED = [MANY_PROMPTS[i] for i in [1] * 5 + [0] * 3 + [4] * 4 + [2] * 2 + [1] * 2 + [3]]


def _prefilled_rows(eng, monkeypatch):
    """Number of prompt rows each prefill forward of `eng` runs, appended to the returned list."""
    rows, real = [], eng._prefill
    monkeypatch.setattr(eng, "_prefill", lambda prompts, device: (rows.append(len(prompts)), real(prompts, device))[1])
    return rows


@pytest.mark.parametrize("mode", ["greedy", "keyed", "generator"])
def test_shared_prefill_gives_the_tokens_and_logprobs_of_prefilling_each_row_across_refills(model, monkeypatch, mode):
    params = SamplingParams(max_new_tokens=9, greedy=True) if mode == "greedy" else KEYED
    keys = list(range(500, 500 + len(GROUPED))) if mode == "keyed" else None
    run = {}
    for share in (True, False):  # 3 slots: the first group of 5 is split over admissions; rows end at many steps
        eng = GenerationEngine(model, MANY_EOS, PAD, batch_size=3, refill_min=1, share_prefill=share)
        prefilled = _prefilled_rows(eng, monkeypatch)
        run[share] = eng.generate(GROUPED, params, gen(4) if mode == "generator" else None, keys=keys, seed=9)
        if share:  # each distinct prompt once, also the one that comes back later in the call
            assert sum(prefilled) == 5 and len(prefilled) > 3, prefilled
        else:
            assert sum(prefilled) == len(GROUPED)
    assert len({len(g.tokens) for g in run[True]}) > 2, "rows should end at different steps (refills)"
    if mode != "greedy":  # the samples of a group differ
        assert len({tuple(g.tokens) for g in run[True][:5]}) > 1
    assert_same_samples(run[True], run[False])


# ---------------------------------------------------------------- continuing rows from stored K/V (next turns)
from reflow.engines.generate import KVStore  # noqa: E402


@pytest.mark.parametrize("mode", ["greedy", "keyed"])
def test_rows_continued_from_a_kv_store_equal_prefilling_their_whole_prompt(model, monkeypatch, mode):
    params = SamplingParams(max_new_tokens=8, greedy=True) if mode == "greedy" else KEYED
    eng = GenerationEngine(model, MANY_EOS, PAD, batch_size=3, refill_min=1)
    store = KVStore()
    first = eng.generate(MANY_PROMPTS, params, keys=KEYS, seed=3, kv_store=store)
    assert len(store) == len(MANY_PROMPTS)
    # next turn: 10 rows go on with observations of 0-4 tokens, one key's prompt no longer extends its entry,
    # and two new rows (fresh prefill in the same admissions as continued ones)
    nxt = [g.prompt_ids + g.tokens + [60 + j] * (j % 5) for j, g in enumerate(first[:10])]
    nxt[4] = [7] + nxt[4]
    nxt += [MANY_PROMPTS[0], MANY_PROMPTS[5]]
    keys = KEYS[:10] + [1, 2]
    fed = _prefilled_rows(eng, monkeypatch)  # fresh prefills only: the continued rows go through _extend
    cont = eng.generate(nxt, params, keys=keys, seed=4, kv_store=store)
    assert sum(fed) == 3  # the row whose prompt changed and the two new ones
    whole = GenerationEngine(model, MANY_EOS, PAD, batch_size=3, refill_min=1).generate(nxt, params, keys=keys, seed=4)
    assert len({len(g.tokens) for g in cont}) > 2, "rows should end at different steps (refills)"
    assert_same_samples(cont, whole)
    with pytest.raises(ValueError, match="pass keys too"):
        eng.generate(nxt, params, kv_store=store)


# ---------------------------------------------------------------- long-tail migration: rows handed between calls
from reflow.engines.generate import Handover  # noqa: E402


def test_rows_taken_mid_call_and_adopted_by_another_call_get_the_tokens_of_one_uninterrupted_call(model):
    """A source call hands its unfinished rows (live and still waiting) over at its 4th decode step; a target
    call, with shorter prompts and fewer rows (its cache grows), adopts them at its 2nd: every row's tokens
    are those of one call, none lost or doubled."""
    whole = keyed(model, MANY_PROMPTS, KEYS, eos=MANY_EOS)
    src_p, src_k, dst_p, dst_k = MANY_PROMPTS[4:], KEYS[4:], MANY_PROMPTS[:4], KEYS[:4]
    handed: list[Handover] = []
    polls = {"src": 0, "dst": 0}

    def leave(unfinished, take):
        polls["src"] += 1
        if polls["src"] == 4:
            handed.extend(take())

    def adopt(unfinished, take):
        polls["dst"] += 1
        return handed if polls["dst"] == 2 else None

    src = list(GenerationEngine(model, MANY_EOS, PAD, batch_size=4).stream(src_p, KEYED, keys=src_k, seed=17,
                                                                            steer=leave))
    assert polls["src"] == 4 and src and handed  # some rows ended before, some were handed over
    assert sorted([g.index for g in src] + [h.generation.index for h in handed]) == list(range(len(src_p)))
    assert any(h.generation.tokens for h in handed) and all(h.budget == KEYED.max_new_tokens for h in handed)
    dst = list(GenerationEngine(model, MANY_EOS, PAD, batch_size=8).stream(dst_p, KEYED, keys=dst_k, seed=17,
                                                                            steer=adopt))
    assert len(dst) == len(dst_p) + len(handed)
    back = {4 + g.index: g for g in src}  # every row under its index in MANY_PROMPTS
    for g in dst:
        at = g.index if g.index < len(dst_p) else 4 + handed[g.index - len(dst_p)].generation.index
        back[at] = g
    assert sorted(back) == list(range(len(MANY_PROMPTS)))
    assert_same_samples(whole, [back[i] for i in range(len(MANY_PROMPTS))])
