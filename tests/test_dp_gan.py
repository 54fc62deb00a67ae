"""dp_gan.py: the privacy guarantee first (accountant, clipping, noise, sampling, selection), then
the AC-GAN, the evaluation and the run contract (resume, budget, export). Card:
../shared/papers/dp_gan.md, Sec. 7 (checklist) and 8 (tests); mutants: tests/mutants.py."""
import ast
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

import common
import dp_gan

# card 2.8 reference table: sigma, q, T, delta, eps (Balle/Opacus), best alpha, eps (classic)
TABLE = [(1.5, 0.04, 2250, 1e-5, 7.32911117, 3.9, 8.07384828),
         (1.1, 256 / 60000, 14040, 1e-5, 2.59436335, 8.1, 3.00587487),
         (1.0, 0.01, 1000, 1e-5, 2.10136527, 7.8, 2.53798288),
         (1.0, 0.01, 10000, 1e-5, 6.71273830, 4.1, 7.42872813),
         (0.5, 0.01, 1000, 1e-5, 15.46426847, 2.1, 16.78538413),
         (0.7, 0.004, 5000, 1e-5, 4.34897992, 4.3, 5.04829372),
         (1.0, 64 / 60000, 9375, 1e-5, 0.80348859, 13, 1.09727707),
         (1.0, 64 / 60000, 18750, 1e-5, 0.94135520, 13, 1.23514369),
         (1.0, 64 / 60000, 18760, 1e-5, 0.94150226, 13, 1.23529075),
         (1.0, 1 / 6000, 6000, 1e-5, 0.48690567, 17, 0.72460613),
         (1.0, 1 / 6000, 3_000_000, 1e-5, 1.59676241, 12, 1.89341723),
         (2.0, 0.001, 100000, 1e-6, 0.75278646, 28, 0.90439312),
         (1.0, 1.0, 1, 1e-5, 4.72850707, 5.4, 5.29852614)]


@pytest.mark.parametrize("sigma,q,steps,delta,eps,alpha,eps_classic", TABLE)
def test_accountant_matches_reference_table(sigma, q, steps, delta, eps, alpha, eps_classic):
    e, a = dp_gan.compute_epsilon(sigma, q, steps, delta)               # checklist 11, 12
    assert abs(e - eps) / eps < 1e-6 and a == alpha
    e_c, _ = dp_gan.compute_epsilon(sigma, q, steps, delta, conversion="classic")
    assert abs(e_c - eps_classic) / eps_classic < 1e-6


def test_single_step_rdp_per_order_and_the_ledger():
    cases = [(1.0, 0.01, 1.5, 1.2725374e-4), (1.0, 0.01, 2, 1.7181342e-4),
             (1.0, 0.01, 2.5, 2.1757533e-4), (1.0, 0.01, 8, 8.936439e-4),
             (1.0, 0.01, 32, 11.246276), (1.1, 256 / 60000, 2, 2.3395776e-5),
             (1.1, 256 / 60000, 8, 9.834106e-5), (1.1, 256 / 60000, 32, 7.5901883),
             (1.0, 1 / 6000, 2, 4.773005e-8), (1.0, 1 / 6000, 32, 7.0198557)]
    for sigma, q, alpha, want in cases:                                  # integer and fractional
        got = dp_gan.rdp_sgm(q, sigma, (alpha,))[0]
        assert abs(got - want) / want < 1e-6, (sigma, q, alpha, got)
    orders = tuple(range(2, 33))                                         # Opacus' docstring case
    rdp = 10 * dp_gan.rdp_sgm(1e-5, 1.0, orders) + 4 * dp_gan.rdp_sgm(1e-4, 3.0, orders)
    e, a = dp_gan.rdp_to_epsilon(orders, rdp, 1e-5)
    assert abs(e - 0.336344) < 1e-6 and a == 23
    acc = dp_gan.RDPAccountant()
    for s, q, t in ((1.0, 0.01, 300), (1.5, 0.04, 2250)):
        for _ in range(t):
            acc.step(s, q)
    assert acc.history == [[1.0, 0.01, 300], [1.5, 0.04, 2250]]
    r = 300 * dp_gan.rdp_sgm(0.01, 1.0) + 2250 * dp_gan.rdp_sgm(0.04, 1.5)
    assert acc.get_epsilon(1e-5) == dp_gan.rdp_to_epsilon(dp_gan.DEFAULT_ORDERS, r, 1e-5)


