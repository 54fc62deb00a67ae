"""avb.py: the card's section 8 invariants, gradient routing, AIS exactness, smoke runs, resume."""

import copy
import json
import math
import struct

import numpy as np
import pytest
import torch

import avb
from tiny_args import TINY

TINY_NETS = ["--width", "4", "--adv-hidden", "16", "--adv-feat", "32", "--z-dim", "4", "--eps-dim", "8",
             "--eps-nbasis", "2"]
EVAL_TINY = ["--device", "cpu", "--ais-chains", "2", "--ais-steps", "4", "--ais-batches", "2",
             "--elbo-batches", "2", "--num-workers", "0"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops only: a second thread buys nothing and is many times slower on a shared, loaded CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_image_nets(ac=True, d=4):
    torch.manual_seed(0)
    return (avb.Encoder(d, eps_dim=8, eps_nbasis=2, width=4, ac=ac), avb.Decoder(d, width=4),
            avb.Adversary(d, hidden=16, feat=32))


def write_fake_mnist(root, n_train=96, n_test=32):
    """MNIST-format idx files in torchvision's raw layout (root/MNIST/raw), random blob images."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx, out = *np.mgrid[:28, :28], {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        cy, cx, r = rng.uniform(8, 20, n), rng.uniform(8, 20, n), rng.uniform(3, 7, n)
        imgs = ((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2 <= r[:, None, None] ** 2) * 255
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28)
                                                         + imgs.astype(np.uint8).tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n)
                                                         + rng.integers(0, 10, n).astype(np.uint8).tobytes())
        out[prefix] = imgs
    return out


def strip_timing(m):
    return {k: v for k, v in m.items() if k not in ("it_s", "eta_s")}


# ---- card section 8, items 1-7 ----
def test_shapes():
    x = torch.randint(0, 2, (5, 1, 28, 28)).float()
    for ac in (True, False):
        enc, dec, T = tiny_image_nets(ac)
        z, mean, var = enc(x)
        assert z.shape == (5, 4) and dec(z).shape == (5, 1, 28, 28) and T(x, z).shape == (5,)
        assert (mean is None) == (not ac) and (ac is False or (mean.shape == var.shape == (5, 4) and (var > 0).all()))
        assert torch.allclose(T(x, z), 0.5 * (z ** 2).sum(1), atol=1e-3)  # std-1e-5 heads: T = log-prior term
    z, mean, var = avb.GaussianEncoder(4, width=4, toy=False)(x)
    assert z.shape == mean.shape == var.shape == (5, 4)
    xt = avb.toy_batch(7, "cpu")
    assert xt.shape == (7, 4) and (xt.sum(1) == 1).all()
    zt = avb.ToyEncoder(2, eps_dim=64, width=64)(xt)[0]
    assert zt.shape == (7, 2) and avb.ToyAdversary(2)(xt, zt).shape == (7,)


def test_ac_moment_estimator():
    """Returned mu, var (batch moments of v_i) match z's mean and variance on fresh noise within 3 SE."""
    torch.manual_seed(0)
    enc = avb.Encoder(3, eps_dim=8, eps_nbasis=2, width=1, ac=True).eval()
    for lin in enc.a:
        torch.nn.init.constant_(lin.bias, 5.0)                           # a_i ~ 1: a visible spread
    x = torch.randint(0, 2, (1, 1, 28, 28)).float().expand(4096, 1, 28, 28)
    with torch.no_grad():
        z, mean, var = enc(x)
        assert torch.allclose(mean, mean[:1].expand_as(mean)) and torch.allclose(z.mean(0), mean[0], atol=1e-5)
        z2 = enc(x)[0]                                                   # independent draws
    n, m2 = z2.shape[0], z2.var(0, unbiased=False)
    se_mean = (m2 / n).sqrt()
    se_var = (((z2 - z2.mean(0)) ** 4).mean(0) - m2 ** 2).clamp_min(0).div(n).sqrt()
    assert (var[0] > 1e-3).all()
    assert ((z2.mean(0) - mean[0]).abs() < 3 * se_mean).all()
    assert ((m2 - var[0]).abs() < 3 * se_var).all()


def test_gaussian_identity_of_ac():
    torch.manual_seed(0)
    mu, sd = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.5, 1.5, 0.3])
    z = mu + sd * torch.randn(100_000, 3)
    mc = avb.contrast_log_ratio(z, (z - mu) / sd, (sd ** 2).expand_as(z)).mean()
    kl = 0.5 * (mu ** 2 + sd ** 2 - 1 - (sd ** 2).log()).sum()
    assert abs(mc / kl - 1) < 0.01
    assert torch.allclose(avb.gaussian_kl(mu[None], sd[None] ** 2)[0], kl)


