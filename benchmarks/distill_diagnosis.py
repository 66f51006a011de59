"""Where a distilled student loses to its k-shot teacher. Trains the `distill` student of a config (k labelled
demonstrations, the other training questions unlabelled), then measures, beside the teacher (the frozen model
with the same k demonstrations, the same draw):

* fit and generalisation: teacher and student accuracy on the unlabelled training queries the student learnt from
  (their labels are read HERE, for the measurement only; training never reads them) and on the test questions;
* agreement: how often the student's answer is the teacher's (training queries, test);
* KL(teacher || student) per answer position on the test questions, teacher-forced on the teacher's own answers
  (position 0 predicts the first answer token);
* per layer, how close the student's attention outputs at the query's tokens are to the teacher's (relative L2
  error), beside the zero-shot model's (the adapter disabled): how much of the gap the virtual pairs close;
* the start: the student's test accuracy before training (its initialisation), beside the zero-shot model's.

    python benchmarks/distill_diagnosis.py --config embedded-text-capitals-distill --shots 8 --out runs/diagnosis
    python benchmarks/distill_diagnosis.py --config examples/elements/distill.yaml \\
        --student '{fixed_alpha: false}' --student '{}'        # several students beside one teacher

Writes diagnosis.json and diagnosis.png (accuracies and agreement; KL per position; the per-layer errors) into
--out and prints a table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch


def _accuracy(evaluation) -> float:
    return evaluation.metrics[evaluation.metrics["metric"]]


def _agreement(one, two) -> float:
    pairs = list(zip(one.predictions, two.predictions))
    return sum(a["prediction"] == b["prediction"] for a, b in pairs) / len(pairs)


@torch.no_grad()
def _kl_and_layers(model, adapter, objective, queries, answers, batch_size: int):
    """KL per relative answer position, and per layer the relative L2 error of the student's and the zero-shot
    model's attention outputs against the teacher's, at the aligned query (not answer) positions."""
    from hificl.objectives import Teacher, answer_positions, capture_outputs
    from hificl.tasks import Example

    modules = adapter.routing.attention_modules
    kl_sum: dict[int, float] = {}
    kl_count: dict[int, int] = {}
    error = {"student": torch.zeros(len(modules), dtype=torch.float64),
             "zero-shot": torch.zeros(len(modules), dtype=torch.float64)}
    norm = torch.zeros(len(modules), dtype=torch.float64)
    teacher = objective.teachers[0]
    for start in range(0, len(queries), batch_size):
        chunk = queries[start:start + batch_size]
        labelled = [Example(q.id, q.question, (answers[q.id],), q.image, target=answers[q.id]) for q in chunk]
        batch = teacher.batch(labelled, objective.student_batch(labelled))
        batch = batch.to(objective.backbone.device)
        with capture_outputs(modules) as student_out:
            student_logits = model(**batch.student).logits
        with adapter.disable_adapter():
            with capture_outputs(modules) as plain_out:
                model(**batch.student)
        teacher_logits, teacher_out = Teacher.run(model, batch, modules)
        labels = batch.student["labels"]
        predicting = answer_positions(labels) & batch.aligned()
        first = predicting.int().argmax(1, keepdim=True)
        relative = torch.arange(labels.shape[1], device=labels.device)[None] - first
        teacher_log = torch.log_softmax(batch.align(teacher_logits).float(), -1)
        student_log = torch.log_softmax(student_logits.float(), -1)
        kl = (teacher_log.exp() * (teacher_log - student_log)).sum(-1)
        for position in relative[predicting].unique().tolist():
            where = predicting & (relative == position)
            kl_sum[position] = kl_sum.get(position, 0.0) + float(kl[where].sum())
            kl_count[position] = kl_count.get(position, 0) + int(where.sum())
        query = batch.aligned() & (labels == -100) & ~predicting  # the query's own tokens, before the answer
        for layer, (s, p, t) in enumerate(zip(student_out, plain_out, teacher_out)):
            t = batch.align(t)[query].double()
            norm[layer] += float(t.pow(2).sum())
            error["student"][layer] += float((s[query].double() - t).pow(2).sum())
            error["zero-shot"][layer] += float((p[query].double() - t).pow(2).sum())
    kl_by_position = {p: kl_sum[p] / kl_count[p] for p in sorted(kl_sum)}
    layers = {name: (value / norm).sqrt().tolist() for name, value in error.items()}
    return kl_by_position, layers


def _diagnose(run, config, method, seed: int, folder: Path, shared: dict) -> dict:
    """Train one student, then measure its start (before training), its fit and generalisation, its agreement with
    the teacher, KL per answer position and its attention outputs; the teacher and the zero-shot model are measured
    once, with the first student's parts, into `shared`."""
    from hificl.evaluator import evaluate
    from hificl.prompting import Prompter

    seeds = run.seeds(seed)
    parts = method.build(run.backbone, run.task, seeds)
    settings = dict(progress=False, warmup=False)
    plain = Prompter(run.task)
    start = evaluate(parts.model, plain, run.backbone, run.task, run.test_examples, config.eval, **settings)
    trained = run.train_and_select(method, parts, folder, seeds)
    trained.restore(trained.result.last_epoch)
    queries = run.training_examples(method, seeds)
    labelled = {e.id: e for e in run.train_examples}
    sets = {"train": [labelled[q.id] for q in queries],  # the measurement alone reads these labels
            "test": run.test_examples}
    if not shared:
        teacher_prompter = parts.objective.teachers[0].prompter
        with parts.adapter.disable_adapter():
            for who, prompter in (("teacher", teacher_prompter), ("zero-shot", plain)):
                shared[who] = {name: evaluate(parts.model, prompter, run.backbone, run.task, examples, config.eval,
                                              **settings) for name, examples in sets.items()}
        shared["train_queries"] = len(sets["train"])
    student = {name: evaluate(parts.model, plain, run.backbone, run.task, examples, config.eval, **settings)
               for name, examples in sets.items()}
    answers = {p["id"]: p["prediction"] for p in shared["teacher"]["test"].predictions}
    kl, layers = _kl_and_layers(parts.model, parts.adapter, parts.objective, run.test_examples, answers,
                                config.eval.batch_size)
    run.close(parts)
    return {"label": method.label, "options": method.options, "start": {"test": _accuracy(start)},
            "accuracy": {name: _accuracy(e) for name, e in student.items()},
            "agreement": {name: _agreement(student[name], shared["teacher"][name]) for name in student},
            "kl_by_answer_position": kl, "attention_output_error": layers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="embedded-text-capitals-distill")
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--seed", type=int, default=3407, help="the replicate (the data stay the config's seed's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config overrides, as for hificl (e.g. train.epochs=6)")
    parser.add_argument("--student", action="append", default=[], metavar="YAML",
                        help="further distill options of one student, e.g. '{fixed_alpha: false}'; repeat to measure "
                             "several students beside one teacher (default: one student, distill's defaults)")
    parser.add_argument("--out", default="runs/distill-diagnosis")
    args = parser.parse_args()

    import yaml

    from hificl.methods import get_method
    from hificl.protocol import Run
    from hificl.run_config import load_run_config

    config = load_run_config(args.config, args.overrides)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    methods = [get_method("distill", shots=args.shots, **(yaml.safe_load(options) or {}))
               for options in args.student or ["{}"]]
    shared: dict = {}
    with tempfile.TemporaryDirectory() as folder:
        config = type(config).from_dict({**config.to_dict(), "output_dir": folder, "progress": False,
                                         "methods": [{"name": "zero-shot"}]})
        run = Run(config)
        students = [_diagnose(run, config, method, args.seed, Path(folder) / f"train-{i}", shared)
                    for i, method in enumerate(methods)]
        test_questions = len(run.test_examples)
    report = {
        "config": args.config, "shots": args.shots, "seed": args.seed,
        "train_queries": shared["train_queries"], "test_questions": test_questions,
        "teacher": {name: _accuracy(e) for name, e in shared["teacher"].items()},
        "zero-shot": {name: _accuracy(e) for name, e in shared["zero-shot"].items()},
        "students": students,
    }
    (out / "diagnosis.json").write_text(json.dumps(report, indent=2))
    _plot(report, out / "diagnosis.png")
    print(f"\n{args.config}, k = {args.shots}, seed {args.seed}: {report['train_queries']} unlabelled training "
          f"queries, {test_questions} test questions")
    print(f"{'':>44} {'start (test)':>12} {'train (fit)':>12} {'test':>8} {'agree train':>12} {'agree test':>11}")
    for who in ("teacher", "zero-shot"):
        print(f"{who:>44} {'':>12} {report[who]['train']:>12.3f} {report[who]['test']:>8.3f}")
    for student in students:
        print(f"{student['label']:>44} {student['start']['test']:>12.3f} {student['accuracy']['train']:>12.3f} "
              f"{student['accuracy']['test']:>8.3f} {student['agreement']['train']:>12.3f} "
              f"{student['agreement']['test']:>11.3f}")
        print("    KL per answer position (test): " + ", ".join(
            f"{p}: {v:.3f}" for p, v in student["kl_by_answer_position"].items()))
        errors = student["attention_output_error"]
        print("    attention-output error per layer, student / zero-shot: " + ", ".join(
            f"{s:.2f}/{z:.2f}" for s, z in zip(errors["student"], errors["zero-shot"])))


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (bars, left, right) = plt.subplots(1, 3, figsize=(15, 4), gridspec_kw={"width_ratios": [1.2, 1, 1]})
    students = report["students"]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = ["teacher", "zero-shot"] + [s["label"] for s in students]
    groups = {"start (test)": [None, None] + [s["start"]["test"] for s in students],
              "train queries (fit)": [report["teacher"]["train"], report["zero-shot"]["train"]]
              + [s["accuracy"]["train"] for s in students],
              "test": [report["teacher"]["test"], report["zero-shot"]["test"]]
              + [s["accuracy"]["test"] for s in students],
              "agreement, test": [None, None] + [s["agreement"]["test"] for s in students]}
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [g + i * width for g, values in enumerate(groups.values()) if values[i] is not None]
        ys = [values[i] for values in groups.values() if values[i] is not None]
        bars.bar(xs, ys, width, label=name, color="gray" if name == "zero-shot" else colours[i % len(colours)])
    bars.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], list(groups), fontsize=8)
    bars.set_ylabel("accuracy / agreement")
    bars.set_ylim(0, 1)  # fractions; the legend sits above the bars
    bars.legend(fontsize=7, loc="upper right")
    for i, student in enumerate(students, start=2):
        kl = student["kl_by_answer_position"]
        positions = sorted(kl, key=int)
        offset = (i - 2 - (len(students) - 1) / 2) * 0.8 / len(students)
        left.bar([int(p) + offset for p in positions], [kl[p] for p in positions], 0.8 / len(students),
                 label=student["label"], color=colours[i % len(colours)])
        errors = student["attention_output_error"]
        right.plot(range(len(errors["student"])), errors["student"], "o-", markersize=3, label=student["label"],
                   color=colours[i % len(colours)])
    right.plot(range(len(errors["zero-shot"])), errors["zero-shot"], "o-", markersize=3,
               label="zero-shot (adapter off)", color="gray")
    left.set_xlabel("answer position (0 predicts the first answer token)")
    left.set_ylabel("KL(teacher || student), test")
    left.legend(fontsize=7)
    right.set_xlabel("layer")
    right.set_ylabel("relative L2 error vs teacher\n(attention outputs, query tokens)")
    right.legend(fontsize=7)
    figure.suptitle(f"{report['config']}, k = {report['shots']}, seed {report['seed']}: "
                    f"{report['train_queries']} unlabelled queries, {report['test_questions']} test questions",
                    fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
