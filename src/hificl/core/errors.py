"""Exceptions raised by hificl. Each message names the problem and the fix."""


class HiFICLConfigError(ValueError):
    """A configuration field has a wrong value or type."""


class AdapterMismatchError(ValueError):
    """A saved adapter does not fit the model it is loaded onto (other shape or other model type)."""


class UnsupportedModelError(TypeError):
    """The model's attention does not go through transformers' attention registry, so it cannot be adapted."""
