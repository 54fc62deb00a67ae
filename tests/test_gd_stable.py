"""gd_stable.py: the card's Sec. 8 checks (exact toy figures, double backprop, D-step independence, real term),
the fidelity checklist items a test can see, and smoke / resume / determinism runs (mog8 and stacked MNIST)."""
import argparse
import json
import math
import struct

import numpy as np
import pytest
import torch

import gd_stable as gs
from tiny_args import TINY


def _radius(theta, psi):
    return math.hypot(theta, psi)


# ---- card Sec. 8, tests 1-4: toys with exact anchors (simultaneous plain GD through train_step) ----
def test_dirac_wgan_spectral_radii():
    # eta = 0: map [[1, h], [-h, 1]], radius sqrt(1 + h^2)^k; eta = 0.5: [[1 - 2 h eta, h], [-h, 1]]
    th, ps = gs.dirac_gan("wgan", 0.0, 0.1, 100, 1.0, 0.0)
    assert _radius(th, ps) == pytest.approx(1.6446, abs=1e-3)
    assert _radius(th, ps) == pytest.approx(1.01 ** 50, rel=1e-9)
    assert _radius(*gs.dirac_gan("wgan", 0.0, 0.1, 900, th, ps)) > 100          # 1000 steps: 144.77
    th, ps = gs.dirac_gan("wgan", 0.5, 0.1, 100, 1.0, 0.0)
    assert _radius(th, ps) == pytest.approx(0.0107, abs=1e-3)
    assert _radius(*gs.dirac_gan("wgan", 0.5, 0.1, 900, th, ps)) < 1e-10


def test_simultaneous_step_is_the_linear_map():
    h, eta, th, ps = 0.1, 0.5, 0.7, -0.3
    th1, ps1 = gs.dirac_gan("wgan", eta, h, 1, th, ps)
    # both gradients taken at (th, ps) before either player moves (checklist 9)
    assert th1 == pytest.approx((1 - 2 * h * eta) * th + h * ps, abs=1e-15)
    assert ps1 == pytest.approx(-h * th + ps, abs=1e-15)


def test_dirac_gan_radii():
    th, ps = gs.dirac_gan("gan", 0.0, 0.1, 100, 1.0, 0.0)
    assert _radius(th, ps) == pytest.approx(1.1125, abs=1e-3)
    assert _radius(*gs.dirac_gan("gan", 0.0, 0.1, 900, th, ps)) == pytest.approx(2.41, abs=0.01)
    th, ps = gs.dirac_gan("gan", 0.5, 0.1, 100, 1.0, 0.0)
    assert _radius(th, ps) == pytest.approx(0.3516, abs=1e-3)
    assert _radius(*gs.dirac_gan("gan", 0.5, 0.1, 900, th, ps)) < 1e-4


def test_uniform_quadratic_wgan_field_and_orbit():
    w = torch.tensor([0.3, -0.7, 1.2], dtype=torch.float64)
    a = torch.tensor([1.0, 0.4, 1.7], dtype=torch.float64)
    for eta in (0.0, 0.5):
        dw, da = gs.uniform_quadratic_field("wgan", eta, w, a)
        assert torch.allclose(dw, (1 - a ** 2) / 3, atol=1e-12)                  # dV/dw
        assert torch.allclose(da, 2 * w * a / 3 + 4 * eta / 9 * a * (1 - a ** 2), atol=1e-12)  # -d(V + eta R)/da
    H = lambda w, a: w * w + a * a / 2 - math.log(a)                            # noqa: E731  conserved by the flow
    assert H(0.3, 1.0) == pytest.approx(0.59)
    assert H(*gs.uniform_quadratic_gan("wgan", 0.0, 0.05, 1000, 0.3, 1.0)) == pytest.approx(0.7695, abs=1e-3)
    w1, a1 = gs.uniform_quadratic_gan("wgan", 0.5, 0.05, 1000, 0.3, 1.0)
    assert math.hypot(w1, a1 - 1) < 1e-4


