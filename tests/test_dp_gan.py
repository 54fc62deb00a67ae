"""dp_gan.py: the privacy guarantee first (accountant, clipping, noise, sampling), then the AC-GAN
and the run contract (smoke, resume, determinism). Card: ../shared/papers/dp_gan.md, Sec. 8."""
import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from tiny_args import TINY

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
    e, a = dp_gan.compute_epsilon(sigma, q, steps, delta)
    assert abs(e - eps) / eps < 1e-6 and a == alpha
    e_c, _ = dp_gan.compute_epsilon(sigma, q, steps, delta, conversion="classic")
    assert abs(e_c - eps_classic) / eps_classic < 1e-6


def test_single_step_rdp_per_order():
    cases = [(1.0, 0.01, 1.5, 1.2725374e-4), (1.0, 0.01, 2, 1.7181342e-4), (1.0, 0.01, 2.5, 2.1757533e-4),
             (1.0, 0.01, 8, 8.936439e-4), (1.0, 0.01, 32, 11.246276), (1.1, 256 / 60000, 2, 2.3395776e-5),
             (1.1, 256 / 60000, 8, 9.834106e-5), (1.1, 256 / 60000, 32, 7.5901883),
             (1.0, 1 / 6000, 2, 4.773005e-8), (1.0, 1 / 6000, 32, 7.0198557)]
    for sigma, q, alpha, want in cases:                                  # integer and fractional orders
        got = dp_gan.rdp_sgm(q, sigma, (alpha,))[0]
        assert abs(got - want) / want < 1e-6, (sigma, q, alpha, got)
    # Opacus' docstring example: two segments compose per order; orders 2..32
    orders = tuple(range(2, 33))
    rdp = 10 * dp_gan.rdp_sgm(1e-5, 1.0, orders) + 4 * dp_gan.rdp_sgm(1e-4, 3.0, orders)
    e, a = dp_gan.rdp_to_epsilon(orders, rdp, 1e-5)
    assert abs(e - 0.336344) < 1e-6 and a == 23
    acc = dp_gan.RDPAccountant()                                         # the ledger composes segments
    for s, q, t in ((1.0, 0.01, 300), (1.5, 0.04, 2250)):
        for _ in range(t):
            acc.step(s, q)
    assert acc.history == [[1.0, 0.01, 300], [1.5, 0.04, 2250]]
    r = 300 * dp_gan.rdp_sgm(0.01, 1.0) + 2250 * dp_gan.rdp_sgm(0.04, 1.5)
    assert acc.get_epsilon(1e-5) == dp_gan.rdp_to_epsilon(dp_gan.DEFAULT_ORDERS, r, 1e-5)


def test_accountant_special_cases_and_monotonicity():
    orders = dp_gan.DEFAULT_ORDERS
    assert len(orders) == 151 and 11 not in orders and 64 not in orders and orders[0] == 1.1 and orders[-1] == 63
    np.testing.assert_array_equal(dp_gan.rdp_sgm(1.0, 1.3), np.array(orders) / (2 * 1.3 ** 2))   # q = 1
    assert (dp_gan.rdp_sgm(0.0, 1.0) == 0).all()                         # q = 0: nothing is released
    assert dp_gan.compute_epsilon(0.0, 0.01, 10, 1e-5)[0] == math.inf     # sigma = 0: no privacy
    eps_t = [dp_gan.compute_epsilon(1.0, 0.01, t, 1e-5)[0] for t in (10, 100, 1000, 10000)]
    eps_q = [dp_gan.compute_epsilon(1.0, q, 1000, 1e-5)[0] for q in (0.001, 0.01, 0.1, 0.5)]
    eps_s = [dp_gan.compute_epsilon(s, 0.01, 1000, 1e-5)[0] for s in (0.6, 0.8, 1.0, 2.0, 4.0)]
    assert eps_t == sorted(eps_t) and eps_q == sorted(eps_q) and eps_s == sorted(eps_s, reverse=True)
    r1, r2 = dp_gan.rdp_sgm(0.01, 1.0), dp_gan.rdp_sgm(0.02, 1.0)
    assert (r2 >= r1).all()                                              # RDP non-decreasing in q


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
    x = lambda: (torch.randn(n, 1, 3, 12, generator=g) * scale + 100).double()
    return x(), torch.randint(0, 2, (n,), generator=g), x(), torch.randint(0, 2, (n,), generator=g)


