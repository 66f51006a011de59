"""The core of hificl: the config, the virtual key-value module and the attention function. It depends on
nothing else in the package."""

from .attention import (
    ATTENTION_NAME,
    AttentionCall,
    attend_with_prefix,
    PROVIDER_ATTR,
    REFERENCE_ATTENTION_NAME,
    VirtualPairs,
    hificl_attention_forward,
    record_attention_calls,
    reference_attention_forward,
    register_attention,
)
from .config import HiFICLConfig
from .errors import AdapterMismatchError, HiFICLConfigError, UnsupportedModelError
from .virtual_kv import VirtualKV, VirtualKVBank

__all__ = [
    "ATTENTION_NAME", "AttentionCall", "attend_with_prefix", "PROVIDER_ATTR", "REFERENCE_ATTENTION_NAME", "VirtualPairs", "hificl_attention_forward",
    "record_attention_calls", "reference_attention_forward", "register_attention", "HiFICLConfig",
    "AdapterMismatchError", "HiFICLConfigError", "UnsupportedModelError", "VirtualKV", "VirtualKVBank",
]
