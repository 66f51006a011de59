"""HiFICL through PEFT's own API (`import hificl` registers ``peft_type "HIFICL"``): the same numbers as hificl's
API bit for bit (one adapter, two switched, a mixed batch) on a text model with grouped-query attention, another
text family and a multimodal one; folders saved by either API load in the other; PEFT's adapter management,
transformers' `load_adapter`, refused merging, the earlier folder format and bad folders."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import IA3Config, PeftModel, get_peft_model
from safetensors.torch import save_file

from hificl import AdapterMismatchError, HiFICLConfig, HiFICLModel, get_hificl_model
from hificl.adapters import load_adapter_model
from fixtures import build, padded_inputs

FAMILIES = ["llama", "qwen3", "llava_qwen2"]  # llama: 4 query heads on 2 KV heads; llava_qwen2: a VLM


def _configs():
    return (HiFICLConfig(value_b_std=0.5, key_b_std=0.3, init_seed=1),
            HiFICLConfig(rank=4, value_b_std=0.7, key_b_std=0.2, init_seed=2, target_layers=[1]))


def _logits(model, inputs, **kwargs):
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


@pytest.fixture(scope="module", params=FAMILIES)
def case(request):
    return build(request.param)


@pytest.fixture()
def both(case):
    """The same two adapters through PEFT's API and through hificl's."""
    first, second = _configs()
    peft_model = get_peft_model(copy.deepcopy(case.model), copy.deepcopy(first))
    peft_model.add_adapter("other", copy.deepcopy(second))
    ours = get_hificl_model(copy.deepcopy(case.model), first)
    ours.add_adapter("other", second)
    return peft_model, ours


def test_peft_and_hificl_apis_give_the_same_logits_bit_for_bit(case, both):
    peft_model, ours = both
    inputs = padded_inputs(case, batch_size=3, seq_len=12, padding="left")
    base = _logits(case.model, inputs)
    assert torch.equal(_logits(peft_model, inputs), _logits(ours, inputs))
    assert not torch.equal(_logits(ours, inputs), base), "the adapter changes the model"
    peft_model.set_adapter("other")
    ours.set_adapter("other")
    assert torch.equal(_logits(peft_model, inputs), _logits(ours, inputs))
    names = ["other", None, "default"]
    mixed = _logits(ours, inputs, adapter_names=names)
    assert torch.equal(_logits(peft_model, inputs, adapter_names=["other", "__base__", "default"]), mixed)
    with peft_model.disable_adapter():
        assert torch.equal(_logits(peft_model, inputs), base)


def test_saved_by_one_api_loads_in_the_other(case, both, tmp_path):
    peft_model, ours = both
    inputs = padded_inputs(case, batch_size=2, seq_len=10, padding="right")
    expected = _logits(ours, inputs)
    peft_model.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    for folder in ("peft", "ours"):
        saved = json.loads((tmp_path / folder / "adapter_config.json").read_text())
        assert saved["peft_type"] == "HIFICL" and (tmp_path / folder / "other" / "adapter_model.safetensors").exists()
        by_peft = PeftModel.from_pretrained(copy.deepcopy(case.model), tmp_path / folder)
        by_ours = HiFICLModel.from_pretrained(copy.deepcopy(case.model), tmp_path / folder)
        assert torch.equal(_logits(by_peft, inputs), expected) and torch.equal(_logits(by_ours, inputs), expected)
        by_peft.load_adapter(tmp_path / folder / "other", adapter_name="other")
        by_ours.load_adapter(tmp_path / folder / "other", adapter_name="other")
        assert not any(p.requires_grad for p in by_ours.parameters()), "loaded for inference: frozen"
        by_peft.set_adapter("other")
        by_ours.set_adapter("other")
        assert torch.equal(_logits(by_peft, inputs), _logits(by_ours, inputs))


def test_peft_adapter_management(tmp_path, capsys):
    case = build("llama")
    model = get_peft_model(copy.deepcopy(case.model), HiFICLConfig(value_b_std=0.5, init_seed=1))
    model.print_trainable_parameters()
    shape = model.base_model.shape
    expected = shape.num_layers * shape.num_query_heads * 2 * (8 * 8 + 8 * shape.head_dim)
    assert f"trainable params: {expected:,}" in capsys.readouterr().out
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 4 * shape.num_layers and all(".hificl.virtual_kv.default." in n for n in trainable)
    model.add_adapter("other", HiFICLConfig(value_b_std=0.5, init_seed=2))
    assert model.active_adapter == "default"
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".other." in n)
    model.set_adapter("other")
    assert {n.split(".virtual_kv.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"other"}
    with pytest.raises(ValueError, match="one active adapter"):
        model.base_model.set_adapter(["default", "other"])
    model.delete_adapter("other")
    assert model.active_adapters == ["default"] and list(model.peft_config) == ["default"]
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    inputs = case.make_inputs(batch_size=2, seq_len=8)
    base = model.unload()
    assert base.config._attn_implementation == "sdpa" and all(p.requires_grad for p in base.parameters())
    assert not any("hificl" in n for n, _ in base.named_modules())
    assert torch.equal(_logits(base, inputs), _logits(case.model, inputs))


def test_transformers_load_adapter(tmp_path):
    case = build("qwen3")
    model = get_peft_model(copy.deepcopy(case.model), HiFICLConfig(value_b_std=0.5, key_b_std=0.3, init_seed=3))
    model.save_pretrained(tmp_path)
    inputs = case.make_inputs(batch_size=2, seq_len=8)
    plain = copy.deepcopy(case.model)
    plain.load_adapter(str(tmp_path))
    assert torch.equal(_logits(plain, inputs), _logits(model, inputs))


def test_a_shape_mismatch_through_peft_names_the_fix(tmp_path):
    get_peft_model(copy.deepcopy(build("qwen3").model), HiFICLConfig()).save_pretrained(tmp_path)
    with pytest.raises(AdapterMismatchError, match="was trained for a model with .* Load it onto the model"):
        PeftModel.from_pretrained(copy.deepcopy(build("llama").model), tmp_path)
    with pytest.raises(AdapterMismatchError, match=str(tmp_path)):
        HiFICLModel.from_pretrained(copy.deepcopy(build("llama").model), tmp_path)


def test_a_folder_of_the_earlier_format_still_loads(tmp_path):
    """Folders written before HiFICL adapters were PEFT's (``method: hificl``, keys ``layers.<i>.<factor>``)."""
    case = build("llama")
    model = get_hificl_model(copy.deepcopy(case.model), HiFICLConfig(value_b_std=0.5, key_b_std=0.3, init_seed=4))
    config = {"method": "hificl", "format_version": 1, **{k: v for k, v in model.peft_config["default"].settings().items()
                                                          if k != "attention_path"},
              "base_model": model.peft_config["default"].model_shape}
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    tensors = {f"layers.{i}.{name}": tensor.detach().clone() for i, layer in model.adapters["default"].layers.items()
               for name, tensor in layer.named_parameters()}
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    inputs = case.make_inputs(batch_size=2, seq_len=8)
    loaded = load_adapter_model(copy.deepcopy(case.model), tmp_path)
    assert isinstance(loaded, HiFICLModel) and torch.equal(_logits(loaded, inputs), _logits(model, inputs))
    loaded.save_pretrained(tmp_path / "upgraded")  # saving writes PEFT's layout
    assert torch.equal(_logits(PeftModel.from_pretrained(copy.deepcopy(case.model), tmp_path / "upgraded"), inputs),
                       _logits(model, inputs))