def test_uniform_quadratic_gan_quadrature_converges():
    w, a = gs.uniform_quadratic_gan("gan", 0.0, 0.05, 1000, 0.3, 1.0)
    assert math.hypot(w, a - 1) == pytest.approx(2.54e-2, abs=1e-3)
    w, a = gs.uniform_quadratic_gan("gan", 0.0, 0.05, 4000, w, a)              # 5000 steps in all
    assert math.hypot(w, a - 1) < 1e-5
    # the vectorized field of the streamline figure equals the per-game field
    ws, As = torch.tensor([0.3, -0.5], dtype=torch.float64), torch.tensor([1.0, 0.6], dtype=torch.float64)
    dw, da = gs.uniform_quadratic_field("gan", 0.5, ws, As)
    for i in range(2):
        dwi, dai = gs.uniform_quadratic_field("gan", 0.5, ws[i], As[i])
        assert (dw[i].item(), da[i].item()) == pytest.approx((dwi.item(), dai.item()), abs=1e-14)


def test_streamline_figure(tmp_path):
    from torchvision.io import read_image
    gs.streamline_figure(tmp_path / "s.png", eta=0.5, size=40, grid=3, n_steps=20)
    img = read_image(str(tmp_path / "s.png"))
    assert img.shape == (3, 48, 4 * 40 + 5 * 4)                                # four panels in one row
    assert (img[:, 4:44, 4:44] < 200).any()                                    # lines were drawn


# ---- card Sec. 8, tests 5-8 on small MLP pairs ----
def _pair(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    G, D = gs.MLPGenerator(z_dim=4, width=8).to(dtype), gs.MLPDiscriminator(width=8).to(dtype)
    x = gs.sample_mog8(32, "cpu").to(dtype)
    z = torch.randn(32, 4, dtype=dtype)
    return G, D, x, z


def _R(G, D, x, z, real=True):
    V = gs.game_value(D(x), D(G(z)), "gan")
    if not real:
        V = gs.expect(gs.f_concave(-D(G(z)), "gan"))
    return gs.gradient_norm_penalty(V, list(D.parameters()))


def test_regularized_g_step_lowers_the_d_gradient_norm():
    def change(eta):                                                            # R after - R before one tiny G step
        G, D, x, z = _pair()
        R0 = _R(G, D, x, z).item()
        if eta >= 0:
            _, g_G, _ = gs.player_grads(G, D, x, z, eta)
        else:                                                                   # the flipped sign of pitfall 1
            V = gs.game_value(D(x), D(G(z)), "gan")
            g_G = torch.autograd.grad(V + eta * _R(G, D, x, z), list(G.parameters()))
        with torch.no_grad():
            for p, g in zip(G.parameters(), g_G):
                p -= 1e-3 * g
        return _R(G, D, x, z).item() - R0
    assert change(0.5) < change(0.0) < change(-0.5)


def test_double_backprop_matches_closed_form_and_finite_differences():
    D, G = gs.Monomial(0.4), gs.Monomial(1.3)                                  # Dirac WGAN
    V = gs.game_value(D(torch.zeros(1, 1, dtype=torch.float64)), D(G(torch.ones(1, 1, dtype=torch.float64))), "wgan")
    eta = 0.7
    (g,) = torch.autograd.grad(eta * gs.gradient_norm_penalty(V, [D.c]), [G.c])
    assert g.item() == pytest.approx(2 * eta * 1.3, abs=1e-12)                 # d(eta theta^2)/d theta
    G, D, x, z = _pair(1)
    params = list(G.parameters())
    grads = torch.autograd.grad(_R(G, D, x, z), params)
    gen, eps = torch.Generator().manual_seed(0), 1e-6
    for _ in range(3):                                                          # random directions
        v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        with torch.no_grad():
            for p, d in zip(params, v):
                p += eps * d
        r_plus = _R(G, D, x, z).item()
        with torch.no_grad():
            for p, d in zip(params, v):
                p -= 2 * eps * d
        r_minus = _R(G, D, x, z).item()
        with torch.no_grad():
            for p, d in zip(params, v):
                p += eps * d
        fd = (r_plus - r_minus) / (2 * eps)
        ad = sum((g * d).sum() for g, d in zip(grads, v)).item()
        assert abs(fd - ad) / max(abs(ad), 1e-12) < 1e-4


def _one_step(eta, update, g_objective="minimax"):
    G, D, x, z = _pair(2, torch.float32)
    opt_G, opt_D = (torch.optim.Adam(m.parameters(), lr=1e-2, betas=(0.5, 0.999)) for m in (G, D))
    gs.train_step(G, D, opt_G, opt_D, (x, z), (x.flip(0), z.flip(0)), eta, "gan", g_objective, update)
    return [p.detach().clone() for p in D.parameters()], [p.detach().clone() for p in G.parameters()]


def test_d_step_does_not_depend_on_eta_and_g_step_does():
    for update in ("simultaneous", "alternating"):
        d0, g0 = _one_step(0.0, update)
        d5, g5 = _one_step(0.5, update)
        assert all(torch.equal(a, b) for a, b in zip(d0, d5)), update
        assert not all(torch.equal(a, b) for a, b in zip(g0, g5)), update


def test_eta_zero_is_the_plain_gan_step_and_d_is_untouched_by_the_g_step():
    G, D, x, z = _pair(3, torch.float32)
    xg, zg = x.flip(0), z.flip(0)
    ref_G, ref_D = gs.MLPGenerator(4, 8), gs.MLPDiscriminator(8)
    ref_G.load_state_dict(G.state_dict())
    ref_D.load_state_dict(D.state_dict())
    make = lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, betas=(0.5, 0.999))  # noqa: E731
    opt_G, opt_D, ropt_G, ropt_D = make(G), make(D), make(ref_G), make(ref_D)
    gs.train_step(G, D, opt_G, opt_D, (x, z), (xg, zg), 0.0)
    # hand-written reference: D minimizes BCE(real, 1) + BCE(fake, 0) = -V; G minimizes V (saturating)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    d_r, d_f = ref_D(x), ref_D(ref_G(z).detach())
    ropt_D.zero_grad()
    (bce(d_r, torch.ones_like(d_r)) + bce(d_f, torch.zeros_like(d_f))).backward()
    ropt_D.step()
    d_after = [p.detach().clone() for p in ref_D.parameters()]
    ropt_G.zero_grad()
    d_r, d_f = ref_D(xg), ref_D(ref_G(zg))
    (-(bce(d_r, torch.ones_like(d_r)) + bce(d_f, torch.zeros_like(d_f)))).backward()
    ropt_G.step()
    for a, b in zip(list(G.parameters()) + list(D.parameters()), list(ref_G.parameters()) + d_after):
        assert torch.allclose(a, b, atol=1e-6)


