"""The over-optimisation analysis: best-of-n's expected score from a pool of samples
(results/best_of_n.py) and the least-squares fits of Gao et al. 2022's forms (results/plots.py)."""

import itertools
import math
import os
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "results"))

import best_of_n  # noqa: E402
import plots  # noqa: E402


@pytest.mark.parametrize("n", [1, 2, 3, 6, 7])
def test_best_of_n_is_the_mean_over_every_n_subset(n):
    """The closed form against brute force: for every n-subset of the pool, the gold score of the subset's
    highest-proxy sample, averaged over the subsets and then the prompts."""
    g = torch.Generator().manual_seed(0)
    proxy, gold = (torch.randn(4, 7, generator=g, dtype=torch.float64),
                   torch.randn(4, 7, generator=g, dtype=torch.float64))
    brute_gold, brute_proxy = [], []
    for p in range(4):
        subsets = list(itertools.combinations(range(7), n))
        best = [max(s, key=lambda i: proxy[p, i].item()) for s in subsets]
        brute_gold.append(sum(gold[p, i].item() for i in best) / len(subsets))
        brute_proxy.append(sum(proxy[p, i].item() for i in best) / len(subsets))
    got_gold, got_proxy = best_of_n.best_of_n(proxy, gold, n)
    assert got_gold == pytest.approx(sum(brute_gold) / 4, abs=1e-12)
    assert got_proxy == pytest.approx(sum(brute_proxy) / 4, abs=1e-12)


def test_best_of_n_ends():
    """n = 1 is the pool's mean; n = the pool is the proxy's argmax; the weights are a distribution."""
    proxy = torch.tensor([[0.3, -1.0, 2.0, 0.5]], dtype=torch.float64)
    gold = torch.tensor([[1.0, 2.0, -3.0, 4.0]], dtype=torch.float64)
    assert best_of_n.best_of_n(proxy, gold, 1)[0] == pytest.approx(1.0)  # (1 + 2 - 3 + 4) / 4
    assert best_of_n.best_of_n(proxy, gold, 4) == pytest.approx((-3.0, 2.0))  # the proxy's favourite, gold -3
    for n in range(1, 9):
        assert best_of_n.best_of_n_weights(8, n).sum().item() == pytest.approx(1.0, abs=1e-12)


def test_kl_of_best_of_n():
    """log n - (n-1)/n: 0 for n = 1; by hand for n = 2 (log 2 - 1/2) and n = 4 (log 4 - 3/4)."""
    assert best_of_n.kl_best_of_n(1) == 0.0
    assert best_of_n.kl_best_of_n(2) == pytest.approx(0.6931471805599453 - 0.5)
    assert best_of_n.kl_best_of_n(4) == pytest.approx(1.3862943611198906 - 0.75)


@pytest.mark.parametrize("form", ["rl", "bon"])
def test_fit_recovers_known_coefficients(form):
    """Points on R(d) = d (α - β log d) (RL) or d (α - β d) (best-of-n) give back α and β, with R² = 1."""
    d = np.linspace(0.2, 4.0, 15)
    r = d * (0.7 - 0.15 * (np.log(d) if form == "rl" else d))
    fit = plots.fit_gao(list(d), list(r), form)
    assert fit["alpha"] == pytest.approx(0.7, abs=1e-9) and fit["beta"] == pytest.approx(0.15, abs=1e-9)
    assert fit["r2"] == pytest.approx(1.0, abs=1e-12) and fit["points"] == 15
    assert plots.gao_curve(fit, form, d) == pytest.approx(r, abs=1e-9)


def test_fit_is_least_squares():
    """On noisy points: the 2 x 2 normal equations solved by hand, and R² = 1 - SS_res / SS_tot by hand."""
    d = [0.5, 1.0, 1.5, 2.0, 3.0]
    r = [0.30, 0.52, 0.61, 0.55, 0.20]
    x2 = [-di * math.log(di) for di in d]
    a11, a12, a22 = sum(x * x for x in d), sum(x * y for x, y in zip(d, x2)), sum(y * y for y in x2)
    b1, b2 = sum(x * y for x, y in zip(d, r)), sum(x * y for x, y in zip(x2, r))
    det = a11 * a22 - a12 * a12
    alpha, beta = (b1 * a22 - b2 * a12) / det, (a11 * b2 - a12 * b1) / det
    fitted = [alpha * x + beta * y for x, y in zip(d, x2)]
    mean = sum(r) / len(r)
    r2 = 1 - sum((y - f) ** 2 for y, f in zip(r, fitted)) / sum((y - mean) ** 2 for y in r)
    fit = plots.fit_gao(d, r, "rl")
    assert (fit["alpha"], fit["beta"], fit["r2"]) == pytest.approx((alpha, beta, r2), abs=1e-12)


@pytest.mark.parametrize("flags, message", [
    ({"n_max": 0}, "--n_max 0 must be a power of 2"),
    ({"n_max": 12}, "--n_max 12 must be a power of 2"),
    ({"num_prompts": 0}, "--num_prompts 0 must be at least 1"),
    ({"out": "/nowhere/best_of_n.json"}, "the folder /nowhere does not exist"),
])
def test_best_of_n_refuses_bad_flags_before_sampling(tmp_path, flags, message):
    """One line naming the flag, before any model is loaded (the RM paths only have to exist for these checks)."""
    args = best_of_n.Args(rms=(str(tmp_path),), members=(str(tmp_path),), out=str(tmp_path / "out.json"))
    with pytest.raises(SystemExit, match=message):
        best_of_n.main(best_of_n.Args(**{**vars(args), **flags}))
    assert not (tmp_path / "out.json").exists()
