"""gd_stable.py: the card's Sec. 8 checks (exact toy anchors, double backprop, D-step independence,
the real term), every fidelity checklist item through train_step or main, and the run plumbing that
is the script's own (--lr on --resume, --d-steps, exports, load_generator, FID wiring, figures)."""
import copy
import json
import math
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import gd_stable as gs
from tiny_args import TINY

BCE = F.binary_cross_entropy_with_logits


def _rows(d):
    return [json.loads(line) for line in open(d / "metrics.jsonl")]


def _untimed(rows):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


def _main(out, *extra):
    return gs.main([*TINY["gd_stable.py"], "--out-dir", str(out), *extra])


# ---- card Sec. 8, tests 5-8, and checklist 1-5, 9, 11 on small MLP pairs ----
def _pair(seed=0, dtype=torch.float64, width=8):
    torch.manual_seed(seed)
    G, D = gs.MLPGenerator(4, width).to(dtype), gs.MLPDiscriminator(width).to(dtype)
    x = gs.sample_mog8(32, "cpu").to(dtype)
    return G, D, x, torch.randn(32, 4, dtype=dtype)


def _V(G, D, x, z, real=True):
    """An independent V: -(BCE(D(x), 1) + BCE(D(G(z)), 0)), the official form (checklist 1)."""
    d_fake = D(G(z))
    fake = -BCE(d_fake, torch.zeros_like(d_fake))
    return fake - BCE(D(x), torch.ones_like(d_fake)) if real else fake


def _R(G, D, x, z, real=True):
    """||grad_{theta_D} V||^2, written out: checklist 3."""
    grads = torch.autograd.grad(_V(G, D, x, z, real), list(D.parameters()), create_graph=True)
    return sum((g ** 2).sum() for g in grads)


def test_value_and_penalty_match_an_independent_implementation():
    G, D, x, z = _pair(4)
    _, _, out = gs.player_grads(G, D, x, z, eta=0.5, diagnostics=True)
    assert out["V"].item() == pytest.approx(_V(G, D, x, z).item(), rel=1e-12)
    with_real, fake_only = _R(G, D, x, z).item(), _R(G, D, x, z, real=False).item()
    assert out["R"].item() == pytest.approx(with_real, rel=1e-10)     # the real term counts (4)
    assert abs(with_real - fake_only) > 1e-3 * with_real
    # f(t) = t for WGAN: V = E D(x) - E D(G(z))
    _, _, out = gs.player_grads(G, D, x, z, eta=0.0, loss="wgan")
    assert out["V"].item() == pytest.approx((D(x).mean() - D(G(z)).mean()).item(), rel=1e-12)


def test_regularized_g_step_lowers_the_d_gradient_norm():
    def change(eta):                                      # R after - R before one tiny G step
        G, D, x, z = _pair()
        R0 = _R(G, D, x, z).item()
        if eta >= 0:
            g_G, _, _ = gs.player_grads(G, D, x, z, eta=eta)
        else:                                             # the flipped sign of pitfall 1
            loss = _V(G, D, x, z) + eta * _R(G, D, x, z)
            g_G = torch.autograd.grad(loss, list(G.parameters()))
        with torch.no_grad():
            for p, g in zip(G.parameters(), g_G):
                p -= 1e-3 * g
        return _R(G, D, x, z).item() - R0
    assert change(0.5) < change(0.0) < change(-0.5)


def test_g_gradient_is_the_double_backprop_of_v_plus_eta_r():
    D, G = gs.Monomial(0.4), gs.Monomial(1.3)                         # Dirac WGAN: R = theta^2
    x0, z1 = torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)
    (g,), _, _ = gs.player_grads(G, D, x0, z1, eta=0.7, loss="wgan")
    assert g.item() == pytest.approx(-0.4 + 2 * 0.7 * 1.3, abs=1e-12)  # dV/dtheta + eta 2 theta
    G, D, x, z = _pair(1)
    params = list(G.parameters())
    g_G, _, _ = gs.player_grads(G, D, x, z, eta=0.5)
    gen, eps = torch.Generator().manual_seed(0), 1e-6
    for _ in range(3):                                                # central differences
        v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        f = []
        for s in (1, -2, 1):
            with torch.no_grad():
                for p, d in zip(params, v):
                    p += s * eps * d
            f.append((_V(G, D, x, z) + 0.5 * _R(G, D, x, z)).item())
        fd = (f[0] - f[1]) / (2 * eps)
        ad = sum((g * d).sum() for g, d in zip(g_G, v)).item()
        assert abs(fd - ad) / abs(ad) < 1e-4