def test_penalty_uses_the_real_term():
    G, D, x, z = _pair(4)
    with_real, fake_only = _R(G, D, x, z).item(), _R(G, D, x, z, real=False).item()
    assert abs(with_real - fake_only) > 1e-6 * max(with_real, fake_only)
    _, _, out = gs.player_grads(G, D, x, z, 0.5, diagnostics=True)
    assert out["R"].item() == pytest.approx(with_real, rel=1e-12)
    assert out["grad_D"].item() == pytest.approx(math.sqrt(with_real), rel=1e-12)
    # so the regularized G step depends on the real batch; the plain minimax G step does not
    x2 = gs.sample_mog8(32, "cpu", generator=torch.Generator().manual_seed(9)).double()
    for eta, depends in ((0.0, False), (0.5, True)):
        g1, g2 = (gs.player_grads(G, D, xr, z, eta)[1] for xr in (x, x2))
        assert (not all(torch.allclose(a, b, rtol=0, atol=1e-15) for a, b in zip(g1, g2))) == depends


def test_nonsat_objective_keeps_the_same_penalty():
    G, D, x, z = _pair(5)
    _, g_G, _ = gs.player_grads(G, D, x, z, 0.5, g_objective="nonsat")
    V = gs.game_value(D(x), D(G(z)), "gan")
    obj = -gs.f_concave(D(G(z)), "gan").mean() + 0.5 * _R(G, D, x, z)           # -E log sigmoid(D(G(z))) + eta R
    for a, b in zip(g_G, torch.autograd.grad(obj, list(G.parameters()))):
        assert torch.allclose(a, b, atol=1e-12)
    assert V.item() < 0


# ---- checklist items 1, 6, 7, 8, 13, 14 ----
def test_defaults_are_the_official_toy_setting():
    a = gs.derive_defaults(gs.parse_args([]))
    assert (a.dataset, a.eta, a.loss, a.g_objective, a.update, a.optimizer) == (
        "mog8", 0.5, "gan", "minimax", "alternating", "adam")
    assert (a.batch_size, a.lr, tuple(a.betas), a.adam_eps, a.steps, a.z_dim, a.hidden) == (
        512, 1e-4, (0.5, 0.999), 1e-8, 100_001, 256, 128)
    b = gs.derive_defaults(gs.parse_args(["--dataset", "stacked_mnist"]))
    assert (b.batch_size, b.lr, b.steps, b.z_dim, b.img_size, b.mode_samples) == (64, 2e-4, 50_000, 100, 28, 26_000)
    assert gs.f_concave(torch.tensor(0.3), "gan").item() == pytest.approx(math.log(1 / (1 + math.exp(-0.3))))


