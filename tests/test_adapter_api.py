"""The adapter API: freezing, parameters, disable, save/load, several adapters, errors."""

import copy
import json

import pytest
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

import peft.peft_model
from hificl import (AdapterMismatchError, HiFICLConfig, HiFICLConfigError, HiFICLModel, UnsupportedModelError,
                    get_hificl_model)
from fixtures import attach, build, padded_inputs, real_rows, rel_err


@pytest.fixture(scope="module")
def llama():
    return build("llama")


def test_disable_adapter_equals_untouched_base(llama):
    inputs = padded_inputs(llama, batch_size=2, seq_len=10, padding="left")
    with torch.no_grad():
        untouched = llama.model(**inputs).logits
        model = attach(llama)
        adapted = model(**inputs).logits
        with model.disable_adapter():
            disabled = model(**inputs).logits
    for got, want, other in zip(real_rows(disabled, inputs), real_rows(untouched, inputs), real_rows(adapted, inputs)):
        assert rel_err(got, want) < 1e-6
        assert rel_err(other, want) > 1e-3


def test_only_adapter_parameters_are_trainable_and_count_matches_the_paper(llama):
    model = attach(llama)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".self_attn.hificl.virtual_kv.default." in name for name in trainable)
    shape = model.shape
    n, r = 8, 8
    expected = shape.num_layers * shape.num_query_heads * 2 * (n * r + r * shape.head_dim)
    assert model.get_nb_trainable_parameters()[0] == expected


def test_full_rank_ablations_change_the_parameters():
    case = build("llama")
    model = attach(case, full_rank_keys=True)
    layer = model.adapters["default"].layers["0"]
    assert layer.k_full.shape == (model.shape.num_query_heads, 8, model.shape.head_dim) and not hasattr(layer, "k_a")
    assert torch.equal(model.virtual_kv(0)[0], layer.k_full)
    shape = model.shape
    assert model.get_nb_trainable_parameters()[0] == shape.num_layers * shape.num_query_heads * (
        8 * shape.head_dim + 8 * 8 + 8 * shape.head_dim)
    with pytest.raises(HiFICLConfigError, match="fixed_alpha"):
        HiFICLConfig(fixed_alpha=True, normalizer="unmasked")


def test_print_trainable_parameters(llama, capsys):
    attach(llama).print_trainable_parameters()
    assert "trainable params:" in capsys.readouterr().out


def test_gradients_reach_only_the_adapter_and_training_lowers_the_loss(llama):
    torch.manual_seed(0)
    model = attach(llama, value_b_std=0.0, key_b_std=0.01)
    inputs = llama.make_inputs(batch_size=2, seq_len=10)
    labels = inputs["input_ids"].clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    model.train()
    for _ in range(8):
        loss = model(**inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is None for n, p in model.base_model.named_parameters() if ".hificl." not in n)
        grads = [p.grad for p in model.adapters["default"].parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0  # V_A's is 0 while V_B = 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05


def test_virtual_kv_shape_and_value(llama):
    model = attach(llama)
    keys, values = model.virtual_kv(1)
    layer = model.adapters["default"].layers["1"]
    assert keys.shape == values.shape == (model.shape.num_query_heads, 8, model.shape.head_dim)
    assert torch.allclose(keys, layer.k_a @ layer.k_b) and torch.allclose(values, layer.v_a @ layer.v_b)


def test_eval_products_are_computed_once_and_refreshed_after_an_update(llama):
    model = attach(llama).eval()
    layer = model.adapters["default"].layers["0"]
    with torch.no_grad():
        first, second = layer(torch.float32), layer(torch.float32)
        assert first[0] is second[0]
        layer.v_b.add_(1.0)  # what an optimiser step does
        third = layer(torch.float32)
    assert third[1] is not first[1] and torch.allclose(third[1], layer.v_a @ layer.v_b)
    with torch.enable_grad():
        assert layer(torch.float32)[0].requires_grad  # training never sees a cached, graph-less product


def test_target_layers(llama):
    model = attach(llama, target_layers=[1])
    assert list(model.adapters["default"].layers) == ["1"]
    with pytest.raises(ValueError, match="no virtual pairs in layer 0"):
        model.virtual_kv(0)
    with pytest.raises(HiFICLConfigError, match="out of range"):
        attach(llama, target_layers=range(0, 9))


def test_save_load_round_trip_is_bit_identical(llama, tmp_path):
    model = attach(llama)
    inputs = padded_inputs(llama, batch_size=2, seq_len=10, padding="left")
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "HIFICL" and saved["rank"] == 8
    assert saved["model_shape"]["num_layers"] == model.shape.num_layers
    loaded = HiFICLModel.from_pretrained(copy.deepcopy(llama.model), tmp_path)
    assert not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)
    trainable = HiFICLModel.from_pretrained(copy.deepcopy(llama.model), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == model.get_nb_trainable_parameters()[0]


def test_loading_onto_another_shape_fails_and_leaves_the_base_untouched(llama, tmp_path):
    attach(build("qwen3")).save_pretrained(tmp_path)
    base = copy.deepcopy(llama.model)
    with pytest.raises(AdapterMismatchError, match="trained for a model with"):
        HiFICLModel.from_pretrained(base, tmp_path)
    assert base.config._attn_implementation == "sdpa"
    assert all(p.requires_grad for p in base.parameters())


def test_loading_errors_name_the_problem(llama, tmp_path):
    with pytest.raises(FileNotFoundError, match="No HiFICL adapter"):
        HiFICLModel.from_pretrained(copy.deepcopy(llama.model), tmp_path)
    model = attach(llama)
    model.save_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterMismatchError, match="not valid JSON"):
        HiFICLModel.from_pretrained(copy.deepcopy(llama.model), tmp_path)
    model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    data["rank"] = 0
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(HiFICLConfigError, match=r"adapter_config.json: HiFICLConfig.rank"):
        HiFICLModel.from_pretrained(copy.deepcopy(llama.model), tmp_path)


