"""The one table of floating-point dtypes by name, as configs write them."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                                  "float64": torch.float64}


def dtype_named(name: str, field: str, *, error: type[Exception] = ValueError) -> torch.dtype:
    """The torch dtype called `name` (one of `DTYPES`), or `error` naming the config `field`."""
    if name not in DTYPES:
        raise error(f"{field} must be one of {sorted(DTYPES)}, got {name!r}.")
    return DTYPES[name]
