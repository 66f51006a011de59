"""The baselines (LIVE, MimIC, LoRA, retrieved ICL) and HiFICL's ablations under the common method interface."""

import copy

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from hificl import pipeline
from hificl.backbones import load_backbone
from hificl.methods import get_method
from hificl.adapters.mimic import MIMIC_ATTENTION, SHIFT_ATTR
from hificl.objectives import Teacher, TeacherBatch
from hificl.run_config import RunConfig
from hificl.seeding import Seeds
from hificl.tasks import Example, Task, get_task


@pytest.fixture(scope="module")
def workspace(tiny_vlm, colour_task):
    return {"vlm": tiny_vlm, "task": colour_task}


def _setup(workspace, name, **options):
    """The method's parts built on a fresh backbone; `backbone.original` is an untouched copy taken before."""
    backbone = load_backbone(workspace["vlm"])
    backbone.original = copy.deepcopy(backbone.model)
    task = get_task("jsonl", seed=3407, train=workspace["task"]["train"], test=workspace["task"]["test"])
    parts = get_method(name, **options).build(backbone, task, Seeds(0, 0))
    return parts, backbone, task


def _student(batch):
    return batch.student if isinstance(batch, TeacherBatch) else batch


def _logits(model, batch):
    model.eval()  # no dropout (peft puts its model in train mode)
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


@pytest.mark.parametrize("name", ["live", "mimic", "lora"])
def test_injected_modules_are_no_ops_where_their_math_says(workspace, name):
    parts, backbone, task = _setup(workspace, name, **({"shots": 2} if name != "lora" else {}))
    original = backbone.original
    student = _student(parts.objective.batch(task.splits["train"][:3]))
    expected = _logits(original, student)
    if name == "live":  # not a no-op at init (documented); exactly one with zero vectors
        assert not torch.allclose(_logits(parts.model, student), expected, atol=1e-7)
        with torch.no_grad():
            parts.adapter.shifts.vectors.zero_()
    if name == "mimic":  # |mu v| <= 1e-3-ish at init (documented); exactly the base with v = 0
        assert torch.allclose(_logits(parts.model, student), expected, atol=1e-2)
        with torch.no_grad():
            parts.adapter.shifts.shift.zero_()
    torch.testing.assert_close(_logits(parts.model, student), expected, rtol=1e-5, atol=1e-5)
    parts.close()
    torch.testing.assert_close(_logits(backbone.model, student), expected, rtol=0, atol=0)


def _mimic_reference(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw):
    """float64 restatement: SA + mu v with mu = Z1_hat / (Z1_hat + Z2), Z2 over the visible keys."""
    shift, weight, bias = (p.double() for p in getattr(module, SHIFT_ATTR)(query.shape[0], query.device)[0])
    q = query.double()
    groups = q.shape[1] // key.shape[1]
    k = key.double().repeat_interleave(groups, 1)
    v = value.double().repeat_interleave(groups, 1)
    scores = q @ k.transpose(-1, -2) * (scaling or q.shape[-1] ** -0.5)
    visible = attention_mask[..., : k.shape[2]] if attention_mask is not None else torch.ones_like(scores, dtype=torch.bool).tril()
    scores = scores.masked_fill(~visible, float("-inf"))
    sa = torch.softmax(scores, -1).nan_to_num(0.0) @ v
    z2 = scores.exp().sum(-1, keepdim=True)
    z1 = torch.exp((q * weight[None, :, None]).sum(-1, keepdim=True) + bias[None, :, None, None])
    out = sa + z1 / (z1 + z2) * shift[None, :, None]
    return out.transpose(1, 2).to(query.dtype), None


def test_mimic_attention_equals_a_float64_reference(workspace):
    parts, backbone, task = _setup(workspace, "mimic", shots=2)
    with torch.no_grad():
        shifts = parts.adapter.shifts
        shifts.shift.normal_(0, 0.5)
        shifts.weight.normal_(0, 0.3)
        shifts.bias.normal_(0, 1.0)
    batch = backbone.encode([task.query_prompt(e) for e in task.splits["test"][:3]], padding_side="right")
    fast = _logits(parts.model, batch)
    AttentionInterface.register("mimic_reference_test", _mimic_reference)
    AttentionMaskInterface.register("mimic_reference_test", lambda *a, **k: sdpa_mask(*a, **{**k, "allow_is_causal_skip": False}))
    parts.adapter.routing.set("mimic_reference_test")
    reference = _logits(parts.model, batch)
    parts.adapter.routing.set(MIMIC_ATTENTION)
    mask = batch["attention_mask"].bool()
    assert ((fast - reference)[mask].abs().max() / reference[mask].abs().max()) < 1e-5
    with parts.model.disable_adapter():
        base = _logits(parts.model, batch)
    assert (fast - base)[mask].abs().max() > 1e-3
    parts.close()


