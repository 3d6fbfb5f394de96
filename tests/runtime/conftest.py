"""The runtime tests share helpers (rl_runs.py) and test plug-ins that live in this folder."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ending_model(debug_model, tmp_path_factory):
    """debug-llama whose responses end (EOS) at different lengths. A fresh preset almost never samples EOS (1 in
    261 tokens), so every response runs to its budget and all end at the same step; here EOS's output row (tied
    to its input embedding) reads one hidden dimension, x10, so after tokens where that dimension is large EOS is
    likely: about a third of 4-token responses end early, at different steps."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("ending") / "model"
    shutil.copytree(debug_model, out)
    model = AutoModelForCausalLM.from_pretrained(out)
    eos = model.config.eos_token_id
    with torch.no_grad():
        row = model.get_output_embeddings().weight[eos]
        row.zero_()
        row[0] = 10.0 / model.model.norm.weight[0]
    model.save_pretrained(out, safe_serialization=True)
    return out
