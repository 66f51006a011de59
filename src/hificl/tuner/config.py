"""`HiFICLConfig`: the validated, documented settings of one HiFICL adapter, as a PEFT config (``peft_type
"HIFICL"``), so that `peft.get_peft_model`, `PeftModel.from_pretrained` and PEFT's `adapter_config.json` serve it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from peft import PeftConfig

from ..core.config import ATTENTION_PATHS, NORMALIZERS, Formula
from ..core.dtypes import DTYPES, dtype_named
from ..core.errors import HiFICLConfigError
from ..core.validate import boolean, choice, integer, known_fields, number


class PeftTypeName(str):
    """A PEFT type that is a plain string (PEFT's `PeftType` enum is closed to other packages) but answers
    ``.value`` like an enum member, as code written for the enum (transformers' PEFT integration) reads it."""

    @property
    def value(self) -> str:
        return str(self)


PEFT_TYPE = PeftTypeName("HIFICL")
HIFICL_FIELDS = ("num_virtual_tokens", "rank", "target_layers", "normalizer", "key_a_std", "key_b_std", "value_a_std",
                 "value_b_std", "full_rank_keys", "full_rank_values", "fixed_alpha", "dtype", "init_seed",
                 "attention_path")


@dataclass
class HiFICLConfig(PeftConfig):
    """Settings of one HiFICL adapter (virtual key-value pairs in every attention head).

    For each targeted decoder layer and each QUERY head the adapter holds
    ``K_v = K_A @ K_B`` and ``V_v = V_A @ V_B`` with ``K_A, V_A: [n, r]`` and ``K_B, V_B: [r, head_dim]``.

    Attributes:
        num_virtual_tokens: n, the number of virtual key-value pairs per head (paper: 8).
        rank: r, the rank of the factorisation of the virtual keys and values (paper: 8; 16 for OK-VQA).
        target_layers: decoder layer indices that get virtual pairs; ``None`` means every layer. A list, tuple
            or ``range`` of non-negative ints (stored as a sorted list).
        normalizer: ``"exact"`` (default) gives exactly softmax attention over ``[K_v; K]`` with the model's causal
            and padding masks on the real keys. ``"unmasked"`` reproduces the authors' released code, whose
            normaliser of the real keys runs over ALL keys (future and padding included); use it only to measure
            the difference.
        key_a_std, key_b_std, value_a_std, value_b_std: standard deviations of the normal initialisation of
            K_A, K_B, V_A, V_B. The paper's defaults are 1, 0.01, 1 and 0 (V_B = 0, so the value term starts at 0;
            the start is still not exactly the base model, since the virtual keys take softmax mass).
        full_rank_keys, full_rank_values: ablations of the paper: learn ``K_v`` (or ``V_v``) as a full
            ``[n, head_dim]`` matrix per head instead of a rank-r product (initialised with the product's scale,
            ``a_std * b_std * sqrt(rank)``).
        fixed_alpha: ablation "alpha fixed to 1": the head output is ``SA + sum_i exp(q.k_v_i)/(Z1 + Z2) v_i``, so
            the virtual pairs add to the attention output instead of taking softmax mass from the real keys.
            Only with normalizer "exact".
        dtype: dtype of the adapter parameters ("float32", "bfloat16", "float16", "float64"). Keep float32 master
            weights when the backbone runs in bf16/fp16: the virtual pairs are cast to the activation dtype at use.
        init_seed: seed of the initialisation (``None``: draw from torch's global generator).
        attention_path: how the exact formula is computed: "auto" (the split-KV merge on CUDA, the concatenation
            elsewhere), "split" or "concat" (see `hificl.core.config.ATTENTION_PATHS`); same numbers up to rounding.
        model_shape: the shape of the language model the adapter was made for (layers, heads, head dim, model
            type); filled in when the adapter is attached, checked when it is loaded. Leave it None.
        trained_by: the hificl method and options that trained the adapter (filled in by hificl's trainer; None
            for an adapter trained elsewhere). Reports name the adapter by it.
    """

    num_virtual_tokens: int = 8
    rank: int = 8
    target_layers: Optional[list[int]] = None
    normalizer: str = "exact"
    key_a_std: float = 1.0
    key_b_std: float = 0.01
    value_a_std: float = 1.0
    value_b_std: float = 0.0
    full_rank_keys: bool = False
    full_rank_values: bool = False
    fixed_alpha: bool = False
    dtype: str = "float32"
    init_seed: Optional[int] = None
    attention_path: str = "auto"
    model_shape: Optional[dict[str, Any]] = None
    trained_by: Optional[dict[str, Any]] = None
    peft_type: Optional[Union[str, Any]] = field(default=PEFT_TYPE, metadata={"help": "Peft type"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.peft_type not in (None, PEFT_TYPE):
            raise HiFICLConfigError(f"HiFICLConfig.peft_type must be {str(PEFT_TYPE)!r}, got {self.peft_type!r}.")
        self.peft_type = PEFT_TYPE
        self.validate()

    def validate(self) -> None:
        """Raise `HiFICLConfigError` naming the field, the value and the fix when anything is wrong."""
        err = {"error": HiFICLConfigError}
        for name in ("num_virtual_tokens", "rank"):
            integer(getattr(self, name), f"HiFICLConfig.{name}", **err)
        if self.target_layers is not None:
            layers = self.target_layers
            if isinstance(layers, int) or not isinstance(layers, (list, tuple, range)):
                raise HiFICLConfigError(
                    f"HiFICLConfig.target_layers must be None (all layers) or a list/tuple/range of layer indices, "
                    f"got {layers!r}."
                )
            bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or i < 0]
            if bad:
                raise HiFICLConfigError(f"HiFICLConfig.target_layers holds invalid layer indices {bad!r}: use ints >= 0.")
            if len(set(layers)) != len(layers):
                raise HiFICLConfigError(f"HiFICLConfig.target_layers has duplicates: {list(layers)!r}.")
            if len(layers) == 0:
                raise HiFICLConfigError("HiFICLConfig.target_layers is empty: give None for all layers or some indices.")
            self.target_layers = sorted(layers)
        if self.normalizer not in NORMALIZERS:
            raise HiFICLConfigError(
                f"HiFICLConfig.normalizer must be one of {NORMALIZERS}, got {self.normalizer!r}. "
                "'exact' is the paper's equation; 'unmasked' only reproduces the authors' code for comparison."
            )
        for name in ("key_a_std", "key_b_std", "value_a_std", "value_b_std"):
            number(getattr(self, name), f"HiFICLConfig.{name}", **err)
        for name in ("full_rank_keys", "full_rank_values", "fixed_alpha"):
            boolean(getattr(self, name), f"HiFICLConfig.{name}", **err)
        if self.fixed_alpha and self.normalizer != "exact":
            raise HiFICLConfigError("HiFICLConfig.fixed_alpha needs normalizer='exact' (the ablation is of the paper's equation).")
        dtype_named(self.dtype, "HiFICLConfig.dtype", **err)
        integer(self.init_seed, "HiFICLConfig.init_seed", minimum=None, allow_none=True, **err)
        choice(self.attention_path, "HiFICLConfig.attention_path", ATTENTION_PATHS, **err)
        for name in ("model_shape", "trained_by"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), dict):
                raise HiFICLConfigError(f"HiFICLConfig.{name} must be a mapping or None, got {getattr(self, name)!r}.")

    @property
    def formula(self) -> Formula:
        """How the virtual pairs enter attention (see `Formula`)."""
        if self.fixed_alpha:
            return Formula.FIXED_ALPHA
        return Formula.UNMASKED if self.normalizer == "unmasked" else Formula.EXACT

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def layers_for(self, num_layers: int) -> list[int]:
        """The targeted layer indices of a model with `num_layers` decoder layers (validated against it)."""
        if self.target_layers is None:
            return list(range(num_layers))
        out_of_range = [i for i in self.target_layers if i >= num_layers]
        if out_of_range:
            raise HiFICLConfigError(
                f"HiFICLConfig.target_layers {out_of_range} are out of range: the model has {num_layers} decoder "
                f"layers (valid indices 0..{num_layers - 1})."
            )
        return list(self.target_layers)

    def settings(self) -> dict[str, Any]:
        """The adapter's own settings (no PEFT bookkeeping, no model shape, no training record)."""
        return {name: getattr(self, name) for name in HIFICL_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["peft_type"] = str(PEFT_TYPE)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HiFICLConfig":
        """Build a config from a dict (e.g. adapter_config.json), rejecting unknown fields by name."""
        if not isinstance(data, dict):
            raise HiFICLConfigError(f"A HiFICL config must be a mapping of field names to values, got {type(data).__name__}.")
        known_fields(data, (f.name for f in dataclasses.fields(cls) if f.init), "HiFICLConfig", error=HiFICLConfigError)
        return cls(**data)