def _adam(m, lr=1e-2):
    return torch.optim.Adam(m.parameters(), lr=lr, betas=(0.5, 0.999))


def _reference_step(G, D, opt_G, opt_D, batches_D, batch_G, eta, g_objective="minimax"):
    """The official loop written out: D minimizes BCE(real, 1) + BCE(fake, 0) = -V per batch, then
    G minimizes V + eta R (minimax) or -E log sigmoid(D(G(z))) + eta R (nonsat)."""
    for x, z in batches_D:
        opt_D.zero_grad()
        (-_V(G.requires_grad_(False), D, x, z)).backward()
        opt_D.step()
    G.requires_grad_(True)
    x, z = batch_G
    obj = _V(G, D, x, z) if g_objective == "minimax" else F.softplus(-D(G(z))).mean()
    loss = obj + eta * _R(G, D, x, z) if eta else obj
    grads = torch.autograd.grad(loss, list(G.parameters()))
    for p, g in zip(G.parameters(), grads):
        p.grad = g
    opt_G.step()


@pytest.mark.parametrize("eta, g_objective, d_steps", [(0.0, "minimax", 1), (0.5, "minimax", 2),
                                                        (0.5, "nonsat", 1)])
def test_alternating_step_equals_the_official_loop(eta, g_objective, d_steps):
    G, D, x, z = _pair(3, torch.float32)
    batches = [(x.roll(i, 0), z.roll(i, 0)) for i in range(d_steps + 1)]
    G2, D2 = copy.deepcopy(G), copy.deepcopy(D)
    opts = [_adam(m) for m in (G, D, G2, D2)]
    gs.train_step(G, D, opts[0], opts[1], batches[:-1], batches[-1], eta=eta,
                  g_objective=g_objective)
    _reference_step(G2, D2, opts[2], opts[3], batches[:-1], batches[-1], eta, g_objective)
    for a, b in zip([*G.parameters(), *D.parameters()], [*G2.parameters(), *D2.parameters()]):
        assert torch.allclose(a, b, atol=1e-6)                        # checklist 2-6


def test_d_step_does_not_depend_on_eta_and_g_step_does():
    for update in ("simultaneous", "alternating"):
        after = []
        for eta in (0.0, 0.5):
            G, D, x, z = _pair(2, torch.float32)
            opt_G, opt_D = _adam(G), _adam(D)
            gs.train_step(G, D, opt_G, opt_D, [(x, z)], (x.flip(0), z.flip(0)), eta=eta,
                          update=update)
            after.append(([p.detach() for p in D.parameters()], [*G.parameters()]))
        assert all(torch.equal(a, b) for a, b in zip(after[0][0], after[1][0])), update
        assert not all(torch.equal(a, b) for a, b in zip(after[0][1], after[1][1])), update


def test_g_step_uses_the_reals_of_its_own_batch():
    G, D, x, z = _pair(4, torch.float32)
    x2 = gs.sample_mog8(32, "cpu", generator=torch.Generator().manual_seed(9))
    g_plain = [gs.player_grads(G, D, xr, z, eta=0.0)[0] for xr in (x, x2)]
    g_reg = [gs.player_grads(G, D, xr, z, eta=0.5)[0] for xr in (x, x2)]
    assert all(torch.equal(a, b) for a, b in zip(*g_plain))           # minimax V: reals constant
    assert not all(torch.allclose(a, b) for a, b in zip(*g_reg))      # R: the reals count
    outs = []
    for x_g in (x, x2):                                               # the same D step
        G1, D1 = copy.deepcopy(G), copy.deepcopy(D)
        outs.append(gs.train_step(G1, D1, _adam(G1), _adam(D1), [(x, z)], (x_g, z), eta=0.5))
    assert outs[0]["loss_D"] == outs[1]["loss_D"] and outs[0]["V"] != outs[1]["V"]