def test_accountant_special_cases_and_monotonicity():
    orders = dp_gan.DEFAULT_ORDERS                                       # Opacus' default alphas
    assert len(orders) == 151 and 11 not in orders and 64 not in orders
    assert orders[0] == 1.1 and orders[98] == 10.9 and orders[99] == 12 and orders[-1] == 63
    np.testing.assert_allclose(dp_gan.rdp_sgm(1.0, 1.3), np.array(orders) / (2 * 1.3 ** 2),
                               rtol=1e-12)                               # q = 1: a / (2 sigma^2)
    assert (dp_gan.rdp_sgm(0.0, 1.0) == 0).all()                         # q = 0: nothing released
    assert dp_gan.compute_epsilon(0.0, 0.01, 10, 1e-5)[0] == math.inf     # sigma = 0: no privacy
    eps_t = [dp_gan.compute_epsilon(1.0, 0.01, t, 1e-5)[0] for t in (10, 100, 1000, 10000)]
    eps_q = [dp_gan.compute_epsilon(1.0, q, 1000, 1e-5)[0] for q in (0.001, 0.01, 0.1, 0.5)]
    eps_s = [dp_gan.compute_epsilon(s, 0.01, 1000, 1e-5)[0] for s in (0.6, 0.8, 1.0, 2.0, 4.0)]
    assert eps_t == sorted(eps_t) and eps_q == sorted(eps_q) and eps_s == sorted(eps_s)[::-1]
    assert (dp_gan.rdp_sgm(0.02, 1.0) >= dp_gan.rdp_sgm(0.01, 1.0)).all()


def test_moments_accountant_equivalence():
    """Official moments accountant = classic conversion on integer orders 2..65 (card 2.8)."""
    orders = np.arange(2, 66, dtype=np.float64)
    for steps, want in ((3_000_000, 2.50e-6), (6000, 1.37e-14)):
        rdp = steps * dp_gan.rdp_sgm(1 / 6000, 1.0, tuple(orders))
        with np.errstate(over="ignore"):
            delta = np.min(np.exp((orders - 1) * (rdp - 2.0)))           # delta at eps = 2
        assert abs(delta - want) / want < 0.01


def tiny_D(dropout=0.0, width=0.125):
    torch.manual_seed(0)
    return dp_gan.TableDiscriminator(2, (3, 12), width=width, dropout=dropout).double()


def lot(n, seed=1, scale=20.0):
    g = torch.Generator().manual_seed(seed)
    x = lambda: (torch.randn(n, 1, 3, 12, generator=g) * scale + 100).double()  # noqa: E731
    return x(), torch.randint(0, 2, (n,), generator=g), x(), torch.randint(0, 2, (n,), generator=g)


LOSS_KW = {"soft": (1.0, 0.0), "class_loss": "all"}
EMPTY = torch.empty(0, 1, 3, 12), torch.empty(0, dtype=torch.long)


def make_cfg(sigma, C, qN=1.0, n_g=2):
    return {"latent": 8, "n_classes": 2, "device": torch.device("cpu"), "sigma": sigma, "C": C,
            "q": 0.01, "expected_lot": qN, "n_g": n_g, "loss_kw": LOSS_KW, "clf_steps": 2,
            "image": False, "noise_gen": None, "autocast": dp_gan.contextlib.nullcontext}


def autograd_grads(D, xr, yr, xf, yf):
    """Ordinary autograd of the summed pair losses (one backward)."""
    D.zero_grad(set_to_none=True)
    s, c = D(torch.cat([xr, xf]))
    n = len(xr)
    dp_gan.pair_loss(s[:n], c[:n], yr, s[n:], c[n:], yf, **LOSS_KW).sum().backward()
    return {k: p.grad.clone() for k, p in D.named_parameters()}


def test_per_example_grads_equal_one_at_a_time_autograd():
    D, (xr, yr, xf, yf) = tiny_D(), lot(5)                               # checklist 5, card test 3
    grads, losses = dp_gan.per_example_grads(D, xr, yr, xf, yf, LOSS_KW)
    assert set(grads) == {k for k, _ in D.named_parameters()}           # every trainable D param
    s, c = D(torch.cat([xr, xf]))
    assert torch.allclose(losses, dp_gan.pair_loss(s[:5], c[:5], yr, s[5:], c[5:], yf, **LOSS_KW))
    for i in range(5):
        ref = autograd_grads(D, xr[i:i + 1], yr[i:i + 1], xf[i:i + 1], yf[i:i + 1])
        assert all((grads[k][i] - g).abs().max() < 1e-6 for k, g in ref.items())
    total = autograd_grads(D, xr, yr, xf, yf)
    assert all((grads[k].sum(0) - g).abs().max() < 1e-6 for k, g in total.items())