LOSS_KW = {"soft": (1.0, 0.0), "class_loss": "all"}


def autograd_grads(D, xr, yr, xf, yf):
    """Ordinary autograd of the summed pair losses (one backward)."""
    D.zero_grad(set_to_none=True)
    s, c = D(torch.cat([xr, xf]))
    n = len(xr)
    dp_gan.pair_loss(s[:n], c[:n], yr, s[n:], c[n:], yf, **LOSS_KW).sum().backward()
    return {k: p.grad.clone() for k, p in D.named_parameters()}


def test_per_example_grads_equal_one_at_a_time_autograd():
    D, (xr, yr, xf, yf) = tiny_D(), lot(5)
    grads, losses = dp_gan.per_example_grads(D, xr, yr, xf, yf, LOSS_KW)
    assert set(grads) == {k for k, _ in D.named_parameters()}           # every trainable D parameter
    s, c = D(torch.cat([xr, xf]))
    want = dp_gan.pair_loss(s[:5], c[:5], yr, s[5:], c[5:], yf, **LOSS_KW)
    assert losses.shape == (5,) and torch.allclose(losses, want)         # l_i rides along with g_i
    for i in range(5):
        ref = autograd_grads(D, xr[i:i + 1], yr[i:i + 1], xf[i:i + 1], yf[i:i + 1])
        for k, g in ref.items():
            assert (grads[k][i] - g).abs().max() < 1e-6
    total = autograd_grads(D, xr, yr, xf, yf)
    for k, g in total.items():
        assert (grads[k].sum(0) - g).abs().max() < 1e-6


def test_clipping_bound_and_unclipped_examples():
    D, (xr, yr, xf, yf) = tiny_D(), lot(6)
    grads, _ = dp_gan.per_example_grads(D, xr, yr, xf, yf, LOSS_KW)
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))
    C = float(norms.median())                                           # half the lot above, half below
    for i in range(6):
        one = {k: g[i:i + 1] for k, g in grads.items()}
        clipped, _ = dp_gan.privatize(one, C, 0.0, 1.0)                  # no noise, divide by 1
        n = math.sqrt(sum(float(g.pow(2).sum()) for g in clipped.values()))
        assert n <= C * (1 + 1e-6)
        if norms[i] <= C:                                                # below C: unchanged up to 1e-6
            assert abs(n - float(norms[i])) <= 1e-6 * C + 1e-5 * float(norms[i])


def test_noise_std_is_sigma_C_over_qN_on_a_zero_gradient():
    """Catches SPRINT_gan issue #5 (std sigma*C^2) and dividing by the realized lot size."""
    D = tiny_D(width=0.25).float()
    n_coords = sum(p.numel() for p in D.parameters())
    assert n_coords >= 100_000
    sigma, C, qN = 1.3, 0.7, 5.0
    empty = torch.empty(0, 1, 3, 12), torch.empty(0, dtype=torch.long)
    torch.manual_seed(3)
    dp_gan.dp_sgd_step(D, torch.optim.SGD(D.parameters(), lr=0.0), *empty, *empty, sigma, C, qN, LOSS_KW)
    g = torch.cat([p.grad.flatten() for p in D.parameters()])           # what the optimizer receives
    assert abs(g.std().item() / (sigma * C / qN) - 1) < 0.05 and abs(g.mean().item()) < 0.05 * sigma * C / qN


