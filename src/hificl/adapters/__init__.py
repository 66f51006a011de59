"""The adapter of every trained method behind one PEFT-shaped API (`AdapterModel`): HiFICL and LoRA as PEFT adapters
(`peft_backed`), PEFT's prefix tuning and CARTRIDGE for comparison (`prompt_learning`), LIVE's and MimIC's shifts in hificl's own format (`shifts`, `live`, `mimic`), and loading any saved folder
(`load_adapter_model`)."""

from .base import ADAPTERS, AdapterModel, load_adapter_model, register_adapter, saved_method
from .files import (CONFIG_NAME, DEFAULT_ADAPTER, FORMAT_VERSION, WEIGHTS_NAME, adapter_folder, read_adapter_config,
                    read_adapter_weights)
from .peft_backed import HiFICLModel, LoraModel, PeftAdapterModel, attention_projections, get_hificl_model
from .prompt_learning import CartridgeModel, PrefixTuningModel, PromptLearningModel
from .shifts import ShiftModel, settings_from_saved
from .live import LiveConfig, LiveModel
from .mimic import MimicConfig, MimicModel

__all__ = ["ADAPTERS", "AdapterModel", "CartridgeModel", "PrefixTuningModel", "PromptLearningModel", "CONFIG_NAME", "DEFAULT_ADAPTER", "FORMAT_VERSION", "HiFICLModel", "LiveConfig", "LiveModel", "LoraModel", "MimicConfig", "MimicModel",
           "PeftAdapterModel", "ShiftModel", "WEIGHTS_NAME", "adapter_folder", "attention_projections",
           "get_hificl_model", "load_adapter_model", "read_adapter_config", "read_adapter_weights", "register_adapter",
           "saved_method", "settings_from_saved"]