def test_clipping_is_one_global_norm_with_factor_min_1_C_over_norm():
    D, (xr, yr, xf, yf) = tiny_D(), lot(6)                               # checklist 5, 6; test 4
    grads, _ = dp_gan.per_example_grads(D, xr, yr, xf, yf, LOSS_KW)
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))
    C = float(norms.median())                                           # half above, half below
    for i in range(6):
        clipped, n_i = dp_gan.privatize({k: g[i:i + 1] for k, g in grads.items()}, C, 0.0, 1.0)
        n = math.sqrt(sum(float(g.pow(2).sum()) for g in clipped.values()))
        want = float(norms[i]) * min(1.0, C / (float(norms[i]) + 1e-6))
        assert abs(n - want) <= 1e-9 * want and n <= C * (1 + 1e-6)
        for k, g in clipped.items():                                   # one factor for all tensors
            assert torch.allclose(g, grads[k][i] * want / float(norms[i]), rtol=1e-9, atol=0)
    tiny, _ = dp_gan.privatize({"w": torch.full((1, 4), 1e-7, dtype=torch.float64)}, 1.0, 0.0, 1.0)
    assert abs(float(tiny["w"][0]) / 1e-7 - 1) < 1e-12                  # below C: unchanged


def test_noise_is_sigma_C_per_coordinate_on_the_sum_over_expected_lot():
    """Catches SPRINT_gan issue #5 (std sigma*C^2), noise on the mean, one shared draw, and
    dividing by the realized lot size (checklist 7, 8; card test 5, 7)."""
    D = tiny_D(width=0.25).float()
    assert sum(p.numel() for p in D.parameters()) >= 100_000
    sigma, C, qN = 1.3, 0.7, 5.0
    torch.manual_seed(3)
    dp_gan.dp_sgd_step(D, torch.optim.SGD(D.parameters(), lr=0.0), *EMPTY, *EMPTY,
                       make_cfg(sigma, C, qN))
    g = torch.cat([p.grad.flatten() for p in D.parameters()])           # what the optimizer gets
    assert abs(g.std().item() / (sigma * C / qN) - 1) < 0.05 and abs(g.mean()) < 0.05 * sigma * C
    gen = torch.Generator().manual_seed(0)                               # the noise stream is used
    a = dp_gan.privatize({"w": torch.zeros(0, 3)}, 1.0, 1.0, 1.0, gen)[0]["w"]
    b = dp_gan.privatize({"w": torch.zeros(0, 3)}, 1.0, 1.0, 1.0,
                         torch.Generator().manual_seed(0))[0]["w"]
    assert torch.equal(a, b) and not torch.equal(a, torch.zeros(3))


def test_sensitivity_of_the_pre_noise_sum_is_C():
    D, (xr, yr, xf, yf) = tiny_D(), lot(4)                               # card test 6
    C = 1e-3
    base, _ = dp_gan.privatize(dp_gan.per_example_grads(D, xr, yr, xf, yf, LOSS_KW)[0], C, 0.0, 1)
    cat = [torch.cat([a, b]) for a, b in zip((xr, yr, xf, yf), lot(1, seed=9, scale=1e4))]
    plus, _ = dp_gan.privatize(dp_gan.per_example_grads(D, *cat, LOSS_KW)[0], C, 0.0, 1)
    diff = math.sqrt(sum(float((plus[k] - base[k]).pow(2).sum()) for k in base))
    assert 0.5 * C < diff <= C * (1 + 1e-6)


def tiny_gan():
    torch.manual_seed(0)
    G = dp_gan.TableGenerator(2, (3, 12), latent=8, width=0.125)
    D = dp_gan.TableDiscriminator(2, (3, 12), width=0.125)
    return G, D, torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters())


@pytest.mark.parametrize("sigma", [1.0, 0.0])
def test_empty_lot_moves_D_by_noise_only_and_each_D_step_is_charged_once(sigma):
    G, D, opt_G, opt_D = tiny_gan()                                      # checklist 4, 10; test 7
    before = {k: v.clone() for k, v in D.state_dict().items()}
    acc = dp_gan.RDPAccountant()
    out = dp_gan.train_step(G, D, opt_G, opt_D, *EMPTY, make_cfg(sigma, 1.0), acc)
    moved = any(not torch.equal(before[k], v) for k, v in D.state_dict().items())
    assert acc.history == [[sigma, 0.01, 1]] and moved == (sigma > 0)
    assert out.tolist()[0] == 0.0 and out.tolist()[3:] == [0.0, 1.0]     # no pair, one step


