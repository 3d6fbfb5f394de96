"""Named model presets: small Llama- and Qwen2-style configs that a fresh machine can create.

`init_model("tiny-llama", out)` writes a randomly initialised Hugging Face folder (config, safetensors
weights, tokenizer) that `AutoModelForCausalLM.from_pretrained(out)` loads. The shapes follow the
families' real configs (RMSNorm, rotary, SwiGLU, grouped-query attention, Qwen2's qkv bias), only
smaller; `debug` is the size the unit tests use, `tiny` the size the demo trains in minutes on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, Qwen2Config

from reflow.models.load import quiet_transformers
from reflow.models.tokenizer import build_byte_tokenizer


@dataclass(frozen=True)
class Preset:
    family: str  # "llama" | "qwen2"
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = True
    description: str = ""


PRESETS: dict[str, Preset] = {
    "debug-llama": Preset("llama", 32, 64, 2, 4, 2, description="unit tests: 2 layers, hidden 32"),
    "debug-qwen2": Preset("qwen2", 32, 64, 2, 4, 2, description="unit tests: Qwen2 layout (qkv bias)"),
    "tiny-llama": Preset("llama", 128, 384, 4, 4, 2, description="demo size: ~0.9M params, trains in minutes on CPU"),
    "tiny-qwen2": Preset("qwen2", 128, 384, 4, 4, 2, description="demo size, Qwen2 layout"),
    "small-llama": Preset("llama", 256, 768, 6, 8, 4, 1024, description="~5M params"),
    "small-qwen2": Preset("qwen2", 256, 768, 6, 8, 4, 1024, description="~5M params, Qwen2 layout"),
    # big enough that compute dominates a CPU pipeline stage (the pipeline benchmark's size)
    "medium-llama": Preset("llama", 512, 1536, 8, 8, 4, 1024, description="~25M params"),
}


class PresetError(ValueError):
    """Unknown preset name."""


def preset_config(name: str, tokenizer) -> PretrainedConfig:
    """The transformers config of preset `name`, with the tokenizer's vocabulary and special ids."""
    if name not in PRESETS:
        raise PresetError(f"unknown model preset '{name}'; choose one of: {', '.join(PRESETS)}")
    p = PRESETS[name]
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_hidden_layers,
        num_attention_heads=p.num_attention_heads,
        num_key_value_heads=p.num_key_value_heads,
        max_position_embeddings=p.max_position_embeddings,
        tie_word_embeddings=p.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
    )
    cls = LlamaConfig if p.family == "llama" else Qwen2Config
    return cls(**common)


def init_model(name: str, out_dir: str | Path, *, seed: int = 0) -> Path:
    """Create preset `name` with random weights (seeded) and save it, with its tokenizer, to `out_dir`."""
    quiet_transformers()
    tokenizer = build_byte_tokenizer()
    config = preset_config(name, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
