"""avb.py: every item of the card's fidelity checklist (section 7) through the code a run uses
(main, train_step, the model classes main builds), the card's section 8 tests, AIS, resume."""

import copy
import json
import math
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import avb
import common
from tiny_args import TINY

TINY_NETS = ["--g-width", "4", "--d-width", "16", "--adv-feat", "32", "--z-dim", "4",
             "--eps-dim", "8", "--eps-nbasis", "2"]
EVAL_TINY = ["--device", "cpu", "--ais-chains", "2", "--ais-steps", "4", "--ais-batches", "2",
             "--elbo-batches", "2", "--num-workers", "0"]
F64 = torch.float64


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
        d2 = (yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2
        imgs = (d2 <= r[:, None, None] ** 2) * 255
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, n, 28, 28) + imgs.astype(np.uint8).tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 2049, n) + rng.integers(0, 10, n).astype(np.uint8).tobytes())
        out[prefix] = imgs
    return out


def untimed(m):
    return {k: v for k, v in m.items() if k != "time_s"}


def rows(d):
    return [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()]


# ---- checklist 1, 6, 10: the encoders are samplers; the AC basis-vector form ----
@pytest.mark.parametrize("kind", ["conv0", "conv0_ac", "toy"])
def test_encoder_is_a_sampler_noise_enters_the_network(kind):
    torch.manual_seed(0)
    if kind == "toy":
        enc, x = avb.ToyEncoder(2, eps_dim=64, width=16), avb.toy_batch(5, "cpu")
        eps = [torch.randn(5, 64) for _ in range(2)]
    else:
        enc = avb.Encoder(4, eps_dim=8, eps_nbasis=2, width=4, ac=kind == "conv0_ac").eval()
        x = torch.randint(0, 2, (5, 1, 28, 28)).float()
        shape = (2, 5, 8) if kind == "conv0_ac" else (5, 8)
        eps = [torch.randn(shape) for _ in range(2)]
    z1, z2, z1b = enc(x, eps[0])[0], enc(x, eps[1])[0], enc(x, eps[0])[0]
    assert torch.equal(z1, z1b) and (z1 - z2).abs().max() > 1e-3       # z = z_phi(x, eps)
    assert (enc(x)[0] - enc(x)[0]).abs().max() > 1e-3                  # fresh noise per call


def test_conv0_encoder_adds_noise_after_every_conv_on_centred_input():
    """Card 2.5: conv (no activation) + Linear(eps), then ELU, 4 times; input 2x - 1."""
    torch.manual_seed(0)
    enc, x, eps = avb.Encoder(4, 8, 2, 4, ac=False), torch.randint(0, 2, (3, 1, 28, 28)).float(), \
        torch.randn(3, 8)
    h = 2 * x - 1
    for conv, inj in zip(enc.convs, enc.inject):
        h = conv(h)
        h = F.elu(h + inj(eps).view_as(h))
    torch.testing.assert_close(enc(x, eps)[0], enc.fc(h.flatten(1)))
    assert [c.stride[0] for c in enc.convs] == [1, 1, 2, 2] and enc.convs[0].kernel_size == (5, 5)


def test_ac_encoder_form_and_moments():
    """z = z0 + sum a_i v_i with a_i = ELU(. - 5) + 1; E[z|x], Var[z|x] from divide-by-B batch
    moments of v_i (card 2.3, checklist 6); the trunk sees 2x - 1 with BN on convs 1-3 only."""
    torch.manual_seed(0)
    enc = avb.Encoder(3, eps_dim=8, eps_nbasis=2, width=2, ac=True).eval()
    for lin in enc.a:                                                    # a_i = ELU(-5) + 1 = e^-5
        torch.nn.init.zeros_(lin.weight)
        torch.nn.init.zeros_(lin.bias)
    x, eps = torch.randint(0, 2, (5, 1, 28, 28)).float(), torch.randn(2, 5, 8)
    z, mean, var = enc(x, eps)
    h = 2 * x - 1
    for i, conv in enumerate(enc.trunk.convs):
        h = F.elu(enc.trunk.bns[i](conv(h)) if i < 3 else conv(h))
    z0, v, a = enc.z0(h.flatten(1)), enc.v(eps), math.exp(-5)
    torch.testing.assert_close(z, z0 + a * v.sum(0))
    torch.testing.assert_close(mean, z0 + a * v.mean(1).sum(0))
    var_v = ((v - v.mean(1, keepdim=True)) ** 2).mean(1)                  # divide-by-B
    torch.testing.assert_close(var, (a ** 2 * var_v.sum(0)).expand_as(var))
    assert len(enc.trunk.bns) == 3 and enc.trunk.bns[0].momentum == 0.001
    assert enc.trunk.bns[0].eps == 1e-3


