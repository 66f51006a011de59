"""Routing a model's language-model attention to a registered attention function, without copying forwards or
dispatching on model names.

`route_attention(model, name)` routes the language model's attention (only the text sub-config on composite
models) to the probe attention for one 2-token forward, which records which modules really called the registry,
in layer order, with their head layout; then to `name`. Every method that changes attention (HiFICL,
MimIC) or needs the decoder layers (LIVE, the teacher losses) or the attention projections (LoRA) uses it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel

from .core import (ATTENTION_NAME, AdapterMismatchError, PROBE_ATTENTION_NAME, AttentionCall, UnsupportedModelError, record_attention_calls,
                   register_attention)


def _text_config_route(base_model: PreTrainedModel, text_config) -> str | dict[str, str]:
    """The argument of `set_attn_implementation` that routes only the language model (with "{name}" to fill)."""
    if text_config is base_model.config:
        return "{name}"
    for key in base_model.config.sub_configs:
        if getattr(base_model.config, key, None) is text_config:
            return {key: "{name}"}
    raise UnsupportedModelError(
        f"{type(base_model).__name__}: cannot find which sub-config holds the language model's config "
        f"({type(text_config).__name__}), so its attention cannot be routed. Pass the language model itself."
    )


def _find_decoder(base_model: PreTrainedModel, text_config) -> nn.Module:
    decoder = base_model.get_decoder() if hasattr(base_model, "get_decoder") else None
    if isinstance(decoder, PreTrainedModel) and decoder.config is text_config:
        return decoder
    for module in base_model.modules():
        if isinstance(module, PreTrainedModel) and module.config is text_config and module.get_input_embeddings() is not None:
            decoder = module  # the innermost one is the bare decoder
    return decoder if decoder is not None else base_model


def _probe(base_model: PreTrainedModel, text_config) -> list[AttentionCall]:
    """Run a 2-token forward of the language model and return the attention calls that reached the probe."""
    decoder = _find_decoder(base_model, text_config)
    embeddings = decoder.get_input_embeddings()
    weight = embeddings.weight if embeddings is not None else next(decoder.parameters())
    hidden = torch.zeros(1, 2, text_config.hidden_size, dtype=weight.dtype, device=weight.device)
    with torch.no_grad(), record_attention_calls() as calls:
        decoder(inputs_embeds=hidden, use_cache=False)
    unique, seen = [], set()
    for call in calls:
        if id(call.module) not in seen:
            seen.add(id(call.module))
            unique.append(call)
    return unique


@dataclass
class RoutedAttention:
    """A model whose language-model attention is routed to a registered function; `restore()` undoes it."""

    model: PreTrainedModel
    text_config: object
    route: str | dict[str, str]
    previous: str
    calls: list[AttentionCall] = field(default_factory=list)

    def set(self, name: str) -> None:
        """Route the language model's attention to the registered function `name`."""
        spec = self.route.format(name=name) if isinstance(self.route, str) else {
            k: v.format(name=name) for k, v in self.route.items()}
        self.model.set_attn_implementation(spec)

    def restore(self) -> None:
        self.set(self.previous)

    @property
    def attention_modules(self) -> list[nn.Module]:
        return [call.module for call in self.calls]

    def decoder_layers(self) -> list[nn.Module]:
        """The decoder layers: the module holding each attention module, in layer order."""
        parents = {id(child): module for module in self.model.modules() for child in module.children()}
        return [parents[id(module)] for module in self.attention_modules]

    def mlps(self) -> list[nn.Module]:
        """Each decoder layer's feed-forward block (its `mlp` or `feed_forward` child)."""
        found = []
        for layer in self.decoder_layers():
            mlp = getattr(layer, "mlp", None) or getattr(layer, "feed_forward", None)
            if not isinstance(mlp, nn.Module):
                raise UnsupportedModelError(
                    f"{type(layer).__name__} has no `mlp` or `feed_forward` block, so MLP-output methods (LIVE, "
                    "MimIC, teacher alignment) cannot hook it."
                )
            found.append(mlp)
        return found