def test_sensitivity_of_the_pre_noise_sum_is_C():
    D, (xr, yr, xf, yf) = tiny_D(), lot(4)
    C, qN = 1e-3, 1.0
    base, _ = dp_gan.privatize(dp_gan.per_example_grads(D, xr, yr, xf, yf, LOSS_KW)[0], C, 0.0, qN)
    big = lot(1, seed=9, scale=1e4)                                      # an outlier record
    cat = [torch.cat([a, b]) for a, b in zip((xr, yr, xf, yf), big)]
    plus, _ = dp_gan.privatize(dp_gan.per_example_grads(D, *cat, LOSS_KW)[0], C, 0.0, qN)
    diff = math.sqrt(sum(float((plus[k] - base[k]).pow(2).sum()) for k in base)) * qN
    assert 0.5 * C < diff <= C * (1 + 1e-6)


def make_cfg(sigma, C, q=0.01, n=100):
    return {"latent": 8, "n_classes": 2, "device": torch.device("cpu"), "sigma": sigma, "C": C, "q": q,
            "expected_lot": q * n, "n_g": 2, "loss_kw": LOSS_KW, "clf_steps": 2, "image": False}


def tiny_gan():
    torch.manual_seed(0)
    G = dp_gan.TableGenerator(2, (3, 12), latent=8, width=0.125)
    D = dp_gan.TableDiscriminator(2, (3, 12), width=0.125)
    return G, D, torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters())


@pytest.mark.parametrize("sigma", [1.0, 0.0])
def test_empty_lot_moves_D_by_noise_only_and_train_step_is_charged_once(sigma):
    G, D, opt_G, opt_D = tiny_gan()
    before = {k: v.clone() for k, v in D.state_dict().items()}
    acc = dp_gan.RDPAccountant()
    empty = torch.empty(0, 1, 3, 12), torch.empty(0, dtype=torch.long)
    out = dp_gan.train_step(G, D, opt_G, opt_D, *empty, make_cfg(sigma, 1.0), acc)
    moved = any(not torch.equal(before[k], v) for k, v in D.state_dict().items())
    assert acc.history == [[sigma, 0.01, 1]] and moved == (sigma > 0) and float(out["loss_D_sum"]) == 0.0


def test_generator_step_is_free_and_leaves_D_untouched():
    G, D, opt_G, _ = tiny_gan()
    before_D, before_G = ({k: v.clone() for k, v in m.state_dict().items()} for m in (D, G))
    dp_gan.generator_step(G, D, opt_G, 4, make_cfg(1.0, 1.0))
    assert all(torch.equal(before_D[k], v) for k, v in D.state_dict().items())
    assert all(p.grad is None and p.requires_grad for p in D.parameters())
    assert any(not torch.equal(before_G[k], v) for k, v in G.state_dict().items())


def test_non_private_step_is_autograd_sum_over_expected_lot():
    D, (xr, yr, xf, yf) = tiny_D(), lot(5)
    qN = 7.0
    ref = {k: g / qN for k, g in autograd_grads(D, xr, yr, xf, yf).items()}
    for sigma, C in ((0.0, 0.0), (0.0, math.inf)):                      # plain path, per-example path
        opt = torch.optim.SGD(D.parameters(), lr=0.0)
        dp_gan.dp_sgd_step(D, opt, xr, yr, xf, yf, sigma, C, qN, LOSS_KW)
        for k, p in D.named_parameters():
            assert (p.grad - ref[k]).abs().max() < 1e-9


def test_batchnorm_in_the_private_D_is_refused():
    D = tiny_D()
    D.trunk[1] = nn.Sequential(nn.BatchNorm2d(4), nn.LeakyReLU(0.3))
    with pytest.raises(ValueError, match="BatchNorm"):
        dp_gan.per_example_grads(D, *lot(3), LOSS_KW)
    dp_gan.check_no_batch_coupling(nn.Sequential(nn.GroupNorm(1, 4), nn.LayerNorm(4)))   # allowed


def test_poisson_lots():
    n, q = 1000, 0.01
    sizes = np.array([len(dp_gan.poisson_lot(n, q, 0, k)) for k in range(3000)])
    assert abs(sizes.mean() - n * q) < 0.2 and abs(sizes.var() / (n * q * (1 - q)) - 1) < 0.1
    assert any(len(dp_gan.poisson_lot(100, q, 0, k)) == 0 for k in range(20))   # lots can be empty
    a, b = dp_gan.poisson_lot(n, 0.3, 5, 17), dp_gan.poisson_lot(n, 0.3, 5, 17)
    assert torch.equal(a, b) and not torch.equal(a, dp_gan.poisson_lot(n, 0.3, 5, 18))


