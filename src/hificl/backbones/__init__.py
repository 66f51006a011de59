"""Backbones: `load_backbone(spec)` gives the embedded default, or any local path / model id, as the backbone of
its family (chosen by the model's config class: see `hificl.backbones.families`)."""

from __future__ import annotations

from ..core import dtype_named
from ..registry import Registry
from .base import IGNORE_INDEX, Backbone
from .families import LlavaBackbone, QwenVLBackbone, default_families

EMBEDDED = "embedded"
EMBEDDED_TEXT = "embedded-text"
FAMILIES: Registry[type[Backbone]] = Registry("backbone family")


def register_family(config_class: type, backbone_class: type[Backbone], replace: bool = False) -> None:
    """Serve models whose config is a `config_class` (or a subclass) with `backbone_class`. The class closest to
    a model's config class wins; a class already served (e.g. a built-in family) needs ``replace=True``."""
    FAMILIES.register(config_class, backbone_class, replace=replace)


def _register_defaults() -> None:
    for config_class, backbone_class in default_families():
        if config_class not in FAMILIES:
            FAMILIES.register(config_class, backbone_class)


def family_for(config) -> type[Backbone]:
    """The backbone class for a model config: its multimodal family (by the config's class and its bases), or
    the generic backbone for a text-only decoder. A multimodal config of no known family is refused (its image
    layout is unknown)."""
    _register_defaults()
    for config_class in type(config).__mro__:
        if config_class in FAMILIES:
            return FAMILIES.get(config_class)
    if getattr(config, "vision_config", None) is not None:
        raise ValueError(f"No backbone family for {type(config).__name__} (supported: {', '.join(FAMILIES.names())}). "
                         "Add one with hificl.backbones.register_family(ConfigClass, BackboneClass).")
    return Backbone


def _chat_template(template: str | None, wanted: bool | None, spec: str) -> str | None:
    if wanted is True and not template:
        raise ValueError(f"chat_template is true but {spec!r} has no chat template.")
    return template if wanted is not False and template else None


def embedded_backbone(model, processor, chat_template: bool | None = None) -> Backbone:
    """The backbone of the embedded SmolVLM (`hificl.embedded`), plain prompts unless `chat_template` is true."""
    template = _chat_template(processor.chat_template, chat_template or False, EMBEDDED)
    return Backbone(model.eval(), processor.tokenizer, processor, name="embedded SmolVLM (SmolLM2-135M)",
                    chat_template=template)


def load_backbone(spec: str | None = None, dtype: str = "float32", chat_template: bool | None = None) -> Backbone:
    """`None`/"embedded": the embedded SmolVLM (real SmolLM2 + this project's vision tower); "embedded-text":
    SmolLM2-135M-Instruct alone; anything else: a local folder or model id loaded with transformers (a model
    whose config has a vision part is loaded with its processor as an image-text-to-text model).

    `chat_template`: None uses the model's chat template where it has one (the embedded models keep their plain
    prompt, with which their results were measured), True requires it, False never uses it (plain prompts)."""
    torch_dtype = dtype_named(dtype, "dtype")
    if spec in (None, "", EMBEDDED):
        from ..embedded import load_embedded_vlm

        model, processor = load_embedded_vlm()
        return embedded_backbone(model.to(torch_dtype), processor, chat_template)
    if spec == EMBEDDED_TEXT:
        from ..embedded import load_smollm2

        model, tokenizer = load_smollm2(dtype=torch_dtype)
        template = _chat_template(tokenizer.chat_template, chat_template or False, EMBEDDED_TEXT)
        return Backbone(model, tokenizer, name="SmolLM2-135M-Instruct", chat_template=template)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(spec)
    except (OSError, ValueError) as error:
        raise ValueError(f"Cannot load a model config from {spec!r} ({error}). Give a local model folder or a "
                         "model id reachable from this machine, or 'embedded'.") from None
    family = family_for(config)
    if getattr(config, "vision_config", None) is None:
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(spec)
        return family(model.eval(), tokenizer, name=str(spec),
                      chat_template=_chat_template(tokenizer.chat_template, chat_template, spec))
    model = AutoModelForImageTextToText.from_pretrained(spec, dtype=torch_dtype)
    processor = family.load_processor(spec)
    tokenizer = getattr(processor, "tokenizer", None) or AutoTokenizer.from_pretrained(spec)
    template = getattr(processor, "chat_template", None) or tokenizer.chat_template
    return family(model.eval(), tokenizer, processor, name=str(spec),
                  chat_template=_chat_template(template, chat_template, spec))


__all__ = ["Backbone", "EMBEDDED", "EMBEDDED_TEXT", "FAMILIES", "IGNORE_INDEX", "LlavaBackbone", "embedded_backbone", "QwenVLBackbone", "family_for",
           "load_backbone", "register_family"]