def test_logged_norms_are_the_official_diagnostics():
    G, D, x, z = _pair(6, torch.float32)
    G0 = copy.deepcopy(G)
    out = gs.train_step(G, D, _adam(G), _adam(D), [(x, z)], (x.flip(0), z.flip(0)), eta=0.5,
                        diagnostics=True)
    xg, zg = x.flip(0), z.flip(0)                     # at the G-step point: D moved, G not yet
    V = _V(G0, D, xg, zg)
    norm = lambda gs_: torch.sqrt(sum((g ** 2).sum() for g in gs_)).item()  # noqa: E731
    assert out["V"].item() == pytest.approx(V.item(), rel=1e-5)
    assert out["grad_D"].item() == pytest.approx(norm(torch.autograd.grad(
        V, list(D.parameters()), retain_graph=True)), rel=1e-4)
    assert out["grad_G"].item() == pytest.approx(norm(torch.autograd.grad(
        V, list(G0.parameters()))), rel=1e-4)                     # of V, not of V + eta R
    assert out["R"].item() == pytest.approx(out["grad_D"].item() ** 2, rel=1e-5)


# ---- checklist 7, 8, 10, 14 through main and the constructors main uses ----
def test_defaults_are_the_official_toy_setting():
    a = gs.parse_args([])
    assert (a.dataset, a.eta, a.loss, a.g_objective, a.update, a.optimizer, a.d_steps) == (
        "mog8", 0.5, "gan", "minimax", "alternating", "adam", 1)
    assert (a.batch_size, a.lr, tuple(a.betas), a.adam_eps, a.steps, a.z_dim) == (
        512, 1e-4, (0.5, 0.999), 1e-8, 100_001, 256)
    assert (a.g_width, a.d_width, a.eval_every, a.mode_samples) == (128, 128, 1000, 2500)
    b = gs.parse_args(["--dataset", "stacked_mnist"])
    assert (b.batch_size, b.lr, b.steps, b.z_dim, b.img_size, b.g_width, b.mode_samples) == (
        64, 2e-4, 50_000, 100, 28, 64, 26_000)


def test_help_groups_and_refused_flag_combinations(capsys):
    with pytest.raises(SystemExit):
        gs.parse_args(["--help"])
    heads = [s for s in capsys.readouterr().out.splitlines() if s.endswith(":") and s[0] != " "]
    assert heads[-3:] == ["paper:", "eval:", "run:"]
    for argv, message in ((["--fid-every", "5"], "--fid-every needs"),
                          (["--dataset", "stacked_mnist", "--fid-every", "5"], "--fid-every needs"),
                          (["--dataset", "shapes", "--eval-every", "5"], "mode metrics exist"),
                          (["--update", "simultaneous", "--d-steps", "2"], "alternating only"),
                          (["--dataset", "cifar10", "--img-size", "28"], "needs --img-size 32"),
                          (["--betas", "0.5", "1"], "must be < 1"),
                          (["--dataset", "imagenet"], "unknown dataset")):
        with pytest.raises(SystemExit):
            gs.parse_args(argv)
        assert message in capsys.readouterr().err.strip().splitlines()[-1], argv