def test_ac_moment_estimator():
    """Card 8.2: mu, var match z's mean and variance on fresh noise within 3 standard errors."""
    torch.manual_seed(0)
    enc = avb.Encoder(3, eps_dim=8, eps_nbasis=2, width=1, ac=True).eval()
    for lin in enc.a:
        torch.nn.init.constant_(lin.bias, 5.0)                           # a_i ~ 1: a visible spread
    x = torch.randint(0, 2, (1, 1, 28, 28)).float().expand(4096, 1, 28, 28)
    with torch.no_grad():
        z, mean, var = enc(x)
        z2 = enc(x)[0]                                                   # independent draws
    assert torch.allclose(mean, mean[:1].expand_as(mean)) and (var[0] > 1e-3).all()
    n, m2 = z2.shape[0], z2.var(0, unbiased=False)
    se_var = (((z2 - z2.mean(0)) ** 4).mean(0) - m2 ** 2).clamp_min(0).div(n).sqrt()
    assert ((z2.mean(0) - mean[0]).abs() < 3 * (m2 / n).sqrt()).all()
    assert ((m2 - var[0]).abs() < 3 * se_var).all()


def test_gaussian_identity_of_ac():
    """Card 8.3: E[log r_alpha - log p] over z ~ N(mu, sd^2) = KL(N(mu, sd^2), N(0, I))."""
    torch.manual_seed(0)
    mu, sd = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.5, 1.5, 0.3])
    z = mu + sd * torch.randn(100_000, 3)
    mc = avb.contrast_log_ratio(z, (z - mu) / sd, (sd ** 2).expand_as(z)).mean()
    kl = 0.5 * (mu ** 2 + sd ** 2 - 1 - (sd ** 2).log()).sum()
    assert abs(mc / kl - 1) < 0.01
    torch.testing.assert_close(avb.gaussian_kl(mu[None], sd[None] ** 2)[0], kl)


# ---- checklist 2, 11, 17: adversary, decoder, toy nets, full-size shapes ----
def test_shapes_and_adversary_starts_at_the_log_prior():
    x = torch.randint(0, 2, (5, 1, 28, 28)).float()
    for ac in (True, False):
        enc, dec, T = tiny_image_nets(ac)
        z, mean, var = enc(x)
        assert z.shape == (5, 4) and dec(z).shape == (5, 1, 28, 28) and T(x, z).shape == (5,)
        assert (mean is None) == (not ac)
        assert not ac or (mean.shape == var.shape == (5, 4) and (var > 0).all())
        torch.testing.assert_close(T(x, z), 0.5 * (z ** 2).sum(1), atol=1e-3, rtol=0)  # 1e-5 heads
    z, mean, var = avb.GaussianEncoder(4, width=4, toy=False)(x)
    assert z.shape == mean.shape == var.shape == (5, 4)
    xt = avb.toy_batch(7, "cpu")
    assert xt.shape == (7, 4) and (xt.sum(1) == 1).all()
    zt = avb.ToyEncoder(2, eps_dim=64, width=64)(xt)[0]
    T, h = avb.ToyAdversary(2), None
    h = F.elu(T.inp(torch.cat([xt, zt], 1)))
    for _ in range(5):
        h = F.elu(h + 0)                                                 # residual branches: 0
    torch.testing.assert_close(T(xt, zt), T.out(h).squeeze(1) + (zt ** 2).sum(1))   # ||z||^2


def test_adversary_form():
    """T = sum theta(x) s(z) (ELU on theta) + T_x + T_z + 1/2 ||z||^2, 3 x LeakyReLU(0.2) towers."""
    torch.manual_seed(0)
    T = avb.Adversary(3, hidden=8, feat=16)
    for head in (T.theta[-1], T.T_x[-1], T.T_z[-1]):
        assert head.weight.abs().max() <= 2e-5                           # std 1e-5, cut at 2 sd
        torch.nn.init.normal_(head.weight)
    x, z = torch.randint(0, 2, (6, 1, 28, 28)).float(), torch.randn(6, 3)
    xf = x.flatten(1)                                                    # x in {0, 1}, not centred
    ref = ((F.elu(T.theta(xf)) * T.s(z)).sum(1) + T.T_x(xf)[:, 0] + T.T_z(z)[:, 0]
           + 0.5 * (z ** 2).sum(1))
    torch.testing.assert_close(T(x, z), ref)
    slopes = [m.negative_slope for m in T.modules() if isinstance(m, torch.nn.LeakyReLU)]
    assert slopes == [0.2] * 12 and len(T.theta) == 7


