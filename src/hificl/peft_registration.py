"""PEFT's own API for HiFICL adapters after ``import hificl``, without importing PEFT for those who never use it.

`hificl.tuner` registers ``peft_type "HIFICL"`` with PEFT when it is imported. `register_with_peft_when_imported`
(run by ``import hificl``) makes sure it is: at once when PEFT is already imported, otherwise the moment PEFT's
import finishes (a post-import hook: a finder on `sys.meta_path` that wraps the loading of the ``peft`` package
once, then removes itself). So ``import hificl`` then ``PeftModel.from_pretrained(model, "hificl-adapter/")``
works, and a script that never touches PEFT never loads it (nor accelerate behind it)."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import sys

logger = logging.getLogger(__name__)

PEFT = "peft"


def _register() -> None:
    """Import `hificl.tuner`, which registers itself (unless it is being imported right now: it then registers
    at the end of its own import)."""
    if "hificl.tuner" in sys.modules:
        return
    try:
        importlib.import_module("hificl.tuner")
    except Exception as error:  # never break the user's `import peft`
        logger.warning("hificl could not register peft_type HIFICL with PEFT (%s): import hificl.tuner to see why.",
                       error)


class _AfterPeftImport(importlib.abc.MetaPathFinder):
    """Finds ``peft`` through the other finders and runs `_register` after its module has executed."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != PEFT:
            return None
        _remove_hook()
        spec = importlib.util.find_spec(fullname)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        execute = loader.exec_module

        def exec_module(module):
            execute(module)
            _register()

        loader.exec_module = exec_module  # this spec's own loader object
        return spec


def _remove_hook() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _AfterPeftImport)]


def register_with_peft_when_imported() -> None:
    """Register ``peft_type "HIFICL"`` with PEFT now if PEFT is imported, else as soon as it is (idempotent)."""
    if PEFT in sys.modules:
        _register()
    elif not any(isinstance(finder, _AfterPeftImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterPeftImport())
