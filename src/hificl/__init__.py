"""hificl: High-Fidelity In-Context Learning -- learnable low-rank virtual key-value pairs in every attention
head of a frozen Hugging Face model."""

from .core import AdapterMismatchError, HiFICLConfigError, UnsupportedModelError
from .tuner import HiFICLConfig, register as _register_with_peft
from .adapters import HiFICLModel, get_hificl_model

from . import methods  # noqa: F401 -- registers the built-in methods and their adapter models (PEFT's tuners do too)

_register_with_peft()  # PEFT's own API (get_peft_model, PeftModel.from_pretrained) serves peft_type "HIFICL"

__version__ = "0.1.0"

__all__ = [
    "HiFICLConfig", "HiFICLModel", "get_hificl_model", "AdapterMismatchError", "HiFICLConfigError",
    "UnsupportedModelError", "__version__",
]