def route_attention(model: PreTrainedModel, name: str, purpose: str = "adapt it") -> RoutedAttention:
    """Route `model`'s language-model attention to the registered function `name` and find its attention modules.

    Raises `UnsupportedModelError` (naming the attention class) when the model's attention does not go through
    transformers' attention registry; the model is left as it was then.
    """
    if not isinstance(model, PreTrainedModel):
        raise UnsupportedModelError(f"hificl needs a transformers PreTrainedModel, got {type(model).__name__}.")
    register_attention()
    text_config = model.config.get_text_config(decoder=True)
    routed = RoutedAttention(model, text_config, _text_config_route(model, text_config),
                             text_config._attn_implementation)
    try:
        routed.set(PROBE_ATTENTION_NAME)
    except ValueError as error:
        raise UnsupportedModelError(
            f"{type(model).__name__} rejected a custom attention implementation ({error}). hificl needs a model "
            "whose attention goes through transformers' AttentionInterface."
        ) from error
    calls = _probe(model, text_config) if text_config._attn_implementation == PROBE_ATTENTION_NAME else []
    num_layers = getattr(text_config, "num_hidden_layers", None)
    if not calls or (num_layers is not None and len(calls) != num_layers):
        attention_classes = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.endswith("Attention")})
        routed.restore()
        raise UnsupportedModelError(
            f"{type(model).__name__}: its language-model attention ({', '.join(attention_classes) or 'unknown'}) "
            f"does not go through transformers' attention registry ({len(calls)} of {num_layers} layers did), so "
            f"hificl cannot {purpose}. Use a model class that supports set_attn_implementation (transformers 5 "
            "decoders do), or a newer transformers version."
        )
    routed.calls = calls
    routed.set(name)
    return routed


def find_language_model(model: PreTrainedModel) -> RoutedAttention:
    """The language model's attention modules and decoder layers, with the model's attention left unchanged."""
    routed = route_attention(model, ATTENTION_NAME, purpose="find its language-model layers")
    routed.restore()
    return routed


@dataclass
class Frozen:
    """Which parameters of a model required gradients before `freeze`; `restore()` puts them back."""

    parameters: list[tuple[nn.Parameter, bool]]

    def restore(self) -> None:
        for parameter, flag in self.parameters:
            parameter.requires_grad_(flag)


def freeze(model: nn.Module) -> Frozen:
    """Stop gradients to every parameter of `model`, remembering how they were."""
    state = Frozen([(p, p.requires_grad) for p in model.parameters()])
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return state


@dataclass(frozen=True)
class ModelShape:
    """The shape of an adapted language model, saved with every adapter and checked when one is loaded."""

    num_layers: int
    num_query_heads: int
    num_kv_heads: int
    head_dim: int
    text_model_type: str
    model_type: str
    hidden_size: int = 0

    CHECKED: ClassVar[tuple[str, ...]] = ("num_layers", "num_query_heads", "num_kv_heads", "head_dim",
                                          "text_model_type")

    @classmethod
    def of(cls, routing: RoutedAttention) -> "ModelShape":
        first = routing.calls[0]
        return cls(num_layers=len(routing.calls), num_query_heads=first.num_query_heads,
                   num_kv_heads=first.num_kv_heads, head_dim=first.head_dim,
                   text_model_type=getattr(routing.text_config, "model_type", ""),
                   model_type=getattr(routing.model.config, "model_type", ""),
                   hidden_size=getattr(routing.text_config, "hidden_size", 0) or 0)

    def describe(self) -> str:
        return (f"{self.num_layers} layers x {self.num_query_heads} query heads ({self.num_kv_heads} KV heads) x "
                f"head dim {self.head_dim}, text model type '{self.text_model_type}'")

    def check(self, saved: Any, source: str) -> None:
        """Raise `AdapterMismatchError` unless `saved` (a dict from a config) describes this shape; `source` names
        where the adapter comes from (its folder, or its config)."""
        if not isinstance(saved, dict):
            raise AdapterMismatchError(f"{source} does not record the base model's shape; re-save the adapter.")
        if any(saved.get(f) != getattr(self, f) for f in self.CHECKED):
            other = (f"{saved.get('num_layers')} layers x {saved.get('num_query_heads')} query heads "
                     f"({saved.get('num_kv_heads')} KV heads) x head dim {saved.get('head_dim')}, text model type "
                     f"'{saved.get('text_model_type')}'")
            raise AdapterMismatchError(
                f"The adapter in {source} was trained for a model with {other}, but this model has "
                f"{self.describe()}. Load it onto the model it was trained for, or train a new adapter.")