def test_mog8_data_and_networks():
    torch.manual_seed(0)
    c = gs.MOG8_CENTERS
    assert torch.allclose(c.norm(dim=1), torch.full((8,), 2.0))
    assert torch.allclose(c[2], torch.tensor([2.0, 0.0]), atol=1e-6)  # angle pi/2: (2 sin, 2 cos)
    x = gs.sample_mog8(16000, "cpu", generator=torch.Generator().manual_seed(0))
    d, k = torch.cdist(x, c).min(1)
    assert (x - c[k]).std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.bincount(k, minlength=8).min() > 1800
    args = gs.parse_args(["--device", "cpu"])
    G, D, opt_G, opt_D = gs.build_models(args, 2, "cpu")
    assert [m.weight.shape for m in G if hasattr(m, "weight")] == [(128, 256), (128, 128), (2, 128)]
    assert [type(m) for m in G][1::2] == [torch.nn.ReLU, torch.nn.ReLU]
    assert [m.weight.shape for m in D if hasattr(m, "weight")] == [(128, 2), (1, 128)]
    for W in [m.weight for m in [*G, *D] if hasattr(m, "weight")]:   # orthogonal, gain 0.8
        small = W @ W.T if W.shape[0] <= W.shape[1] else W.T @ W
        assert torch.allclose(small, 0.64 * torch.eye(len(small)), atol=1e-5)
    assert all(m.bias.abs().max() == 0 for m in [*G, *D] if hasattr(m, "bias"))
    assert torch.allclose(D(x[:5]), D[2](torch.relu(D[0](x[:5] / 4))))  # x / 4, an unbounded logit
    far = torch.tensor([[4000.0, 0.0]])                               # zero biases: D(c x) = c D(x)
    assert D(far).item() == pytest.approx(100 * D(far / 100).item(), rel=1e-4) and D(far).abs() > 1


def test_mog8_mode_metric_three_sigma_and_one_percent():
    x = gs.sample_mog8(2500, "cpu", generator=torch.Generator().manual_seed(1))
    modes, hq = gs.mog8_modes(x)
    assert modes == 8 and hq == pytest.approx(1 - math.exp(-4.5), abs=0.01)  # P(r < 3 sigma), 2-D
    c = gs.MOG8_CENTERS
    for n7, expected in ((25, 8), (24, 7)):          # mode 7 holds exactly 1% / just under 1%
        pts = torch.cat([c[torch.arange(2500 - n7) % 7], c[7:].expand(n7, 2)])
        assert gs.mog8_modes(pts)[0] == expected
    shifted = c + torch.tensor([0.059, 0.0])                          # 2.95 sigma: high quality
    assert gs.mog8_modes(shifted.repeat(10, 1)) == (8, 1.0)
    assert gs.mog8_modes(c + torch.tensor([0.061, 0.0])) == (0, 0.0)  # 3.05 sigma: not


def _official_run(steps, eta, d_steps, batch=64, z_dim=8, width=16):
    """The official gaussian-toy loop written out, from the seed main sets (checklist 8, 10)."""
    torch.manual_seed(0)
    G, D = gs.MLPGenerator(z_dim, width), gs.MLPDiscriminator(width)
    opt_G, opt_D = (torch.optim.Adam(m.parameters(), lr=1e-4, betas=(0.5, 0.999), eps=1e-8)
                    for m in (G, D))
    for _ in range(steps):
        draw = lambda: (gs.sample_mog8(batch, "cpu"), torch.randn(batch, z_dim))  # noqa: E731
        _reference_step(G, D, opt_G, opt_D, [draw() for _ in range(d_steps)], draw(), eta)
    return G, D


@pytest.mark.parametrize("eta, d_steps", [(0.0, 1), (0.5, 2)])
def test_main_runs_the_official_loop(tmp_path, eta, d_steps):
    _main(tmp_path, "--eta", str(eta), "--d-steps", str(d_steps), "--sample-every", "0")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    G, D = _official_run(3, eta, d_steps)
    for net, key in ((G, "G"), (D, "D")):
        for name, p in net.state_dict().items():
            assert torch.allclose(state[key][name], p, atol=1e-6), (key, name)


def test_optimizer_flags_reach_both_players(tmp_path):
    _main(tmp_path, "--steps", "1", "--lr", "3e-4", "--betas", "0.6", "0.95", "--adam-eps", "1e-6")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    for key in ("opt_G", "opt_D"):
        group = state[key]["param_groups"][0]
        assert (group["lr"], tuple(group["betas"]), group["eps"]) == (3e-4, (0.6, 0.95), 1e-6)


