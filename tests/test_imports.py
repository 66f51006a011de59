"""Importing hificl is cheap and its registries are explicit: the core loads no transformers, accelerate or PIL;
``hificl --help`` loads no model library; PEFT serves peft_type HIFICL once both are imported, in either order.
Each check runs in a fresh interpreter (this test process has imported everything already)."""

import json
import subprocess
import sys

import pytest


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


HEAVY = ("accelerate", "PIL", "transformers", "peft", "hificl.methods.base")


def _heavy_loaded_after(code: str) -> tuple[str, list[str]]:
    """What `code` prints, and which of the heavy modules it left imported."""
    out = _run(f"import json, sys\n{code}\nprint('LOADED', json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    printed, _, loaded = out.rpartition("LOADED ")
    return printed, json.loads(loaded)


def test_the_core_imports_no_model_library():
    assert _heavy_loaded_after("import hificl.core")[1] == []


def test_help_loads_no_model_library():
    printed, loaded = _heavy_loaded_after("from hificl.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass")
    assert "usage: hificl" in printed and loaded == []


@pytest.mark.parametrize("order", ["import hificl; import peft", "import peft; import hificl", "import hificl.tuner"])
def test_peft_knows_hificl_once_both_are_imported(order):
    out = _run(f"{order}\nfrom peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING\n"
               "print('HIFICL' in PEFT_TYPE_TO_CONFIG_MAPPING, 'HIFICL' in PEFT_TYPE_TO_TUNER_MAPPING)")
    assert out.strip() == "True True"


def test_the_adapter_api_loads_on_first_use():
    out = _run("import sys, hificl\nassert 'hificl.adapters' not in sys.modules\n"
               "from hificl import HiFICLConfig, get_hificl_model\nprint(HiFICLConfig().peft_type, "
               "get_hificl_model.__module__)")
    assert out.split() == ["HIFICL", "hificl.adapters.peft_backed"]


def test_registries_list_names_without_importing_their_entries():
    out = _run("import sys\nfrom hificl.methods import METHODS\nprint(METHODS.names())\n"
               "print('hificl.methods.live' in sys.modules)\nfrom hificl.methods import get_method\n"
               "print(get_method('live').label, 'hificl.methods.live' in sys.modules)")
    names, before, after = out.strip().splitlines()
    assert "distill" in names and "live" in names and before == "False" and after == "LIVE True"
