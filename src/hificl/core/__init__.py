"""The core of hificl: the settings vocabulary, the virtual key-value module and the attention function (with its float64
reference and the probe that finds attention modules). It depends on nothing else in the package."""

from .attention import ATTENTION_NAME, PROVIDER_ATTR, VirtualPairs, hificl_attention_forward
from .config import ATTENTION_PATHS, NORMALIZERS, Formula
from .dtypes import DTYPES, dtype_named
from .errors import AdapterMismatchError, HiFICLConfigError, UnsupportedModelError
from .prefix import attend_with_prefix
from .probe import PROBE_ATTENTION_NAME, AttentionCall, record_attention_calls
from .reference import REFERENCE_ATTENTION_NAME, reference_attention_forward
from .register import register_attention
from .virtual_kv import VirtualKV

__all__ = [
    "ATTENTION_NAME", "AttentionCall", "DTYPES", "Formula", "PROBE_ATTENTION_NAME", "PROVIDER_ATTR",
    "REFERENCE_ATTENTION_NAME", "VirtualPairs", "attend_with_prefix", "dtype_named", "hificl_attention_forward",
    "record_attention_calls", "reference_attention_forward", "register_attention", "ATTENTION_PATHS", "NORMALIZERS",
    "AdapterMismatchError", "HiFICLConfigError", "UnsupportedModelError", "VirtualKV",
]
