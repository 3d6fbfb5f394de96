"""A tokenizer built on the spot, because the Hugging Face hub is out of reach on many machines.

It is byte-level: every UTF-8 byte is one token (256 of them, in GPT-2's printable byte alphabet),
plus a few special tokens. Nothing is learned, so it is deterministic, it round-trips any text, and
each digit is a single token — which is what small models need to learn arithmetic.
The result is an ordinary `PreTrainedTokenizerFast` saved as `tokenizer.json` + config, so
`AutoTokenizer.from_pretrained(folder)` loads it anywhere.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END]

# ChatML, as Qwen2 uses; `messages` rows of a dataset are rendered through it.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: ids 0..4 are the special tokens, 5..260 the 256 bytes."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    # BPE with no merges = plain byte tokens; the ByteLevel pre-tokenizer maps bytes to that alphabet.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS)
    tok.chat_template = CHAT_TEMPLATE
    return tok
