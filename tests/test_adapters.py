"""The common tester every adapter method runs (as PEFT's testers do): save and load give the same model, the
saved files hold exactly the pinned tensor names and config fields with a checked format version, disabling
gives exactly the base model, a mixed batch equals its rows run alone, and unloading gives the base back."""

import copy
import json

import pytest
import torch

from hificl import AdapterMismatchError
from hificl.adapters import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME, load_adapter_model
from hificl.backbones import load_backbone
from hificl.methods import get_method
from hificl.seeding import Seeds
from hificl.tasks import get_task

METHODS = {"hificl": {"value_b_std": 0.5}, "live": {"shots": 2}, "mimic": {"shots": 2}, "lora": {},
           "prefix_tuning": {"num_virtual_tokens": 4}, "cartridge": {"num_virtual_tokens": 4}}
PEFT_PREFIXES = ("prefix_tuning", "cartridge")  # PEFT's prompt learning: no mixed-adapter batches
TENSORS = {  # the saved tensor names, per layer (the tiny language model has 2 layers)
    "hificl": {f"base_model.model.model.text_model.layers.{i}.self_attn.hificl.virtual_kv.{n}"
               for i in range(2) for n in ("k_a", "k_b", "v_a", "v_b")},
    "live": {"vectors", "scales"},
    "mimic": {"shift", "weight", "bias"},
    "lora": {f"base_model.model.model.text_model.layers.{i}.self_attn.{p}_proj.lora_{m}.weight"
             for i in range(2) for p in "qkvo" for m in "AB"},
    "prefix_tuning": {"prompt_embeddings"},
    "cartridge": {"prompt_embeddings"},
}
SHAPE = {"num_layers", "num_query_heads", "num_kv_heads", "head_dim", "text_model_type", "model_type", "hidden_size"}
PEFT_FIELDS = {"peft_type", "task_type", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
               "auto_mapping"}
CONFIG = {  # the saved adapter_config.json fields (HiFICL, LoRA: PEFT's format)
    "hificl": PEFT_FIELDS | {"model_shape", "trained_by", "num_virtual_tokens", "rank", "target_layers", "normalizer",
                             "key_a_std", "key_b_std", "value_a_std", "value_b_std", "full_rank_keys",
                             "full_rank_values", "fixed_alpha", "dtype", "init_seed", "attention_path"},
    "live": {"method", "format_version", "base_model", "trained_by", "vector_std", "scale_init", "init_seed"},
    "mimic": {"method", "format_version", "base_model", "trained_by", "shift_std", "weight_std", "init_seed"},
}


@pytest.fixture(scope="module")
def setting(tiny_vlm, colour_task):
    backbone = load_backbone(tiny_vlm)
    task = get_task("jsonl", seed=3407, train=colour_task["train"], test=colour_task["test"])
    batch = backbone.encode([task.query_prompt(e) for e in task.splits["test"][:3]], padding_side="right")
    return backbone, task, batch


def _logits(model, batch, **kwargs):
    model.eval()
    with torch.no_grad():
        return model(**batch, **kwargs).logits


def _adapted(setting, name):
    """The method's adapter on a fresh copy of the backbone's model, its weights moved off their initialisation."""
    backbone, task, _ = setting
    backbone = copy.copy(backbone)
    backbone.model = copy.deepcopy(backbone.model)
    parts = get_method(name, **METHODS[name]).build(backbone, task, Seeds(0, 0))
    with torch.no_grad():
        for tensor in parts.adapter.adapter_state("default").values():
            tensor.add_(torch.randn_like(tensor) * 0.3)
    return parts.adapter, backbone.model


def _row(batch, row):
    n = int(batch["attention_mask"][row].sum())
    out = {k: v[row:row + 1, :n] for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    out.update({k: v[row:row + 1] for k, v in batch.items() if k.startswith("pixel")})
    return out, n


@pytest.mark.parametrize("name", METHODS)
def test_save_and_load_give_the_same_model_and_the_pinned_format(setting, name, tmp_path):
    adapter, base = _adapted(setting, name)
    batch = setting[2]
    expected = _logits(adapter, batch)
    adapter.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert files - {"README.md"} == {CONFIG_NAME, WEIGHTS_NAME}
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / WEIGHTS_NAME))) == TENSORS[name]
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    if name == "lora":
        assert saved["peft_type"] == "LORA" and saved["r"] == 16 and saved["lora_alpha"] == 32
    elif name in PEFT_PREFIXES:
        assert saved["peft_type"] == name.upper() and saved["num_virtual_tokens"] == 4
    elif name == "hificl":
        assert set(saved) == CONFIG[name] and saved["peft_type"] == "HIFICL" and set(saved["model_shape"]) == SHAPE
    else:
        assert set(saved) == CONFIG[name] and saved["method"] == name and saved["format_version"] == FORMAT_VERSION
        assert set(saved["base_model"]) == SHAPE
    if name not in ("lora",) + PEFT_PREFIXES:  # what trained it (PEFT's own config fields hold LoRA's options)
        assert saved["trained_by"] == {"method": name, "options": json.loads(json.dumps(
            get_method(name, **METHODS[name]).options))}
    untouched = adapter.unload()
    reloaded = load_adapter_model(untouched, tmp_path)
    assert type(reloaded) is type(adapter)
    assert torch.equal(_logits(reloaded, batch), expected)
    reloaded.unload()


