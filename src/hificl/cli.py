"""`hificl train | eval | compare`: a thin command line over `hificl.pipeline`."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from .methods import METHODS
from .run_config import DEFAULT_CONFIG, load_run_config, packaged_configs

EPILOG = f"""
configs:
  --config takes a YAML file or a packaged config name ({DEFAULT_CONFIG} by default: the embedded SmolVLM, whose
  language model is the real SmolLM2-135M-Instruct, on easy-VQA's images; embedded-easyvqa-baselines adds
  retrieved ICL, LoRA, LIVE and MimIC). Any field can be overridden with --set KEY=VALUE (dotted keys, list items
  by index, YAML values):
    --set train.epochs=1 --set test_samples=50 --set methods.2.shots=4
    --set 'methods=[{{name: zero-shot}}, {{name: hificl, rank: 4}}]'
  Your own data: a JSONL task (one {{"image": ..., "question": ..., "answer": ...}} per line):
    --set task.name=jsonl --set task.train=data/train.jsonl --set task.test=data/test.jsonl
  Your own model: --backbone PATH_OR_MODEL_ID (a vision config loads its processor too).
  Methods by name: {", ".join(METHODS.names())} (their options: the README's protocol and hificl.methods).

examples:
  hificl compare                                   # zero-shot, 1/2/4/8-shot ICL and HiFICL on easy-VQA
  hificl compare --config embedded-easyvqa-baselines   # every baseline of the paper beside HiFICL
  hificl train --set 'methods=[{{name: hificl}}]' --output-dir runs/mine
  hificl eval --adapter runs/mine/adapter --set 'methods=[{{name: hificl}}]'
  hificl inspect --adapter runs/mine/adapter --output-dir runs/mine/inspect
  hificl compare --set 'methods=[{{name: icl, shots: 8, pool_size: 8}}, {{name: distill, shots: 8}}]'
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hificl", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train, evaluate and compare HiFICL (virtual key-value pairs in a frozen model) against "
                    "zero-shot and in-context learning, under one protocol.",
        epilog=EPILOG)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,compare,inspect}")
    helps = {
        "compare": "run every configured method (train the trainable ones), print and save a table and plots",
        "train": "train the config's trainable method; the adapter chosen on validation goes to OUTPUT_DIR/adapter",
        "eval": "evaluate the config's methods on the test subset (trainable ones load --adapter)",
        "inspect": "what a saved HiFICL adapter does on the test questions: the attention share of its virtual "
                   "slots per layer and head (heatmap + JSON), and its virtual values read through the LM head",
    }
    for name, text in helps.items():
        sub = commands.add_parser(name, help=text, description=text, epilog=EPILOG,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.add_argument("--config", default=None, metavar="YAML",
                         help=f"a YAML file or packaged config ({', '.join(packaged_configs())}); default {DEFAULT_CONFIG}")
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config field (repeatable)")
        sub.add_argument("--backbone", help="model: 'embedded', 'embedded-text', or a local folder / model id")
        sub.add_argument("--output-dir", help="where results, checkpoints and adapters go")
        sub.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
        sub.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                         help="how much status hificl logs to stderr (default: info)")
        if name in ("eval", "inspect"):
            sub.add_argument("--adapter", required=name == "inspect",
                             help="a saved adapter folder" + (" for the trainable method" if name == "eval" else ""))
        if name == "inspect":
            sub.add_argument("--queries", type=int, default=64, help="test questions to average over (default 64)")
        elif name != "eval":
            sub.add_argument("--restart", action="store_true",
                             help="discard the checkpoints in the output folder and train from scratch (without it, "
                                  "a run resumes from them, and refuses to when the settings changed)")
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record is emitted (not the stream of the moment it was made)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _configure_logging(level: str) -> None:
    """hificl's status lines to stderr, once (a second call, e.g. from tests, changes only the level)."""
    log = logging.getLogger("hificl")
    log.setLevel(level.upper())
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("hificl: %(message)s"))
        log.addHandler(handler)
        log.propagate = False


def _stop_on_sigterm():
    """SIGTERM (a scheduler's notice before it kills a job) stops the run as Ctrl-C does (training first finishes
    its step and writes a checkpoint: `hificl.trainer.StopRequests`). Returns the handler it replaces."""
    from .trainer import Interrupted

    def stop(signum, frame):
        raise Interrupted(signum)

    if threading.current_thread() is not threading.main_thread():
        return signal.getsignal(signal.SIGTERM)
    return signal.signal(signal.SIGTERM, stop)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .distributed import close_process_group, process_state

    main_process = process_state().is_main_process
    _configure_logging(args.log_level if main_process else "error")
    overrides = list(args.overrides)
    if args.backbone:
        overrides.append(f"backbone={args.backbone}")
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.no_progress:
        overrides.append("progress=false")
    if args.no_progress or not main_process:  # transformers' own bars too (weight loading)
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    try:
        config = load_run_config(args.config, overrides)
    except (ValueError, FileNotFoundError) as error:
        print(f"hificl: config error: {error}", file=sys.stderr)
        return 2

    from tqdm.contrib.logging import logging_redirect_tqdm

    from . import pipeline
    from .inspect import inspect_adapter
    from .report import markdown_table, plot_name

    previous_sigterm = _stop_on_sigterm()
    finished = False  # a process that failed alone must not wait for the others
    try:
        with logging_redirect_tqdm(loggers=[logging.getLogger("hificl")]):
            if args.command == "compare":
                results = pipeline.compare(config, restart=args.restart)
            elif args.command == "train":
                summary = pipeline.train(config, restart=args.restart)
                if main_process:
                    print(f"adapter (epoch {summary['selected_epoch']}) saved to {summary['adapter']}")
                finished = True
                return 0
            elif args.command == "inspect":
                report = inspect_adapter(config, args.adapter, args.queries)
                if main_process:
                    print((Path(config.output_dir) / "inspect.md").read_text())
                    print(f"inspection of {report['method']}: {config.output_dir}/inspect.json, inspect.md, "
                          "virtual_share.png")
                finished = True
                return 0
            else:
                results = pipeline.evaluate_config(config, args.adapter)
        finished = True
    except (ValueError, OSError, ImportError, RuntimeError) as error:
        print(f"hificl: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as error:
        signum = getattr(error, "signum", signal.SIGINT)
        saved = getattr(error, "checkpoint", None)
        where = f"progress saved in {saved}" if saved else f"the last checkpoint is in {config.output_dir}"
        print(f"\nhificl: stopped by {signal.Signals(signum).name} ({where}). Run the same command again to resume "
              "(or add --restart to train from scratch).", file=sys.stderr)
        return 128 + signum
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous_sigterm)
        if finished:
            close_process_group()
    if not main_process:
        return 0
    print()
    print(markdown_table(results))
    print(f"results: {config.output_dir}/results.json, results.md, {plot_name(results)}"
          + (", data_efficiency.png" if results.get("data_efficiency") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