def test_sprint_architecture_and_keras_same_padding():
    G, D = dp_gan.TableGenerator(2), dp_gan.TableDiscriminator(2)
    z = torch.rand(3, 100) * 2 - 1
    assert G(z, torch.tensor([0, 1, 1])).shape == (3, 1, 3, 12)
    assert sum(p.numel() for p in D.parameters()) == 1_858_947          # card 2.4 layer table
    assert sum(p.numel() for p in G.parameters()) == 333_897
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in D.modules())
    assert [m.p for m in D.modules() if isinstance(m, nn.Dropout)] == [0.3, 0.3, 0.3]
    conv = D.trunk[0]                                                    # 3x3 stride 2 on 3x12
    x = torch.randn(2, 1, 3, 12)
    ref = nn.functional.conv2d(nn.functional.pad(x, (0, 1, 1, 1)), conv.weight, conv.bias, stride=2)
    assert conv(x).shape == (2, 32, 2, 6) and torch.allclose(conv(x), ref)
    Gi, Di = dp_gan.ImageGenerator(10, width=0.125), dp_gan.ImageDiscriminator(10, width=0.125)
    xi = Gi(torch.rand(2, 100) * 2 - 1, torch.tensor([3, 7]))
    assert xi.shape == (2, 1, 28, 28) and xi.abs().max() <= 1
    s, c = Di(xi)
    assert s.shape == (2,) and c.shape == (2, 10)


def test_sprint_synth_matches_card_statistics():
    x, y = dp_gan.sprint_synth(6502, 0)
    assert x.shape == (6502, 3, 12) and torch.equal(x, dp_gan.sprint_synth(6502, 0)[0])
    means = x[:6000].mean(dim=(0, 2))
    assert torch.allclose(means, torch.tensor([129.03, 72.07, 2.27]), atol=0.02)
    med = [x[:6000][y[:6000] == a, 0].median(0).values for a in (0, 1)]   # standard, intensive SBP
    assert (med[0][1:] - 135).abs().max() <= 4 and (med[1][4:] - 119).abs().max() <= 4


def test_csv_loader(tmp_path):
    good = tmp_path / "t.csv"
    good.write_text("a,b,arm,c,d\n1,2,x,3,4\n5,6,y,7,8\n9,10,x,11,12\n")
    x, y, classes = dp_gan.load_csv_table(str(good), "arm", (2, 2))
    assert x.shape == (3, 2, 2) and y.tolist() == [0, 1, 0] and classes == ["x", "y"]
    assert x[1].flatten().tolist() == [5, 6, 7, 8]
    for text, msg in (("a,b\n1,2\n", "no label column"), ("a,arm\nfoo,1\n", "non-numeric"),
                      ("a,arm\nnan,1\n", "NaN"), ("a,arm\n,1\n", "non-numeric")):
        bad = tmp_path / "bad.csv"
        bad.write_text(text)
        with pytest.raises(ValueError, match=msg):
            dp_gan.load_csv_table(str(bad), "arm")


def test_report_noisy_max():
    g = torch.Generator().manual_seed(0)
    scores = [0.1, 0.9, 0.5, 0.7]
    assert dp_gan.report_noisy_max(scores, 3, 0.0, g) == [1, 3, 2]       # no noise: top picks in order
    picks = dp_gan.report_noisy_max(scores, 10, 100.0, g)
    assert sorted(picks) == [0, 1, 2, 3]                                 # without replacement, capped


def run(tmp_path, name, extra=()):
    return dp_gan.main(TINY["dp_gan.py"] + ["--out-dir", str(tmp_path / name), *extra])


