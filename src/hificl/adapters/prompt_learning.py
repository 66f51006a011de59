"""PEFT's prompt-learning adapters that serve learned key-value prefixes through ``past_key_values``, for comparing
them with HiFICL under one protocol: prefix tuning (`PrefixTuningModel`: a per-layer prefix of keys and values,
optionally through an MLP re-parameterisation) and CARTRIDGE (`CartridgeModel`: the KV prefix stored directly, its
first token frozen as an attention sink). Both are PEFT's own code run unchanged (task type CAUSAL_LM); they hold
one adapter and serve no mixed-adapter batches (PEFT's prompt learning does not)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from peft import CartridgeConfig, PeftConfig, PrefixTuningConfig
from transformers import PreTrainedModel

from .base import AdapterModel, register_adapter
from .files import DEFAULT_ADAPTER
from .peft_backed import PeftAdapterModel, _peft_fields


class PromptLearningModel(PeftAdapterModel):
    """A PEFT prompt-learning adapter behind the common adapter API. Subclasses set `config_class`."""

    config_class: ClassVar[type[PeftConfig]]

    def __init__(self, base_model: PreTrainedModel, config: PeftConfig, init_seed: int | None = None,
                 adapter_name: str = DEFAULT_ADAPTER):
        if not isinstance(config, self.config_class):
            raise TypeError(f"{self.title} needs a {self.config_class.__name__}, got {type(config).__name__}.")
        with torch.random.fork_rng(devices=[]):  # PEFT initialises the prefix from the global generator
            if init_seed is not None:
                torch.manual_seed(init_seed)
            super().__init__(base_model, config, adapter_name)
        self._trainable = {n for n, p in self._encoder(adapter_name).named_parameters() if p.requires_grad}

    def _encoder(self, name: str):
        return self.peft_model.prompt_encoder[name]

    @property
    def active_adapter(self) -> str | None:
        return self.peft_model.active_adapter if self.adapter_names else None

    def add_adapter(self, adapter_name: str, config: PeftConfig) -> None:
        raise ValueError(f"A {self.title} model holds one adapter here; make another model for another adapter.")

    delete_adapter = AdapterModel.delete_adapter  # one adapter: unload() instead

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """The prompt encoder's live parameters (saved by PEFT as ``prompt_embeddings``)."""
        self._check_names([name])
        return dict(self._encoder(name).named_parameters())

    def _set_trainable(self, name: str, trainable: bool) -> None:
        for key, parameter in self._encoder(name).named_parameters():
            parameter.requires_grad_(trainable and key in self._trainable)

    def _names(self, adapter_names, kwargs: dict[str, Any]) -> dict[str, Any]:
        if adapter_names is not None:
            raise ValueError(f"PEFT's {self.title} serves no mixed-adapter batches (adapter_names).")
        return kwargs

    def activation_checkpointing_enable(self, *args, **kwargs) -> None:
        raise ValueError(f"{self.title} cannot train with gradient checkpointing: transformers drops the "
                         "past_key_values that carry the prefix from checkpointed layers. Set "
                         "train.gradient_checkpointing: false for this method.")

    gradient_checkpointing_enable = activation_checkpointing_enable

    def record_training(self, method: str, options: dict[str, Any], data: dict[str, Any] | None = None) -> None:
        """The config's own fields hold the adapter's settings; nothing else is recorded."""

    def _release(self) -> None:
        """PEFT's prompt learning changes nothing in the base model (the prefix is passed per call)."""

    @classmethod
    def _config_from_saved(cls, data: dict[str, Any], folder: Path) -> PeftConfig:
        return cls.config_class(**_peft_fields(cls.config_class, data, folder))

    @staticmethod
    def _settings(config: PeftConfig) -> dict[str, Any]:
        return {k: v for k, v in config.to_dict().items()
                if k not in ("base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping")}

    @classmethod
    def _attach(cls, base_model, config: PeftConfig, folder: Path, adapter_name: str) -> "PromptLearningModel":
        return cls(base_model, config, adapter_name=adapter_name)


@register_adapter
class PrefixTuningModel(PromptLearningModel):
    method = "prefix_tuning"
    title = "PEFT prefix tuning"
    peft_type = "PREFIX_TUNING"
    config_class = PrefixTuningConfig


@register_adapter
class CartridgeModel(PromptLearningModel):
    method = "cartridge"
    title = "PEFT CARTRIDGE"
    peft_type = "CARTRIDGE"
    config_class = CartridgeConfig
