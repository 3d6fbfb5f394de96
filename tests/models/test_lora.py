"""LoRA through PEFT (reflow/models/lora.py): the train engine's step is PEFT's own forward/backward, the
adapters switch off to the base model, merged weights equal PEFT's merge, adapters round-trip PEFT's format."""

import copy
from types import SimpleNamespace

import pytest
import torch

peft = pytest.importorskip("peft")

from reflow.algorithms.losses import sequence_nll  # noqa: E402
from reflow.data.batch import SampleBatch  # noqa: E402
from reflow.engines.generate import GenerationEngine, SamplingParams  # noqa: E402
from reflow.engines.train import TrainEngine  # noqa: E402
from reflow.models.load import load_critic, load_policy  # noqa: E402
from reflow.models.lora import (LoraError, add_adapters, adapters_off, merged_copy, save_adapters,  # noqa: E402
                                trainable_names)
from reflow.models.packing import token_logprobs, token_values  # noqa: E402
from reflow.models.presets import init_model  # noqa: E402

LORA = SimpleNamespace(rank=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return init_model("debug-llama", tmp_path_factory.mktemp("lora") / "llama", seed=5)


def lora_model(model_dir, seed=0):
    """A LoRA model whose B is random (a fresh adapter has B = 0 and changes nothing)."""
    model = load_policy(model_dir)
    wrapped = add_adapters(model, LORA)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model, wrapped


def make_batch(lens=(7, 7, 7, 7), prompt=3, seed=0) -> SampleBatch:
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(5, 261, (n,), generator=g) for n in lens]
    masks = [(torch.arange(n) >= prompt).long() for n in lens]
    return SampleBatch.from_sequences(range(len(lens)), {"input_ids": seqs, "action_mask": masks})


