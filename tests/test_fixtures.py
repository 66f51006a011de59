"""Fast checks of the tiny-model factory of the fixtures package (tests/fixtures/models.py)."""

import time

import pytest
import torch

from fixtures import FAMILIES, MULTIMODAL_FAMILIES, TEXT_FAMILIES, build, real_token_positions

ATOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models are fastest on one thread; with several intra-op threads on a busy 2-core machine the OpenMP
    # workers contend and the same tests take 3-4x longer.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cases():
    return {}


def _case(cases, name):
    if name not in cases:
        cases[name] = build(name)
    return cases[name]


def test_family_lists():
    assert set(FAMILIES) == set(TEXT_FAMILIES) | set(MULTIMODAL_FAMILIES)
    assert not set(TEXT_FAMILIES) & set(MULTIMODAL_FAMILIES)
    assert len(FAMILIES) == len(set(FAMILIES)) == 12


@pytest.mark.parametrize("name", FAMILIES)
def test_build_is_fast_deterministic_and_tiny(name, cases):
    t0 = time.perf_counter()
    case = build(name)
    assert time.perf_counter() - t0 < 2.0
    cases[name] = case
    model = case.model
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    text_cfg = model.config.get_text_config()
    assert text_cfg._attn_implementation == "sdpa"
    assert text_cfg.num_attention_heads == 4 and text_cfg.num_key_value_heads == 2
    assert text_cfg.hidden_size // text_cfg.num_attention_heads == 16 or getattr(text_cfg, "head_dim", None) == 16
    again = build(name)
    for (n, p), (_, q) in zip(model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_forward_each_padding(name, padding, cases):
    case = _case(cases, name)
    inputs = case.make_inputs(batch_size=2, seq_len=12, padding=padding)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert ids.shape == mask.shape == (2, 12)
    if padding is None:
        assert bool(mask.all())
    else:
        assert mask[0].all() and 3 <= int((mask[1] == 0).sum()) <= 5
        pad_side = mask[1, 0] == 0 if padding == "left" else mask[1, -1] == 0
        assert pad_side
        assert bool((ids[mask == 0] == case.pad_token_id).all())
    if case.is_multimodal:
        img = ids == case.image_token_id
        assert bool(img.any(-1).all()), "every row holds an image"
        assert not bool((img & (mask == 0)).any()), "image tokens lie in the real part"
        assert "pixel_values" in inputs
    real = ids[(mask == 1)]
    if case.is_multimodal:
        real = real[real < 240]
    assert bool(((real >= 3) & (real < 240)).all())
    with torch.no_grad():
        logits = case.model(**inputs).logits
    assert logits.shape[:2] == (2, 12)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", MULTIMODAL_FAMILIES)
def test_multimodal_text_only_inputs(name, cases):
    case = _case(cases, name)
    inputs = case.make_inputs(padding="left", images=False)
    assert set(inputs) == {"input_ids", "attention_mask"}
    with torch.no_grad():
        assert torch.isfinite(case.model(**inputs).logits).all()


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("padding", ["left", "right"])
def test_padded_rows_match_rows_alone(name, padding, cases):
    case = _case(cases, name)
    # seq_len 20 > gemma3's sliding window of 8, so the sliding mask matters
    inputs = case.make_inputs(batch_size=3, seq_len=20, padding=padding, seed=1)
    with torch.no_grad():
        batch_logits = case.model(**inputs).logits
        for row in range(3):
            alone = case.row_inputs(inputs, row)
            assert bool(alone["attention_mask"].all())
            logits = case.model(**alone).logits[0]
            pos = real_token_positions(inputs, row)
            assert logits.shape[0] == len(pos)
            torch.testing.assert_close(batch_logits[row, pos], logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate_left_padding_matches_rows_alone(name, cases):
    case = _case(cases, name)
    inputs = case.make_inputs(batch_size=2, seq_len=12, padding="left")
    width = inputs["input_ids"].shape[1]
    out = case.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 2 and width < out.shape[1] <= width + 3
    for row in range(2):
        alone = case.row_inputs(inputs, row)
        n = alone["input_ids"].shape[1]
        new_alone = case.model.generate(**alone, max_new_tokens=3, do_sample=False)[0, n:]
        assert torch.equal(out[row, width : width + len(new_alone)], new_alone)
