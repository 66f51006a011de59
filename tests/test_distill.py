"""Distillation of k demonstrations from unlabelled queries, and the inspection of virtual pairs: no training
label is ever read (the task's answers raise), teacher and student see the same query tokens, initialising from
the teacher's demonstration tokens reproduces them, and the inspection equals a direct float64 computation."""

import json

import pytest
import torch

from hificl import pipeline
from hificl.backbones import load_backbone
from hificl.cli import main as cli_main
from hificl.methods import get_method
from hificl.run_config import RunConfig
from hificl.seeding import Seeds
from hificl.tasks import Example, Task, get_task, read_jsonl, register_task, unlabelled
from hificl.tasks.base import Query


class LabelReadError(AssertionError):
    pass


class Guarded:
    """An example whose answers raise when read (an unlabelled query, as a task would hold it)."""

    def __init__(self, example: Example):
        self.id, self.question, self.image = example.id, example.question, example.image

    @property
    def answers(self):
        raise LabelReadError(f"the answer of {self.id} was read")

    @property
    def target(self):
        raise LabelReadError(f"the answer of {self.id} was read")


def _guarded_task(colour_task, seed, pool_size):
    """The colour task with every answer guarded, except those of the first `pool_size` training examples of the
    seeded shuffle (the k labelled demonstrations)."""
    train, test = read_jsonl(colour_task["train"]), read_jsonl(colour_task["test"])
    probe = Task("probe", {"train": train, "test": test})
    pool = {e.id for e in probe.subset("train", pool_size, seed)}
    return Task("guarded", {"train": [e if e.id in pool else Guarded(e) for e in train],
                            "test": [Guarded(e) for e in test], "validation": [Guarded(e) for e in train[:4]]})


@pytest.mark.parametrize("options", [{}, {"align_weight": 0.5}, {"labelled_weight": 1.0},
                                     {"confidence": "weight"}, {"confidence": "filter", "min_confidence": 0.2}])
def test_no_training_label_is_read(tiny_vlm, colour_task, tmp_path, options):
    register_task("guarded-colours", lambda seed, **options: _guarded_task(colour_task, seed, 2), replace=True)
    config = RunConfig.from_dict({
        "backbone": tiny_vlm, "output_dir": str(tmp_path), "progress": False, "validation_samples": 4,
        "task": {"name": "guarded-colours"}, "methods": [{"name": "distill", "shots": 2, "draws": 2,
                                                         "value_b_std": 0.3, **options}],
        "train": {"epochs": 2, "batch_size": 4, "grad_accum": 1, "lr": 0.05}, "eval": {"max_new_tokens": 3}})
    summary = pipeline.train(config)  # every answer outside the labelled pool raises when read
    assert summary["train"]["steps"] == 2 * 6 and summary["train"]["best_epoch"] is None, "no labelled validation"
    assert summary["train"]["history"][-1]["train_loss"] >= 0
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())  # a PEFT HiFICL adapter
    assert saved["peft_type"] == "HIFICL" and saved["trained_by"]["method"] == "distill"
    from hificl.methods import method_for_adapter

    assert method_for_adapter(tmp_path / "adapter").label.startswith("distilled"), "reported as what trained it"
    with pytest.raises(LabelReadError):  # the guard works: a labelled method reads the answers
        pipeline.train(RunConfig.from_dict({**config.to_dict(), "methods": [{"name": "hificl"}],
                                            "output_dir": str(tmp_path / "labelled")}))


@pytest.fixture(scope="module")
def setting(tiny_vlm, colour_task):
    backbone = load_backbone(tiny_vlm)
    task = get_task("jsonl", seed=3407, train=colour_task["train"], test=colour_task["test"], instruction="Name the colour.\n")
    return backbone, task


