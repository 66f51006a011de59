"""Backbones: `load_backbone(spec)` gives the embedded default, or any local path / model id."""

from __future__ import annotations

import torch

from .base import IGNORE_INDEX, Backbone

EMBEDDED = "embedded"
EMBEDDED_TEXT = "embedded-text"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_backbone(spec: str | None = None, dtype: str = "float32") -> Backbone:
    """`None`/"embedded": the embedded SmolVLM (real SmolLM2 + this project's vision tower); "embedded-text":
    SmolLM2-135M-Instruct alone; anything else: a local folder or model id loaded with transformers (a model
    whose config has a vision part is loaded with its processor as an image-text-to-text model)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    torch_dtype = DTYPES[dtype]
    if spec in (None, "", EMBEDDED):
        from ..embedded import load_embedded_vlm

        model, processor = load_embedded_vlm()
        return Backbone(model.to(torch_dtype).eval(), processor.tokenizer, processor, name="embedded SmolVLM (SmolLM2-135M)")
    if spec == EMBEDDED_TEXT:
        from ..embedded import load_smollm2

        model, tokenizer = load_smollm2(dtype=torch_dtype)
        return Backbone(model, tokenizer, name="SmolLM2-135M-Instruct")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(spec)
    except (OSError, ValueError) as error:
        raise ValueError(f"Cannot load a model config from {spec!r} ({error}). Give a local model folder or a "
                         "model id reachable from this machine, or 'embedded'.") from None
    if getattr(config, "vision_config", None) is not None:
        model = AutoModelForImageTextToText.from_pretrained(spec, dtype=torch_dtype)
        processor = AutoProcessor.from_pretrained(spec)
        return Backbone(model.eval(), processor.tokenizer, processor, name=str(spec))
    model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch_dtype)
    return Backbone(model.eval(), AutoTokenizer.from_pretrained(spec), name=str(spec))


__all__ = ["Backbone", "IGNORE_INDEX", "load_backbone", "EMBEDDED", "EMBEDDED_TEXT"]