def test_generator_step_is_free_non_saturating_on_2L_fakes_and_leaves_D_untouched():
    G, D, opt_G, _ = tiny_gan()                                          # checklist 9; test 8
    before_D, before_G = ({k: v.clone() for k, v in m.state_dict().items()} for m in (D, G))
    seen = []
    G.register_forward_pre_hook(lambda m, a: seen.append(len(a[0])))
    torch.manual_seed(5)
    loss = dp_gan.generator_step(G, D, opt_G, make_cfg(1.0, 1.0, n_g=6))
    assert seen == [6] and all(torch.equal(before_D[k], v) for k, v in D.state_dict().items())
    assert all(p.grad is None and p.requires_grad for p in D.parameters())
    assert any(not torch.equal(before_G[k], v) for k, v in G.state_dict().items())
    G.load_state_dict(before_G)                                          # recompute: -log D(G(z))
    torch.manual_seed(5)
    z, c = dp_gan.sample_zc(6, 8, 2, "cpu")
    s, logits = D(G(z, c))
    want = nn.functional.softplus(-s).mean() + nn.functional.cross_entropy(logits, c)
    assert torch.allclose(loss, want.detach(), rtol=1e-6)
    s = torch.tensor([-3.0, 0.5])                                        # non-saturating at 0.9
    assert torch.allclose(dp_gan.generator_loss(s, torch.zeros(2, 2), torch.tensor([0, 1]), 0.9),
                          (0.9 * nn.functional.softplus(-s) + 0.1 * nn.functional.softplus(s))
                          .mean() + math.log(2))
    args = dp_gan.parse_args(["--sample-rate", "0.25", "--n-train", "64"])
    cfg = dp_gan.step_config(args, {"n_train": 64, "n_classes": 2, "table": True},
                             torch.device("cpu"))
    assert cfg["n_g"] == 32 and cfg["expected_lot"] == 16                # G sees 2L, D divides qN


def test_pair_loss_terms_targets_and_class_weights():
    s_r, s_f, c_r, c_f = torch.tensor([0.3]), torch.tensor([-1.2]), torch.randn(1, 3), \
        torch.randn(1, 3)
    y_r, y_f = torch.tensor([2]), torch.tensor([0])
    bce, ce = nn.functional.binary_cross_entropy_with_logits, nn.functional.cross_entropy
    for soft in ((1.0, 0.0), (0.9, 0.1), (0.95, 0.0)):
        adv = bce(s_r, torch.tensor([soft[0]])) + bce(s_f, torch.tensor([soft[1]]))
        for mode, w in (("all", (1, 1)), ("real", (2, 0))):
            want = 0.5 * (adv + w[0] * ce(c_r, y_r) + w[1] * ce(c_f, y_f))
            got = dp_gan.pair_loss(s_r, c_r, y_r, s_f, c_f, y_f, soft, mode)
            assert torch.allclose(got, want), (soft, mode)


def test_non_private_step_is_autograd_sum_over_expected_lot():
    D, (xr, yr, xf, yf) = tiny_D(), lot(5)                               # checklist 14; test 9
    qN = 7.0
    ref = {k: g / qN for k, g in autograd_grads(D, xr, yr, xf, yf).items()}
    for sigma, C in ((0.0, 0.0), (0.0, math.inf)):                      # plain, per-example path
        dp_gan.dp_sgd_step(D, torch.optim.SGD(D.parameters(), lr=0.0), xr, yr, xf, yf,
                           make_cfg(sigma, C, qN))
        assert all((p.grad - ref[k]).abs().max() < 1e-9 for k, p in D.named_parameters())


def test_batchnorm_in_the_private_D_is_refused():
    D = tiny_D()                                                         # checklist 1
    D.trunk[1] = nn.Sequential(nn.BatchNorm2d(4), nn.LeakyReLU(0.3))
    with pytest.raises(ValueError, match="BatchNorm"):
        dp_gan.per_example_grads(D, *lot(3), LOSS_KW)
    dp_gan.check_no_batch_coupling(nn.Sequential(nn.GroupNorm(1, 4), nn.LayerNorm(4)))   # allowed


def test_poisson_lots_and_seeds_from_the_whole_secret():
    n, q = 1000, 0.01                                                    # checklist 4
    sizes = np.array([len(dp_gan.poisson_lot(n, q, 0, k)) for k in range(3000)])
    assert abs(sizes.mean() - n * q) < 0.2 and abs(sizes.var() / (n * q * (1 - q)) - 1) < 0.1
    assert any(len(dp_gan.poisson_lot(100, q, 0, k)) == 0 for k in range(20))   # can be empty
    a, b = dp_gan.poisson_lot(n, 0.3, 5, 17), dp_gan.poisson_lot(n, 0.3, 5, 17)
    assert torch.equal(a, b) and not torch.equal(a, dp_gan.poisson_lot(n, 0.3, 5, 18))
    big = 2 ** 130 + 5                                                   # no overflow, every bit
    lots = [dp_gan.poisson_lot(n, 0.3, s, 0) for s in (big, big + 2 ** 100, 5)]
    assert not torch.equal(lots[0], lots[1]) and not torch.equal(lots[0], lots[2])
    assert len({dp_gan.derive_seed(big, w) for w in ("lot", "noise", "torch")}) == 3


