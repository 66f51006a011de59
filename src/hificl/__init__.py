"""hificl: High-Fidelity In-Context Learning -- learnable low-rank virtual key-value pairs in every attention
head of a frozen Hugging Face model."""

from .core import AdapterMismatchError, HiFICLConfig, HiFICLConfigError, UnsupportedModelError
from .model import HiFICLModel, get_hificl_model

__version__ = "0.1.0"

__all__ = [
    "HiFICLConfig", "HiFICLModel", "get_hificl_model", "AdapterMismatchError", "HiFICLConfigError",
    "UnsupportedModelError", "__version__",
]
