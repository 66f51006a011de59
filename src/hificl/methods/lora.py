"""LoRA through peft on the language model's attention projections only (q/k/v/o: every linear layer of the
attention modules that the routing probe finds, so vision towers are never touched). r 16, alpha 32, dropout
0.05; CE on the answer. An exact no-op at init (peft starts B at 0). Saved in peft's own format, so
`peft.PeftModel.from_pretrained` loads it too."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters import DEFAULT_ADAPTER, WEIGHTS_NAME, AdapterModel, adapter_folder, register_adapter
from ..core import AdapterMismatchError
from ..core.validate import integer, number
from ..objectives import AnswerLoss
from ..routing import find_language_model
from .base import Method, Parts


def attention_projections(model: nn.Module) -> list[str]:
    """Full names of the linear layers inside the language model's attention modules."""
    names = {id(module): name for name, module in model.named_modules()}
    return [f"{names[id(attention)]}.{child_name}"
            for attention in find_language_model(model).attention_modules
            for child_name, child in attention.named_children() if isinstance(child, nn.Linear)]


@register_adapter
class LoraModel(AdapterModel):
    """peft's LoRA on the language model's attention projections, behind the common adapter API."""

    method = "lora"
    title = "LoRA"

    def __init__(self, base_model, r: int = 16, alpha: int = 32, dropout: float = 0.05, init_seed: int | None = None,
                 peft_config=None):
        from peft import LoraConfig, get_peft_model

        super().__init__(base_model)
        config = peft_config or LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                                           target_modules=attention_projections(base_model))
        with torch.random.fork_rng(devices=[]):  # peft initialises A from the global generator
            if init_seed is not None:
                torch.manual_seed(init_seed)
            self.peft_model = get_peft_model(base_model, config)

    @property
    def adapter_names(self) -> list[str]:
        return [DEFAULT_ADAPTER]

    @property
    def active_adapter(self) -> str:
        return DEFAULT_ADAPTER

    @property
    def peft_config(self):
        return self.peft_model.peft_config

    def _call(self, run, args, adapter_names, kwargs):
        """peft's own mixed-batch and disable machinery: rows named None run on the base ("__base__")."""
        if adapter_names is not None:
            self._check_names(adapter_names)
            kwargs["adapter_names"] = [name if name is not None else "__base__" for name in adapter_names]
        with self.peft_model.disable_adapter() if self._disabled else contextlib.nullcontext():
            return run(*args, **kwargs)

    def forward(self, *args, adapter_names=None, **kwargs):
        return self._call(self.peft_model, args, adapter_names, kwargs)

    def generate(self, *args, adapter_names=None, **kwargs):
        return self._call(self.peft_model.generate, args, adapter_names, kwargs)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        self._check_names([name])
        return {n: p for n, p in self.peft_model.named_parameters() if "lora_" in n}

    def save_pretrained(self, save_directory, adapter_names=None) -> None:
        with adapter_folder(save_directory) as tmp:
            self.peft_model.save_pretrained(tmp)

    def load_adapter(self, model_dir, adapter_name: str = DEFAULT_ADAPTER, is_trainable: bool = False) -> None:
        self.restore_weights(model_dir, adapter_name)
        for tensor in self.adapter_state(adapter_name).values():
            tensor.requires_grad_(is_trainable)

    def restore_weights(self, model_dir, adapter_name: str | None = None) -> None:
        from peft.utils import set_peft_model_state_dict

        folder = Path(model_dir)
        _, tensors = self._read(folder)
        result = set_peft_model_state_dict(self.peft_model, tensors)
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing:
            raise AdapterMismatchError(f"{folder / WEIGHTS_NAME} lacks LoRA weights {missing[:3]}; it was saved for "
                                       "another model or other settings.")

    def _release(self) -> None:
        self.peft_model.unload()

    @classmethod
    def _empty(cls, base_model, config: dict[str, Any]) -> "LoraModel":
        import dataclasses

        from peft import LoraConfig

        known = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
        return cls(base_model, peft_config=LoraConfig(**{k: v for k, v in config.items() if k in known}))


class Lora(Method):
    name = "lora"
    trainable = True

    def __init__(self, r: int = 16, alpha: int = 32, dropout: float = 0.05, **options: Any):
        super().__init__(**options)
        self.r = integer(r, "lora: r")
        self.alpha = number(alpha, "lora: alpha", positive=True)
        self.dropout = float(number(dropout, "lora: dropout", below=1))

    @property
    def options(self) -> dict[str, Any]:
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout}

    @property
    def label(self) -> str:
        return "LoRA"

    @classmethod
    def from_saved(cls, config: dict[str, Any]) -> "Lora":
        return cls(r=config.get("r", 16), alpha=config.get("lora_alpha", 32), dropout=config.get("lora_dropout", 0.05))

    def build(self, backbone, task, seeds) -> Parts:
        adapter = LoraModel(backbone.model, self.r, self.alpha, self.dropout, init_seed=seeds.init)
        prompter = self.prompter(backbone, task, seeds)
        return Parts(prompter, adapter, adapter, AnswerLoss(backbone, task, prompter))