@pytest.mark.parametrize("name", ["live", "mimic", "hificl"])
@pytest.mark.parametrize("instruction", ["", "Answer with one colour word."])
def test_teacher_targets_come_from_the_untouched_model(workspace, name, instruction):
    options = {"shots": 2} if name != "hificl" else {"teacher_weight": 1.0, "teacher_shots": 2, "value_b_std": 0.5}
    parts, backbone, task = _setup(workspace, name, **options)
    task.instruction = instruction  # stated once before the demonstrations: student and teacher differ in front
    original = backbone.original
    items = task.splits["train"][:2]
    batch = parts.objective.batch(items)
    student, teacher = batch.student, batch.teacher
    aligned = batch.aligned()
    for row in range(2):  # aligned positions hold the same tokens; they cover the answer and its prediction
        n, offset = int(student["attention_mask"][row].sum()), int(batch.offsets[row])
        start = int(batch.starts[row])
        assert torch.equal(teacher["input_ids"][row, offset + start:offset + n], student["input_ids"][row, start:n])
        answer = (student["labels"][row] != -100).nonzero().flatten()
        assert aligned[row, answer.min() - 1:n].all() and aligned[row].sum() == n - max(start, 1)
        assert not aligned[row, 0], "the sequence-initial token is never aligned"
        assert (start > 0) == bool(instruction)
    teacher_logits, _ = Teacher.run(parts.model, batch)
    expected = _logits(original, teacher)
    torch.testing.assert_close(teacher_logits, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logits(parts.model, student), _logits(original, student), atol=1e-6)
    assert torch.isfinite(parts.objective.loss(parts.model, batch))
    parts.close()


@pytest.mark.parametrize("name, options", [("live", {"shots": 2}), ("mimic", {"shots": 2}), ("lora", {}),
                                           ("hificl", {"teacher_weight": 0.5, "teacher_shots": 2})])
def test_each_method_trains_only_its_parameters_and_round_trips(workspace, name, options, tmp_path):
    parts, backbone, task = _setup(workspace, name, **options)
    model = parts.model
    batch = parts.objective.batch(task.splits["train"][:4])
    loss = parts.objective.loss(model, batch)
    assert torch.isfinite(loss)
    loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    assert parts.adapter.get_nb_trainable_parameters()[0] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    student = _student(batch)
    before = _logits(model, student)
    parts.adapter.save_pretrained(tmp_path)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.zero_()
    parts.adapter.restore_weights(tmp_path)
    torch.testing.assert_close(_logits(model, student), before, rtol=0, atol=0)
    parts.close()


def test_live_has_separate_learning_rates_for_vectors_and_scales(workspace):
    parts, _, _ = _setup(workspace, "live", shots=2)
    assert parts.param_groups == [{"params": ["shifts.vectors"], "lr": 5e-3}, {"params": ["shifts.scales"], "lr": 1e-2}]
    parts.close()