def test_only_the_adapters_train_and_the_optimizer_holds_only_them(model_dir):
    model, _ = lora_model(model_dir)
    names = trainable_names(model)
    assert names and all("lora_A" in n or "lora_B" in n for n in names)
    engine = TrainEngine(model, lr=1e-2, grad_clip=0.0)
    in_optimizer = {id(p) for g in engine.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    assert len(in_optimizer) == len(names) == 2 * 4 * 2  # A and B x 4 targets x 2 layers


def test_a_lora_train_step_equals_pefts_own_forward_backward_and_adam_step(model_dir):
    batch = make_batch()
    ours, wrapped = lora_model(model_dir)
    theirs = peft.get_peft_model(load_policy(model_dir), copy.deepcopy(wrapped.peft_config["default"]))
    theirs.get_base_model().load_state_dict(ours.state_dict())  # the same adapter
    before = {n: p.detach().clone() for n, p in ours.named_parameters() if p.requires_grad}

    def nll(model, mb, norm):
        logp, _ = token_logprobs(model, mb, attention="padded")
        return sequence_nll(logp, mb.tokens["action_mask"], norm.tokens), {}

    engine = TrainEngine(ours, lr=1e-2, eps=1e-8, grad_clip=0.0, micro_batch_tokens=14)  # 2 micro-batches
    stats = engine.step(batch, nll)

    # PEFT's forward on the whole (equal-length) batch, its logits, the same loss; AdamW over its trainable params
    ids, _ = batch.padded("input_ids")
    mask, _ = batch.padded("action_mask")
    logits = theirs(input_ids=ids).logits[:, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    loss = -(logp * mask[:, 1:]).sum() / mask.sum()
    loss.backward()
    trainable = [p for p in theirs.parameters() if p.requires_grad]
    torch.optim.AdamW(trainable, lr=1e-2, eps=1e-8, weight_decay=0.0).step()

    assert abs(stats["loss"] - loss.item()) < 1e-6
    after = dict(theirs.get_base_model().named_parameters())
    for n, p in ours.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[n])
            torch.testing.assert_close(p, after[n], rtol=0, atol=1e-6)
        else:
            assert torch.equal(p, after[n])  # the base never moves


def test_adapters_off_gives_the_base_models_log_probs_exactly(model_dir):
    model, _ = lora_model(model_dir)
    base = load_policy(model_dir)
    batch = make_batch(lens=(5, 9, 6))
    with torch.no_grad():
        with_adapters, _ = token_logprobs(model, batch)
        with adapters_off(model):
            off, _ = token_logprobs(model, batch)
        plain, _ = token_logprobs(base, batch)
        again, _ = token_logprobs(model, batch)
    assert torch.equal(off, plain)
    assert not torch.allclose(with_adapters, plain)
    assert torch.equal(again, with_adapters)  # switched back on after the block


def test_merged_copy_equals_pefts_merge_and_unload_and_shares_every_other_weight(model_dir):
    model, wrapped = lora_model(model_dir)
    merged = merged_copy(model)
    reference = copy.deepcopy(wrapped).merge_and_unload()
    ours, theirs = dict(merged.named_parameters()), dict(reference.named_parameters())
    assert ours.keys() == theirs.keys()
    for n in ours:
        assert torch.equal(ours[n], theirs[n]), n
    assert merged.model.embed_tokens.weight is model.model.embed_tokens.weight
    assert merged.model.layers[0].self_attn.k_proj.weight is model.model.layers[0].self_attn.k_proj.weight
    q = model.model.layers[0].self_attn.q_proj
    assert torch.equal(q.base_layer.weight, load_policy(model_dir).model.layers[0].self_attn.q_proj.weight)


def test_generation_on_merged_weights_gives_the_tokens_of_the_adapters_and_log_probs_within_float_rounding(model_dir):
    model, _ = lora_model(model_dir)
    prompts = [[5 + (7 * i + j) % 200 for j in range(4 + i % 3)] for i in range(12)]
    params = SamplingParams(max_new_tokens=8, temperature=1.0)
    a = GenerationEngine(model, [0], 0, batch_size=5).generate(prompts, params, keys=list(range(12)), seed=3)
    b = GenerationEngine(merged_copy(model), [0], 0, batch_size=5).generate(prompts, params, keys=list(range(12)),
                                                                           seed=3)
    assert [g.tokens for g in a] == [g.tokens for g in b]
    for x, y in zip(a, b):
        torch.testing.assert_close(torch.as_tensor(x.logprobs), torch.as_tensor(y.logprobs), rtol=0, atol=1e-5)


def test_saved_adapters_load_with_peft_from_pretrained_and_give_the_same_logits(model_dir, tmp_path):
    model, wrapped = lora_model(model_dir)
    tensors = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    folder = save_adapters(tmp_path / "adapter", tensors, wrapped)
    assert (folder / "adapter_model.safetensors").is_file() and (folder / "adapter_config.json").is_file()
    loaded = peft.PeftModel.from_pretrained(load_policy(model_dir), str(folder))
    ids = torch.randint(5, 261, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    again = add_adapters(load_policy(model_dir), LORA, adapter_dir=folder).get_base_model()
    assert [n for n, p in again.named_parameters() if p.requires_grad] == list(tensors)  # resumable: trainable


def test_a_critic_trains_adapters_and_its_new_scalar_head(model_dir):
    critic = load_critic(model_dir)
    add_adapters(critic, LORA)
    names = trainable_names(critic)
    assert any(n.startswith("score.") for n in names) and all("lora_" in n or n.startswith("score.") for n in names)
    batch = make_batch(lens=(6, 8))
    values = token_values(critic, batch)
    values.sum().backward()
    assert all(p.grad is not None for p in critic.parameters() if p.requires_grad)
    with adapters_off(critic):  # the base critic: zero head
        assert torch.equal(token_values(critic, batch), torch.zeros_like(values))


def test_target_modules_that_match_no_layer_are_an_error_naming_the_key_and_the_layers(model_dir):
    bad = SimpleNamespace(**{**vars(LORA), "target_modules": ["qkv"]})
    with pytest.raises(LoraError, match=r"actor\.lora\.target_modules=\['qkv'\] matches no layer.*q_proj"):
        add_adapters(load_policy(model_dir), bad, key="actor.lora")