def test_new_lr_on_resume_takes_effect_and_other_flags_are_refused(tmp_path, capsys):
    _main(tmp_path / "a", "--steps", "2")
    with pytest.raises(common.UserError, match="cannot change --eta"):
        _main(tmp_path / "a", "--resume", "--eta", "0.1")
    _main(tmp_path / "a", "--resume", "--lr", "5e-4")
    assert "--lr 0.0001 -> 0.0005 (takes effect)" in capsys.readouterr().out
    state = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    assert all(state[k]["param_groups"][0]["lr"] == 5e-4 for k in ("opt_G", "opt_D"))


def test_mog8_run_logs_resumes_exactly_and_eta_zero_keeps_the_rng_stream(tmp_path):
    m = _main(tmp_path / "a", "--eval-every", "2")
    assert m["step"] == 3 and all(math.isfinite(v) for v in m.values())
    assert {"V", "grad_D", "grad_G", "R", "loss_D", "loss_G", "modes", "hq"} <= set(m)  # (11)
    assert [("modes" in r) for r in _rows(tmp_path / "a")] == [False, True, True]
    rng_a = torch.get_rng_state()
    _main(tmp_path / "b", "--eval-every", "2", "--steps", "2")
    _main(tmp_path / "b", "--eval-every", "2", "--resume")
    assert _untimed(_rows(tmp_path / "a")) == _untimed(_rows(tmp_path / "b"))
    _main(tmp_path / "c", "--eta", "0")
    assert torch.equal(torch.get_rng_state(), rng_a)                  # --eta 0: same stream (10)
    assert _rows(tmp_path / "c")[0]["loss_D"] == _rows(tmp_path / "a")[0]["loss_D"]


def test_mog8_figures_export_and_load_generator(tmp_path):
    from PIL import Image
    _main(tmp_path, "--export-samples", "50")
    for name in ("reals.png", "samples/0000002.png", "samples/0000003.png", "curves.png"):
        assert (tmp_path / name).exists(), name
    plot = np.asarray(Image.open(tmp_path / "samples" / "0000003.png"))[-320:]  # below the strip
    G = gs.load_generator(tmp_path / "ckpt.pt")
    px = lambda p: plot[round((3 - p[1]) / 6 * 319), round((p[0] + 3) / 6 * 319)]  # noqa: E731
    assert tuple(px((0.0, 2.0))) == common.REAL_RGB                   # real: orange (mode k = 0)
    fake = G(torch.randn(512, 8, generator=torch.Generator().manual_seed(0))).detach()
    assert tuple(px(fake[-1].tolist())) == common.FAKE_RGB            # generated: green, on top
    pts = np.load(tmp_path / "samples_50.npz")["points"]
    z = torch.randn(50, 8, generator=torch.Generator().manual_seed(0 + 2))
    assert not G.training and np.allclose(pts, G(z).detach().numpy(), atol=1e-6)
    args_json = (tmp_path / "args.json").read_bytes()
    _main(tmp_path, "--resume", "--export-samples", "20")             # a finished run
    assert (tmp_path / "samples_20.npz").exists() and (tmp_path / "args.json").read_bytes() == \
        args_json