def test_decoder_architecture():
    """Linear + ELU -> 8w x 7 x 7 -> ConvT 5x5 4w s2, 2w s2, w s1 (ReLU each) -> 1 s1 logits."""
    torch.manual_seed(0)
    dec = avb.Decoder(4, width=4)
    convs = [m for m in dec.net if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0], c.kernel_size[0]) for c in convs] == [
        (32, 16, 2, 5), (16, 8, 2, 5), (8, 4, 1, 5), (4, 1, 1, 5)]
    assert [type(m) for m in dec.net][1::2] == [torch.nn.ReLU] * 3 and len(dec.net) == 7
    z = torch.randn(3, 4)
    torch.testing.assert_close(dec(z), dec.net(F.elu(dec.fc(z)).view(3, 32, 7, 7)))


def test_full_size_defaults_and_parameter_counts():
    """The card's defaults (2.6) and the official sizes, counted on the meta device (no memory)."""
    img, toy = (avb.parse_args(a) for a in ([], ["--dataset", "toy4"]))
    assert (img.z_dim, img.eps_dim, img.eps_nbasis, img.ac, img.batch_size, img.lr, img.lr_d,
            img.betas, img.update, img.val_size, img.g_width, img.d_width, img.adv_feat) == (
        32, 64, 32, True, 128, 5e-5, 1e-4, [0.5, 0.999], "simultaneous", 5000, 64, 1024, 8192)
    assert (toy.z_dim, toy.eps_dim, toy.ac, toy.batch_size, toy.lr, toy.lr_d, toy.betas,
            toy.update, toy.d_steps, toy.steps, toy.d_width, toy.g_width) == (
        2, 64, False, 512, 2e-5, 1e-4, [0.9, 0.999], "alternating", 2, 100_000, 256, 64)
    assert (img.ais_chains, img.ais_steps, img.ais_batches, img.ais_eps, img.ais_schedule,
            img.elbo_batches) == (8, 2000, 20, 0.01, "linear", 200)
    with torch.device("meta"):
        enc, dec, T = avb.build_models(img, "meta")
        tenc, tdec, tT = avb.build_models(toy, "meta")
    n = lambda m: sum(p.numel() for p in m.parameters())
    tower = lambda i, o: i * 1024 + 2 * 1024 ** 2 + 1024 * o + 3 * 1024 + o
    assert n(T) == tower(784, 8192) + tower(32, 8192) + tower(784, 1) + tower(32, 1)
    assert n(dec) == 33 * 25088 + 25 * (512 * 256 + 256 * 128 + 128 * 64 + 64) + 256 + 128 + 64 + 1
    assert n(tenc) == 69 * 64 + 2 * 65 * 64 + 65 * 2 and n(tdec) == 3 * 64 + 2 * 65 * 64 + 65 * 4
    assert n(tT) == 7 * 256 + 5 * 2 * 257 * 256 + 257
    assert n(enc) > 30 * 25088 * 32                                      # z0 + 32 a_i heads


# ---- checklist 3, 4, 5, 7, 8 (simultaneous): one train_step against the equations ----
def reference_losses(enc, dec, T, x, ac):
    """Eq. (3.7) and (3.3) written out from the card (2.3, 2.4), independently of elbo_terms."""
    z, mean, var = enc(x)
    recon = F.binary_cross_entropy_with_logits(dec(z), x, reduction="none").sum((1, 2, 3))
    if ac:
        mu, v = mean.detach(), var.detach()
        zt = (z - mu) / (v + 1e-4).sqrt()
        log_r = -0.5 * (zt ** 2 + v.log() + math.log(2 * math.pi)).sum(1)
        log_p = -0.5 * (z ** 2 + math.log(2 * math.pi)).sum(1)
        kl = T(x, zt) + log_r - log_p
    else:
        zt, kl = z, T(x, z)
    z_p = torch.randn_like(z)
    t_q, t_p = T(x, zt.detach()), T(x, z_p)
    loss_D = -(F.logsigmoid(t_q).mean() + F.logsigmoid(-t_p).mean())
    return (recon + kl).mean() / 784, loss_D