def test_optimal_adversary_matches_closed_form():
    """Eq. (3.3) trained on q = N(1, 0.5^2) vs p = N(0, 1): T* = log 2 - 2 (z - 1)^2 + z^2 / 2 (Prop. 1)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 32), torch.nn.ELU(), torch.nn.Linear(32, 32), torch.nn.ELU(),
                              torch.nn.Linear(32, 1))
    T = lambda z: net(z).squeeze(1) + 0.5 * (z ** 2).sum(1)             # log prior built in
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / 1000)
    for _ in range(1000):
        loss = avb.adversary_loss(T(1 + 0.5 * torch.randn(512, 1)), T(torch.randn(512, 1)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    zs = torch.tensor([0.0, 0.5, 1.0, 1.5])
    with torch.no_grad():
        err = T(zs[:, None]) - (math.log(2) - 2 * (zs - 1) ** 2 + 0.5 * zs ** 2)
    assert err.abs().max() < 0.1, err


@pytest.mark.parametrize("ac", [True, False])
def test_gradient_routing_and_simultaneous_update(ac):
    """One step: T's Adam moments hold only grad of Eq. (3.3), enc/dec's only grad of Eq. (3.7), all
    computed at the pre-step parameters from the same sample; the adversary loss never reaches phi."""
    enc, dec, T = tiny_image_nets(ac)
    args = avb.derive_defaults(avb.parse_args(["--dataset", "shapes", "--ac" if ac else "--no-ac"]))
    opt_G = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-3, betas=(0.5, 0.999))
    opt_D = torch.optim.Adam(T.parameters(), lr=1e-3, betas=(0.5, 0.999))
    x = torch.randint(0, 2, (6, 1, 28, 28)).float()
    ref = [copy.deepcopy(m) for m in (enc, dec, T)]
    rng = torch.get_rng_state()
    avb.train_step(enc, dec, T, opt_G, opt_D, lambda: x, args, 1 / 784)
    torch.set_rng_state(rng)                                             # replay the same eps, z_p
    t = avb.elbo_terms(*ref, x, ac)
    primal = [*ref[0].parameters(), *ref[1].parameters()]
    g_G = torch.autograd.grad(avb.primal_loss(t["recon"], t["kl"], 1 / 784), primal, retain_graph=True)
    loss_D = avb.adversary_loss(t["T_q"], t["T_p"])
    g_D = torch.autograd.grad(loss_D, list(ref[2].parameters()), retain_graph=True)
    assert all(g is None for g in torch.autograd.grad(loss_D, list(ref[0].parameters()), allow_unused=True))
    for opt, params, grads in ((opt_G, [*enc.parameters(), *dec.parameters()], g_G), (opt_D, list(T.parameters()), g_D)):
        for p, g in zip(params, grads):
            torch.testing.assert_close(opt.state[p]["exp_avg"], 0.5 * g, rtol=1e-4, atol=1e-9)


def test_signs():
    """Raising T on q-pairs raises the primal loss and lowers the adversary loss (Eq. 3.3, 3.7)."""
    torch.manual_seed(0)
    recon, T_q, T_p, r = torch.rand(8) * 100, torch.randn(8), torch.randn(8), torch.randn(8)
    for c in (0.5, 2.0):
        assert avb.primal_loss(recon, T_q + c + r, 0.1) > avb.primal_loss(recon, T_q + r, 0.1)
        assert avb.adversary_loss(T_q + c, T_p) < avb.adversary_loss(T_q, T_p)
    T_q.requires_grad_(True)
    g, = torch.autograd.grad(avb.adversary_loss(T_q, T_p), T_q)
    assert (g < 0).all()                                                 # ascent on T for q-pairs


# ---- AIS on the linear-Gaussian model p(z) = N(0, I2), p(x|z) = N(Wz + b, s^2 I5) ----
def linear_gaussian(W, b, s):
    def log_joint(z, x):
        lx = -0.5 * (((x - z @ W.T - b) / s) ** 2).sum(1) - 5 * math.log(s) - 2.5 * avb.LOG_2PI
        return lx + avb.log_prior(z)

    def log_px(x):
        return torch.distributions.MultivariateNormal(b, W @ W.T + s ** 2 * torch.eye(5, dtype=W.dtype)).log_prob(x)
    return log_joint, log_px


def test_ais_exact_with_true_posterior():
    """r_0 = p(z|x): every increment is (beta_{i+1} - beta_i) log p(x), so the estimate is exact."""
    torch.manual_seed(0)
    Q = torch.linalg.qr(torch.randn(5, 2, dtype=torch.float64))[0]
    c, b, s = torch.tensor([1.5, 0.7], dtype=torch.float64), torch.randn(5, dtype=torch.float64), 0.8
    W = Q * c                                                            # orthogonal columns: diagonal posterior
    log_joint, log_px = linear_gaussian(W, b, s)
    x = torch.randn(6, 5, dtype=torch.float64) * 2
    post_var = 1 / (1 + c ** 2 / s ** 2)
    post_mean = post_var * ((x - b) @ W) / s ** 2
    est = avb.ais_log_likelihood(x, log_joint, post_mean, post_var.sqrt().expand_as(post_mean), n_chains=3,
                                 n_steps=20)
    assert (est - log_px(x)).abs().max() < 1e-4


def test_ais_from_prior_close_to_closed_form():
    """r_0 = prior, K = 500: the mean estimate over 8 examples is within 0.05 nats (per example: 0.25)."""
    torch.manual_seed(1)
    W, b, s = torch.randn(5, 2), torch.randn(5), 1.0
    log_joint, log_px = linear_gaussian(W, b, s)
    x = (W @ torch.randn(2, 8) + b[:, None] + s * torch.randn(5, 8)).T   # (8, 5) drawn from the model
    est = avb.ais_log_likelihood(x, log_joint, torch.zeros(8, 2), torch.ones(8, 2), n_chains=32, n_steps=500)
    err = est - log_px(x)
    assert err.mean().abs() < 0.05 and err.abs().max() < 0.25, err


# ---- data ----
def test_binarization_and_mnist_split(tmp_path):
    imgs = write_fake_mnist(tmp_path)
    args = avb.derive_defaults(avb.parse_args(["--data-root", str(tmp_path), "--val-size", "16"]))
    train, val, test = avb.split_mnist(args)
    assert (len(train), len(val), len(test)) == (80, 16, 32)
    assert torch.allclose((train[0][0][0] + 1) / 2, torch.from_numpy(imgs["train"][16] / 255.0).float())
    assert torch.allclose((val[15][0][0] + 1) / 2, torch.from_numpy(imgs["train"][15] / 255.0).float())
    torch.manual_seed(0)
    x = torch.full((20_000, 1, 2, 2), 2 * 0.3 - 1)                       # intensity 0.3
    b1, b2 = avb.binarize(x), avb.binarize(x)
    assert set(b1.unique().tolist()) <= {0.0, 1.0} and not torch.equal(b1, b2)   # fresh on every read
    assert abs(b1.mean().item() - 0.3) < 3 * math.sqrt(0.3 * 0.7 / b1.numel())
    rgb = torch.rand(2, 3, 28, 28) * 2 - 1                               # shapes stand-in: gray, 1 channel
    assert avb.binarize(rgb).shape == (2, 1, 28, 28)


# ---- runs ----
def toy_argv(tmp_path, *extra):
    return ["--dataset", "toy4", "--device", "cpu", "--batch-size", "64", "--adv-hidden", "32", "--width", "16",
            "--log-every", "10", "--sample-every", "25", "--ckpt-every", "25", "--deterministic",
            "--out-dir", str(tmp_path), *extra]


def test_toy_smoke_determinism_and_resume(tmp_path):
    m = avb.main(toy_argv(tmp_path / "a", "--steps", "50"))
    assert m["step"] == 50 and all(math.isfinite(v) for v in m.values())
    assert m["elbo"] <= 0 and m["elbo"] == pytest.approx(-(m["recon"] + m["kl"]))
    for f in ("ckpt.pt", "metrics.jsonl", "args.json", "reals.png", "samples/0000050.png", "samples/latent_0000050.png"):
        assert (tmp_path / "a" / f).exists(), f
    m2 = avb.main(toy_argv(tmp_path / "b", "--steps", "25"))
    m2 = avb.main(toy_argv(tmp_path / "b", "--steps", "50", "--resume"))
    assert strip_timing(m2) == strip_timing(m)                           # resume == uninterrupted == rerun
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 25, 30, 40, 50]
    res = avb.main(["--evaluate", str(tmp_path / "a" / "ckpt.pt"), *EVAL_TINY])
    assert math.isfinite(res["ais_log_px"]) and res["ais_log_px"] < 0 and res["ais_images"] == 128


def test_mnist_files_smoke_resume_evaluate(tmp_path):
    write_fake_mnist(tmp_path / "data")
    base = ["--dataset", "mnist", "--data-root", str(tmp_path / "data"), "--device", "cpu", "--batch-size", "8",
            *TINY_NETS, "--val-size", "16", "--num-workers", "0", "--log-every", "1", "--sample-every", "2",
            "--ckpt-every", "2", "--deterministic"]
    full = avb.main(base + ["--steps", "3", "--out-dir", str(tmp_path / "full")])
    assert all(math.isfinite(v) for v in full.values())
    assert full["loss_G"] == pytest.approx(-full["elbo"] / 784, rel=1e-5)   # official 1/(H*W*C) scaling
    avb.main(base + ["--steps", "2", "--out-dir", str(tmp_path / "r")])
    resumed = avb.main(base + ["--steps", "3", "--out-dir", str(tmp_path / "r"), "--resume"])
    assert strip_timing(resumed) == strip_timing(full)
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("full", "r"))
    assert all(torch.equal(a["T"][k], b["T"][k]) for k in a["T"])
    assert [json.loads(ln)["step"] for ln in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    res = avb.main(["--evaluate", str(tmp_path / "full" / "ckpt.pt"), "--data-root", str(tmp_path / "data"),
                    *EVAL_TINY])
    assert math.isfinite(res["ais_log_px"]) and math.isfinite(res["elbo_estimate"])
    for extra in (["--no-ac"], ["--model", "vae"]):                      # AVB d=8 form and the VAE baseline
        out = tmp_path / extra[-1]
        m = avb.main(base + extra + ["--steps", "1", "--out-dir", str(out)])
        assert math.isfinite(m["loss_G"]) and (extra[0] != "--no-ac" or m["kl"] == pytest.approx(m["T_q"]))  # KL^ = T
        assert math.isfinite(avb.main(["--evaluate", str(out / "ckpt.pt"), "--data-root", str(tmp_path / "data"),
                                       *EVAL_TINY])["ais_log_px"])


def test_tiny_args_run_offline(tmp_path):
    m = avb.main(TINY["avb.py"] + ["--out-dir", str(tmp_path)])
    assert m["step"] == 2 and all(math.isfinite(v) for v in m.values())
    with pytest.raises(ValueError):
        avb.derive_defaults(avb.parse_args(["--model", "vae", "--ac"]))


# ---- --export-samples and --fid-every (issue 3), images only ----
def test_export_and_fid_wiring_leave_training_unchanged(fid_recorder, tmp_path):
    extra = ["--log-every", "2", "--ckpt-every", "1"]
    plain = avb.main(TINY["avb.py"] + extra + ["--out-dir", str(tmp_path / "plain")])
    m = avb.main(TINY["avb.py"] + extra + ["--out-dir", str(tmp_path / "f"), "--export-samples", "5", "--fid-every",
                                           "1", "--fid-samples", "7", "--fid-weights", "w.pth"])
    assert strip_timing(plain) == {k: v for k, v in strip_timing(m).items() if k != "fid"}   # training RNG untouched
    logged = [json.loads(ln) for ln in (tmp_path / "f" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["fid"]) for r in logged] == [(1, 11.0), (2, 12.0)] and m["fid"] == 12.0  # FID step = log step
    assert all((c["dataset"], c["img_size"], c["n"], c["weights"], c["class_label"], c["shape"]) ==
               ("shapes", 28, 7, "w.pth", None, (3, 1, 28, 28)) and -1 <= c["lo"] < c["hi"] <= 1
               for c in fid_recorder.calls)
    img = np.load(tmp_path / "f" / "samples_5.npz")["images"]
    assert img.dtype == np.uint8 and img.shape == (5, 28, 28, 1)
    args = avb.derive_defaults(avb.parse_args(TINY["avb.py"]))          # round(255 p), p = decoder means
    decoder = avb.build_models(args)[1]
    decoder.load_state_dict(torch.load(tmp_path / "f" / "ckpt.pt", weights_only=True)["decoder"])
    p = torch.sigmoid(decoder(torch.randn(5, args.z_dim, generator=torch.Generator().manual_seed(args.seed + 2))))
    assert np.array_equal(img, (p * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())


@pytest.mark.parametrize("flag", ["--export-samples", "--fid-every"])
def test_toy_rejects_image_only_flags(flag, tmp_path):
    with pytest.raises(ValueError, match="image datasets"):
        avb.main(["--dataset", "toy4", "--device", "cpu", flag, "1", "--out-dir", str(tmp_path)])
