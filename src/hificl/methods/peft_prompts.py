"""PEFT's KV-prefix methods as baselines, run by PEFT's own code under hificl's protocol (the same data, prompt,
epoch selection and metric as HiFICL): prefix tuning (a learned key-value prefix in every layer, served as
``past_key_values``; ``prefix_projection`` re-parameterises it through PEFT's MLP) and CARTRIDGE (the KV prefix
stored directly, the first ``num_frozen_tokens`` frozen). Both start from PEFT's default random initialisation
(drawn from the replicate's init seed) and train on the answer (CE). Unlike HiFICL's virtual pairs, a prefix is
shared by the query heads of a KV group, enters the KV cache and takes positions."""

from __future__ import annotations

from typing import Any

from peft import CartridgeConfig, PrefixTuningConfig

from ..adapters import CartridgeModel, PrefixTuningModel, PromptLearningModel
from ..core.validate import boolean, integer
from .base import Method


class _PeftPrefix(Method):
    """Subclasses set `name`, `adapter_class`, `title` and define ``peft_config()``."""

    trainable = True
    adapter_class: type
    title: str

    def __init__(self, num_virtual_tokens: int = 8, **options: Any):
        super().__init__(**options)
        self.num_virtual_tokens = integer(num_virtual_tokens, f"{self.name}: num_virtual_tokens")

    @property
    def options(self) -> dict[str, Any]:
        return {"num_virtual_tokens": self.num_virtual_tokens}

    @property
    def label(self) -> str:
        return self.title

    @classmethod
    def from_saved(cls, config: dict[str, Any]) -> "_PeftPrefix":
        return cls(**{k: config[k] for k in cls().options if k in config})

    def adapter(self, backbone, seeds) -> PromptLearningModel:
        return self.adapter_class(backbone.model, self.peft_config(), init_seed=seeds.replicate)


class PrefixTuning(_PeftPrefix):
    """Options: ``num_virtual_tokens`` (8), ``prefix_projection`` (False: the prefix itself is learned; True:
    through PEFT's two-layer MLP, ``encoder_hidden_size`` wide)."""

    name = "prefix_tuning"
    adapter_class = PrefixTuningModel
    title = "PEFT prefix tuning"

    def __init__(self, num_virtual_tokens: int = 8, prefix_projection: bool = False, encoder_hidden_size: int = 512,
                 **options: Any):
        super().__init__(num_virtual_tokens, **options)
        self.prefix_projection = boolean(prefix_projection, "prefix_tuning: prefix_projection")
        self.encoder_hidden_size = integer(encoder_hidden_size, "prefix_tuning: encoder_hidden_size")

    @property
    def options(self) -> dict[str, Any]:
        return {**super().options, "prefix_projection": self.prefix_projection,
                "encoder_hidden_size": self.encoder_hidden_size}

    @property
    def label(self) -> str:
        return self.title + (" (MLP)" if self.prefix_projection else "")

    def peft_config(self) -> PrefixTuningConfig:
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=self.num_virtual_tokens,
                                  prefix_projection=self.prefix_projection,
                                  encoder_hidden_size=self.encoder_hidden_size)


class Cartridge(_PeftPrefix):
    """Options: ``num_virtual_tokens`` (8), ``num_frozen_tokens`` (1, the paper's attention sink)."""

    name = "cartridge"
    adapter_class = CartridgeModel
    title = "PEFT CARTRIDGE"

    def __init__(self, num_virtual_tokens: int = 8, num_frozen_tokens: int = 1, **options: Any):
        super().__init__(num_virtual_tokens, **options)
        self.num_frozen_tokens = integer(num_frozen_tokens, "cartridge: num_frozen_tokens", minimum=0)
        if self.num_frozen_tokens >= self.num_virtual_tokens:
            raise ValueError(f"cartridge: num_frozen_tokens ({self.num_frozen_tokens}) must be below "
                             f"num_virtual_tokens ({self.num_virtual_tokens}), or nothing is trained.")

    @property
    def options(self) -> dict[str, Any]:
        return {**super().options, "num_frozen_tokens": self.num_frozen_tokens}

    def peft_config(self) -> CartridgeConfig:
        return CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=self.num_virtual_tokens,
                               num_frozen_tokens=self.num_frozen_tokens)