def test_sprint_architecture_and_keras_same_padding():
    G, D = dp_gan.TableGenerator(2), dp_gan.TableDiscriminator(2)       # checklist 1, 2, 18
    assert sum(p.numel() for p in D.parameters()) == 1_858_947          # card 2.4 layer table
    assert sum(p.numel() for p in G.parameters()) == 333_897
    assert [type(m).__name__ for m in D.trunk] == [
        "SameConv2d", "LeakyReLU", "Dropout", "SameConv2d", "LeakyReLU", "Dropout", "Flatten",
        "Linear", "ReLU", "Dropout", "Linear", "ReLU"]
    assert [m.p for m in D.modules() if isinstance(m, nn.Dropout)] == [0.3, 0.3, 0.3]
    assert [m.negative_slope for m in D.modules() if isinstance(m, nn.LeakyReLU)] == [0.3, 0.3]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in D.modules())
    conv, x = D.trunk[0], torch.randn(2, 1, 3, 12)                       # 3x3 stride 2 on 3x12
    ref = nn.functional.conv2d(nn.functional.pad(x, (0, 1, 1, 1)), conv.weight, conv.bias, 2)
    assert conv(x).shape == (2, 32, 2, 6) and torch.allclose(conv(x), ref)
    torch.manual_seed(0)
    with torch.no_grad():
        G.conv2.weight.mul_(100)                                         # outputs far from 0
    z, c = torch.rand(3, 100) * 2 - 1, torch.tensor([0, 1, 1])            # G by hand
    h = torch.relu(G.fc[2](torch.relu(G.fc[0](z * G.embed.weight[c])))).view(3, 32, 3, 4)
    h = torch.relu(G.conv1(h.repeat_interleave(2, 2).repeat_interleave(6, 3)))   # nearest (2, 6)
    want = nn.functional.conv2d(h, G.conv2.weight, G.conv2.bias, stride=2, padding=1)
    assert want.abs().max() > 2 and want.shape == (3, 1, 3, 12)          # linear output, no tanh
    assert torch.allclose(G(z, c), want, rtol=1e-5, atol=1e-4)
    assert G.conv1.padding == (2, 2) and G.conv1.kernel_size == (5, 5)


def test_image_nets_follow_the_keras_example():
    G, D = dp_gan.ImageGenerator(10, width=0.125), dp_gan.ImageDiscriminator(10, width=0.125)
    z, c = torch.rand(2, 100) * 2 - 1, torch.tensor([3, 7])
    h = torch.relu(G.fc(z * G.embed.weight[c])).view(2, -1, 3, 3)      # z * E[c], not z + E[c]
    want = torch.tanh(G.up[2](torch.relu(G.up[1](torch.relu(G.up[0](h))))))
    x = G(z, c)
    assert x.shape == (2, 1, 28, 28) and torch.allclose(x, want) and x.abs().max() <= 1
    assert [m.negative_slope for m in D.modules() if isinstance(m, nn.LeakyReLU)] == [0.2] * 4
    assert [m.p for m in D.modules() if isinstance(m, nn.Dropout)] == [0.3] * 4
    s, logits = D(x)
    assert s.shape == (2,) and logits.shape == (2, 10)


def test_sprint_synth_matches_card_statistics():
    x, y = dp_gan.sprint_synth(6502, 0)                                 # checklist 19
    assert x.shape == (6502, 3, 12) and torch.equal(x, dp_gan.sprint_synth(6502, 0)[0])
    means = x[:6000].mean(dim=(0, 2))
    assert torch.allclose(means, torch.tensor([129.03, 72.07, 2.27]), atol=0.02)
    med = [x[:6000][y[:6000] == a, 0].median(0).values for a in (0, 1)]   # standard, intensive
    assert (med[0][1:] - 135).abs().max() <= 4 and (med[1][4:] - 119).abs().max() <= 4
    assert abs(y[:6000].float().mean() - 0.5) < 0.02


def test_npz_loader(tmp_path):
    good = tmp_path / "t.npz"
    np.savez(good, x=np.arange(24.0).reshape(3, 2, 4), y=np.array([0, 2, 1]))
    x, y, k = dp_gan.load_npz_table(str(good))
    assert x.shape == (3, 2, 4) and y.tolist() == [0, 2, 1] and k == 3
    for name, arrays, msg in (("nan", dict(x=np.full((2, 1, 2), np.nan), y=np.zeros(2, int)),
                               "finite"), ("noy", dict(x=np.zeros((2, 1, 2))), "arrays x, y"),
                              ("float", dict(x=np.zeros((2, 1, 2)), y=np.zeros(2)), "integer")):
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(common.UserError, match=msg):
            dp_gan.load_npz_table(str(tmp_path / f"{name}.npz"))


