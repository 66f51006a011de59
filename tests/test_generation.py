"""Generation with the KV cache equals recomputing the whole sequence at every step, the virtual pairs never
enter the cache, and a mixed-adapter batch generates what each row generates alone."""

import pytest
import torch

from hificl import HiFICLConfig
from fixtures import FAMILIES, attach, build


def _generate(model, inputs, use_cache, **kwargs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=5, do_sample=False, use_cache=use_cache,
                              output_scores=True, return_dict_in_generate=True, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_greedy_generation_equals_full_recomputation(family):
    case = build(family)
    model = attach(case)
    inputs = case.make_inputs(batch_size=2, seq_len=12, padding="left")
    cached, full = _generate(model, inputs, True), _generate(model, inputs, False)
    assert torch.equal(cached.sequences, full.sequences)
    for a, b in zip(cached.scores, full.scores):
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-5


def test_virtual_pairs_never_enter_the_cache():
    case = build("llama")
    model = attach(case)
    inputs = case.make_inputs(batch_size=1, seq_len=9)
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    keys = out.past_key_values.layers[0].keys
    assert keys.shape[-2] == 9


@pytest.mark.parametrize("family", ["qwen2", "idefics2"])
def test_mixed_adapter_generation_equals_rows_alone(family):
    case = build(family)
    model = attach(case, seed=1)
    model.add_adapter("other", HiFICLConfig(value_b_std=0.5, key_b_std=0.3, init_seed=2))
    inputs = case.make_inputs(batch_size=3, seq_len=12, padding="left")
    names = ["default", None, "other"]
    mixed = _generate(model, inputs, True, adapter_names=names)
    for row, name in enumerate(names):
        alone_inputs = case.row_inputs(inputs, row)
        if name is None:
            with model.disable_adapter():
                alone = _generate(model, alone_inputs, True)
        else:
            model.set_adapter(name)
            alone = _generate(model, alone_inputs, True)
        new_tokens = mixed.sequences[row, inputs["input_ids"].shape[1]:]
        assert torch.equal(new_tokens, alone.sequences[0, alone_inputs["input_ids"].shape[1]:])


def test_beam_search_repeats_row_adapters_per_beam():
    case = build("llama")
    model = attach(case)
    model.add_adapter("other", HiFICLConfig(value_b_std=0.5, key_b_std=0.3, init_seed=3))
    inputs = case.make_inputs(batch_size=2, seq_len=8, padding="left")
    with torch.no_grad():
        mixed = model.generate(**inputs, max_new_tokens=4, num_beams=3, do_sample=False, adapter_names=["other", "default"])
        model.set_adapter("other")
        first = model.generate(**case.row_inputs(inputs, 0), max_new_tokens=4, num_beams=3, do_sample=False)
    assert torch.equal(mixed[0, inputs["input_ids"].shape[1]:], first[0, -4:])



@pytest.fixture(scope="module")
def smollm2_backbone():
    from hificl.backbones import load_backbone

    return load_backbone("embedded-text")


@pytest.mark.parametrize("adapter", [False, True])
def test_stopping_at_stop_strings_gives_the_answers_of_the_whole_budget(smollm2_backbone, adapter):
    """Each sequence stops at the first of the task's stop strings, batched, and every post-processed answer equals
    the one cut from a generation of the whole budget (real SmolLM2, real tokenizer); beam search runs the whole
    budget, its answers unchanged."""
    import dataclasses

    from hificl.adapters import get_hificl_model
    from hificl.generation import generate_answers
    from hificl.tasks import get_task

    backbone = smollm2_backbone
    model = (get_hificl_model(backbone.model, HiFICLConfig(value_b_std=0.05, init_seed=1)) if adapter
             else backbone.model)
    try:
        task = get_task("capitals", seed=3407)
        prompts = [task.query_prompt(e) for e in task.splits["test"][:6]]
        batch = backbone.encode(prompts, padding_side="left")
        length, budget = batch["input_ids"].shape[1], 10
        with torch.no_grad():
            whole = model.generate(**batch, max_new_tokens=budget, do_sample=False,
                                   pad_token_id=backbone.pad_token_id)
        tokens = whole[:, length:]
        # the task's own "\n", and a word that ends two continuations part-way
        words = [backbone.decode(tokens[row, 2:3]) for row in (0, 3)]
        stops = tuple(dict.fromkeys(["\n"] + [w for w in words if w.strip()]))
        assert len(stops) > 1
        stopping = dataclasses.replace(task, stop_strings=stops)
        stopped = generate_answers(model, backbone, stopping, batch, budget)
        assert [stopping.postprocess(raw) for raw in stopped] == \
            [stopping.postprocess(backbone.decode(row)) for row in tokens]
        lengths = [len(backbone.tokenizer(raw, add_special_tokens=False)["input_ids"]) for raw in stopped]
        assert min(lengths) < budget  # sequences did stop early, each where it met a stop string
        assert all(any(stop in raw for stop in stops) or n >= budget for raw, n in zip(stopped, lengths))
        beams = generate_answers(model, backbone, stopping, batch, budget, num_beams=2)
        with torch.no_grad():
            whole_beams = model.generate(**batch, max_new_tokens=budget, num_beams=2, do_sample=False,
                                         pad_token_id=backbone.pad_token_id)
        assert beams == [backbone.decode(row) for row in whole_beams[:, length:]]
    finally:
        if adapter:
            model.unload()
