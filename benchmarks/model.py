"""Model-level cost of HiFICL and LoRA against the frozen base, measured in one run on the same inputs: the
inference forward, a training step (with and without gradient checkpointing) and decoding, with peak memory.

The model is a Llama decoder of a few layers with Llama-3-8B's layer shape by default (hidden 4096, 32 query heads,
8 key/value heads, head dim 128, MLP 14336), random weights, built from a config (nothing is downloaded):

* forward   -- one inference forward of a batch (HiFICL: virtual pairs of n 8, r 8; LoRA merged into the weights
               costs exactly the base, so it is not timed);
* train     -- forward + backward + AdamW step of the trainable parameters (base: the frozen model's own backward,
               with the input embeddings requiring gradients, no optimiser); LoRA r 8 on q/k/v/o, unmerged;
* decode    -- greedy generation of `--new-tokens` tokens after the batch's prompts (KV cache).

Every variant of a measurement runs interleaved with the others, round by round, after one untimed warm-up round;
medians are reported as ratios to the base measured in the same run. Peak memory: CUDA's allocator peak (or, on a
CPU, the process's resident peak where Linux allows a reset), reported as extra over the base.

    python benchmarks/model.py                                          # CPU: a scaled-down layer shape
    python benchmarks/model.py --device cuda --dtype bfloat16 --llama3-8b --lengths 1024 4096 16384
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        with contextlib.suppress(OSError):
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")


def _peak_mib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    return 0.0


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, head_dim=args.head_dim, max_position_embeddings=32768,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
    return model


def variants(model, args):
    """(name, model, trainable parameters) of base, HiFICL and LoRA on copies sharing nothing trainable."""
    import copy

    from peft import LoraConfig, get_peft_model

    from hificl import HiFICLConfig, get_hificl_model

    base = model
    hificl = get_hificl_model(copy.deepcopy(model), HiFICLConfig(num_virtual_tokens=8, rank=8, init_seed=0,
                                                                 value_b_std=0.01,
                                                                 attention_path="split" if args.split else "auto"))
    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj",
                                                                                               "v_proj", "o_proj"]))
    for variant in (hificl, lora):
        variant.to(args.device)
    return {"base": base, "hificl": hificl, "lora": lora}


def measure(runs: dict, args) -> dict:
    """Interleaved median seconds and peak memory of each callable (after one untimed warm-up round)."""
    times = {name: [] for name in runs}
    peaks = {}
    for name, run in runs.items():  # warm-up, and the memory of one call each
        _sync(args.device)
        _reset_peak(args.device)
        run()
        _sync(args.device)
        peaks[name] = _peak_mib(args.device)
    for _ in range(args.repeats):
        for name, run in runs.items():
            _sync(args.device)
            start = time.perf_counter()
            run()
            _sync(args.device)
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), peaks[name]) for name in runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--llama3-8b", action="store_true", help="Llama-3-8B's layer shape (the default on CUDA)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=3584)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--batch-tokens", type=int, default=4096, help="batch = max(1, batch_tokens // T)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--split", action="store_true",
                        help="HiFICL through the split-KV merge on this device (the default on CUDA only)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    if args.llama3_8b or args.device == "cuda":
        args.hidden, args.heads, args.kv_heads, args.head_dim, args.intermediate = 4096, 32, 8, 128, 14336
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args)
    models = variants(model, args)
    rows = []
    for t in args.lengths:
        batch = max(1, args.batch_tokens // t)
        ids = torch.randint(10, args.vocab, (batch, t), device=args.device)
        row = {"T": t, "batch": batch}

        def forward(m):
            def run():
                with torch.no_grad():
                    m(input_ids=ids, use_cache=False)
            return run

        def train(m, checkpointing):
            params = [p for p in m.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None

            def run():
                if checkpointing:
                    m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                m.train()
                if optimizer is None:  # the frozen model's own backward
                    embeds = m.get_input_embeddings()(ids).detach().requires_grad_(True)
                    out = m(inputs_embeds=embeds, labels=ids, use_cache=False)
                else:
                    out = m(input_ids=ids, labels=ids, use_cache=False)
                out.loss.backward()
                if optimizer is not None:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                m.eval()
                if checkpointing:
                    m.activation_checkpointing_disable()
            return run

        def decode(m):
            def run():
                with torch.no_grad():
                    m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                               min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
            return run

        results = measure({"base": forward(models["base"]), "hificl": forward(models["hificl"])}, args)
        row["forward"] = {name: {"seconds": s, "x base": s / results["base"][0],
                                 "extra peak MiB": p - results["base"][1]} for name, (s, p) in results.items()}
        for checkpointing in (False, True):
            key = "train (gradient checkpointing)" if checkpointing else "train"
            results = measure({name: train(models[name], checkpointing) for name in ("base", "hificl", "lora")}, args)
            row[key] = {name: {"seconds": s, "x base": s / results["base"][0], "peak MiB": p,
                               "extra peak MiB": p - results["base"][1]} for name, (s, p) in results.items()}
        results = measure({"base": decode(models["base"]), "hificl": decode(models["hificl"])}, args)
        row["decode"] = {name: {"seconds": s, "x base": s / results["base"][0]} for name, (s, p) in results.items()}
        rows.append(row)

    print(f"Llama decoder, {args.layers} layers, hidden {args.hidden}, {args.heads} heads ({args.kv_heads} KV) x "
          f"{args.head_dim}, MLP {args.intermediate}; {args.device} {args.dtype}, median of {args.repeats}"
          + ("; HiFICL through the split-KV merge" if args.split else ""))
    print(f"{'T':>6} {'batch':>5} {'measurement':<32} {'variant':<7} {'seconds':>9} {'x base':>7} {'extra MiB':>10}")
    for row in rows:
        for key in ("forward", "train", "train (gradient checkpointing)", "decode"):
            for name, value in row[key].items():
                extra = value.get("extra peak MiB")
                print(f"{row['T']:>6} {row['batch']:>5} {key:<32} {name:<7} {value['seconds']:>9.4f} "
                      f"{value['x base']:>7.3f} {'' if extra is None else f'{extra:>10.0f}'}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"args": vars(args), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
