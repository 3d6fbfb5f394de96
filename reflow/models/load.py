"""Loading and saving models as Hugging Face folders.

Roles map onto stock transformers classes, so every checkpoint reflow writes is a safetensors folder
that `from_pretrained` (and vLLM) loads back without reflow:
    actor / ref : AutoModelForCausalLM
    critic      : AutoModelForTokenClassification, num_labels=1   (a scalar value per token)
    reward      : AutoModelForSequenceClassification, num_labels=1 (a scalar score at the last token)
A critic or reward model started from a causal-LM folder gets the backbone's weights and a new head.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PreTrainedTokenizerFast,
)



def quiet_transformers() -> None:
    """Silence load/save progress bars and warnings: reflow prints its own progress."""
    import huggingface_hub

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


quiet_transformers()
log = logging.getLogger("reflow.models")


class ModelError(ValueError):
    """A model folder that cannot be used; the message says what to do."""


def check_model_dir(path: str | Path, key: str = "model path") -> Path:
    p = Path(path)
    if not p.is_dir():
        raise ModelError(f"{key} '{p}' is not a folder; create a model with "
                         f"`reflow init-model --preset tiny-llama --out {p}` or point {key} at a HF model folder")
    if not (p / "config.json").is_file():
        raise ModelError(f"{key} '{p}' has no config.json; it must be a Hugging Face model folder (save_pretrained output)")
    return p


def load_tokenizer(path: str | Path):
    p = check_model_dir(path)
    declared = None
    if (p / "tokenizer_config.json").is_file():
        declared = json.loads((p / "tokenizer_config.json").read_text()).get("tokenizer_class")
    if declared in ("TokenizersBackend", "PreTrainedTokenizerFast") and (p / "tokenizer.json").is_file():
        # transformers 5 forces Qwen2Tokenizer on every qwen2 folder, which adds tokens our preset
        # vocabulary lacks; a folder that declares a plain tokenizers backend gets exactly that.
        tok = PreTrainedTokenizerFast.from_pretrained(p)
    else:
        tok = AutoTokenizer.from_pretrained(p)
    if tok.eos_token_id is None:
        raise ModelError(f"tokenizer in '{p}' has no eos_token; set one in tokenizer_config.json")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # generation pads finished rows; any id works since it is masked
    return tok


def check_same_tokenizer(tok, main_key: str, main_path: str | Path, others: dict[str, str | Path | None]) -> None:
    """Every role reads the token ids of `tok` (the tokenizer of `main_path`): a role folder `others[key]` with
    another vocabulary would read them as other tokens, one with a smaller embedding would index past it."""
    vocab = tok.get_vocab()
    for key, path in others.items():
        if path is None or Path(path).resolve() == Path(main_path).resolve():
            continue
        p = check_model_dir(path, key)
        if any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
            theirs = load_tokenizer(p).get_vocab()
            if theirs != vocab:
                token = min(set(theirs.items()) ^ set(vocab.items()))[0]
                raise ModelError(f"{key} '{p}' has another tokenizer than {main_key} '{main_path}' ({len(theirs)} vs "
                                 f"{len(vocab)} tokens; they differ at {token!r}): every role reads {main_key}'s "
                                 f"token ids, so {key} must come from the same base model as {main_key}")
        size = AutoConfig.from_pretrained(p).vocab_size
        if size is not None and size < len(tok):
            raise ModelError(f"{key} '{p}' has vocab_size {size}, fewer than the {len(tok)} tokens of {main_key}'s "
                             f"tokenizer; {key} must come from the same base model as {main_key}")


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_policy(path, dtype: str = "float32") -> torch.nn.Module:
    p = check_model_dir(path)
    return AutoModelForCausalLM.from_pretrained(p, dtype=_dtype(dtype), attn_implementation="sdpa")


def _load_scalar_head(cls, path, dtype: str, head_arch_suffix: str) -> torch.nn.Module:
    p = check_model_dir(path)
    config = AutoConfig.from_pretrained(p)
    fresh = not any(a.endswith(head_arch_suffix) for a in (config.architectures or []))
    model = cls.from_pretrained(p, num_labels=1, dtype=_dtype(dtype), attn_implementation="sdpa")
    if fresh:
        # A new head starts at zero so the first values/rewards are neutral, not random noise.
        torch.nn.init.zeros_(model.score.weight)
        if getattr(model.score, "bias", None) is not None:
            torch.nn.init.zeros_(model.score.bias)
    return model


def load_critic(path, dtype: str = "float32") -> torch.nn.Module:
    return _load_scalar_head(AutoModelForTokenClassification, path, dtype, "ForTokenClassification")


def load_reward_model(path, dtype: str = "float32") -> torch.nn.Module:
    model = _load_scalar_head(AutoModelForSequenceClassification, path, dtype, "ForSequenceClassification")
    return model


AM_MARKER = "advantage_model.json"  # in a reward-model folder written by `reflow am`


def advantage_model_info(path: str | Path | None) -> dict | None:
    """The advantage-model record of a reward-model folder (how it was centred, its per-task score statistics),
    or None for a plain reward model."""
    if path is None or not (Path(path) / AM_MARKER).is_file():
        return None
    return json.loads((Path(path) / AM_MARKER).read_text())


def save_model(model: torch.nn.Module, tokenizer, out_dir: str | Path) -> Path:
    """Write a HF safetensors folder (weights, config, tokenizer)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
