"""Where a distilled student loses to its k-shot teacher. Trains the `distill` student of a config (k labelled
demonstrations, the other training questions unlabelled), then measures, beside the teacher (the frozen model
with the same k demonstrations, the same draw):

* fit and generalisation: teacher and student accuracy on the unlabelled training queries the student learnt from
  (their labels are read HERE, for the measurement only; training never reads them) and on the test questions;
* agreement: how often the student's answer is the teacher's (training queries, test);
* KL(teacher || student) per answer position on the test questions, teacher-forced on the teacher's own answers
  (position 0 predicts the first answer token);
* per layer, how close the student's attention outputs at the query's tokens are to the teacher's (relative L2
  error), beside the zero-shot model's (the adapter disabled): how much of the gap the virtual pairs close.

    python benchmarks/distill_diagnosis.py --config embedded-text-capitals-distill --shots 8 --out runs/diagnosis

Writes diagnosis.json and diagnosis.png (KL per position; the per-layer errors) into --out and prints a table.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="embedded-text-capitals-distill")
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--seed", type=int, default=3407, help="the replicate (the data stay the config's seed's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config overrides, as for hificl (e.g. train.epochs=6)")
    parser.add_argument("--student", default="{}", help="further distill options, YAML (e.g. '{ce_weight: 0.5}')")
    parser.add_argument("--out", default="runs/distill-diagnosis")
    args = parser.parse_args()

    import yaml

    from hificl.evaluator import evaluate
    from hificl.methods import get_method
    from hificl.prompting import Prompter
    from hificl.protocol import Run
    from hificl.run_config import load_run_config

    config = load_run_config(args.config, args.overrides)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        config = type(config).from_dict({**config.to_dict(), "output_dir": folder, "progress": False,
                                         "methods": [{"name": "zero-shot"}]})
        run = Run(config)
        method = get_method("distill", shots=args.shots, **yaml.safe_load(args.student))
        seeds = run.seeds(args.seed)
        parts = method.build(run.backbone, run.task, seeds)
        trained = run.train_and_select(method, parts, Path(folder) / "train", seeds)
        trained.restore(trained.result.last_epoch)
        queries = run.training_examples(method, seeds)
        labelled = {e.id: e for e in run.train_examples}
        train_set = [labelled[q.id] for q in queries]  # the measurement alone reads these labels
        teacher_prompter = parts.objective.teachers[0].prompter
        settings = dict(progress=False, warmup=False)
        student, teacher = {}, {}
        for name, examples in (("train", train_set), ("test", run.test_examples)):
            student[name] = evaluate(parts.model, Prompter(run.task), run.backbone, run.task, examples,
                                     config.eval, **settings)
            with parts.adapter.disable_adapter():
                teacher[name] = evaluate(parts.model, teacher_prompter, run.backbone, run.task, examples,
                                         config.eval, **settings)
        answers = {p["id"]: p["prediction"] for p in teacher["test"].predictions}
        kl, layers = _kl_and_layers(parts.model, parts.adapter, parts.objective, run.test_examples, answers,
                                    config.eval.batch_size)
        run.close(parts)
    report = {
        "config": args.config, "shots": args.shots, "seed": args.seed, "student_options": method.options,
        "train_queries": len(train_set), "test_questions": len(run.test_examples),
        "teacher": {name: _accuracy(e) for name, e in teacher.items()},
        "student": {name: _accuracy(e) for name, e in student.items()},
        "agreement": {name: _agreement(student[name], teacher[name]) for name in student},
        "kl_by_answer_position": kl, "attention_output_error": layers,
    }
    (out / "diagnosis.json").write_text(json.dumps(report, indent=2))
    _plot(report, out / "diagnosis.png")
    print(f"\n{args.config}, k = {args.shots}, seed {args.seed}: {len(train_set)} unlabelled training queries, "
          f"{len(run.test_examples)} test questions")
    print(f"{'':>22} {'train queries (fit)':>20} {'test (generalisation)':>22}")
    for who in ("teacher", "student"):
        print(f"{who + ' accuracy':>22} {report[who]['train']:>20.3f} {report[who]['test']:>22.3f}")
    print(f"{'agreement':>22} {report['agreement']['train']:>20.3f} {report['agreement']['test']:>22.3f}")
    print("KL per answer position (test): " + ", ".join(f"{p}: {v:.3f}" for p, v in kl.items()))
    print("attention-output error per layer, student / zero-shot: " + ", ".join(
        f"{s:.2f}/{z:.2f}" for s, z in zip(layers["student"], layers["zero-shot"])))


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    positions = sorted(report["kl_by_answer_position"], key=int)
    left.bar([int(p) for p in positions], [report["kl_by_answer_position"][p] for p in positions], color="#4c72b0")
    left.set_xlabel("answer position (0 predicts the first answer token)")
    left.set_ylabel("KL(teacher || student), test")
    errors = report["attention_output_error"]
    layers = range(len(errors["student"]))
    right.plot(layers, errors["zero-shot"], "o-", label="zero-shot (adapter off)", color="gray")
    right.plot(layers, errors["student"], "o-", label="distilled student", color="#4c72b0")
    right.set_xlabel("layer")
    right.set_ylabel("relative L2 error vs teacher\n(attention outputs, query tokens)")
    right.legend(fontsize=8)
    figure.suptitle(f"{report['config']}, k = {report['shots']}: teacher {report['teacher']['test']:.1%} / student "
                    f"{report['student']['test']:.1%} on test, agreement {report['agreement']['test']:.1%}",
                    fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
