"""Where MimIC's alignment error comes from at initialisation: the layer-wise MSE between the student's MLP outputs
(query alone, shifts at their initial values) and the 8-shot teacher's, on one training batch of a run config,
split by layer and by kind of position -- the sequence-initial token (the attention sink), newlines, image
tokens, other prompt text, answer tokens -- with the positions the alignment uses now (never the sequence-initial
token) and with that token included (what hificl aligned before).

    python -m tools.diagnose_mimic [--config embedded-easyvqa-baselines] [--batch 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from hificl.backbones import load_backbone
from hificl.methods import get_method
from hificl.objectives import Teacher, capture_outputs
from hificl.run_config import load_run_config
from hificl.seeding import Seeds
from hificl.tasks import get_task

KINDS = ("sequence-initial", "newline", "image", "prompt text", "answer")


def position_kinds(batch, tokenizer) -> torch.Tensor:
    """``[b, T]`` index into KINDS for each student position (-1: padding)."""
    ids, real = batch.student["input_ids"], batch.student["attention_mask"].bool()
    kinds = torch.full(ids.shape, KINDS.index("prompt text"))
    newline = torch.tensor(["\n" in tokenizer.decode([i]) for i in range(len(tokenizer))])
    image = torch.zeros(len(tokenizer), dtype=torch.bool)
    for token in ("<image>", "<fake_token_around_image>", "<global-img>"):
        index = tokenizer.convert_tokens_to_ids(token)
        if isinstance(index, int) and index != tokenizer.unk_token_id:
            image[index] = True
    kinds[newline[ids]] = KINDS.index("newline")
    kinds[image[ids]] = KINDS.index("image")
    kinds[batch.student["labels"] != -100] = KINDS.index("answer")
    first = real.int().argmax(dim=1)
    kinds[torch.arange(ids.shape[0]), first] = KINDS.index("sequence-initial")
    kinds[~real] = -1
    return kinds


def diagnose(config_name: str, batch_size: int, shots: int) -> dict:
    config = load_run_config(config_name)
    seeds = Seeds(config.seed, config.seed)
    task = get_task(config.task["name"], seed=seeds.data, **{k: v for k, v in config.task.items() if k != "name"})
    backbone = load_backbone(config.backbone, config.dtype, config.chat_template)
    backbone.model.to("cuda" if torch.cuda.is_available() else "cpu")
    parts = get_method("mimic", shots=shots).build(backbone, task, seeds)
    batch = parts.objective.batch(task.subset("train", batch_size, seeds.data)).to(backbone.device)
    mlps = parts.objective.mlps
    with torch.no_grad(), capture_outputs(mlps) as student:
        parts.model(**batch.student)
    _, teacher = Teacher.run(parts.model, batch, mlps)
    errors = torch.stack([((s.float() - batch.align(t).float()) ** 2).mean(-1) for s, t in zip(student, teacher)]).cpu()
    batch = batch.to(torch.device("cpu"))
    kinds = position_kinds(batch, backbone.tokenizer)
    aligned_now = batch.aligned()
    aligned_before = aligned_now | (kinds == KINDS.index("sequence-initial"))
    report = {"config": config_name, "batch": batch_size, "shots": shots, "layers": len(mlps),
              "mse_aligned_now": float(errors[:, aligned_now].mean()),
              "mse_with_sequence_initial": float(errors[:, aligned_before].mean()), "by_kind": {}, "by_layer": []}
    total = float(errors[:, aligned_before].sum())
    for index, kind in enumerate(KINDS):
        where = aligned_before & (kinds == index)
        if where.any():
            report["by_kind"][kind] = {"positions": int(where.sum()), "mean_error": float(errors[:, where].mean()),
                                       "share_of_total_error": float(errors[:, where].sum()) / total}
    initial = aligned_before & (kinds == KINDS.index("sequence-initial"))
    for layer, layer_errors in enumerate(errors):
        report["by_layer"].append({"layer": layer, "sequence_initial": float(layer_errors[initial].mean()),
                                   "other_aligned": float(layer_errors[aligned_now].mean())})
    parts.close()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="embedded-easyvqa-baselines")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--json", help="also write the report to this file")
    args = parser.parse_args()
    report = diagnose(args.config, args.batch, args.shots)
    print(f"MimIC at initialisation, {args.config}, {args.batch} training queries, {args.shots}-shot teacher, "
          f"{report['layers']} layers")
    print(f"MSE over the aligned positions: {report['mse_aligned_now']:.3f} (with the sequence-initial token: "
          f"{report['mse_with_sequence_initial']:.3f})")
    print(f"{'position kind':<18} {'positions':>9} {'mean error':>11} {'share of error':>15}")
    for kind, row in report["by_kind"].items():
        print(f"{kind:<18} {row['positions']:>9} {row['mean_error']:>11.3f} {row['share_of_total_error']:>15.1%}")
    worst = sorted(report["by_layer"], key=lambda r: -r["sequence_initial"])[:5]
    print("layers with the largest error at the sequence-initial token: " + ", ".join(
        f"{r['layer']} ({r['sequence_initial']:.0f} vs {r['other_aligned']:.2f} elsewhere)" for r in worst))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