def test_report_noisy_max_is_laplace():
    g = torch.Generator().manual_seed(0)                                 # checklist 15
    assert dp_gan.report_noisy_max([0.1, 0.9, 0.5, 0.7], 3, 0.0, g) == [1, 3, 2]   # plain argmax
    assert sorted(dp_gan.report_noisy_max([0.1, 0.9, 0.5, 0.7], 10, 100.0, g)) == [0, 1, 2, 3]
    b = 0.2                                  # P(pick the better by b) = 1 - exp(-1) (1 + 1/2) / 2
    wins = np.mean([dp_gan.report_noisy_max([0.0, b], 1, b, g) == [1] for _ in range(4000)])
    assert abs(wins - (1 - 0.75 * math.exp(-1))) < 0.03


def test_tstr_trains_on_synthetic_and_scores_held_out_real_records():
    """G's records carry the class in every feature; the real TRAINING labels are flipped, the
    held-out ones are not: TSTR (trained on G) scores ~1 on the held-out records, the real
    baseline (trained on the flipped records) ~0; any swap of sets shows (checklist 16)."""
    class SignG(nn.Module):
        def forward(self, z, c):
            return (2.0 * c - 1)[:, None, None, None] * (5 + z[:, :36].reshape(-1, 1, 3, 12))

    cfg, args = make_cfg(1.0, 1.0), dp_gan.parse_args(["--tstr-samples", "200", "--clf-steps",
                                                       "60", "--select-picks", "0"])
    cfg["latent"] = 36
    z, y = torch.rand(100, 36) * 2 - 1, torch.arange(100) % 2
    real_tr, real_te = (SignG()(z, y), 1 - y), (SignG()(z.flip(0), y), y)
    out, eps = dp_gan.evaluate(SignG(), args, cfg, real_tr, real_te, {"lr": [], "nn": []},
                               None, post=False)
    assert eps == 0.0 and out["tstr_lr"] > 0.95 and out["tstr_nn"] > 0.95
    assert out["real_lr"] < 0.05 and out["real_nn"] < 0.05


def test_selection_noise_scale_and_charge():
    args = dp_gan.parse_args(["--select-picks", "3", "--select-epsilon", "0.05"])
    scores = {"lr": [0.5, 0.6, 0.7, 0.8], "nn": [0.8, 0.7, 0.6, 0.5]}
    picks, eps = dp_gan.select_epochs(scores, 100, args)
    assert len(picks) == 3 and eps == pytest.approx(0.15)
    draws = {tuple(dp_gan.select_epochs(scores, 100, dp_gan.parse_args(["--seed", str(s)]))[0])
             for s in range(30)}
    assert len(draws) > 1                                                # scale 2/(N eps) = 0.4
    plain = dp_gan.parse_args(["--noise-multiplier", "0", "--max-grad-norm", "0"])
    assert dp_gan.select_epochs(scores, 100, plain) == ([3, 2, 1, 0, 0, 1, 2, 3], 0.0)


def test_latent_labels_and_official_defaults():
    z, c = dp_gan.sample_zc(20000, 100, 2, "cpu", torch.Generator().manual_seed(0))   # item 3
    assert z.min() >= -1 and z.max() < 1 and abs(z.mean()) < 0.01 and abs(z.var() - 1 / 3) < 0.01
    assert abs(c.float().mean() - 0.5) < 0.02                            # uniform fake labels
    a = dp_gan.parse_args([])                                            # card 2.6, checklist 17
    assert (a.dataset, a.noise_multiplier, a.max_grad_norm, a.lr, tuple(a.betas), a.epochs,
            a.delta, a.z_dim, a.n_train, a.n_test, a.batch_size, a.sample_rate, a.conversion,
            tuple(a.soft_labels), a.class_loss) == ("sprint_synth", 1.0, 1e-4, 2e-5, (0.5, 0.999),
                                                    500, 1e-5, 100, 6000, 502, 1, None, "balle",
                                                    (1.0, 0.0), "all")
    m = dp_gan.parse_args(["--dataset", "mnist"])
    assert (m.max_grad_norm, m.lr, m.epochs, m.batch_size) == (1.0, 2e-4, 20, 64)
    assert dp_gan.parse_args(["--latent-dim", "7"]).z_dim == 7           # the old name: an alias
    assert "ssecret" in dp_gan.parse_args(["--seed", "12345"]).out_dir   # a secret seed stays out
    assert "s12345" in dp_gan.parse_args(["--seed", "12345", "--noise-multiplier", "0",
                                          "--max-grad-norm", "0"]).out_dir
    for bad in (["--batch-size", "4", "--sample-rate", "0.1"], ["--sample-rate", "0"],
                ["--epochs", "0"], ["--noise-multiplier", "1", "--max-grad-norm", "0"]):
        with pytest.raises(SystemExit):
            dp_gan.parse_args(bad)


