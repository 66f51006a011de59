"""LoRA through peft on the language model's attention projections only (q/k/v/o: every linear layer of the
attention modules that the routing probe finds, so vision towers are never touched). r 16, alpha 32, dropout
0.05; CE on the answer. An exact no-op at init (peft starts B at 0)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from ..routing import find_language_model, freeze
from .base import Method


class Lora(Method):
    name = "lora"
    trainable = True

    def __init__(self, r: int = 16, alpha: int = 32, dropout: float = 0.05, **options: Any):
        super().__init__(**options)
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"lora: r must be a positive int, got {r!r}.")
        if not 0 <= float(dropout) < 1:
            raise ValueError(f"lora: dropout must be in [0, 1), got {dropout!r}.")
        self.r, self.alpha, self.dropout = r, alpha, float(dropout)
        self.wrapped = None

    def target_modules(self, model: nn.Module) -> list[str]:
        """Full names of the linear layers inside the language model's attention modules."""
        names = {id(module): name for name, module in model.named_modules()}
        return [f"{names[id(attention)]}.{child_name}"
                for attention in find_language_model(model).attention_modules
                for child_name, child in attention.named_children() if isinstance(child, nn.Linear)]

    def setup(self, backbone, task, seed: int) -> None:
        from peft import LoraConfig, get_peft_model

        super().setup(backbone, task, seed)
        self._frozen = freeze(backbone.model)
        config = LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, bias="none",
                            target_modules=self.target_modules(backbone.model))
        self.wrapped = get_peft_model(backbone.model, config)

    @property
    def model(self) -> nn.Module:
        return self.wrapped

    def disabled(self):
        return self.wrapped.disable_adapter()

    def save(self, folder) -> None:
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            self.wrapped.save_pretrained(tmp)
            if folder.exists():
                shutil.rmtree(folder)
            tmp.rename(folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def load(self, folder) -> None:
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        path = Path(folder) / "adapter_model.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"No LoRA adapter in {folder}: expected {path.name}.")
        set_peft_model_state_dict(self.wrapped, load_file(str(path)))

    def close(self) -> None:
        if self.wrapped is not None:
            self.wrapped.unload()
            self._frozen.restore()
            self.wrapped = None

    def describe(self):
        return {"method": "LoRA", "r": self.r, "alpha": self.alpha}
