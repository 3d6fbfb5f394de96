"""Weight-major linears for CPU decode: same outputs as nn.Linear, modules left as they were, used by decode."""

import pytest
import torch

from reflow.engines import skinny
from reflow.engines.generate import GenerationEngine, SamplingParams
from reflow.engines.skinny import eligible_linears, weight_major_linears
from reflow.models.load import load_policy
from reflow.models.presets import init_model


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 16), (3, 1, 16), (2, 5, 16)])
def test_weight_major_linear_matches_nn_linear_to_float_rounding_for_any_leading_shape(bias, shape):
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 40, bias=bias)
    x = torch.randn(shape)
    want = layer(x)
    with weight_major_linears([layer]):
        got = layer(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_inputs_above_max_rows_take_the_plain_linear_bit_for_bit():
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 40)
    x = torch.randn(9, 16)
    with weight_major_linears([layer], max_rows=8):
        got = layer(x)
    assert torch.equal(got, torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_the_override_is_removed_on_exit_and_on_error():
    layer = torch.nn.Linear(4, 4)
    with weight_major_linears([layer]):
        assert "forward" in layer.__dict__
    assert "forward" not in layer.__dict__
    with pytest.raises(RuntimeError), weight_major_linears([layer]):
        raise RuntimeError("boom")
    assert "forward" not in layer.__dict__


def test_gradients_flow_through_the_weight_major_product_like_nn_linear():
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 6)
    x = torch.randn(3, 8, requires_grad=True)
    layer(x).square().sum().backward()
    want = (x.grad.clone(), layer.weight.grad.clone(), layer.bias.grad.clone())
    x.grad, layer.weight.grad, layer.bias.grad = None, None, None
    with weight_major_linears([layer]):
        layer(x).square().sum().backward()
    for g, w in zip((x.grad, layer.weight.grad, layer.bias.grad), want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = init_model("debug-qwen2", tmp_path_factory.mktemp("skinny") / "m", seed=3)  # q/k/v carry biases
    model = load_policy(path).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # larger weights, so greedy decoding depends on the context (see test_generate)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def test_every_decode_forward_uses_weight_major_linears_and_gives_the_plain_tokens_and_logprobs(model, monkeypatch):
    prompts = [[40, 41, 42, 43], [100, 7], [9], [150, 60, 70, 80, 90, 33]]
    params = SamplingParams(max_new_tokens=10, greedy=True)
    plain = GenerationEngine(model, [2], 0, weight_major_decode=False).generate(prompts, params)
    calls = []
    real = skinny._weight_major
    monkeypatch.setattr(skinny, "_weight_major", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast = GenerationEngine(model, [2], 0).generate(prompts, params)
    layers = len(eligible_linears(model))
    decode_steps = max(len(g.tokens) for g in fast) - 1  # the first token comes from the prefill's logits
    assert len(calls) == layers * decode_steps > 0
    assert [g.tokens for g in fast] == [g.tokens for g in plain]
    for f, p in zip(fast, plain):
        torch.testing.assert_close(torch.tensor(f.logprobs), torch.tensor(p.logprobs), rtol=1e-4, atol=1e-5)
    assert all("forward" not in m.__dict__ for m in model.modules())