def test_a_peft_folder_of_another_type_is_refused_by_name(tmp_path):
    case = build("llama")
    get_peft_model(copy.deepcopy(case.model), IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                        feedforward_modules=["down_proj"])).save_pretrained(tmp_path)
    with pytest.raises(AdapterMismatchError, match=r"adapter_config.json holds a PEFT adapter of type 'IA3'"):
        load_adapter_model(copy.deepcopy(case.model), tmp_path)
    with pytest.raises(AdapterMismatchError, match="is a PEFT IA3 adapter, not a HiFICL adapter"):
        HiFICLModel.from_pretrained(copy.deepcopy(case.model), tmp_path)


def test_without_import_hificl_peft_says_what_the_readme_says(tmp_path):
    case = build("llama")
    get_peft_model(copy.deepcopy(case.model), HiFICLConfig()).save_pretrained(tmp_path / "adapter")
    case.model.save_pretrained(tmp_path / "model")
    script = ("import sys; from transformers import AutoModelForCausalLM; from peft import PeftModel; "
              "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sys.argv[1]), sys.argv[2])")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "model"), str(tmp_path / "adapter")],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "KeyError: 'HIFICL'" in out.stderr
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "KeyError: 'HIFICL'" in readme and "import hificl" in readme


def test_the_transformers_trainer_example_trains_the_virtual_pairs(tmp_path):
    """examples/peft_trainer.py on a tiny model: the loss falls, and the saved folder loads in both APIs."""
    import importlib.util

    from fixtures import family_tokenizer

    path = Path(__file__).parents[1] / "examples" / "peft_trainer.py"
    spec = importlib.util.spec_from_file_location("peft_trainer_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    case, tokenizer = build("llama"), family_tokenizer("llama")
    pairs = [("red", "apple"), ("yellow", "banana"), ("green", "lime"), ("purple", "plum")] * 2
    model, losses = example.train_with_trainer(copy.deepcopy(case.model), tokenizer, pairs, str(tmp_path), steps=60,
                                               lr=1e-1, config=HiFICLConfig(value_b_std=0.01, init_seed=0))
    assert len(losses) >= 10 and losses[-1] < losses[0] - 0.5, losses
    inputs = case.make_inputs(batch_size=2, seq_len=8)
    model.eval()
    expected = _logits(model, inputs)
    assert torch.equal(_logits(PeftModel.from_pretrained(copy.deepcopy(case.model), tmp_path), inputs), expected)
    assert torch.equal(_logits(HiFICLModel.from_pretrained(copy.deepcopy(case.model), tmp_path), inputs), expected)


def test_peft_generate_serves_one_adapter_per_row(case, both):
    """``adapter_names`` on PEFT's `generate`: each row generates what it generates alone under its adapter (or the
    base model), greedy, beams of one."""
    peft_model, _ = both
    inputs = case.make_inputs(batch_size=3, seq_len=8)  # unpadded: every row alone is the same tokens
    names = ["other", "__base__", "default"]
    with torch.no_grad():
        mixed = peft_model.generate(**inputs, adapter_names=names, max_new_tokens=4, do_sample=False)
        for row, name in enumerate(names):
            alone = {k: v[row:row + 1] for k, v in inputs.items()}
            if name == "__base__":
                with peft_model.disable_adapter():
                    expected = peft_model.generate(**alone, max_new_tokens=4, do_sample=False)
            else:
                peft_model.set_adapter(name)
                expected = peft_model.generate(**alone, max_new_tokens=4, do_sample=False)
            assert torch.equal(mixed[row], expected[0]), (row, name)


@pytest.mark.parametrize("change", [{"intermediate_size": 96, "hidden_size": 96}, {"num_hidden_layers": 3}],
                         ids=["wider", "deeper"])
def test_a_lora_adapter_is_checked_against_the_model(tmp_path, change):
    """A LoRA folder onto a Llama of another width, or a deeper one with the same module names: refused, naming
    the file, before PEFT loads anything (the names and shapes of every saved tensor are checked)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hificl.adapters import LoraModel

    def llama(**overrides):
        torch.manual_seed(0)
        fields = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
        return LlamaForCausalLM(LlamaConfig(**{**fields, **overrides}))

    LoraModel(llama(), init_seed=0).save_pretrained(tmp_path)
    message = "adapter_model.safetensors does not match" if "hidden_size" in change else "trained for another model"
    with pytest.raises(AdapterMismatchError, match=message):
        load_adapter_model(llama(**change), tmp_path)
    assert isinstance(load_adapter_model(llama(), tmp_path), LoraModel)