def test_lora_targets_only_the_language_model_attention(workspace):
    parts, backbone, _ = _setup(workspace, "lora")
    names = [n for n, m in parts.model.named_modules() if hasattr(m, "lora_A")]
    assert names and all("text_model" in n and "self_attn" in n for n in names)
    assert {n.rsplit(".", 1)[-1] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    parts.close()
    assert not any(hasattr(m, "lora_A") for m in backbone.model.modules())


def test_retrieval_returns_the_true_nearest_neighbours():
    points = {f"e{i}": torch.tensor([float(i), 1.0]) for i in range(10)}
    examples = [Example(f"e{i}", f"q{i}", ("a",)) for i in range(10)]
    task = Task("toy", {"train": examples, "test": examples}, template="{question}")
    method = get_method("icl", shots=3, selection="retrieval", features=lambda xs: torch.stack([points[x.id] for x in xs]))
    prompter = method.prompter(None, task, Seeds(0, 0))
    query = Example("query", "q", ("a",))
    points["query"] = torch.tensor([4.0, 1.0])
    # cosine similarity to (4, 1): the nearest directions are 4, then 3 and 5 (5: 0.9998, 3: 0.9997), then 6 ...
    by_hand = sorted(range(10), key=lambda i: -torch.nn.functional.cosine_similarity(points[f"e{i}"], points["query"], 0))
    chosen = prompter.demonstrations(query)
    assert [e.id for e in chosen] == [f"e{i}" for i in reversed(by_hand[:3])]
    assert chosen[-1].id == "e4", "the nearest demonstration sits next to the query"
    assert all(e.id != "e4" for e in prompter.demonstrations(examples[4])), "a query never retrieves itself"


def test_model_feature_retrieval_runs_on_the_backbone(workspace):
    parts, _, task = _setup(workspace, "icl", shots=2, selection="retrieval", pool_size=10)
    demos = parts.prompter.demonstrations(task.splits["test"][0])
    assert len(demos) == 2 and all(d in parts.prompter.pool for d in demos)


def test_compare_reports_every_baseline(workspace, tmp_path):
    config = RunConfig.from_dict({
        "backbone": workspace["vlm"], "output_dir": str(tmp_path), "progress": False, "validation_samples": 0,
        "task": {"name": "jsonl", "train": workspace["task"]["train"], "test": workspace["task"]["test"]},
        "methods": [{"name": "zero-shot"}, {"name": "icl", "shots": 2, "selection": "retrieval", "pool_size": 8},
                    {"name": "live", "shots": 2}, {"name": "mimic", "shots": 2},
                    {"name": "lora", "train": {"epochs": 2, "lr": 5e-4}},
                    {"name": "hificl", "fixed_alpha": True}],
        "train": {"epochs": 1, "batch_size": 8, "grad_accum": 1}, "eval": {"batch_size": 4, "max_new_tokens": 3}})
    results = pipeline.compare(config)
    names = [row["method"] for row in results["rows"]]
    assert names == ["zero-shot", "2-shot ICL (retrieved)", "LIVE", "MimIC", "LoRA", "HiFICL (fixed_alpha)"]
    steps = {row["method"]: row["train_steps"] for row in results["rows"][2:]}
    assert steps["LoRA"] == 2 * steps["LIVE"], "a method's own train settings override the run's"
    for row in results["rows"][2:]:
        assert row["trainable_params"] > 0 and row["train_seconds_per_step"] > 0 and row["train_peak_memory_mb"] > 0
    for row in results["rows"]:
        assert row["seconds_per_query"] > 0 and row["prompt_tokens_per_query"] > 0


def test_mimic_cached_generation_equals_full_recomputation(workspace):
    parts, backbone, task = _setup(workspace, "mimic", shots=2)
    with torch.no_grad():
        parts.adapter.shifts.shift.normal_(0, 0.5)
        parts.adapter.shifts.weight.normal_(0, 0.3)
    batch = backbone.encode([task.query_prompt(e) for e in task.splits["test"][:3]], padding_side="left")
    outputs = []
    for use_cache in (True, False):
        with torch.no_grad():
            out = parts.model.generate(**batch, max_new_tokens=4, do_sample=False, use_cache=use_cache,
                                        output_scores=True, return_dict_in_generate=True,
                                        pad_token_id=backbone.pad_token_id)
        outputs.append(out)
    assert torch.equal(outputs[0].sequences, outputs[1].sequences)
    for cached, full in zip(outputs[0].scores, outputs[1].scores):
        torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
    parts.close()


@pytest.mark.parametrize("family, chat", [("smolvlm", False), ("llama", False), ("llama", True), ("qwen2_vl", True)])
@pytest.mark.parametrize("instruction", ["", "Answer with one colour word."])
@pytest.mark.parametrize("bos", [False, True])
def test_the_alignment_mask_never_includes_a_sequence_initial_position(saved_model, colour_task, text_colour_task,
                                                                     family, chat, instruction, bos):
    """MimIC's (and LIVE's) alignment never compares a row's first token -- a BOS or the prompt's first token,
    the attention sink -- with a token of the teacher, with or without BOS, instruction or chat template."""
    from tokenizers import processors

    backbone = load_backbone(saved_model(family, chat))
    if bos:  # a tokenizer that adds BOS, as Llama's do
        backbone.tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", backbone.tokenizer.convert_tokens_to_ids("<bos>"))])
    files = colour_task if backbone.processor is not None else text_colour_task
    task = get_task("jsonl", seed=3407, train=files["train"], test=files["test"], instruction=instruction)
    parts = get_method("mimic", shots=2).build(backbone, task, Seeds(0, 0))
    batch = parts.objective.batch(task.splits["train"][:3])
    aligned, mask = batch.aligned(), batch.student["attention_mask"].bool()
    for row in range(3):
        first = int(mask[row].nonzero().min())
        assert not aligned[row, first], (family, chat, instruction, bos)
        if bos:
            assert batch.student["input_ids"][row, first] == backbone.tokenizer.convert_tokens_to_ids("<bos>")
        answer = (batch.student["labels"][row] != -100).nonzero().flatten()
        assert aligned[row, answer].all() and aligned[row, answer.min() - 1]
    assert torch.isfinite(parts.objective.loss(parts.model, batch))
    parts.close()
