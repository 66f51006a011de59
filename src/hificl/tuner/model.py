"""`HiFICLTuner`: PEFT's tuner for HiFICL (what `get_peft_model` builds for a `HiFICLConfig`).

Attaching routes the language model's attention once to hificl's attention function (`hificl.routing`: a probe
forward finds the attention modules, whatever the model family) and gives each targeted attention module a
`HiFICLLayer` child holding the virtual pairs of every adapter. Nothing is wrapped or replaced, so `unload()` removes
the layers and restores the attention implementation and which parameters required gradients; `merge_and_unload()`
is refused (there is no weight to merge the pairs into). One adapter is active at a time; PEFT's
``adapter_names=[...]`` keyword on forward/generate serves several adapters (and the base model, for None or
"__base__") in one batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict
from typing import Any, Iterator, Sequence

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from ..core import ATTENTION_NAME, PROVIDER_ATTR, REFERENCE_ATTENTION_NAME
from ..routing import Frozen, ModelShape, RoutedAttention, freeze, route_attention
from .config import HiFICLConfig
from .layer import BASE_ROW, MERGE_REFUSED, HiFICLLayer, RowSelection


class HiFICLTuner(BaseTuner):
    """PEFT's tuner for HiFICL adapters (see the module docstring)."""

    prefix = "virtual_kv"
    tuner_layer_cls = HiFICLLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _pre_injection_hook(self, model: nn.Module, config: HiFICLConfig, adapter_name: str) -> None:
        if not isinstance(config, HiFICLConfig):
            raise TypeError(f"HiFICL adapters need a HiFICLConfig, got {type(config).__name__}.")
        if self.__dict__.get("_routing") is None:
            self._selection = RowSelection()
            self._routing: RoutedAttention = route_attention(model, ATTENTION_NAME,
                                                             purpose="add virtual key-value pairs to it")
            self._frozen: Frozen | None = None

    @property
    def routing(self) -> RoutedAttention:
        """The base model's routed attention (its attention modules, decoder layers and MLPs in layer order)."""
        return self._routing

    @property
    def shape(self) -> ModelShape:
        return ModelShape.of(self._routing)

    def layers(self) -> list[HiFICLLayer]:
        """The tuner layers, in decoder-layer order."""
        return [getattr(m, PROVIDER_ATTR) for m in self._routing.attention_modules
                if isinstance(getattr(m, PROVIDER_ATTR, None), HiFICLLayer)]

    # ------------------------------------------------------------------------------------------- injecting
    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Add adapter `adapter_name` (its config is ``self.peft_config[adapter_name]``) to every targeted layer.
        The layers draw their initialisation in layer order from one generator seeded by ``init_seed``."""
        config = self.peft_config[adapter_name]
        config.validate()
        shape = self.shape
        if config.model_shape is None:
            config.model_shape = asdict(shape)
        else:
            shape.check(config.model_shape, f"this HiFICLConfig (adapter {adapter_name!r})")
        indices = config.layers_for(shape.num_layers)
        if self._frozen is None:
            self._frozen = freeze(model)  # the first adapter freezes the base model; unload() restores it
        generator = torch.Generator().manual_seed(config.init_seed) if config.init_seed is not None else None
        names = {id(module): name for name, module in model.named_modules()}
        for index in indices:
            module = self._routing.calls[index].module
            self._create_and_replace(config, adapter_name, module, PROVIDER_ATTR, module, names[id(module)],
                                     generator=generator)
            if names[id(module)] not in self.targeted_module_names:
                self.targeted_module_names.append(names[id(module)])
        others = [name for name in self.active_adapters if name != adapter_name]
        if not others:  # the first adapter (or the first since the last was deleted) becomes active
            self.set_adapter(adapter_name, inference_mode=config.inference_mode)
            return
        for layer in self.layers():  # a later one is added frozen, the active one left as it is
            layer._active_adapter = others
            if adapter_name in layer.virtual_kv:
                layer.virtual_kv[adapter_name].requires_grad_(False)

    def _create_and_replace(self, peft_config: HiFICLConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, parameter_name: str | None = None,
                            generator: torch.Generator | None = None) -> None:
        """Give attention module `target` a `HiFICLLayer` child (once) and the adapter's pairs in it."""
        layer = getattr(target, PROVIDER_ATTR, None)
        if not isinstance(layer, HiFICLLayer):
            layer = HiFICLLayer(self._routing.attention_modules.index(target), self._selection)
            target.add_module(PROVIDER_ATTR, layer)
        own = next((p for n, p in target.named_parameters() if not n.startswith(PROVIDER_ATTR + ".")), None)
        device = own.device if own is not None else self._routing.calls[layer.layer_index].device
        shape = self.shape
        layer.update_layer(adapter_name, peft_config, shape.num_query_heads, shape.head_dim, device, generator)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """The adapter's dtype is its config's ``dtype`` (float32 master weights by default, whatever the backbone's
        dtype); PEFT's upcasting of bf16/fp16 adapters is not applied."""

    # ------------------------------------------------------------------------------------- which adapter
    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Make `adapter_name` the active adapter: the one every row gets, and the only trainable one (unless
        `inference_mode`)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) > 1:
            raise ValueError(f"HiFICL serves one active adapter at a time, got {names}; to serve several in one "
                             "batch pass adapter_names=[one name per row] to forward/generate.")
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"Unknown adapter(s) {unknown}; this model has {list(self.peft_config)}.")
        for layer in self.layers():
            layer.set_adapter(names, inference_mode=inference_mode)
        self.active_adapter = names[0] if names else []

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter. If it was active, the first remaining one (or none: the base model) becomes active."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Unknown adapter(s) [{adapter_name!r}]; this model has {list(self.peft_config)}.")
        del self.peft_config[adapter_name]
        for layer in self.layers():
            for attribute in (layer.virtual_kv, layer.settings):
                if adapter_name in attribute:
                    del attribute[adapter_name]
        if adapter_name in self.active_adapters:
            remaining = list(self.peft_config)
            if remaining:
                self.set_adapter(remaining[0])
            else:
                for layer in self.layers():
                    layer._active_adapter = []
                self.active_adapter = []

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """PEFT's hook around forward/generate: ``adapter_names`` (one adapter name, or None / "__base__" for the base
        model, per row) mixes adapters in one batch."""
        names = kwargs.pop("adapter_names", None)
        if names is None:
            yield
            return
        names = list(names)
        if not names:
            raise ValueError("adapter_names is empty: give one adapter name (or None) per batch row.")
        unknown = sorted({str(n) for n in names if n not in (None, BASE_ROW) and n not in self.peft_config})
        if unknown:
            raise ValueError(f"Unknown adapter(s) {unknown}; this model has {list(self.peft_config)}.")
        previous, self._selection.names = self._selection.names, names
        try:
            yield
        finally:
            self._selection.names = previous

    @contextlib.contextmanager
    def reference_attention(self) -> Iterator[None]:
        """Run the slow float64 reference attention instead of the fused path (for tests and debugging)."""
        self._routing.set(REFERENCE_ATTENTION_NAME)
        try:
            yield
        finally:
            self._routing.set(ATTENTION_NAME)

    # ------------------------------------------------------------------------------------------- leaving
    def _check_merge_allowed(self) -> None:
        raise ValueError(MERGE_REFUSED)

    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        raise ValueError(MERGE_REFUSED)

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names: Sequence[str] | None = None) -> nn.Module:
        """`unload()`: the layers removed, the attention implementation and the parameters' trainability restored.
        Merging is refused (see `MERGE_REFUSED`)."""
        if merge:
            raise ValueError(MERGE_REFUSED)
        for module in self._routing.attention_modules:
            if isinstance(getattr(module, PROVIDER_ATTR, None), HiFICLLayer):
                delattr(module, PROVIDER_ATTR)
        self._routing.restore()
        if self._frozen is not None:
            self._frozen.restore()
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model
