"""Model shapes for planning: parameter counts, FLOPs and bytes from any HF Llama / Qwen2 config, and
LLaMA-7B/13B/34B/70B configs (published dimensions, no weights) for what-if plans.

For a decoder with hidden size h, intermediate size i, L layers, n_q attention heads, n_kv key/value
heads of size d_h and vocabulary V:

    per layer   attention  q, o: h * n_q d_h each;  k, v: h * n_kv d_h each   (+ q/k/v biases: Qwen2)
                MLP        gate, up, down: h * i each (SwiGLU)
                norms      2 h
    split by t  q, k, v, gate, up (column-wise), o, down (row-wise); norms stay whole (see shards.py)
    outside     embeddings V h, final norm h, and the head: lm_head V h (unless tied to the
                embeddings) for a policy / reference ("lm"); a scalar `score` head: h + 1 (bias) for
                a critic ("value": token classification), h for a reward model ("score": sequence
                classification)

Forward FLOPs of one decoder layer for T tokens that each attend to c keys on average:

    F_layer(T, c) = 2 T P_mm + 4 T c n_q d_h       (P_mm: the layer's matmul parameters;
                                                    4 = QK^T and AV, 2 FLOPs per multiply-add)

(causal attention over whole sequences of length S: c = S/2; decode step k after a prompt of P tokens:
c = P + k). Head FLOPs: 2 T h V (lm) or 2 T h (score). Backward = 2 x forward.
KV cache: 2 n_kv d_h bytes_per_value per token per layer.

The LLaMA configs (LLaMA-2 7B/13B/70B, CodeLlama-34B; vocab 32000, untied head, bf16):

    size  hidden  intermediate  layers  heads  kv heads
    7b    4096    11008         32      32     32
    13b   5120    13824         40      40     40
    34b   8192    22016         48      64     8
    70b   8192    28672         80      64     8
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from transformers import LlamaConfig, PretrainedConfig

LLAMA_DIMS = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40),
    "34b": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=48, num_attention_heads=64,
                num_key_value_heads=8),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8),
}


class ModelShapeError(ValueError):
    """An unknown model size, or a config the planner cannot read."""


def llama_config(size: str) -> LlamaConfig:
    """The HF config of LLaMA-`size` (7b, 13b, 34b, 70b): shapes only, nothing downloaded."""
    key = size.lower().removeprefix("llama-").removeprefix("llama")
    if key not in LLAMA_DIMS:
        raise ModelShapeError(f"unknown LLaMA size '{size}'; choose one of: {', '.join(LLAMA_DIMS)}")
    cfg = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False,
                      rms_norm_eps=1e-5, **LLAMA_DIMS[key])
    cfg.dtype = "bfloat16"
    return cfg


def _dtype_bytes(config) -> int:
    dt = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(dt).replace("torch.", "") if dt is not None else "float32"
    return 2 if name in ("bfloat16", "float16", "half") else 4


@dataclass(frozen=True)
class ModelShape:
    """What the cost and memory models need to know about one role's model."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = False
    qkv_bias: bool = False
    head: str = "lm"  # "lm" (policy, reference), "value" (critic), "score" (reward model)
    dtype_bytes: int = 2  # bytes per weight / activation value in calls (bf16: 2, fp32: 4)
    config: PretrainedConfig | None = field(default=None, hash=False, compare=False, repr=False)
    # LoRA on a trained role: rank r and the adapted linear layers (q_proj, ..., down_proj); 0 = every weight trains
    lora_rank: int = 0
    lora_targets: tuple[str, ...] = ()

    @classmethod
    def of(cls, config, head: str = "lm", dtype_bytes: int | None = None) -> "ModelShape":
        if head not in ("lm", "value", "score"):
            raise ModelShapeError(f"head '{head}' is not one of lm, value, score")
        try:
            h, nq = int(config.hidden_size), int(config.num_attention_heads)
            return cls(hidden=h, intermediate=int(config.intermediate_size), layers=int(config.num_hidden_layers),
                       heads=nq, kv_heads=int(getattr(config, "num_key_value_heads", None) or nq),
                       head_dim=int(getattr(config, "head_dim", None) or h // nq), vocab=int(config.vocab_size),
                       tied=bool(getattr(config, "tie_word_embeddings", False)),
                       qkv_bias=getattr(config, "model_type", "") == "qwen2" or bool(getattr(config, "attention_bias", False)),
                       head=head, dtype_bytes=dtype_bytes or _dtype_bytes(config), config=config)
        except AttributeError as e:
            raise ModelShapeError(f"model config lacks {e}; the planner reads Llama / Qwen2 style configs") from None

    # ------------------------------------------------------------------ parameters
    @cached_property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @cached_property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @cached_property
    def layer_split_params(self) -> int:
        """Parameters of one layer that tensor parallel splits (q, k, v, o, gate, up, down)."""
        h = self.hidden
        attn = h * self.q_dim * 2 + h * self.kv_dim * 2 + (self.q_dim + 2 * self.kv_dim if self.qkv_bias else 0)
        return attn + 3 * h * self.intermediate

    @cached_property
    def layer_whole_params(self) -> int:
        """Parameters of one layer every tensor-parallel rank holds whole (the two norms)."""
        return 2 * self.hidden

    @cached_property
    def layer_params(self) -> int:
        return self.layer_split_params + self.layer_whole_params

    @cached_property
    def layer_matmul_params(self) -> int:
        h = self.hidden
        return h * self.q_dim * 2 + h * self.kv_dim * 2 + 3 * h * self.intermediate

    @cached_property
    def head_params(self) -> int:
        if self.head == "value":
            return self.hidden + 1
        if self.head == "score":
            return self.hidden
        return 0 if self.tied else self.vocab * self.hidden

    @cached_property
    def outer_params(self) -> int:
        """Parameters outside the decoder layers (on every pipeline stage, never tensor split)."""
        return self.vocab * self.hidden + self.hidden + self.head_params

    @cached_property
    def params(self) -> int:
        return self.layers * self.layer_params + self.outer_params

    @cached_property
    def trainable_params(self) -> int:
        """Parameters the optimizer holds: all of them, or with LoRA r (in + out) per adapted linear layer
        (A: [r, in], B: [out, r]) plus a scalar head (a critic's or reward model's, trained whole)."""
        if not self.lora_rank:
            return self.params
        h, i = self.hidden, self.intermediate
        dims = {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        per_layer = sum(self.lora_rank * sum(dims[t]) for t in self.lora_targets if t in dims)
        return self.layers * per_layer + (self.head_params if self.head != "lm" else 0)

    @cached_property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.params

    # ------------------------------------------------------------------ FLOPs and bytes
    def layer_flops(self, tokens: float, context: float) -> float:
        """Forward FLOPs of one decoder layer: 2 T P_mm + 4 T c n_q d_h."""
        return 2 * tokens * self.layer_matmul_params + 4 * tokens * context * self.q_dim

    def head_flops(self, tokens: float) -> float:
        return 2 * tokens * self.hidden * (self.vocab if self.head == "lm" else 1)

    @cached_property
    def kv_bytes_per_token_layer(self) -> int:
        return 2 * self.kv_dim * self.dtype_bytes

    def describe(self) -> str:
        return (f"{self.params / 1e9:.2f}B params (h{self.hidden} i{self.intermediate} L{self.layers} "
                f"heads {self.heads}/{self.kv_heads} V{self.vocab}, {self.head} head)")


def param_shapes(config, head: str = "lm") -> dict[str, tuple[int, ...]]:
    """Full parameter shapes by plain HF name (as `reflow.parallel.shards.param_shapes` reports them for
    AutoModelForCausalLM; AutoModelForTokenClassification with head="value"; AutoModelForSequenceClassification
    with head="score"),
    built from the config without making a model."""
    m = ModelShape.of(config, head)
    h = m.hidden
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (m.vocab, h)}
    for layer in range(m.layers):
        p = f"model.layers.{layer}."
        out[p + "self_attn.q_proj.weight"] = (m.q_dim, h)
        if m.qkv_bias:
            out[p + "self_attn.q_proj.bias"] = (m.q_dim,)
        out[p + "self_attn.k_proj.weight"] = (m.kv_dim, h)
        if m.qkv_bias:
            out[p + "self_attn.k_proj.bias"] = (m.kv_dim,)
        out[p + "self_attn.v_proj.weight"] = (m.kv_dim, h)
        if m.qkv_bias:
            out[p + "self_attn.v_proj.bias"] = (m.kv_dim,)
        out[p + "self_attn.o_proj.weight"] = (h, m.q_dim)
        out[p + "mlp.gate_proj.weight"] = (m.intermediate, h)
        out[p + "mlp.up_proj.weight"] = (m.intermediate, h)
        out[p + "mlp.down_proj.weight"] = (h, m.intermediate)
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "post_attention_layernorm.weight"] = (h,)
    out["model.norm.weight"] = (h,)
    if head in ("value", "score"):
        out["score.weight"] = (1, h)
        if head == "value":
            out["score.bias"] = (1,)
    elif not m.tied:
        out["lm_head.weight"] = (m.vocab, h)
    return out