@pytest.mark.parametrize("name", ["live", "mimic"])
def test_the_format_version_is_checked_on_load(setting, name, tmp_path):
    adapter, base = _adapted(setting, name)
    adapter.save_pretrained(tmp_path)
    untouched = adapter.unload()
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(AdapterMismatchError, match="newer than this hificl reads"):
        load_adapter_model(untouched, tmp_path)
    del config["format_version"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(AdapterMismatchError, match="no valid format_version"):
        load_adapter_model(untouched, tmp_path)


@pytest.mark.parametrize("name", METHODS)
def test_disabled_is_exactly_the_base_and_unload_gives_it_back(setting, name):
    batch = setting[2]
    pristine = copy.deepcopy(setting[0].model)
    expected = _logits(pristine, batch)
    adapter, base = _adapted(setting, name)
    adapted = _logits(adapter, batch)
    assert (adapted - expected).abs().max() > 1e-4, "the adapter changes the model"
    with adapter.disable_adapter():
        assert torch.equal(_logits(adapter, batch), expected)
    model = adapter.unload()
    assert torch.equal(_logits(model, batch), expected)
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in pristine.parameters()]
    assert [n for n, _ in model.named_modules()] == [n for n, _ in pristine.named_modules()], "nothing left hooked in"


@pytest.mark.parametrize("name", METHODS)
def test_a_mixed_batch_equals_its_rows_run_alone(setting, name):
    batch = setting[2]
    adapter, base = _adapted(setting, name)
    names = ["default", None, "default"]
    if name in PEFT_PREFIXES:
        with pytest.raises(ValueError, match="no mixed-adapter batches"):
            _logits(adapter, batch, adapter_names=names)
        return
    mixed = _logits(adapter, batch, adapter_names=names)
    for row, adapter_name in enumerate(names):
        alone, n = _row(batch, row)
        if adapter_name is None:
            with adapter.disable_adapter():
                expected = _logits(adapter, alone)
        else:
            expected = _logits(adapter, alone)
        torch.testing.assert_close(mixed[row, :n], expected[0], rtol=1e-5, atol=1e-5)
    adapter.unload()


@pytest.mark.parametrize("name", METHODS)
def test_gradient_checkpointing_gives_the_same_gradients(setting, name):
    """With the frozen backbone's activations recomputed in the backward pass (train.gradient_checkpointing), every
    adapter method gets the gradients it gets without (dropout masks included: checkpointing replays the RNG)."""
    from hificl.routing import find_language_model

    backbone, task, _ = setting
    backbone = copy.copy(backbone)
    backbone.model = copy.deepcopy(backbone.model)
    mlp = find_language_model(backbone.model).mlps()[0]  # inside the checkpointed layer forward
    parts = get_method(name, **METHODS[name]).build(backbone, task, Seeds(0, 0))
    if name in PEFT_PREFIXES:  # transformers drops past_key_values in checkpointed layers: refused, by name
        with pytest.raises(ValueError, match="gradient_checkpointing: false"):
            parts.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return
    with torch.no_grad():
        for tensor in parts.adapter.adapter_state("default").values():
            tensor.add_(torch.randn_like(tensor) * 0.3)
    batch = parts.objective.batch(task.splits["train"][:3])
    calls = []
    handle = mlp.register_forward_pre_hook(lambda *args: calls.append(torch.is_grad_enabled()))  # recompute stops early
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            parts.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        parts.model.train()
        parts.model.zero_grad(set_to_none=True)
        calls.clear()
        torch.manual_seed(0)
        parts.objective.loss(parts.model, batch).backward()
        grads.append({n: p.grad.clone() for n, p in parts.model.named_parameters() if p.requires_grad})
        student_calls = len(calls) - (1 if name in ("live", "mimic") else 0)  # the teacher's forward runs once
        assert student_calls == (2 if checkpointing else 1), "checkpointing recomputes the layer in backward"
    handle.remove()
    parts.model.activation_checkpointing_disable()
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], rtol=1e-5, atol=1e-7)
    parts.close()


def test_any_saved_adapter_loads_in_a_fresh_process(setting, tmp_path):
    """load_adapter_model knows every built-in method without the caller importing hificl.methods first."""
    import subprocess
    import sys

    adapter, _ = _adapted(setting, "mimic")
    adapter.save_pretrained(tmp_path)
    adapter.unload()
    script = ("import sys; from transformers import AutoModelForImageTextToText; "
              "from hificl.adapters import load_adapter_model; "
              f"m = load_adapter_model(AutoModelForImageTextToText.from_pretrained(sys.argv[1]), sys.argv[2]); "
              "print(type(m).__name__)")
    out = subprocess.run([sys.executable, "-c", script, setting[0].name, str(tmp_path)], capture_output=True, text=True)
    assert out.stdout.strip() == "MimicModel", out.stderr[-2000:]