def test_teacher_and_student_see_the_same_query_tokens(setting):
    backbone, task = setting
    method = get_method("distill", shots=2, labelled=4, draws=2)
    parts = method.build(backbone, task, Seeds(0, 0))
    pool = method.labelled_ids(task, Seeds(0, 0))
    queries = [unlabelled(e) for e in task.splits["train"] if e.id not in pool][:3]
    assert all(isinstance(q, Query) and not hasattr(q, "answers") for q in queries)
    batches = parts.objective.batch(queries)
    assert len(batches) == 2, "one teacher batch per ensemble draw"
    answers = parts.objective.answers.answers
    assert set(answers) == {q.id for q in queries}
    for batch in batches:
        for row in range(3):
            n, offset, start = (int(batch.student["attention_mask"][row].sum()), int(batch.offsets[row]),
                                int(batch.starts[row]))
            assert start > 0, "the instruction precedes the demonstrations: the sequences differ in front"
            assert torch.equal(batch.teacher["input_ids"][row, offset + start:offset + n],
                               batch.student["input_ids"][row, start:n])
            target = backbone.tokenizer.decode(batch.student["labels"][row][batch.student["labels"][row] != -100])
            assert target == str(task.target_text(Example(queries[row].id, "q", (answers[queries[row].id],),
                                                          target=answers[queries[row].id] or "-")))
    demos = [d.id for batch in batches for d in parts.objective.teachers[0].prompter.demonstrations(queries[0])]
    assert set(demos) <= pool, "demonstrations come from the labelled pool only"
    loss = parts.objective.loss(parts.model, batches)
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None for p in parts.adapter.parameters() if p.requires_grad)
    parts.close()