def test_mog8_data_and_networks():
    c = gs.mog8_centers()
    assert torch.allclose(c.norm(dim=1), torch.full((8,), 2.0))
    assert torch.allclose(c[2], torch.tensor([2.0, 0.0]), atol=1e-6)           # angle pi/2: (2 sin, 2 cos)
    x = gs.sample_mog8(16000, "cpu", generator=torch.Generator().manual_seed(0))
    d, k = torch.cdist(x, c).min(1)
    assert (x - c[k]).std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.bincount(k, minlength=8).min() > 1800
    G, D = gs.MLPGenerator(), gs.MLPDiscriminator()
    assert sum(p.numel() for p in G.parameters()) == 256 * 128 + 128 + 128 * 128 + 128 + 128 * 2 + 2
    assert sum(p.numel() for p in D.parameters()) == 2 * 128 + 128 + 128 + 1
    W = G[0].weight                                                             # (128, 256): rows orthogonal, gain 0.8
    assert torch.allclose(W @ W.T, 0.64 * torch.eye(128), atol=1e-5) and G[0].bias.abs().max() == 0
    assert torch.allclose(D(x[:5]), D[2](D[1](D[0](x[:5] / 4))))               # D sees x / 4


def test_dcgan_shapes():
    for size, c in ((28, 3), (28, 1), (32, 3)):
        G = gs.DCGANGenerator(100, c, size, width=0.25)
        D = gs.DCGANDiscriminator(c, size, width=0.25)
        x = G(torch.randn(2, 100))
        assert x.shape == (2, c, size, size) and D(x).shape == (2, 1) and x.abs().max() <= 1


def test_mog8_mode_metric():
    x = gs.sample_mog8(2500, "cpu", generator=torch.Generator().manual_seed(1))
    modes, hq = gs.mog8_modes(x)
    assert modes == 8 and hq == pytest.approx(1 - math.exp(-4.5), abs=0.01)    # P(r < 3 sigma) in 2-D
    modes, hq = gs.mog8_modes(x[(x[:, 0] > 1)])                                 # the 3 modes with x > 1
    assert modes == 3
    assert gs.mog8_modes(torch.zeros(100, 2)) == (0, 0.0)


