"""Shared helpers of the core tests: attaching an adapter whose value term matters, running the fp64 reference,
and comparing logits."""

from __future__ import annotations

import copy

import torch

from hificl import HiFICLConfig, get_hificl_model
from tiny_models import position_ids_for


def attach(case, seed: int = 1, **overrides):
    """A HiFICL model on a fresh copy of `case.model`, with non-zero V_B so the virtual values matter."""
    fields = dict(value_b_std=0.5, key_b_std=0.3, init_seed=seed)
    if overrides.get("full_rank_keys") or overrides.get("full_rank_values"):
        fields.update(key_a_std=1.0, value_a_std=1.0)
    fields.update(overrides)
    return get_hificl_model(copy.deepcopy(case.model), HiFICLConfig(**fields))


M_ROPE_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")  # compute padding-aware 3-D positions themselves


def padded_inputs(case, **kwargs) -> dict:
    """`case.make_inputs(...)` plus padding-aware position ids. Virtual keys carry no position, so unlike plain
    RoPE attention the output depends on absolute query positions: a left-padded row needs the positions it
    would have alone (generate() computes them; a bare forward must be given them)."""
    inputs = case.make_inputs(**kwargs)
    if kwargs.get("padding") and case.name not in M_ROPE_FAMILIES:
        inputs["position_ids"] = position_ids_for(inputs)
    return inputs


def to_double(inputs: dict) -> dict:
    return {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}


def reference_logits(model, inputs: dict, **kwargs) -> torch.Tensor:
    """Logits of a float64 copy of `model` run with the slow reference attention."""
    reference = copy.deepcopy(model).double()
    with torch.no_grad(), reference.reference_attention():
        return reference(**to_double(inputs), **kwargs).logits


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def real_rows(logits: torch.Tensor, inputs: dict) -> list[torch.Tensor]:
    """Each row's logits at its non-padding positions."""
    mask = inputs["attention_mask"].bool()
    return [logits[row][mask[row]] for row in range(logits.shape[0])]