@pytest.mark.parametrize("full_rank", [False, True])
def test_initialising_from_demonstrations_takes_the_teachers_own_tokens(setting, full_rank):
    from hificl.attention_capture import capture_attention

    backbone, task = setting
    options = {"full_rank_keys": True, "full_rank_values": True} if full_rank else {"rank": 16, "num_virtual_tokens": 4}
    parts = get_method("distill", shots=2, init="demonstrations", **options).build(backbone, task, Seeds(0, 0))
    adapter = parts.adapter
    keys, values = adapter.virtual_kv(0)
    # every virtual key is (up to the factorisation: rank 16 = head dim, exact) a post-RoPE demonstration key
    prompter = parts.objective.teachers[0].prompter
    queries = [unlabelled(e) for e in task.subset("train", prompter.shots + 4, 0)[prompter.shots:]]
    batch = backbone.encode([prompter.prompt(q) for q in queries], padding_side="right")
    with torch.no_grad(), adapter.disable_adapter(), capture_attention(adapter) as captured:
        adapter(**batch)
    _, key, value, _ = captured[0]
    groups = keys.shape[0] // key.shape[1]
    for head in range(keys.shape[0]):
        candidates = key[:, head // groups].reshape(-1, key.shape[-1])
        distance = torch.cdist(keys[head].double(), candidates.double()).min(-1).values
        assert distance.max() < 1e-4, (head, distance)
    parts.close()


def test_inspection_equals_a_direct_float64_computation(setting):
    """The virtual share of every layer and head equals the softmax mass on the virtual columns of attention over
    the concatenation [K_v; K], computed here in float64 from the captured queries and keys."""
    from hificl import HiFICLConfig, get_hificl_model
    from hificl.attention_capture import capture_attention
    from hificl.inspect import virtual_attention_share, virtual_value_tokens
    from hificl.prompting import Prompter
    import copy

    backbone, task = setting
    model = get_hificl_model(copy.deepcopy(backbone.model), HiFICLConfig(value_b_std=0.5, key_b_std=0.5, init_seed=3))
    examples = task.splits["test"][:5]
    local = copy.copy(backbone)
    local.model = model.base_model
    share = virtual_attention_share(model, Prompter(task), local, examples, batch_size=5)
    batch = local.encode([task.query_prompt(e) for e in examples], padding_side="left")
    batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad(), capture_attention(model) as captured:
        model(**batch)
    real = batch["attention_mask"].bool()
    for layer, (query, key, _, visible) in captured.items():
        virtual_keys, _ = model.virtual_kv(layer)
        q, k = query.double(), key.double().repeat_interleave(query.shape[1] // key.shape[1], 1)
        scores = torch.cat([q @ virtual_keys.double().transpose(-1, -2), (q @ k.transpose(-1, -2)).masked_fill(
            ~visible, float("-inf"))], -1) * q.shape[-1] ** -0.5
        mass = torch.softmax(scores, -1)[..., :virtual_keys.shape[1]].sum(-1)  # [b, h, q]
        expected = mass.permute(1, 0, 2)[:, real].mean(-1)
        torch.testing.assert_close(share[layer], expected, rtol=1e-10, atol=1e-12)
    assert (share > 0).all() and (share < 1).all()
    tokens = virtual_value_tokens(model, backbone.tokenizer, top=5)
    assert len(tokens) == model.shape.num_layers and all(len(row["tokens"]) == 5 for row in tokens)


def test_the_inspect_command_writes_a_heatmap_and_json(tiny_vlm, colour_task, tmp_path, capsys):
    common = ["--backbone", tiny_vlm, "--no-progress", "--set",
              f"task={{name: jsonl, train: {colour_task['train']}, test: {colour_task['test']}}}",
              "--set", "train.epochs=1", "--set", "train.batch_size=8", "--set", "train.grad_accum=1",
              "--set", "validation_samples=0", "--set", "eval.max_new_tokens=2"]
    assert cli_main(["train", *common, "--set", "methods=[{name: distill, shots: 2}]", "--output-dir",
                     str(tmp_path / "train")]) == 0
    assert cli_main(["inspect", *common, "--adapter", str(tmp_path / "train" / "adapter"), "--queries", "4",
                     "--output-dir", str(tmp_path / "inspect")]) == 0
    report = json.loads((tmp_path / "inspect" / "inspect.json").read_text())
    assert report["queries"] == 4 and len(report["virtual_share"]) == 2 and len(report["virtual_share"][0]) == 4
    assert (tmp_path / "inspect" / "virtual_share.png").stat().st_size > 0
    assert report["virtual_term"] == "added", "a distilled student adds its virtual term (fixed_alpha) by default"
    assert "weight of the virtual term (added to the prompt's whole attention" in capsys.readouterr().out


def test_teacher_answers_show_progress_and_a_finished_run_does_not_redo_them(tiny_vlm, colour_task, tmp_path,
                                                                             capsys, monkeypatch):
    """The teacher's answers come with a progress bar; a rerun after training finished resumes from the last
    checkpoint without generating them again (they only serve steps that are left)."""
    from hificl.distillation import TeacherAnswers

    args = ["train", "--backbone", tiny_vlm, "--set",
            f"task={{name: jsonl, train: {colour_task['train']}, test: {colour_task['test']}}}",
            "--set", "train.epochs=1", "--set", "train.batch_size=8", "--set", "train.grad_accum=1",
            "--set", "validation_samples=0", "--set", "eval.max_new_tokens=2",
            "--set", "methods=[{name: distill, shots: 2}]", "--output-dir", str(tmp_path / "train")]
    assert cli_main(args) == 0
    assert "teacher answers" in capsys.readouterr().err

    def regenerated(*args, **kwargs):
        raise AssertionError("teacher answers generated again for a finished run")

    monkeypatch.setattr(TeacherAnswers, "_generate", regenerated)
    assert cli_main(args) == 0


@pytest.mark.parametrize("student", ["hificl", "live", "mimic", "lora"])
def test_a_student_is_built_by_its_own_methods_recipe(setting, student):
    """The student's adapter, its initialisation and its optimiser groups (LIVE's learning rates, MimIC's bias
    without weight decay) are those of the student method itself; only the objective is distillation's."""
    backbone, task = setting

    def trainable(adapter):
        return {name: p.detach().clone() for name, p in adapter.named_parameters() if p.requires_grad}

    parts = get_method("distill", shots=2, student=student).build(backbone, task, Seeds(0, 5))
    try:
        kind, groups, weights = type(parts.adapter), parts.param_groups, trainable(parts.adapter)
        assert type(parts.objective).__name__ == ("TeacherAnswerAlignment" if student == "mimic" else "TeacherAnswerKL")
    finally:
        parts.close()
    alone = get_method(student).build(backbone, task, Seeds(0, 5))
    try:
        assert type(alone.adapter) is kind and alone.param_groups == groups
        mine = trainable(alone.adapter)
        assert mine.keys() == weights.keys() and all(torch.equal(mine[k], weights[k]) for k in mine)
    finally:
        alone.close()
    if student == "live":
        assert groups == [{"params": ["shifts.vectors"], "lr": 5e-3}, {"params": ["shifts.scales"], "lr": 1e-2}]


def test_a_students_options_are_its_methods_and_its_objectives_are_refused():
    live = get_method("distill", student="live", vector_lr=1e-3)
    assert live.param_groups()[0]["lr"] == 1e-3 and live.options["vector_lr"] == 1e-3
    assert "kl_weight" not in live.options and live.label == "LIVE distilled (8-shot)"
    assert get_method("distill", rank=4).options["rank"] == 4
    with pytest.raises(ValueError, match=r"\['kl_weight'\] set the live method's own training objective"):
        get_method("distill", student="live", kl_weight=2.0)
    with pytest.raises(ValueError, match="student live.*rank"):
        get_method("distill", student="live", rank=4)
    with pytest.raises(ValueError, match="draws must be 1"):
        get_method("distill", student="mimic", draws=2)
    with pytest.raises(ValueError, match="init: demonstrations sets virtual key-value pairs"):
        get_method("distill", student="lora", init="demonstrations")
    with pytest.raises(ValueError, match="distill: student"):
        get_method("distill", student="distill")
    with pytest.raises(ValueError, match="its own distillation objective.*align_weight must be 0"):
        get_method("distill", student="mimic", align_weight=1.0)
    assert "align_weight" not in get_method("distill").options, "the ids of runs before the option stay"


def test_the_attention_alignment_term_is_the_mean_squared_error_of_the_aligned_attention_outputs(setting):
    """align_weight x (mean over layers of the squared error, averaged over the aligned positions and features,
    between the student's attention outputs and the teacher's), restated here with hooks of the test's own."""
    backbone, task = setting
    parts = get_method("distill", shots=2, align_weight=0.5, value_b_std=0.3).build(backbone, task, Seeds(0, 0))
    try:
        queries = [unlabelled(e) for e in task.splits["train"]][6:9]
        batches = parts.objective.batch(queries)
        terms = parts.objective.terms(parts.model, batches)
        assert len(terms) == 2 and terms[1][0] == 0.5
        modules = parts.adapter.routing.attention_modules
        seen = {"student": [], "teacher": []}

        def hooks(into):
            return [m.register_forward_hook(lambda _m, _i, out: into.append(out[0].detach().double()))
                    for m in modules]

        batch = batches[0]
        handles = hooks(seen["student"])
        with torch.no_grad():
            parts.model(**batch.student)
        for h in handles:
            h.remove()
        handles = hooks(seen["teacher"])
        with torch.no_grad(), parts.adapter.disable_adapter():
            parts.model(**batch.teacher)
        for h in handles:
            h.remove()
        mask = batch.student["attention_mask"]
        per_layer = []
        for s, t in zip(seen["student"], seen["teacher"]):
            errors = []
            for row in range(s.shape[0]):
                first_real = int(mask[row].nonzero().min())
                for j in range(int(batch.starts[row]), int(mask[row].sum())):
                    if j == first_real:
                        continue
                    errors.append(((s[row, j] - t[row, int(batch.offsets[row]) + j]) ** 2).mean())
            per_layer.append(torch.stack(errors).mean())
        expected = torch.stack(per_layer).mean()
        torch.testing.assert_close(terms[1][1].double(), expected, rtol=1e-5, atol=1e-8)
        assert parts.objective.counts(batches)[-1] == int(batch.aligned().sum())
    finally:
        parts.close()


def _by_hand(parts, backbone, batches, labelled, confidence="none", min_confidence=0.5):
    """The distillation terms restated row by row and position by position from the model's logits (float64):
    the teacher's distribution averaged over its draws at each position predicting an answer token, the query's
    confidence the product of the teacher's probabilities of its answer tokens, then the weighted means of KL and
    CE over the batch's answer positions, the CE on the labelled examples' true answers (each encoded alone), and
    the queries' confidences."""
    model, first = parts.model, batches[0]
    with torch.no_grad():
        student = torch.log_softmax(parts.model(**{k: v for k, v in first.student.items()
                                                     if k != "labels"}).logits.double(), -1)
        with parts.adapter.disable_adapter():
            teachers = [torch.softmax(model(**b.teacher).logits.double(), -1) for b in batches]
    kls, ces, weights, confidences = [], [], [], []
    labels = first.student["labels"]
    for row in range(labels.shape[0]):
        positions = [j for j in range(labels.shape[1] - 1) if labels[row, j + 1] != -100]
        mixed = [sum(t[row, int(b.offsets[row]) + j] for t, b in zip(teachers, batches)) / len(batches)
                 for j in positions]
        sure = torch.prod(torch.stack([p[labels[row, j + 1]] for p, j in zip(mixed, positions)]))
        confidences.append(float(sure))
        weight = {"none": 1.0, "weight": sure, "filter": float(sure >= min_confidence)}[confidence]
        for p, j in zip(mixed, positions):
            kls.append((p * (p.log() - student[row, j])).sum())
            ces.append(-student[row, j, labels[row, j + 1]])
            weights.append(weight)
    losses, tokens = torch.tensor(0.0, dtype=torch.float64), 0
    with torch.no_grad():
        for example in labelled:
            alone = backbone.encode([parts.objective.task.query_prompt(example)],
                                    [parts.objective.task.target_text(example)], padding_side="right")
            log = torch.log_softmax(model(**{k: v for k, v in alone.items() if k != "labels"}).logits.double(), -1)
            for j in range(alone["labels"].shape[1] - 1):
                if alone["labels"][0, j + 1] != -100:
                    losses, tokens = losses - log[0, j, alone["labels"][0, j + 1]], tokens + 1
    weights = torch.tensor([float(w) for w in weights], dtype=torch.float64)
    return ((weights * torch.stack(kls)).mean(), (weights * torch.stack(ces)).mean(),
            losses / tokens if tokens else None, confidences)


@pytest.mark.parametrize("confidence", ["none", "weight", "filter"])
def test_the_distillation_loss_with_labelled_ce_and_confidence_equals_a_hand_computation(setting, confidence):
    """KL (x 1) + ce_weight x CE on the teacher's answers (each query's positions weighed by its confidence under
    `confidence`) + labelled_weight x CE on the true answers of the labelled pool asked zero-shot, against
    `_by_hand`; for "filter" the threshold lies between the queries' confidences, so one is kept, one dropped."""
    backbone, task = setting
    options = {"confidence": confidence} if confidence != "none" else {}
    method = get_method("distill", shots=2, labelled=4, draws=2, ce_weight=0.3, labelled_weight=0.7,
                        value_b_std=0.3, **options)
    parts = method.build(backbone, task, Seeds(3, 0))
    try:
        labelled = task.subset("train", 4, 3)
        assert {e.id for e in labelled} == method.labelled_ids(task, Seeds(3, 0))
        pool = method.labelled_ids(task, Seeds(3, 0))
        queries = [unlabelled(e) for e in task.splits["train"] if e.id not in pool][:3]
        batches = parts.objective.batch(queries)
        min_confidence = 0.5
        if confidence == "filter":
            sure = sorted(_by_hand(parts, backbone, batches, [])[3])
            assert sure[0] < sure[-1], "the queries' confidences differ: a threshold between them filters"
            min_confidence = parts.objective.min_confidence = (sure[0] + sure[-1]) / 2
        kl, ce, labelled_ce, _ = _by_hand(parts, backbone, batches, labelled, confidence, min_confidence)
        terms = parts.objective.terms(parts.model, batches)
        assert [w for w, _ in terms] == [1.0, 0.3, 0.7]
        for (_, mean), expected in zip(terms, (kl, ce, labelled_ce)):
            torch.testing.assert_close(mean.double(), expected, rtol=2e-4, atol=0.0)  # confidences ~1e-24 here
        assert parts.objective.counts(batches)[2] == sum(
            int((backbone.encode([task.query_prompt(e)], [task.target_text(e)])["labels"][0, 1:] != -100).sum())
            for e in labelled)
        if confidence == "filter":
            assert 0 < float(terms[0][1].detach()) < float(_by_hand(parts, backbone, batches, [], "none")[0]), \
                "dropped queries lower the mean"
    finally:
        parts.close()


def test_the_new_distill_options_are_validated_and_reported():
    method = get_method("distill", labelled_weight=0.5, confidence="filter", min_confidence=0.3)
    assert method.options["labelled_weight"] == 0.5 and method.options["confidence"] == "filter"
    assert method.options["min_confidence"] == 0.3
    assert method.label == "distilled (8-shot, labelled CE x0.5, confidence >= 0.3)"
    assert get_method("distill", confidence="weight").label == "distilled (8-shot, confidence-weighted)"
    defaults = get_method("distill").options
    assert not {"labelled_weight", "confidence", "min_confidence"} & set(defaults), "earlier run ids stay"
    with pytest.raises(ValueError, match="labelled_weight must be a finite number >= 0"):
        get_method("distill", labelled_weight=-1.0)
    with pytest.raises(ValueError, match="confidence must be one of 'none', 'weight', 'filter'"):
        get_method("distill", confidence="soft")
    with pytest.raises(ValueError, match="min_confidence is the threshold of confidence: filter"):
        get_method("distill", confidence="weight", min_confidence=0.3)
    with pytest.raises(ValueError, match="min_confidence is a probability: at most 1"):
        get_method("distill", confidence="filter", min_confidence=1.5)
    with pytest.raises(ValueError, match="min_confidence must be a finite number > 0"):
        get_method("distill", confidence="filter", min_confidence=0)
    with pytest.raises(ValueError, match="takes no labelled_weight: labelled_weight must be 0"):
        get_method("distill", student="mimic", labelled_weight=1.0)
    with pytest.raises(ValueError, match="takes no confidence: confidence must be none"):
        get_method("distill", student="mimic", confidence="weight")


@pytest.mark.parametrize("options, starts_at_zero_shot", [({}, True), ({"fixed_alpha": False}, False),
                                                          ({"init": "demonstrations"}, False)])
def test_a_hificl_student_starts_at_the_zero_shot_model_unless_given_the_papers_formula(setting, options,
                                                                                         starts_at_zero_shot):
    """By default a HiFICL student adds its virtual term to the attention output (fixed_alpha), so its zero values
    leave the zero-shot model's logits untouched before training; the paper's formula (the virtual keys take
    softmax mass) and values taken from the demonstrations do not."""
    backbone, task = setting
    parts = get_method("distill", shots=2, **options).build(backbone, task, Seeds(0, 0))
    try:
        assert parts.adapter.peft_config[parts.adapter.active_adapter].fixed_alpha is ("fixed_alpha" not in options)
        queries = [unlabelled(e) for e in task.splits["test"][:3]]
        batch = backbone.encode([parts.prompter.prompt(q) for q in queries], padding_side="left")
        with torch.no_grad():
            student = parts.adapter(**batch).logits
            with parts.adapter.disable_adapter():
                zero_shot = parts.adapter(**batch).logits
        real = batch["attention_mask"].bool()
        gap = (student - zero_shot)[real].abs().max().item()
        assert (gap < 1e-5) is starts_at_zero_shot, gap
    finally:
        parts.close()


def test_the_papers_formula_for_a_student_is_named_and_has_its_own_id():
    default, paper = get_method("distill"), get_method("distill", fixed_alpha=False)
    assert default.options["fixed_alpha"] is True and paper.options["fixed_alpha"] is False
    assert default.label == "distilled (8-shot)" and paper.label == "distilled (8-shot, paper formula)"
    assert default.id != paper.id, "a rerun under the other formula never reports the old result"
    assert get_method("distill", rank=4, full_rank_keys=True).label == "distilled (8-shot, full_rank_keys)"
    unmasked = get_method("distill", normalizer="unmasked")  # the authors' normaliser has no fixed-alpha variant
    assert unmasked.options["fixed_alpha"] is False and "paper formula" in unmasked.label
    with pytest.raises(ValueError, match="fixed_alpha needs normalizer='exact'"):
        get_method("distill", normalizer="unmasked", fixed_alpha=True)


def test_the_diagnosis_benchmark_measures_each_students_start_fit_and_agreement(tiny_lm, text_colour_task, tmp_path):
    """benchmarks/distill_diagnosis.py with two students beside one teacher: the default student starts exactly at
    the zero-shot model's test accuracy (its virtual term adds zero), and every measurement is in range."""
    import runpy
    import sys
    from pathlib import Path

    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({
        "backbone": tiny_lm, "task": {"name": "jsonl", **text_colour_task}, "validation_samples": 0,
        "train": {"epochs": 1, "batch_size": 4, "grad_accum": 1, "lr": 0.05}, "eval": {"max_new_tokens": 3}}))
    script = Path(__file__).parents[1] / "benchmarks" / "distill_diagnosis.py"
    argv = sys.argv
    sys.argv = [str(script), "--config", str(config), "--shots", "2", "--student", "{}",
                "--student", "{fixed_alpha: false, value_b_std: 0.3}", "--out", str(tmp_path / "out")]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
    report = json.loads((tmp_path / "out" / "diagnosis.json").read_text())
    default, paper = report["students"]
    assert default["label"] == "distilled (2-shot)" and paper["label"] == "distilled (2-shot, paper formula)"
    assert default["start"]["test"] == report["zero-shot"]["test"], "the default student starts at zero-shot"
    for student in (default, paper):
        numbers = [*student["accuracy"].values(), *student["agreement"].values(), student["start"]["test"]]
        assert all(0 <= n <= 1 for n in numbers)
        assert student["kl_by_answer_position"] and all(v >= -1e-6 for v in student["kl_by_answer_position"].values())
        assert len(student["attention_output_error"]["student"]) == len(student["attention_output_error"]["zero-shot"])
    assert (tmp_path / "out" / "diagnosis.png").stat().st_size > 0
