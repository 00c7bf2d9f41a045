"""models/dropout.py: the same masks, outputs, gradients and generator state as nn.Dropout,
whichever way the masks are drawn."""
import pytest
import torch
from torch import nn

from models import dropout as D


def run(module: nn.Module, x: torch.Tensor, seed: int = 7):
    """Output, input gradient and the default generator's state afterwards."""
    torch.manual_seed(seed)
    x = x.clone().requires_grad_()
    out = module(x)
    (out.float() * torch.arange(out.numel(), dtype=torch.float32).view_as(out)).sum().backward()
    return out.detach(), x.grad, torch.get_rng_state()


CASES = [
    (torch.float32, (128, 4096), 0.3),
    (torch.float32, (3, 5, 7), 0.1),
    (torch.bfloat16, (64, 33), 0.5),
    (torch.float64, (17,), 0.9),
]


@pytest.mark.parametrize("dtype, shape, p", CASES)
def test_masks_values_gradients_and_generator_state_equal_nn_dropout(dtype, shape, p):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    for got, want in zip(run(D.Dropout(p), x), run(nn.Dropout(p), x)):
        assert torch.equal(got, want)


def test_fast_path_draws_with_torch_rand_where_the_probe_agrees(monkeypatch):
    """Where the probe agrees (e.g. an AMD CPU) the mask comes from torch.rand, and is
    still nn.Dropout's; where it does not, nn.Dropout itself runs."""
    calls = []
    real = torch.rand
    monkeypatch.setattr(D.torch, "rand", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(256, 64)
    D.Dropout(0.2)(x)
    assert bool(calls) == D.rand_matches_bernoulli(torch.float32)


def test_falls_back_to_nn_dropout_when_the_probe_disagrees(monkeypatch):
    monkeypatch.setattr(D, "rand_matches_bernoulli", lambda dtype: False)
    x = torch.randn(40, 30)
    for got, want in zip(run(D.Dropout(0.25), x), run(nn.Dropout(0.25), x)):
        assert torch.equal(got, want)


def test_eval_mode_p_zero_and_non_contiguous_inputs_behave_as_nn_dropout():
    x = torch.randn(30, 20)
    assert torch.equal(D.Dropout(0.5).eval()(x), x)
    assert torch.equal(D.Dropout(0.0)(x), x)
    strided = torch.randn(20, 30).t()   # not contiguous: torch's own kernel, its own element order
    for got, want in zip(run(D.Dropout(0.4), strided), run(nn.Dropout(0.4), strided)):
        assert torch.equal(got, want)