def test_smoke_resume_determinism(tmp_path):
    m = run(tmp_path, "a")
    d = tmp_path / "a"
    steps = m["step"]
    assert all(math.isfinite(v) for k, v in m.items() if k != "corr_spearman")
    for f in ("ckpt.pt", "metrics.jsonl", "args.json", "privacy.json", f"samples/{steps:07d}.csv", "generators/G_0002.pt"):
        assert (d / f).exists(), f
    lines = [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()]
    eps = [ln["eps"] for ln in lines]
    assert eps == sorted(eps) and eps[0] > 0 and lines[-1]["step"] == steps
    priv = json.loads((d / "privacy.json").read_text())
    assert priv["steps"] == steps and abs(priv["epsilon"] - m["eps"]) < 1e-12   # one event per D step
    assert priv["epsilon_selection"] == pytest.approx(2 * 0.05) and not priv["non_private"]
    same = lambda a, b: {k: v for k, v in a.items() if k not in ("it_s", "eta_s", "corr_spearman")} == {
        k: v for k, v in b.items() if k not in ("it_s", "eta_s", "corr_spearman")}
    assert same(m, run(tmp_path, "b"))                                   # determinism
    half = run(tmp_path, "c", ["--steps", str(steps // 2)])
    assert half["step"] == steps // 2
    m_res = run(tmp_path, "c", ["--steps", str(steps), "--resume"])
    lines_c = [json.loads(ln)["step"] for ln in (tmp_path / "c/metrics.jsonl").read_text().splitlines()]
    assert lines_c == [ln["step"] for ln in lines]                       # each step logged once
    assert json.loads((tmp_path / "c/privacy.json").read_text())["history"] == priv["history"]
    for k in ("step", "loss_D", "loss_G", "eps", "lot", "tstr_lr"):       # resume == uninterrupted
        assert m_res[k] == m[k], k


def test_target_epsilon_and_non_private_mode(tmp_path, capsys):
    m = run(tmp_path, "t", ["--target-epsilon", "5.5", "--tstr-samples", "0"])
    want = dp_gan.max_steps_within(5.5, 1.0, 0.25, 1e-5, "balle", 50)
    assert m["step"] == want and m["eps"] <= 5.5 < dp_gan.compute_epsilon(1.0, 0.25, want + 1, 1e-5)[0]
    out = capsys.readouterr().out
    assert "epoch 1 | eps" in out and "epoch 2 | eps" not in out         # eps every epoch; stopped in epoch 2
    m = run(tmp_path, "np", ["--noise-multiplier", "0", "--max-grad-norm", "0", "--tstr-samples", "0"])
    assert m["eps"] == math.inf and "NON-PRIVATE" in capsys.readouterr().out
    with pytest.raises(SystemExit):                                      # a target needs noise
        run(tmp_path, "x", ["--noise-multiplier", "0", "--max-grad-norm", "0", "--target-epsilon", "1"])
    assert json.loads((tmp_path / "np/privacy.json").read_text())["epsilon"] is None


IMAGE = ["--dataset", "shapes", "--img-size", "20", "--device", "cpu", "--width", "0.0625", "--sample-rate", "1e-4",
         "--steps", "2", "--tstr-samples", "0"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")   # torchvision.io decoders
def test_image_configuration_runs_with_bench_and_exports_samples(tmp_path):
    m = dp_gan.main(IMAGE + ["--bench-d-steps", "2", "--export-samples", "8", "--out-dir", str(tmp_path)])
    assert m["step"] == 2 and m["bench_d_it_s_private"] > 0 and m["bench_d_it_s_plain"] > 0
    assert (tmp_path / "samples/0000002.png").exists() and (tmp_path / "reals.png").exists()
    with np.load(tmp_path / "samples_8.npz") as f:
        images, labels = f["images"], f["labels"]
    assert images.shape == (8, 20, 20, 3) and images.dtype == np.uint8 and labels.tolist() == [0, 1, 2, 3, 4, 5, 0, 1]
    G = dp_gan.ImageGenerator(6, 3, 20, width=0.0625)                    # same samples, written by save_image
    G.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True)["G"])
    with torch.no_grad():
        x = G(torch.rand(8, 100, generator=torch.Generator().manual_seed(13)) * 2 - 1, torch.tensor(labels))
    torchvision.utils.save_image(x[3], tmp_path / "x3.png", normalize=True, value_range=(-1, 1))
    assert np.array_equal(torchvision.io.read_image(str(tmp_path / "x3.png")).permute(1, 2, 0).numpy(), images[3])


def test_fid_every_reaches_fid_py_with_private_samples(fid_recorder, tmp_path):
    m = dp_gan.main(IMAGE + ["--fid-every", "1", "--fid-samples", "7", "--fid-weights", "w.pth", "--log-every", "2",
                             "--out-dir", str(tmp_path)])
    calls = fid_recorder.calls                                           # steps 1 and 2, with a log line each
    assert [(c["dataset"], c["img_size"], c["n"], c["weights"], c["class_label"]) for c in calls] == \
        [("shapes", 20, 7, "w.pth", None)] * 2
    assert all(c["shape"] == (3, 3, 20, 20) and -1 <= c["lo"] < c["hi"] <= 1 for c in calls)
    lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(ln["step"], ln["fid"]) for ln in lines] == [(1, 11.0), (2, 12.0)] and m["fid"] == 12.0


@pytest.mark.parametrize("flag", [["--export-samples", "8"], ["--fid-every", "1"]])
def test_tables_refuse_image_evaluation_flags(flag, tmp_path):
    for dataset in ("sprint_synth", "csv:none.csv"):
        with pytest.raises(ValueError, match="image datasets"):
            dp_gan.main(["--dataset", dataset, "--device", "cpu", "--out-dir", str(tmp_path), *flag])


def test_dropout_masks_differ_per_example_and_no_opacus():
    """randomness='different': identical pairs in one lot get their own dropout masks."""
    D, (xr, yr, xf, yf) = tiny_D(dropout=0.5), lot(1)
    rep = [t.expand(4, *t.shape[1:]).contiguous() for t in (xr, yr, xf, yf)]
    grads, _ = dp_gan.per_example_grads(D, *rep, LOSS_KW)
    g = grads["trunk.7.weight"].flatten(1)                               # first dense layer
    assert not torch.allclose(g[0], g[1]) and not torch.allclose(g[2], g[3])
    tree = ast.parse(Path(dp_gan.__file__).read_text())
    imported = {n.name for x in ast.walk(tree) if isinstance(x, ast.Import) for n in x.names} | {
        x.module for x in ast.walk(tree) if isinstance(x, ast.ImportFrom)}
    assert imported <= {"argparse", "copy", "csv", "functools", "json", "math", "os", "random", "resource", "time",
                        "warnings", "numpy", "torch", "torch.nn", "torch.nn.functional", "torchvision", "scipy",
                        "torch.func", "common", "fid"}                           # no Opacus, no sklearn
    assert "fid" not in {n.name for x in tree.body if isinstance(x, ast.Import) for n in x.names}   # eval only


def test_latent_labels_and_official_defaults():
    z, c = dp_gan.sample_zc(20000, 100, 2, "cpu", torch.Generator().manual_seed(0))
    assert z.min() >= -1 and z.max() < 1 and abs(z.mean()) < 0.01 and abs(z.var() - 1 / 3) < 0.01   # U(-1, 1)
    assert abs(c.float().mean() - 0.5) < 0.02                            # uniform fake labels
    a = dp_gan.parse_args([])                                            # card 2.6, sprint column
    assert (a.dataset, a.noise_multiplier, a.max_grad_norm, a.lr_d, a.lr_g, tuple(a.betas), a.epochs, a.delta,
            a.latent_dim, a.n_train) == ("sprint_synth", 1.0, 1e-4, 2e-5, 2e-5, (0.5, 0.999), 500, 1e-5, 100, 6000)
    m = dp_gan.parse_args(["--dataset", "mnist"])
    assert (m.max_grad_norm, m.lr_d, m.epochs) == (1.0, 2e-4, 20)