@pytest.mark.parametrize("ac", [True, False])
def test_train_step_matches_the_equations_and_routes_gradients(ac):
    """One step: T's Adam moments hold only the grad of Eq. (3.3), enc/dec's only that of Eq.
    (3.7), both at the pre-step parameters and from the same sample (simultaneous, Alg. 1)."""
    enc, dec, T = tiny_image_nets(ac)
    args = avb.parse_args(["--dataset", "shapes", "--ac" if ac else "--no-ac"])
    opt_G = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-3, betas=(0.5, 0.999))
    opt_D = torch.optim.Adam(T.parameters(), lr=1e-3, betas=(0.5, 0.999))
    x = torch.randint(0, 2, (6, 1, 28, 28)).float()
    ref = [copy.deepcopy(m) for m in (enc, dec, T)]
    rng = torch.get_rng_state()
    avb.train_step(enc, dec, T, opt_G, opt_D, lambda: x, args, 1 / 784)
    torch.set_rng_state(rng)                                             # replay the same eps, z_p
    loss_G, loss_D = reference_losses(*ref, x, ac)
    primal = [*ref[0].parameters(), *ref[1].parameters()]
    g_G = torch.autograd.grad(loss_G, primal, retain_graph=True)
    g_D = torch.autograd.grad(loss_D, list(ref[2].parameters()), retain_graph=True)
    assert all(g is None for g in torch.autograd.grad(loss_D, primal, allow_unused=True))
    for opt, params, grads in ((opt_G, [*enc.parameters(), *dec.parameters()], g_G),
                               (opt_D, list(T.parameters()), g_D)):
        for p, g in zip(params, grads):
            torch.testing.assert_close(opt.state[p]["exp_avg"], 0.5 * g, rtol=1e-4, atol=1e-9)


def test_signs():
    """Card 8.6: raising T on q-pairs raises the primal loss and lowers the adversary loss."""
    torch.manual_seed(0)
    recon, T_q, T_p, r = torch.rand(8) * 100, torch.randn(8), torch.randn(8), torch.randn(8)
    for c in (0.5, 2.0):
        assert avb.primal_loss(recon, T_q + c + r, 0.1) > avb.primal_loss(recon, T_q + r, 0.1)
        assert avb.adversary_loss(T_q + c, T_p) < avb.adversary_loss(T_q, T_p)