# ---- through main: tiny runs (q = 16/64: 4 steps an epoch) ----
TINY = ["--device", "cpu", "--n-train", "64", "--n-test", "32", "--batch-size", "16",
        "--epochs", "2", "--width", "0.0625", "--tstr-samples", "64", "--clf-steps", "20",
        "--select-picks", "2", "--log-every", "3", "--sample-every", "4", "--ckpt-every", "3",
        "--deterministic"]


def rows(d):
    return [{k: v for k, v in json.loads(ln).items() if k != "time_s"}
            for ln in (Path(d) / "metrics.jsonl").read_text().splitlines()]


def snapshot(d):
    return {p.name: p.read_bytes() for p in Path(d).rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """One uninterrupted private run; records what main passes to report_noisy_max."""
    d, calls = tmp_path_factory.mktemp("dp") / "ref", []
    rnm = dp_gan.report_noisy_max
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dp_gan, "report_noisy_max", lambda *a: calls.append(a[1:3]) or rnm(*a))
        m = dp_gan.main(TINY + ["--out-dir", str(d)])
    return d, m, calls


def test_run_logs_eps_every_epoch_and_charges_every_step_once(ref, capsys):
    d, m, calls = ref
    lines = rows(d)                                                      # checklist 10, 13, 15
    assert [r["step"] for r in lines] == [3, 4, 6, 8] and m["step"] == 8
    eps = [r["eps"] for r in lines]
    assert eps == sorted(eps) and eps[-1] == pytest.approx(dp_gan.compute_epsilon(
        1.0, 0.25, 8, 1e-5)[0], rel=1e-12)
    assert [r["epoch"] for r in lines if "transfer_lr" in r] == [1.0, 2.0]
    priv = json.loads((d / "privacy.json").read_text())
    assert priv["steps"] == 8 and priv["history"] == [[1.0, 0.25, 8]] and not priv["non_private"]
    assert calls == [(1, 2 / (64 * 0.05)), (1, 2 / (64 * 0.05))]        # noisy, scale 2/(N eps)
    assert m["eps_select"] == pytest.approx(0.1) == priv["epsilon_selection"]
    assert priv["epsilon_total"] == pytest.approx(priv["epsilon"] + 0.1)
    assert not (d / "reals.png").exists()                               # no real record drawn
    for f in ("ckpt.pt", "args.json", "eval.json", "curves.png",
              "samples/0000004.png", "samples/0000008.png", "generators/G_0002.pt"):
        assert (d / f).exists(), f
    assert 0 <= m["tstr_lr"] <= 1 and 0 <= m["real_nn"] <= 1 and "coef_spearman" in m
    G = dp_gan.load_generator(d / "generators/G_0002.pt")                # the snapshot alone
    state = torch.load(d / "ckpt.pt", weights_only=True)
    assert all(torch.equal(v, state["G"][k]) for k, v in G.state_dict().items())


def test_stop_mid_window_then_resume_reproduces_the_whole_log(ref, tmp_path):
    """Stopped at step 5 (the log window holds step 5), resumed: metrics.jsonl equals ref's."""
    d, step = tmp_path / "run", dp_gan.train_step
    n = []

    def stop_at_5(*a):
        n.append(1)
        if len(n) == 5:
            common._STOP.append(15)                                      # what SIGTERM does
        return step(*a)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dp_gan, "train_step", stop_at_5)
        try:
            assert dp_gan.main(TINY + ["--out-dir", str(d)])["step"] == 5
        finally:
            common._STOP.clear()
    assert torch.load(d / "ckpt.pt", weights_only=True)["window"].tolist()[4] == 1.0
    m = dp_gan.main(TINY + ["--out-dir", str(d), "--resume"])
    assert rows(d) == rows(ref[0])
    assert {k: m[k] for k in ("tstr_lr", "real_lr", "eps_select")} == {
        k: ref[1][k] for k in ("tstr_lr", "real_lr", "eps_select")}


def test_a_finished_private_run_spends_more_only_when_asked(ref, tmp_path, capsys):
    d = tmp_path / "run"
    shutil.copytree(ref[0], d)
    before = snapshot(d)
    with pytest.raises(common.UserError, match=r"finished and spent eps 6\.3531 .*"
                       r"eps 6\.2531 -> 7\.3281 over 4 more D steps, plus 0\.1 .*total 7\.5281"):
        dp_gan.main(TINY + ["--out-dir", str(d), "--resume", "--epochs", "3"])
    assert snapshot(d) == before
    m = dp_gan.main(TINY + ["--out-dir", str(d), "--resume", "--export-samples", "6"])
    assert m["step"] == 8 and m["eps_select"] == pytest.approx(0.1)       # nothing new spent
    after = snapshot(d)
    assert after["args.json"] == before["args.json"] and after["eval.json"] == before["eval.json"]
    with np.load(d / "samples_6.npz") as f:
        assert f["records"].shape == (6, 3, 12) and f["labels"].tolist() == [0, 1] * 3
        assert (f["records"] >= 0).all() and (f["records"] == np.trunc(f["records"])).all()
    m = dp_gan.main(TINY + ["--out-dir", str(d), "--resume", "--epochs", "3",
                            "--spend-more-epsilon", "--lr", "1e-3"])
    assert m["step"] == 12 and m["eps_select"] == pytest.approx(0.2)      # a second selection
    state = torch.load(d / "ckpt.pt", weights_only=True)
    assert [g["lr"] for g in state["opt_D"]["param_groups"] + state["opt_G"]["param_groups"]] == \
        [1e-3, 1e-3]                                                     # a new --lr takes effect
    assert "resume: --lr" in capsys.readouterr().out


