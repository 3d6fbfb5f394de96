"""Model presets and the built-in byte tokenizer."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from reflow.models.presets import PRESETS, PresetError, init_model, preset_config
from reflow.models.tokenizer import build_byte_tokenizer




@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    return init_model("debug-llama", tmp_path_factory.mktemp("presets") / "llama", seed=0)


@pytest.fixture(scope="session")
def tokenizer():
    return build_byte_tokenizer()


@pytest.mark.parametrize("name,family", [("debug-llama", "llama"), ("debug-qwen2", "qwen2")])
def test_init_model_writes_a_folder_transformers_loads(tmp_path, name, family):
    out = init_model(name, tmp_path / name)
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    p = PRESETS[name]
    assert model.config.model_type == family
    assert model.config.hidden_size == p.hidden_size and model.config.num_hidden_layers == p.num_hidden_layers
    assert model.config.num_key_value_heads == p.num_key_value_heads
    assert model.config.vocab_size == len(build_byte_tokenizer()) == 261
    assert model.config.eos_token_id == tok.eos_token_id == 2
    assert model.config.pad_token_id == tok.pad_token_id == 0
    # the saved tokenizer encodes as the byte tokenizer does (on NFC text: transformers loads a qwen2
    # folder's tokenizer as Qwen2Tokenizer, which adds NFC normalisation and an <|endoftext|> token)
    text = "Q: 12+3=? A: 15 café"
    assert tok(text).input_ids == build_byte_tokenizer()(text).input_ids
    ids = torch.tensor([tok("12+3=").input_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, 5, 261) and torch.isfinite(logits).all()
    # Qwen2's layout has biases on q/k/v, Llama's does not
    has_bias = model.model.layers[0].self_attn.q_proj.bias is not None
    assert has_bias == (family == "qwen2")


def test_seeded_init_is_deterministic(llama_dir, tmp_path):
    again = init_model("debug-llama", tmp_path / "again", seed=0)
    other = init_model("debug-llama", tmp_path / "other", seed=1)
    w0, w1, w2 = (load_file(d / "model.safetensors") for d in (llama_dir, again, other))
    assert set(w0) == set(w1)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    emb = "model.embed_tokens.weight"
    assert not torch.equal(w0[emb], w2[emb])


def test_unknown_preset_lists_the_presets(tmp_path, tokenizer):
    with pytest.raises(PresetError) as e:
        init_model("huge-llama", tmp_path / "x")
    msg = str(e.value)
    assert "huge-llama" in msg and all(name in msg for name in PRESETS)
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError):  # PresetError is a ValueError
        preset_config("nope", tokenizer)


@pytest.mark.parametrize("text", ["hello world", "  two  spaces\nnew\tline", "naïve café – 日本語 🙂", "<|eos|> literal?",
                                  "decomposed e\u0301 stays decomposed", "\x00\x7f\u200b"])
def test_byte_tokenizer_round_trips_any_text(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text


def test_byte_tokenizer_is_one_token_per_utf8_byte(tokenizer):
    text = "naïve 🙂"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text.encode("utf-8")) == 11
    assert all(5 <= i < 261 for i in ids)


def test_each_digit_is_one_token(tokenizer):
    ids = tokenizer("1234567890", add_special_tokens=False).input_ids
    assert len(ids) == 10 and len(set(ids)) == 10
    assert tokenizer("99", add_special_tokens=False).input_ids == [ids[8], ids[8]]


def test_special_token_ids(tokenizer):
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [3, 4]
    assert len(tokenizer) == 5 + 256
    assert tokenizer("<|eos|>", add_special_tokens=False).input_ids == [2]


def test_chat_template_renders_chatml(tokenizer):
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n")
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