def test_optimal_adversary_matches_closed_form():
    """Card 8.4: Eq. (3.3), q = N(1, 0.5^2) vs p = N(0, 1): T* = log 2 - 2 (z - 1)^2 + z^2 / 2."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 32), torch.nn.ELU(), torch.nn.Linear(32, 32),
                              torch.nn.ELU(), torch.nn.Linear(32, 1))
    T = lambda z: net(z).squeeze(1) + 0.5 * (z ** 2).sum(1)             # log prior built in
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / 400)
    for _ in range(400):
        loss = avb.adversary_loss(T(1 + 0.5 * torch.randn(1024, 1)), T(torch.randn(1024, 1)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    zs = torch.tensor([0.0, 0.5, 1.0, 1.5])
    with torch.no_grad():
        err = T(zs[:, None]) - (math.log(2) - 2 * (zs - 1) ** 2 + 0.5 * zs ** 2)
    assert err.abs().max() < 0.1, err


# ---- checklist 13: AIS on a linear-Gaussian model p(z) = N(0, I2), p(x|z) = N(Wz + b, s^2 I5) --
def linear_gaussian(seed, scale=1.0, s=1.0, n=8):
    torch.manual_seed(seed)
    W, b = torch.randn(5, 2, dtype=F64) * scale, torch.randn(5, dtype=F64)
    x = (W @ torch.randn(2, n, dtype=F64) + b[:, None] + s * torch.randn(5, n, dtype=F64)).T

    def log_joint(z, x):
        r = (x - z @ W.T - b) / s
        return -0.5 * (r ** 2).sum(1) - 5 * math.log(s) - 2.5 * avb.LOG_2PI + avb.log_prior(z)
    cov = W @ W.T + s ** 2 * torch.eye(5, dtype=F64)
    post_cov = torch.linalg.inv(torch.eye(2, dtype=F64) + W.T @ W / s ** 2)
    post_mean = (x - b) @ W @ post_cov / s ** 2
    log_px = torch.distributions.MultivariateNormal(b, cov).log_prob(x)
    return x, log_joint, log_px, post_mean, post_cov.diagonal().sqrt().expand_as(post_mean)


def test_ais_exact_with_true_posterior():
    """r_0 = p(z|x): every increment is (beta_i+1 - beta_i) log p(x): exact for any kernel."""
    torch.manual_seed(0)
    Q = torch.linalg.qr(torch.randn(5, 2, dtype=F64))[0]
    c, b, s = torch.tensor([1.5, 0.7], dtype=F64), torch.randn(5, dtype=F64), 0.8
    W = Q * c                                                            # a diagonal posterior
    x = torch.randn(6, 5, dtype=F64) * 2
    log_joint = lambda z, x: (-0.5 * (((x - z @ W.T - b) / s) ** 2).sum(1) - 5 * math.log(s)
                              - 2.5 * avb.LOG_2PI + avb.log_prior(z))
    log_px = torch.distributions.MultivariateNormal(b, W @ W.T + s ** 2 * torch.eye(5, dtype=F64))
    post_var = 1 / (1 + c ** 2 / s ** 2)
    post_mean = post_var * ((x - b) @ W) / s ** 2
    for schedule in ("linear", "sigmoid"):
        est = avb.ais_log_likelihood(x, log_joint, post_mean, post_var.sqrt().expand_as(post_mean),
                                     n_chains=3, n_steps=20, schedule=schedule)[0]
        assert (est - log_px.log_prob(x)).abs().max() < 1e-4


def test_ais_from_the_prior_close_to_closed_form():
    """Card 8.7b at K = 200 (pilot-adapted steps): mean error over 8 images within 0.05 nats."""
    x, log_joint, log_px, _, _ = linear_gaussian(1)
    torch.manual_seed(0)
    est, steps, acc = avb.ais_log_likelihood(x, log_joint, torch.zeros(8, 2, dtype=F64),
                                             torch.ones(8, 2, dtype=F64), n_chains=32, n_steps=200)
    err = est - log_px
    assert err.mean().abs() < 0.05 and err.abs().max() < 0.25, err
    assert steps.shape == (199,) and 0.5 < acc < 0.8                     # adapted to 0.6-0.7


def test_ais_with_the_sigmoid_schedule_converges_to_the_exact_log_likelihood():
    """Issue 12: from an encoder-like r_0 (offset, twice too wide), the error shrinks with K
    (the linear schedule: test_ais_from_the_prior_close_to_closed_form)."""
    x, log_joint, log_px, post_mean, post_sd = linear_gaussian(0, scale=1.5, s=0.5)
    mean0 = post_mean + post_sd * torch.randn(post_mean.shape, dtype=F64)
    errs = []
    for K in (1, 10, 300):
        torch.manual_seed(100)
        est = avb.ais_log_likelihood(x, log_joint, mean0, 2 * post_sd, n_chains=64, n_steps=K,
                                     eps=0.3, schedule="sigmoid", adapt="off")[0]
        errs.append((est - log_px).abs().mean().item())
    assert errs[0] > 2.5 * errs[2] and errs[1] > 1.5 * errs[2] and errs[2] < 0.05, errs


def test_sigmoid_schedule():
    b = avb.annealing_schedule(10, "sigmoid")
    g = 1 / (1 + np.exp(-np.linspace(-4, 4, 11)))                        # Wu et al., rad = 4
    assert np.allclose(b, (g - g[0]) / (g[-1] - g[0])) and b[0] == 0 and b[-1] == 1
    assert avb.annealing_schedule(4) == [0, 0.25, 0.5, 0.75, 1]


def test_pilot_adapted_steps_leave_ais_unbiased():
    """Issue 12: with one image per batch, chains adapting their own step (--ais-adapt chain, the
    official rule) bias log-mean-exp over 100k chains by -0.028 +- 0.004 nats here (measured; the
    mutant in tests/mutants.py); the pilot-adapted run is unbiased."""
    s, x = 0.3, torch.tensor([[1.5]], dtype=F64)
    log_joint = lambda z, x: (-0.5 * ((x - z) / s) ** 2 - math.log(s) - 0.5 * avb.LOG_2PI
                              ).sum(1) + avb.log_prior(z)
    truth = torch.distributions.Normal(0.0, math.sqrt(1 + s * s)).log_prob(x[0, 0]).item()
    torch.manual_seed(0)
    est = avb.ais_log_likelihood(x, log_joint, torch.zeros(1, 1, dtype=F64),
                                 torch.ones(1, 1, dtype=F64), n_chains=100_000, n_steps=20,
                                 eps=0.5)[0]
    assert abs(est.item() - truth) < 0.014, est.item() - truth


def test_hmc_leapfrog_step_rule_and_scale():
    """10 leapfrog steps (11 gradient calls per transition), half steps at both ends (acceptance
    ~1 at a small step), step x eps * sd(x), x1.1 above acceptance 0.7 and /1.1 below 0.6."""
    calls = []

    def log_joint(z, x):
        calls.append(1)
        return avb.log_prior(z / x[:, :1]) - 3 * x[:, 0].log()           # N(0, sd^2 I3), sd = x
    torch.manual_seed(0)
    for sd in (1.0, 1e-3):                                               # r_0 = target, any scale
        x = torch.full((256, 1), sd, dtype=F64)
        calls.clear()
        _, steps, acc = avb.ais_log_likelihood(x, log_joint, torch.zeros(256, 3, dtype=F64),
                                               torch.full((256, 3), sd, dtype=F64), n_chains=1,
                                               n_steps=6, eps=0.3, adapt="off")
        assert acc > 0.97 and len(calls) == 1 + 5 * 11
        assert torch.equal(steps, torch.full((5,), 0.3, dtype=F64))
    x = torch.ones(64, 1, dtype=F64)
    for eps, factor in ((0.01, 1.1), (30.0, 1 / 1.1)):                 # accepts all / rejects all
        calls.clear()
        steps = avb.ais_log_likelihood(x, log_joint, torch.zeros(64, 3, dtype=F64),
                                       torch.ones(64, 3, dtype=F64), n_chains=2, n_steps=6,
                                       eps=eps, adapt="pilot")[1]
        assert len(calls) == 2 * (1 + 5 * 11)                           # pilot + weighted chains
        torch.testing.assert_close(steps, eps * factor ** torch.arange(5, dtype=F64))


# ---- checklist 12: data ----
def test_binarization_and_mnist_split(tmp_path):
    imgs = write_fake_mnist(tmp_path)
    args = avb.parse_args(["--data-root", str(tmp_path), "--val-size", "16", "--batch-size", "8"])
    train, test = avb.load_images(args)
    assert (len(train), len(test)) == (80, 32)                           # 96 - 16 validation
    torch.testing.assert_close((train[0][0][0] + 1) / 2, torch.from_numpy(imgs["train"][16] / 255.0)
                               .float())
    torch.manual_seed(0)
    x = torch.full((20_000, 1, 2, 2), 2 * 0.3 - 1)                       # intensity 0.3
    b1, b2 = avb.binarize(x), avb.binarize(x)
    assert set(b1.unique().tolist()) <= {0.0, 1.0} and not torch.equal(b1, b2)  # fresh per read
    assert abs(b1.mean().item() - 0.3) < 3 * math.sqrt(0.3 * 0.7 / b1.numel())
    assert avb.binarize(torch.rand(2, 3, 28, 28) * 2 - 1).shape == (2, 1, 28, 28)  # RGB -> gray


# ---- runs: checklist 8, 9, 14, 15, 16, 17; resume; evaluation ----
def toy_argv(tmp_path, *extra):
    return ["--dataset", "toy4", "--device", "cpu", "--batch-size", "64", "--d-width", "32",
            "--g-width", "16", "--log-every", "10", "--sample-every", "15", "--ckpt-every", "15",
            "--deterministic", "--out-dir", str(tmp_path), *extra]


def test_toy_smoke_resume_evaluate_and_posterior_figure(tmp_path, capsys):
    m = avb.main(toy_argv(tmp_path / "a", "--steps", "30"))
    assert m["step"] == 30 and all(math.isfinite(v) for v in m.values())
    assert m["elbo"] <= 0 and m["elbo"] == pytest.approx(-(m["recon"] + m["kl"]))
    state = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    step_of = lambda opt: state[opt]["state"][0]["step"].item()
    assert (step_of("opt_G"), step_of("opt_D")) == (30, 60)             # 1 primal, 2 adversary
    assert state["opt_G"]["param_groups"][0]["betas"] == (0.9, 0.999)
    fig = Image.open(tmp_path / "a" / "samples" / "0000030.png")
    assert fig.width >= 256 and fig.height > fig.width                   # title strip on top
    pix = np.asarray(fig.convert("RGB")).reshape(-1, 3).astype(int)
    for rgb in avb.TOY_RGB:                                              # every posterior drawn
        assert (np.abs(pix - (np.array(rgb) * 150 + 255 * 105) / 255).max(1) < 3).any()
    avb.main(toy_argv(tmp_path / "b", "--steps", "15"))
    m2 = avb.main(toy_argv(tmp_path / "b", "--steps", "30", "--resume"))
    assert untimed(m2) == untimed(m)                                     # resume == uninterrupted
    assert [r["step"] for r in rows(tmp_path / "b")] == [10, 15, 20, 30]
    capsys.readouterr()
    res = avb.main(["--evaluate", str(tmp_path / "a" / "ckpt.pt"), *EVAL_TINY])
    out = capsys.readouterr().out
    assert math.isfinite(res["ais_log_px"]) and res["ais_log_px"] < 0 and res["ais_images"] == 128
    assert "AIS 16/16 (100%)" in out and "ELBO estimate (not a bound)" in out   # Progress lines
    assert json.loads((tmp_path / "a" / "eval.json").read_text()) == res


def test_mnist_files_smoke_resume_and_optimizers(tmp_path):
    write_fake_mnist(tmp_path / "data")
    base = ["--dataset", "mnist", "--data-root", str(tmp_path / "data"), "--device", "cpu",
            "--batch-size", "8", *TINY_NETS, "--val-size", "16", "--num-workers", "0",
            "--log-every", "1", "--sample-every", "2", "--ckpt-every", "2", "--deterministic"]
    full = avb.main(base + ["--steps", "3", "--out-dir", str(tmp_path / "full")])
    assert all(math.isfinite(v) for v in full.values())
    assert full["loss_G"] == pytest.approx(-full["elbo"] / 784, rel=1e-5)   # official 1/(H*W*C)
    avb.main(base + ["--steps", "2", "--out-dir", str(tmp_path / "r")])
    resumed = avb.main(base + ["--steps", "3", "--out-dir", str(tmp_path / "r"), "--resume"])
    assert untimed(resumed) == untimed(full)
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("full", "r"))
    assert all(torch.equal(a["T"][k], b["T"][k]) for k in a["T"])
    assert [r["step"] for r in rows(tmp_path / "r")] == [1, 2, 3]
    g, d = a["opt_G"]["param_groups"][0], a["opt_D"]["param_groups"][0]
    assert (g["lr"], g["betas"], d["lr"], d["betas"]) == (5e-5, (0.5, 0.999), 1e-4, (0.5, 0.999))
    assert a["opt_G"]["state"][0]["step"] == a["opt_D"]["state"][0]["step"] == 3  # simultaneous
    m = avb.main(base + ["--no-ac", "--steps", "1", "--out-dir", str(tmp_path / "noac")])
    assert m["kl"] == pytest.approx(m["T_q"])                            # no AC: KL^ = T(x, z)


@pytest.mark.parametrize("model", ["avb-ac", "avb", "vae"])
def test_evaluate_initial_distribution_and_reported_statistics(model, tmp_path, monkeypatch,
                                                               capsys):
    """r_0 = AC moments with sd = sqrt(var + 1e-4), the prior without AC, q for the VAE; log p(x)
    is the mean over batches with std/sqrt(n); the ELBO is labelled an estimate for AVB."""
    extra = {"avb-ac": [], "avb": ["--no-ac"], "vae": ["--model", "vae"]}[model]
    avb.main(TINY["avb.py"] + extra + ["--steps", "1", "--out-dir", str(tmp_path)])
    seen, enc_out = [], []
    for cls in (avb.Encoder, avb.GaussianEncoder):
        forward = cls.forward
        monkeypatch.setattr(cls, "forward", lambda self, *a, f=forward: enc_out.append(
            f(self, *a)) or enc_out[-1])

    def fake_ais(x, log_joint, mean, std, n_chains, n_steps, eps, schedule, adapt, gen, progress):
        seen.append((mean, std, enc_out[-1]))
        return torch.full((x.shape[0],), -100.0 - 2 * len(seen)), None, 0.65
    monkeypatch.setattr(avb, "ais_log_likelihood", fake_ais)
    capsys.readouterr()
    res = avb.main(["--evaluate", str(tmp_path / "ckpt.pt"), *EVAL_TINY, "--ais-batches", "3"])
    for mean, std, (_, q_mean, q_var) in seen:
        if model == "avb":
            assert torch.equal(mean, torch.zeros_like(mean))
            assert torch.equal(std, torch.ones_like(std))
        else:
            assert torch.equal(mean, q_mean)
            torch.testing.assert_close(std, (q_var + 1e-4 * (model == "avb-ac")).sqrt())
    vals = [-102.0, -104.0, -106.0]
    assert res["ais_log_px"] == pytest.approx(np.mean(vals))
    assert res["ais_se"] == pytest.approx(np.std(vals) / math.sqrt(3)) and res["ais_images"] == 24
    label = "ELBO bound" if model == "vae" else "ELBO estimate (not a bound)"
    assert label in capsys.readouterr().out


def test_tiny_args_amp_and_flag_errors(tmp_path):
    m = avb.main(TINY["avb.py"] + ["--out-dir", str(tmp_path / "a")])
    assert m["step"] == 2 and all(math.isfinite(v) for v in m.values())
    m = avb.main(TINY["avb.py"] + ["--out-dir", str(tmp_path / "b"), "--amp", "bf16"])
    assert all(math.isfinite(v) for v in m.values())
    for bad, msg in ((["--model", "vae", "--ac"], "--ac needs"), (["--betas", "0.5", "1"], "< 1"),
                     (["--dataset", "cifar10"], "unknown dataset"),
                     (["--dataset", "toy4", "--export-samples", "1"], "image datasets"),
                     (["--dataset", "toy4", "--fid-every", "1"], "image datasets")):
        with pytest.raises(common.UserError, match=msg):
            avb.parse_args(bad)
    for bad in (["--ais-steps", "0"], ["--ais-eps", "nan"], ["--lr-d", "0"], ["--z-dim", "-1"]):
        with pytest.raises(SystemExit):
            avb.parse_args(bad)


def test_resume_may_change_steps_and_eval_flags_only(tmp_path):
    argv = TINY["avb.py"] + ["--out-dir", str(tmp_path)]
    avb.main(argv)
    m = avb.main(argv + ["--resume", "--steps", "3", "--ais-steps", "10", "--ais-adapt", "off"])
    assert m["step"] == 3
    with pytest.raises(common.UserError, match="cannot change --lr"):
        avb.main(argv + ["--resume", "--steps", "4", "--lr", "1e-3"])


class _FakeTrainingFID:
    """The fid.TrainingFID contract (plumbing.md), for a script's --fid-every wiring."""
    calls = []

    def __init__(self, dataset, data_root, img_size, device, n_samples, weights=None, **kw):
        self.setup = (dataset, img_size, n_samples, weights)

    def __call__(self, sample_fn, class_label=None, n_samples=None):
        x = sample_fn(3)
        self.calls.append((self.setup, tuple(x.shape), x.min().item(), x.max().item()))
        return {"fid": 10.0 + len(self.calls), "is": 1.0, "is_std": 0.0}