def test_target_epsilon_non_private_mode_and_the_seed_warning(tmp_path, capsys):
    m = dp_gan.main(TINY + ["--out-dir", str(tmp_path / "t"), "--target-epsilon", "5.5",
                            "--tstr-samples", "0"])
    eps = [dp_gan.compute_epsilon(1.0, 0.25, t, 1e-5)[0] for t in (m["step"], m["step"] + 1)]
    assert m["step"] == 5 and eps[0] <= 5.5 < eps[1] and m["eps"] == eps[0]   # checklist 13
    out = capsys.readouterr().out
    assert "privacy plan: q 0.25 (expected lot qN = 16 of N 64)" in out and "default --seed" in out
    m = dp_gan.main(TINY + ["--out-dir", str(tmp_path / "np"), "--noise-multiplier", "0",
                            "--max-grad-norm", "0", "--tstr-samples", "0", "--seed", "7"])
    assert m["eps"] == math.inf and m["loss_D"] > 0                      # checklist 14
    out = capsys.readouterr().out
    assert "NON-PRIVATE" in out and "default --seed" not in out
    assert json.loads((tmp_path / "np/privacy.json").read_text())["epsilon"] is None
    with pytest.raises(SystemExit):                                      # a target needs noise
        dp_gan.parse_args(["--noise-multiplier", "0", "--max-grad-norm", "0",
                           "--target-epsilon", "1"])


IMAGE = ["--dataset", "shapes", "--img-size", "20", "--device", "cpu", "--width", "0.0625",
         "--n-train", "32", "--n-test", "40", "--batch-size", "8", "--epochs", "1",
         "--num-workers", "0", "--tstr-samples", "20", "--clf-steps", "5", "--select-picks", "1"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")   # torchvision.io decoders
def test_image_configuration_with_bf16_and_exported_samples(tmp_path):
    m = dp_gan.main(IMAGE + ["--amp", "bf16", "--export-samples", "8", "--out-dir", str(tmp_path)])
    assert m["step"] == 4 and math.isfinite(m["loss_D"]) and 0 <= m["tstr_nn"] <= 1
    assert (tmp_path / "samples/0000004.png").exists()
    with np.load(tmp_path / "samples_8.npz") as f:
        images, labels = f["images"], f["labels"]
    assert images.shape == (8, 20, 20, 3) and images.dtype == np.uint8
    assert labels.tolist() == [0, 1, 2, 3, 4, 5, 0, 1]
    G = dp_gan.load_generator(tmp_path / "ckpt.pt")                     # same samples, save_image
    gen = torch.Generator().manual_seed(dp_gan.derive_seed(0, "export"))
    with torch.no_grad():
        x = G(torch.rand(8, 100, generator=gen) * 2 - 1, torch.tensor(labels))
    torchvision.utils.save_image(x[3], tmp_path / "x3.png", normalize=True, value_range=(-1, 1))
    png = torchvision.io.read_image(str(tmp_path / "x3.png")).permute(1, 2, 0).numpy()
    assert np.array_equal(png, images[3])


def test_dropout_masks_differ_per_example_and_no_opacus():
    """randomness='different': identical pairs in one lot get their own dropout masks (item 20)."""
    D, (xr, yr, xf, yf) = tiny_D(dropout=0.5), lot(1)
    rep = [t.expand(4, *t.shape[1:]).contiguous() for t in (xr, yr, xf, yf)]
    grads, _ = dp_gan.per_example_grads(D, *rep, LOSS_KW)
    g = grads["trunk.7.weight"].flatten(1)                               # first dense layer
    assert not torch.allclose(g[0], g[1]) and not torch.allclose(g[2], g[3])
    tree = ast.parse(Path(dp_gan.__file__).read_text())
    imported = {n.name.split(".")[0] for x in ast.walk(tree) if isinstance(x, ast.Import)
                for n in x.names} | {x.module.split(".")[0] for x in ast.walk(tree)
                                     if isinstance(x, ast.ImportFrom)}
    assert not imported & {"opacus", "sklearn", "fid"}                   # no Opacus, no sklearn