# ---- stacked MNIST on a small MNIST-format file set ----
def _write_fake_mnist(root, n_train=400, n_test=200):
    """Learnable digits: class k is a bright bar at rows 4 + 2k on faint noise (idx files as torchvision reads)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        y = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        x = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
        for i, k in enumerate(y):
            x[i, 4 + 2 * k: 6 + 2 * k, 3:25] = 255
        (raw / f"{split}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + x.tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + y.tobytes())


def test_stacked_mnist_dataset_and_mode_metric(tmp_path):
    import common
    _write_fake_mnist(tmp_path)
    mnist = common.load_dataset("mnist", str(tmp_path), download=False)
    ds = gs.StackedMNIST(mnist, seed=0)
    x, y = ds[7]
    j = ds.idx[7]
    assert x.shape == (3, 28, 28) and y == 100 * mnist.targets[j[0]] + 10 * mnist.targets[j[1]] + mnist.targets[j[2]]
    assert torch.allclose(x[1], mnist[j[1].item()][0][0], atol=1e-6)            # channel = that digit, in [-1, 1]
    assert not torch.equal(ds.idx[:, 0], ds.idx[:, 1])                         # independent draws per channel
    clf, acc = gs.train_classifier(mnist, common.load_dataset("mnist", str(tmp_path), train=False), 10, "cpu", 0)
    assert acc >= 0.98
    xs = torch.stack([ds[i][0] for i in range(300)])
    ys = torch.tensor([ds[i][1] for i in range(300)])
    modes, kl = gs.digit_modes(xs, clf)
    p = torch.bincount(ys, minlength=1000).double() / 300
    assert modes == len(ys.unique())
    assert kl == pytest.approx((p[p > 0] * (1000 * p[p > 0]).log()).sum().item(), abs=1e-6)
    assert gs.digit_modes(xs[:1].expand(50, -1, -1, -1), clf) == (1, pytest.approx(math.log(1000)))


def _lines(path):
    return [json.loads(ln) for ln in open(path)]


def _same(a, b):
    return {k: v for k, v in a.items() if k != "it_s"} == {k: v for k, v in b.items() if k != "it_s"}


def test_mog8_smoke_resume_determinism(tmp_path):
    argv = TINY["gd_stable.py"]
    m = gs.main(argv + ["--out-dir", str(tmp_path / "a")])
    assert m["step"] == 3 and all(math.isfinite(v) for v in m.values())
    assert {"V", "grad_D", "grad_G", "R", "loss_D", "loss_G", "it_s", "modes", "hq"} <= set(m)
    for f in ("ckpt.pt", "args.json", "reals.png", "samples/0000002.png", "samples/0000003.png"):
        assert (tmp_path / "a" / f).exists(), f
    rng_after_a = torch.get_rng_state()
    b = str(tmp_path / "b")
    gs.main(argv + ["--out-dir", b, "--steps", "2"])
    mb = gs.main(argv + ["--out-dir", b, "--resume"])
    la, lb = _lines(tmp_path / "a" / "metrics.jsonl"), _lines(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in lb] == [1, 2, 3]                                 # each step logged once
    assert all(_same(x, y) for x, y in zip(la, lb)) and _same(m, mb)            # determinism + exact resume
    gs.main(argv + ["--out-dir", str(tmp_path / "c"), "--eta", "0"])
    assert torch.equal(torch.get_rng_state(), rng_after_a)                      # --eta 0: same RNG stream
    assert _lines(tmp_path / "c" / "metrics.jsonl")[0]["loss_D"] == la[0]["loss_D"]


def test_stacked_mnist_smoke_resume(tmp_path):
    _write_fake_mnist(tmp_path / "data")
    argv = ["--dataset", "stacked_mnist", "--data-root", str(tmp_path / "data"), "--device", "cpu", "--deterministic",
            "--batch-size", "8", "--steps", "3", "--g-width", "0.125", "--d-width", "0.125", "--z-dim", "16",
            "--num-workers", "0", "--log-every", "1", "--sample-every", "3", "--ckpt-every", "2",
            "--eval-every", "3", "--mode-samples", "100", "--classifier-steps", "10", "--export-samples", "10"]
    m = gs.main(argv + ["--out-dir", str(tmp_path / "a")])
    assert m["step"] == 3 and all(math.isfinite(v) for v in m.values()) and 1 <= m["modes"] <= 100
    npz = np.load(tmp_path / "a" / "samples_10.npz")["images"]
    assert npz.shape == (10, 28, 28, 3) and npz.dtype == np.uint8
    assert (tmp_path / "a" / "reals.png").exists() and (tmp_path / "a" / "samples" / "0000003.png").exists()
    b = ["--out-dir", str(tmp_path / "b"), "--classifier", str(tmp_path / "a" / "mnist_classifier.pt")]
    gs.main(argv + b + ["--steps", "2"])
    mb = gs.main(argv + b + ["--resume"])
    assert _same(m, mb)                                                         # same batches, z, classifier


def test_shapes_with_the_other_branches(tmp_path):
    # simultaneous plain steps, WGAN with weight clipping, non-saturating G, bf16 autocast: all real flags
    argv = ["--dataset", "shapes", "--device", "cpu", "--deterministic", "--steps", "2", "--batch-size", "4",
            "--g-width", "0.125", "--d-width", "0.125", "--num-workers", "0", "--log-every", "1",
            "--sample-every", "2", "--update", "simultaneous", "--optimizer", "sgd", "--loss", "wgan",
            "--d-clip", "0.01", "--g-objective", "nonsat", "--amp", "bf16", "--out-dir", str(tmp_path)]
    m = gs.main(argv)
    assert m["step"] == 2 and all(math.isfinite(v) for v in m.values())
    D = torch.load(tmp_path / "ckpt.pt", weights_only=True)["D"]
    assert max(v.abs().max().item() for k, v in D.items() if "running" not in k and "num_batches" not in k) <= 0.01
    with pytest.raises(ValueError, match="mode metrics"):
        gs.main(argv[:-2] + ["--eval-every", "5", "--out-dir", str(tmp_path / "x")])


# ---- issue 3: --export-samples and --fid-every (image datasets only) ----
def _tiny_image(dataset, out, *extra):
    return ["--dataset", dataset, "--device", "cpu", "--deterministic", "--batch-size", "4", "--g-width", "0.125",
            "--d-width", "0.125", "--z-dim", "8", "--num-workers", "0", "--sample-every", "0", "--eval-every", "0",
            "--out-dir", str(out), *extra]


def test_export_samples_keep_channels_and_save_image_quantisation(tmp_path):
    import torchvision
    from torchvision.io import read_image
    _write_fake_mnist(tmp_path / "data")
    argv = ["--data-root", str(tmp_path / "data"), "--steps", "1"]
    gs.main(_tiny_image("mnist", tmp_path / "plain", *argv))
    rng_plain = torch.get_rng_state()
    gs.main(_tiny_image("mnist", tmp_path / "a", *argv, "--export-samples", "5"))
    assert torch.equal(torch.get_rng_state(), rng_plain)                       # own generator: training RNG untouched
    x = np.load(tmp_path / "a" / "samples_5.npz")["images"]
    assert x.shape == (5, 28, 28, 1) and x.dtype == np.uint8                    # NHWC, native single channel
    G = gs.DCGANGenerator(8, 1, 28, 0.125)
    G.load_state_dict(torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["G"])
    fake = gs.sample(G, torch.randn(5, 8, generator=torch.Generator().manual_seed(0 + 2)), "cpu")
    assert torch.equal(torch.from_numpy(x[..., 0]), ((fake + 1) * 127.5 + 0.5).to(torch.uint8)[:, 0])  # seed + 2
    with torch.no_grad():
        G.net[-2].weight.mul_(2000)                                              # spread the tiny G's near-0 outputs
    gs.export_samples(G, argparse.Namespace(export_samples=5, z_dim=8, seed=0, out_dir=str(tmp_path)), "cpu")
    x = np.load(tmp_path / "samples_5.npz")["images"]
    fake = gs.sample(G, torch.randn(5, 8, generator=torch.Generator().manual_seed(0 + 2)), "cpu")
    torchvision.utils.save_image(fake, tmp_path / "ref.png", nrow=5, padding=0, normalize=True, value_range=(-1, 1))
    ref = read_image(str(tmp_path / "ref.png"))[0].view(28, 5, 28).permute(1, 0, 2)   # the PNG save_image writes
    assert torch.equal(torch.from_numpy(x[..., 0]), ref) and len(np.unique(x)) > 50 and {0, 255} <= set(x.flat)


def test_fid_every_reaches_fid_for_training_and_leaves_training_alone(fid_recorder, tmp_path):
    argv = ["--steps", "3", "--log-every", "10"]
    m = gs.main(_tiny_image("shapes", tmp_path / "a", *argv, "--fid-every", "2", "--fid-samples", "7",
                            "--fid-weights", "w.pth"))
    rng_fid = torch.get_rng_state()
    assert [c["n"] for c in fid_recorder.calls] == [7, 7] and m["fid"] == 12.0      # steps 2 and 3 (the last)
    assert [(r["step"], r["fid"]) for r in _lines(tmp_path / "a" / "metrics.jsonl")] == [(2, 11.0), (3, 12.0)]
    for c in fid_recorder.calls:
        assert (c["dataset"], c["img_size"], c["weights"], c["class_label"]) == ("shapes", 28, "w.pth", None)
        assert c["shape"] == (3, 3, 28, 28) and -1 <= c["lo"] < c["hi"] <= 1
    plain = gs.main(_tiny_image("shapes", tmp_path / "b", *argv))
    assert torch.equal(torch.get_rng_state(), rng_fid) and _same({k: v for k, v in m.items() if k != "fid"}, plain)


def test_fid_and_export_flags_are_refused_where_they_cannot_work(tmp_path):
    for flag in ("--fid-every", "--export-samples"):
        with pytest.raises(ValueError, match="image datasets"):
            gs.main(TINY["gd_stable.py"] + [flag, "1", "--out-dir", str(tmp_path / "toy")])
    with pytest.raises(ValueError, match="common.load_dataset can load"):
        gs.main(["--dataset", "stacked_mnist", "--fid-every", "5", "--device", "cpu", "--out-dir", str(tmp_path / "s")])
    assert not (tmp_path / "toy").exists() and not (tmp_path / "s").exists()