# ---- stacked MNIST on a small MNIST-format file set (checklist 13) ----
def _write_fake_mnist(root, n_train=400, n_test=200):
    """Learnable digits: class k is a bright bar at rows 4 + 2k on faint noise (idx files)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        y = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        x = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
        for i, k in enumerate(y):
            x[i, 4 + 2 * k: 6 + 2 * k, 3:25] = 255
        header = struct.pack(">IIII", 2051, n, 28, 28)
        (raw / f"{split}-images-idx3-ubyte").write_bytes(header + x.tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + y.tobytes())


def test_stacked_mnist_dataset_and_mode_metric(tmp_path, capsys):
    _write_fake_mnist(tmp_path)
    mnist = common.load_dataset("mnist", str(tmp_path), download=False)
    ds = gs.StackedMNIST(mnist, seed=0)
    x, y = ds[7]
    j = ds.idx[7]
    assert x.shape == (3, 28, 28)
    assert y == 100 * mnist.targets[j[0]] + 10 * mnist.targets[j[1]] + mnist.targets[j[2]]
    assert torch.allclose(x[1], mnist[j[1].item()][0][0], atol=1e-6)  # channel = digit, [-1, 1]
    assert (ds.idx[:, 0] != ds.idx[:, 1]).float().mean() > 0.9        # independent per channel
    test = common.load_dataset("mnist", str(tmp_path), train=False, download=False)
    clf, acc = gs.train_classifier(mnist, test, 10, "cpu", 0)
    assert acc >= 0.98 and "MNIST classifier 10/10" in capsys.readouterr().out  # Progress line
    xs = torch.stack([ds[i][0] for i in range(300)])
    ys = torch.tensor([ds[i][1] for i in range(300)])
    modes, kl = gs.digit_modes(xs, clf)
    p = torch.bincount(ys, minlength=1000).double() / 300
    assert modes == len(ys.unique())
    assert kl == pytest.approx((p[p > 0] * (1000 * p[p > 0]).log()).sum().item(), abs=1e-6)
    assert gs.digit_modes(xs[:1].expand(50, -1, -1, -1), clf) == (1, pytest.approx(math.log(1000)))


def test_a_weak_classifier_is_refused_before_the_run_starts(tmp_path):
    _write_fake_mnist(tmp_path / "data")
    with pytest.raises(common.UserError, match="accuracy .* < 0.98: raise --classifier-steps"):
        gs.main(["--dataset", "stacked_mnist", "--data-root", str(tmp_path / "data"), "--device",
                 "cpu", "--classifier-steps", "1", "--out-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_stacked_mnist_run_resumes_exactly(tmp_path):
    _write_fake_mnist(tmp_path / "data")
    argv = ["--dataset", "stacked_mnist", "--data-root", str(tmp_path / "data"), "--device", "cpu",
            "--deterministic", "--batch-size", "8", "--steps", "3", "--g-width", "8",
            "--d-width", "8", "--z-dim", "16", "--num-workers", "0", "--log-every", "1",
            "--sample-every", "3", "--ckpt-every", "2", "--eval-every", "3", "--mode-samples",
            "100", "--classifier-steps", "10", "--export-samples", "10"]
    m = gs.main(argv + ["--out-dir", str(tmp_path / "a")])
    assert m["step"] == 3 and all(math.isfinite(v) for v in m.values()) and 1 <= m["modes"] <= 100
    x = np.load(tmp_path / "a" / "samples_10.npz")["images"]
    assert x.shape == (10, 28, 28, 3) and x.dtype == np.uint8
    assert (tmp_path / "a" / "reals.png").exists() and (tmp_path / "a" / "samples" /
                                                         "0000003.png").exists()
    gs.main(argv + ["--out-dir", str(tmp_path / "b"), "--steps", "2"])
    gs.main(argv + ["--out-dir", str(tmp_path / "b"), "--resume"])   # same batches, z, classifier
    a, b = _untimed(_rows(tmp_path / "a")), _untimed(_rows(tmp_path / "b"))
    del b[1]["modes"], b[1]["kl"]                                     # run b's end at step 2
    assert a == b and "modes" in a[2]


def test_image_export_is_common_quantize_and_load_generator_rebuilds_g(tmp_path):
    _write_fake_mnist(tmp_path / "data")
    argv = ["--dataset", "mnist", "--data-root", str(tmp_path / "data"), "--device", "cpu",
            "--batch-size", "4", "--g-width", "8", "--d-width", "8", "--z-dim", "8", "--steps", "1",
            "--num-workers", "0", "--sample-every", "0", "--eval-every", "0"]
    gs.main(argv + ["--out-dir", str(tmp_path / "plain")])
    rng_plain = torch.get_rng_state()
    gs.main(argv + ["--out-dir", str(tmp_path / "a"), "--export-samples", "5"])
    assert torch.equal(torch.get_rng_state(), rng_plain)              # own generator
    x = np.load(tmp_path / "a" / "samples_5.npz")["images"]
    assert x.shape == (5, 28, 28, 1) and x.dtype == np.uint8          # NHWC, native channel
    G = gs.load_generator(tmp_path / "a" / "ckpt.pt")
    assert not G.training and G.config["channels"] == 1
    fake = G(torch.randn(5, 8, generator=torch.Generator().manual_seed(0 + 2)))
    assert np.array_equal(x, common.quantize(fake).numpy())


def test_fid_every_builds_at_start_up_and_leaves_training_alone(fid_recorder, tmp_path):
    argv = ["--dataset", "shapes", "--device", "cpu", "--deterministic", "--batch-size", "4",
            "--g-width", "8", "--d-width", "8", "--z-dim", "8", "--num-workers", "0",
            "--sample-every", "0", "--steps", "3", "--log-every", "10"]
    m = gs.main(argv + ["--out-dir", str(tmp_path / "a"), "--fid-every", "2", "--fid-samples",
                        "12", "--fid-weights", "w.pth"])
    rng_fid = torch.get_rng_state()
    (built,) = fid_recorder.built
    assert (built["dataset"], built["img_size"], built["n_samples"], built["weights"]) == (
        "shapes", 28, 12, "w.pth")
    assert [(r["step"], r["fid"], r["is"]) for r in _rows(tmp_path / "a")] == [
        (2, 11.0, 1.1), (3, 12.0, 1.2)] and m["is_std"] == 0.1        # steps 2 and 3 (the last)
    assert all(c["shape"] == (3, 3, 28, 28) and -1 <= c["lo"] < c["hi"] <= 1
               for c in fid_recorder.calls)
    plain = gs.main(argv + ["--out-dir", str(tmp_path / "b")])
    assert torch.equal(torch.get_rng_state(), rng_fid)
    assert {k: v for k, v in m.items() if k not in ("fid", "is", "is_std", "time_s")} == \
        {k: v for k, v in plain.items() if k != "time_s"}


def test_fid_every_without_fid_py_is_one_message(monkeypatch, tmp_path):
    import sys
    monkeypatch.setitem(sys.modules, "fid", None)                     # import fid fails
    with pytest.raises(common.UserError, match="needs fid.py"):
        gs.main(["--dataset", "shapes", "--device", "cpu", "--fid-every", "2", "--out-dir",
                 str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_shapes_with_the_other_branches(tmp_path):
    # simultaneous plain steps, WGAN with weight clipping, non-saturating G, bf16: real flags
    m = gs.main(["--dataset", "shapes", "--device", "cpu", "--deterministic", "--steps", "2",
                 "--batch-size", "4", "--g-width", "8", "--d-width", "8", "--num-workers", "0",
                 "--log-every", "1", "--sample-every", "2", "--update", "simultaneous",
                 "--optimizer", "sgd", "--loss", "wgan", "--d-clip", "0.01", "--g-objective",
                 "nonsat", "--amp", "bf16", "--out-dir", str(tmp_path)])
    assert m["step"] == 2 and all(math.isfinite(v) for v in m.values())
    D = torch.load(tmp_path / "ckpt.pt", weights_only=True)["D"]
    assert max(v.abs().max().item() for k, v in D.items() if v.is_floating_point()
               and "running" not in k) <= 0.01


# ---- card Sec. 8, tests 1-4 (last: the slowest): the toys through train_step; checklist 12 ----
def test_dirac_wgan_spectral_radii():
    # eta = 0: map [[1, h], [-h, 1]], radius sqrt(1 + h^2)^k; eta = 0.5: [[1 - 2 h eta, h], [-h, 1]]
    ps, th = gs.toy_run("dirac", "wgan", 0.0, 0.1, 100, 0.0, 1.0)
    assert math.hypot(th, ps) == pytest.approx(1.01 ** 50, rel=1e-9)             # 1.6446
    assert math.hypot(*gs.toy_run("dirac", "wgan", 0.0, 0.1, 900, ps, th)) > 100  # 144.77
    ps, th = gs.toy_run("dirac", "wgan", 0.5, 0.1, 100, 0.0, 1.0)
    assert math.hypot(th, ps) == pytest.approx(0.0107, abs=1e-3)
    assert math.hypot(*gs.toy_run("dirac", "wgan", 0.5, 0.1, 900, ps, th)) < 1e-10


def test_simultaneous_step_is_the_linear_map():
    h, eta, th, ps = 0.1, 0.5, 0.7, -0.3
    ps1, th1 = gs.toy_run("dirac", "wgan", eta, h, 1, ps, th)
    # both gradients taken at (th, ps) before either player moves (checklist 9)
    assert th1 == pytest.approx((1 - 2 * h * eta) * th + h * ps, abs=1e-15)
    assert ps1 == pytest.approx(-h * th + ps, abs=1e-15)


def test_dirac_gan_radii():
    ps, th = gs.toy_run("dirac", "gan", 0.0, 0.1, 100, 0.0, 1.0)
    assert math.hypot(th, ps) == pytest.approx(1.1125, abs=1e-3)
    assert math.hypot(*gs.toy_run("dirac", "gan", 0.0, 0.1, 900, ps, th)) == pytest.approx(
        2.4117, abs=1e-3)
    ps, th = gs.toy_run("dirac", "gan", 0.5, 0.1, 100, 0.0, 1.0)
    assert math.hypot(th, ps) == pytest.approx(0.3516, abs=1e-3)
    assert math.hypot(*gs.toy_run("dirac", "gan", 0.5, 0.1, 900, ps, th)) < 1e-4


def test_uniform_quadratic_wgan_field_and_orbit():
    w = torch.tensor([0.3, -0.7, 1.2], dtype=torch.float64)
    a = torch.tensor([1.0, 0.4, 1.7], dtype=torch.float64)
    for eta in (0.0, 0.5):
        dw, da = gs.uniform_quadratic_field("wgan", eta, w, a)
        assert torch.allclose(dw, (1 - a ** 2) / 3, atol=1e-12)                   # dV/dw
        assert torch.allclose(da, 2 * w * a / 3 + 4 * eta / 9 * a * (1 - a ** 2), atol=1e-12)
    H = lambda w, a: w * w + a * a / 2 - math.log(a)                   # conserved by the flow
    assert H(0.3, 1.0) == pytest.approx(0.59)
    w1, a1 = gs.toy_run("uniform", "wgan", 0.0, 0.05, 1000, 0.3, 1.0)
    assert H(w1, a1) == pytest.approx(0.7695, abs=1e-3)
    w1, a1 = gs.toy_run("uniform", "wgan", 0.5, 0.05, 1000, 0.3, 1.0)
    assert math.hypot(w1, a1 - 1) < 1e-4                                          # 7.0e-6


def test_uniform_quadratic_gan_quadrature_converges():
    w, a = gs.toy_run("uniform", "gan", 0.0, 0.05, 1000, 0.3, 1.0)
    assert math.hypot(w, a - 1) == pytest.approx(2.54e-2, abs=1e-3)
    w, a = gs.toy_run("uniform", "gan", 0.0, 0.05, 4000, w, a)                    # 5000 in all
    assert math.hypot(w, a - 1) < 1e-5


def test_streamline_figure_has_labelled_panels(tmp_path):
    from PIL import Image
    gs.streamline_figure(tmp_path / "s.png", eta=0.5, size=64, grid=3, n_steps=20)
    img = np.asarray(Image.open(tmp_path / "s.png"))
    panel = img[-64:]                                                  # the four panels, bottom
    assert img.shape[1] == 4 * 240 and img.shape[0] > 64 + 3 * 14     # title strips above
    assert (panel[:, :64] < 200).all(axis=2).any()                    # lines were drawn
    red = (panel[..., 0] > 200) & (panel[..., 1] < 60)
    assert red[:, :240].any() and red[:, 720:].any()                  # the equilibrium, each panel