def test_an_interrupted_save_keeps_the_previous_adapter(llama, tmp_path, monkeypatch):
    model = attach(llama)
    model.save_pretrained(tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()

    def broken_save(tensors, path, metadata=None):
        with open(path, "wb") as handle:
            handle.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(peft.peft_model, "safe_save_file", broken_save)
    with torch.no_grad():
        model.adapters["default"].layers["0"].v_b.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_several_named_adapters(llama, tmp_path):
    model = attach(llama)
    model.add_adapter("other", HiFICLConfig(rank=4, value_b_std=0.5, init_seed=5))
    assert model.active_adapter == "default"
    assert not any(p.requires_grad for p in model.adapters["other"].parameters())
    model.set_adapter("other")
    assert all(p.requires_grad for p in model.adapters["other"].parameters())
    assert not any(p.requires_grad for p in model.adapters["default"].parameters())
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("other", HiFICLConfig())
    with pytest.raises(ValueError, match="Unknown adapter"):
        model.set_adapter("missing")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "other" / "adapter_config.json").exists()
    reloaded = HiFICLModel.from_pretrained(copy.deepcopy(llama.model), tmp_path / "other", adapter_name="other")
    assert reloaded.peft_config["other"].rank == 4
    model.delete_adapter("other")
    assert model.active_adapter == "default" and list(model.adapters) == ["default"]
    model.delete_adapter("default")
    inputs = llama.make_inputs(batch_size=1, seq_len=6)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, llama.model(**inputs).logits)


@pytest.mark.parametrize("family", ["qwen2", "llava_qwen2"])
def test_mixed_adapter_batch_equals_rows_run_separately(family):
    case = build(family)
    model = attach(case, seed=1)
    model.add_adapter("other", HiFICLConfig(value_b_std=0.5, key_b_std=0.3, init_seed=2))
    inputs = padded_inputs(case, batch_size=3, seq_len=14, padding="right")
    names = ["other", None, "default"]
    with torch.no_grad():
        mixed = real_rows(model(**inputs, adapter_names=names).logits, inputs)
        for row, name in enumerate(names):
            alone = case.row_inputs(inputs, row)
            if name is None:
                with model.disable_adapter():
                    expected = model(**alone).logits[0]
            else:
                model.set_adapter(name)
                expected = model(**alone).logits[0]
            assert rel_err(mixed[row], expected) < 1e-5
    with pytest.raises(ValueError, match="Unknown adapter"):
        model(**inputs, adapter_names=["default", "nope", None])


def test_bf16_backbone_keeps_float32_adapter_weights():
    case = build("llama")
    model = get_hificl_model(copy.deepcopy(case.model).to(torch.bfloat16), HiFICLConfig(value_b_std=0.5, init_seed=1))
    assert all(p.dtype == torch.float32 for p in model.adapters.parameters())
    inputs = case.make_inputs(batch_size=2, seq_len=10)
    logits = model(**inputs, labels=inputs["input_ids"]).logits
    assert logits.dtype == torch.bfloat16
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.adapters.parameters())


class _OwnAttentionConfig(PretrainedConfig):
    model_type = "own_attention_test"

    def __init__(self, hidden_size=8, num_hidden_layers=1, **kwargs):
        self.hidden_size, self.num_hidden_layers = hidden_size, num_hidden_layers
        super().__init__(**kwargs)


class _HandWrittenAttention(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.proj = nn.Linear(size, size)

    def forward(self, x):
        scores = x @ x.transpose(-1, -2)
        return torch.softmax(scores, -1) @ self.proj(x)


class _OwnAttentionModel(PreTrainedModel):
    config_class = _OwnAttentionConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(10, config.hidden_size)
        self.attention = _HandWrittenAttention(config.hidden_size)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids=None, inputs_embeds=None, **kwargs):
        return self.attention(self.embed(input_ids) if inputs_embeds is None else inputs_embeds)


def test_models_whose_attention_bypasses_the_registry_are_refused():
    with pytest.raises(UnsupportedModelError, match="_HandWrittenAttention"):
        get_hificl_model(_OwnAttentionModel(_OwnAttentionConfig()))
    with pytest.raises(UnsupportedModelError, match="PreTrainedModel"):
        get_hificl_model(nn.Linear(2, 2))


@pytest.mark.parametrize("field, value", [
    ("num_virtual_tokens", 0), ("rank", -1), ("rank", 2.5), ("normalizer", "softmax"), ("dtype", "int8"),
    ("key_b_std", -0.1), ("target_layers", [0, 0]), ("target_layers", 3), ("target_layers", [-1]),
    ("init_seed", "x"), ("value_a_std", float("nan")),
])
def test_bad_config_values_raise_a_clear_error(field, value):
    with pytest.raises(HiFICLConfigError, match=field):
        HiFICLConfig(**{field: value})


def test_config_round_trip_and_unknown_fields():
    config = HiFICLConfig(rank=4, target_layers=range(3), normalizer="unmasked")
    assert config.target_layers == [0, 1, 2]
    assert HiFICLConfig.from_dict(config.to_dict()) == config
    with pytest.raises(HiFICLConfigError, match="Unknown HiFICLConfig field"):
        HiFICLConfig.from_dict({"rnak": 4})
    with pytest.raises(HiFICLConfigError, match="method"):
        HiFICLConfig.from_dict({"method": "lora"})
