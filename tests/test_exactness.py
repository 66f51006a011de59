"""The fast attention equals a float64 reference of the paper's equation on every model family, with and without
padding, and the 'unmasked' normalizer equals a float64 restatement of the authors' formula (likewise the
paper's ablations: alpha fixed to 1, full-rank virtual keys and values)."""

import pytest
import torch

from fixtures import FAMILIES, attach, build, padded_inputs, real_rows, reference_logits, rel_err


@pytest.fixture(scope="module", params=FAMILIES)
def case(request):
    return build(request.param)


@pytest.mark.parametrize("padding", [None, "left", "right"])
@pytest.mark.parametrize("options", [{"normalizer": "exact"}, {"normalizer": "unmasked"}, {"fixed_alpha": True},
                                     {"full_rank_keys": True, "full_rank_values": True}], ids=str)
def test_logits_equal_float64_reference(case, padding, options):
    model = attach(case, **options)
    inputs = padded_inputs(case, batch_size=2, seq_len=16, padding=padding)
    with torch.no_grad():
        fast = model(**inputs).logits
    with torch.no_grad(), model.disable_adapter():
        base = model(**inputs).logits
    expected = reference_logits(model, inputs)
    for got, want, plain in zip(real_rows(fast, inputs), real_rows(expected, inputs), real_rows(base, inputs)):
        assert rel_err(got, want) < 1e-5
        assert rel_err(plain, want) > 1e-3, "the virtual pairs must change the output, or the test proves nothing"


def test_unmasked_differs_from_exact_during_training_only_through_the_normalizer():
    """On an unpadded sequence the authors' Z2 sees future keys: positions before the last differ from 'exact'."""
    case = build("llama")
    inputs = case.make_inputs(batch_size=1, seq_len=12)
    with torch.no_grad():
        exact = attach(case, normalizer="exact")(**inputs).logits
        unmasked = attach(case, normalizer="unmasked")(**inputs).logits
    assert rel_err(unmasked[0, :-1], exact[0, :-1]) > 1e-4


@pytest.mark.parametrize("padding", ["left", "right"])
def test_padded_rows_equal_rows_alone(case, padding):
    model = attach(case)
    inputs = padded_inputs(case, batch_size=2, seq_len=16, padding=padding)
    with torch.no_grad():
        batched = real_rows(model(**inputs).logits, inputs)
        for row in range(2):
            alone = model(**case.row_inputs(inputs, row)).logits[0]
            assert rel_err(batched[row], alone) < 1e-5


def test_reference_attention_has_no_virtual_term_when_disabled():
    """Guards the reference itself: disabled, the fp64 reference equals the base model run in fp32."""
    case = build("qwen2")
    model = attach(case)
    inputs = padded_inputs(case, batch_size=2, seq_len=10, padding="left")
    with torch.no_grad():
        base = case.model(**inputs).logits
        with model.disable_adapter():
            expected = reference_logits(model, inputs)
    for got, want in zip(real_rows(base, inputs), real_rows(expected, inputs)):
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("path", ["default", "split"])
@pytest.mark.parametrize("padding", [None, "left", "right"])
@pytest.mark.parametrize("options", [{"normalizer": "exact"}, {"fixed_alpha": True}], ids=str)
def test_adapter_gradients_equal_float64_reference(case, padding, options, path):
    """The gradients of every adapter parameter through the fast path -- the device's default (the concatenation
    on a CPU) and the split-KV merge -- equal those of a float64 copy run with the reference attention."""
    import copy

    model = attach(case, **options, attention_path="split" if path == "split" else "auto")
    inputs = padded_inputs(case, batch_size=2, seq_len=16, padding=padding)
    mask = inputs["attention_mask"].bool()
    weights = torch.randn(model(**inputs).logits.shape, generator=torch.Generator().manual_seed(0))

    def adapter_grads(m, run_inputs, reference=False):
        m.zero_grad(set_to_none=True)
        context = m.reference_attention() if reference else torch.enable_grad()
        with context:
            logits = m(**run_inputs).logits
        (logits * weights.to(logits.dtype))[mask].sum().backward()
        return {n: p.grad.detach().double() for n, p in m.named_parameters() if p.requires_grad}

    fast = adapter_grads(model, inputs)
    reference_model = copy.deepcopy(model).double()
    expected = adapter_grads(reference_model, {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
                                               for k, v in inputs.items()}, reference=True)
    assert fast.keys() == expected.keys() and fast
    for name in fast:
        assert rel_err(fast[name], expected[name]) < 1e-5, name