@pytest.mark.parametrize("name", METHODS)
def test_left_padded_generation_equals_each_row_alone(setting, name, tmp_path):
    """Prompts of different lengths, left-padded as the evaluator batches them: every adapter method generates
    for each row what it generates for that row alone, with finite scores (a query position that sees no real
    key -- padding -- must not turn into NaN and spread through the values)."""
    from fixtures import write_colour_task
    from hificl.tasks import get_task

    backbone, _, _ = setting
    files = write_colour_task(tmp_path / "task")
    task = get_task("jsonl", seed=3407, train=files["train"], test=files["test"])
    examples = task.splits["test"][:3]
    prompts = [task.query_prompt(e) for e in examples]
    prompts[1] = prompts[1][:-1] + ["Which colour fills this square, please?\nAnswer:"]  # a longer prompt
    adapter, _ = _adapted(setting, name)
    adapter.eval()

    def generate(batch):
        with torch.no_grad():
            out = adapter.generate(**batch, max_new_tokens=4, do_sample=False, output_scores=True,
                                   return_dict_in_generate=True, pad_token_id=backbone.pad_token_id)
        return out.sequences[:, batch["input_ids"].shape[1]:], torch.stack(out.scores, 1)

    batch = backbone.encode(prompts, padding_side="left")
    assert (batch["attention_mask"] == 0).any(), "the batch is padded"
    tokens, scores = generate(batch)
    assert torch.isfinite(scores).all()
    for row, prompt in enumerate(prompts):
        alone_tokens, alone_scores = generate(backbone.encode([prompt], padding_side="left"))
        assert torch.equal(tokens[row], alone_tokens[0])
        torch.testing.assert_close(scores[row], alone_scores[0], rtol=1e-4, atol=1e-4)
    adapter.unload()


@pytest.mark.parametrize("name, options", [("live", {"shots": 2, "vector_lr": 1e-3, "kl_positions": "predicting"}),
                                           ("mimic", {"shots": 2, "ce_weight": 0.25}),
                                           ("hificl", {"rank": 4, "teacher_weight": 0.5, "teacher_shots": 2})])
def test_a_saved_adapter_reports_the_options_that_trained_it(setting, name, options, tmp_path):
    """`hificl eval --adapter` names the method by what trained the adapter (its ``trained_by`` record), not by
    the method's defaults."""
    from hificl.methods import method_for_adapter

    backbone, task, _ = setting
    backbone = copy.copy(backbone)
    backbone.model = copy.deepcopy(backbone.model)
    method = get_method(name, **options)
    parts = method.build(backbone, task, Seeds(0, 0))
    parts.adapter.save_pretrained(tmp_path)
    parts.close()
    assert method_for_adapter(tmp_path).options == method.options != get_method(name).options
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["trained_by"]["options"]["shots"] = "many"
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(AdapterMismatchError, match=r"adapter_config.json: its 'trained_by' record"):
        method_for_adapter(tmp_path)


@pytest.mark.parametrize("name", ["hificl", "lora", "prefix_tuning", "cartridge"])
def test_answer_loss_equals_the_loss_of_the_whole_sequence_logits(setting, name):
    """The training loss runs the LM head only where an answer token is predicted: its value and gradients equal
    those of the model's own loss over the whole sequence's logits."""
    backbone, task, _ = setting
    backbone = copy.copy(backbone)
    backbone.model = copy.deepcopy(backbone.model)
    parts = get_method(name, **METHODS[name]).build(backbone, task, Seeds(0, 0))
    assert parts.objective.keep_logits
    batch = parts.objective.batch(task.splits["train"][:3])
    assert (batch["labels"] == -100).sum() > batch["labels"].numel() / 2  # most positions carry no label
    params = [p for p in parts.model.parameters() if p.requires_grad]
    parts.model.train()
    losses, grads = [], []
    for compute in (lambda: parts.objective.loss(parts.model, batch), lambda: parts.model(**batch).loss):
        torch.manual_seed(0)  # the same dropout draws (LoRA)
        loss = compute()
        losses.append(loss.item())
        grads.append(torch.autograd.grad(loss, params))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for fast, whole in zip(*grads):
        assert torch.allclose(fast, whole, rtol=1e-5, atol=1e-8)
    assert any(g.abs().sum() > 0 for g in grads[0])


BAD_VALUES = {"hificl": ("rank", -1), "live": ("scale_init", "big"), "mimic": ("shift_std", "wide"),
              "lora": ("r", -1), "prefix_tuning": ("num_virtual_tokens", "four"), "cartridge": ("num_virtual_tokens", "four")}


@pytest.mark.parametrize("name", METHODS)
def test_a_bad_value_in_a_saved_config_names_the_file(setting, name, tmp_path):
    adapter, base = _adapted(setting, name)
    adapter.save_pretrained(tmp_path)
    untouched = adapter.unload()
    field, value = BAD_VALUES[name]
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert field in config
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, field: value}))
    with pytest.raises((AdapterMismatchError, ValueError)) as error:
        load_adapter_model(untouched, tmp_path)
    assert str(tmp_path / CONFIG_NAME) in str(error.value) and field in str(error.value)
