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
