"""What virtual pairs do: the share of each head's attention that goes to the virtual slots (``1 - alpha``), per
layer and head, over a task's queries; and what the virtual values write into the residual stream, read through
the language-model head (the top tokens per layer, a logit lens). `hificl inspect --adapter DIR` writes both
as JSON, a heatmap PNG and a Markdown table. The attention calls are recorded by `hificl.attention_capture`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from .adapters import HiFICLModel, load_adapter_model
from .attention_capture import recording
from .backbones import Backbone
from .io import atomic_write, atomic_write_json, atomic_write_text
from .methods import method_for_adapter
from .prompting import Prompter
from .protocol import Run, holding
from .run_config import RunConfig
from .tasks import Example


@torch.no_grad()
def virtual_attention_share(model: HiFICLModel, prompter: Prompter, backbone: Backbone,
                            examples: Sequence[Example], batch_size: int = 8) -> torch.Tensor:
    """``[layers, heads]``: the mean over the queries' real positions of the softmax mass each head gives the
    virtual slots (``1 - alpha``; 0 in layers the adapter does not target). Batches are left-padded with the
    positions generation gives them, so the padding queries see no real key and are not counted."""
    shape = model.shape
    was_training = model.training
    model.eval()
    with recording(model) as recorder:
        for start in range(0, len(examples), batch_size):
            chunk = list(examples[start:start + batch_size])
            batch = backbone.encode([prompter.prompt(e) for e in chunk], padding_side="left")
            batch = {k: v.to(backbone.device) for k, v in batch.items()}
            if "mm_token_type_ids" not in batch:  # the positions generation gives left-padded rows
                batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
            model(**batch)
    model.train(was_training)
    share = torch.zeros(shape.num_layers, shape.num_query_heads, dtype=torch.float64)
    for layer, mass in recorder.mass.items():
        share[layer] = mass / recorder.count[layer]
    return share


@torch.no_grad()
def virtual_value_tokens(model: HiFICLModel, tokenizer, top: int = 10) -> list[dict[str, Any]]:
    """Per targeted layer, what its virtual values write into the residual stream -- ``sum_h W_o^h mean_i
    v_{h,i}``, each head attending evenly to its virtual slots -- read through the final norm and the
    language-model head: the top tokens, with their logits."""
    base = model.base_model
    head = base.get_output_embeddings()
    norm = _final_norm(base)
    rows = []
    for index, module in enumerate(model.routing.attention_modules):
        layer_kv = model.adapters[model.active_adapter].get(index)
        if layer_kv is None:
            continue
        _, values = layer_kv(torch.float32)  # [h, n, d]
        out_proj = _output_projection(module)
        write = out_proj.weight.float() @ values.mean(1).reshape(-1)  # the heads' mean values, concatenated
        hidden = norm(write.to(head.weight.dtype)[None, None])[0, 0] if norm is not None else write
        logits = head(hidden.to(head.weight.dtype)).float()
        values_top, ids = logits.topk(top)
        rows.append({"layer": index, "norm": float(write.norm()),
                     "tokens": [tokenizer.decode([int(i)]) for i in ids], "logits": [float(v) for v in values_top]})
    return rows


def _output_projection(attention: torch.nn.Module) -> torch.nn.Linear:
    for name in ("o_proj", "out_proj", "dense", "c_proj"):
        layer = getattr(attention, name, None)
        if isinstance(layer, torch.nn.Linear):
            return layer
    raise ValueError(f"{type(attention).__name__} has no output projection (o_proj) to read the virtual values through.")


def _final_norm(model) -> torch.nn.Module | None:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    while decoder is not None and not hasattr(decoder, "norm") and hasattr(decoder, "get_decoder"):
        decoder = decoder.get_decoder() if decoder.get_decoder() is not decoder else None
    for candidate in (decoder, getattr(decoder, "text_model", None), getattr(model, "model", None)):
        norm = getattr(candidate, "norm", None)
        if isinstance(norm, torch.nn.Module):
            return norm
    return None


def write_inspection(folder: str | Path, share: torch.Tensor, tokens: list[dict[str, Any]], title: str,
                     queries: int, added: bool = False) -> list[Path]:
    """inspect.json, virtual_share.png (layers x heads heatmap) and inspect.md into `folder`. ``added``: the
    adapter adds its virtual term to the attention output (``fixed_alpha``), so the share is that term's weight and
    the prompt keeps its whole attention; otherwise the virtual slots take the share from the prompt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    what = ("weight of the virtual term (added to the prompt's whole attention: fixed_alpha)" if added
            else "attention share of the virtual slots (1 - alpha)")
    atomic_write_json(folder / "inspect.json", {"title": title, "queries": queries,
                                               "virtual_term": "added" if added else "softmax",
                                               "virtual_share": share.tolist(),
                                               "virtual_share_per_layer": share.mean(1).tolist(),
                                               "value_tokens": tokens})
    figure, axis = plt.subplots(figsize=(max(4, 0.35 * share.shape[1] + 2), max(3, 0.18 * share.shape[0] + 1.5)))
    image = axis.imshow(share.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=max(1e-6, float(share.max())))
    axis.set_xlabel("head")
    axis.set_ylabel("layer")
    axis.set_title(f"{what}\n{title}, {queries} queries", fontsize=9)
    figure.colorbar(image, ax=axis)
    figure.tight_layout()
    atomic_write(folder / "virtual_share.png", lambda tmp: figure.savefig(tmp, dpi=120, format="png"))
    plt.close(figure)
    lines = [f"**{title}**: {what} over {queries} queries (mean over heads) and the top tokens of what each "
             "layer's virtual values write, read through the LM head\n",
             "| layer | share | top tokens |", "|---|---|---|"]
    by_layer = {row["layer"]: row for row in tokens}
    for layer in range(share.shape[0]):
        words = " ".join(repr(t) for t in by_layer[layer]["tokens"][:6]) if layer in by_layer else "-"
        lines.append(f"| {layer} | {float(share[layer].mean()):.3f} | {words} |")
    atomic_write_text(folder / "inspect.md", "\n".join(lines) + "\n")
    return [folder / "inspect.json", folder / "virtual_share.png", folder / "inspect.md"]


def inspect_adapter(config: RunConfig, adapter: str, queries: int = 64) -> dict[str, Any]:
    """`hificl inspect`: what a saved HiFICL adapter (trained or distilled) does on the config's test questions --
    the attention share of its virtual slots per layer and head, and what its virtual values write, read through
    the LM head; written to output_dir as inspect.json, virtual_share.png and inspect.md."""
    with holding(config):
        run = Run(config, trains=False)
        method = method_for_adapter(adapter)
        model = load_adapter_model(run.backbone.model, adapter).to(run.state.device)  # whole (under FSDP2 too)
        try:
            if not isinstance(model, HiFICLModel):
                raise ValueError(f"{adapter} holds a {type(model).title} adapter: inspect reads virtual key-value pairs "
                                 "(HiFICL adapters, trained or distilled).")
            examples = run.test_examples[:queries]
            share = virtual_attention_share(model, Prompter(run.task), run.backbone, examples, config.eval.batch_size)
            tokens = virtual_value_tokens(model, run.backbone.tokenizer)
        finally:
            model.unload()
        if run.main:
            write_inspection(run.output_dir, share, tokens, method.label, len(examples),
                             added=model.peft_config[model.active_adapter].fixed_alpha)
    return {"method": method.label, "virtual_share": share.tolist(), "value_tokens": tokens,
            "queries": len(examples)}


__all__ = ["inspect_adapter", "virtual_attention_share", "virtual_value_tokens", "write_inspection"]