def test_export_fid_wiring_and_load_generator(monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "fid", type("fid", (), {
        "TrainingFID": _FakeTrainingFID}))
    _FakeTrainingFID.calls = []
    extra = ["--log-every", "2", "--ckpt-every", "1"]
    plain = avb.main(TINY["avb.py"] + extra + ["--out-dir", str(tmp_path / "plain")])
    m = avb.main(TINY["avb.py"] + extra + ["--out-dir", str(tmp_path / "f"), "--export-samples",
                                           "5", "--fid-every", "1", "--fid-samples", "7",
                                           "--fid-weights", "w.pth"])
    assert untimed(plain) == {k: v for k, v in untimed(m).items() if k not in ("fid", "is",
                                                                             "is_std")}
    assert [(r["step"], r["fid"]) for r in rows(tmp_path / "f")] == [(1, 11.0), (2, 12.0)]
    assert all(c[:2] == (("shapes", 28, 7, "w.pth"), (3, 1, 28, 28)) and -1 <= c[2] < c[3] <= 1
               for c in _FakeTrainingFID.calls)
    img = np.load(tmp_path / "f" / "samples_5.npz")["images"]
    assert img.dtype == np.uint8 and img.shape == (5, 28, 28, 1)
    decoder, z_dim = avb.load_generator(tmp_path / "f" / "ckpt.pt")    # the checkpoint alone
    p = torch.sigmoid(decoder(torch.randn(5, z_dim, generator=torch.Generator().manual_seed(2))))
    assert np.array_equal(img, common.quantize(2 * p - 1).numpy())      # save_image rounding
    args_json = (tmp_path / "f" / "args.json").read_text()
    avb.main(TINY["avb.py"] + ["--out-dir", str(tmp_path / "f"), "--resume", "--export-samples",
                               "3"])
    assert (tmp_path / "f" / "samples_3.npz").exists()
    assert (tmp_path / "f" / "args.json").read_text() == args_json
