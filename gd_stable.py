"""Gradient-norm-regularized GAN: Gradient descent GAN optimization is locally stable.
Nagarajan, Kolter. NIPS 2017. arXiv:1706.04156
Official code: locuslab/gradient_regularized_gan (gaussian-toy-regularized.py; TF 1.1 + Keras 1.2; 8 Gaussians only)

Paper -> code  (regularization / experiment section numbers unchecked [unverified]: cited by title)
  Sec. 2    V = E f(D(x)) + E f(-D(G(z))), f concave (GAN, WGAN) ..... f_concave(), game_value()
  Sec. 2    gradient-descent updates: D ascends V, G descends V ....... train_step(update=...)
  Sec. 3    stable GAN vs WGAN limit cycles (toys, card 2.6) ......... dirac_gan(), uniform_quadratic_gan()
  reg. sec. G descends V + eta ||grad_{theta_D} V||^2, D unchanged ... gradient_norm_penalty(), player_grads()
  exp. sec. streamlines of the 2-parameter uniform/quadratic toy ...... uniform_quadratic_field(), streamline_figure()
  exp. sec. 8 Gaussians, official MLPs with orthogonal init .......... sample_mog8(), MLPGenerator, MLPDiscriminator
  exp. sec. image run [unverified: recalled as stacked MNIST + DCGAN] . StackedMNIST, DCGANGenerator, DCGANDiscriminator
  ours      mode metrics (8 Gaussians; 1000 stacked-MNIST modes) ..... mog8_modes(), digit_modes(), train_classifier()
Deviations (each one also tagged in the code; grep DEVIATION|PAPER-VS-CODE)
  1. PAPER-VS-CODE  Analysis: simultaneous plain gradient steps; official code: alternating D step then G step
     (fresh batch each) with Adam. Default: the code; --update simultaneous --optimizer sgd: the analysis.
  2. DEVIATION  torch Adam adds eps to the bias-corrected sqrt(v), Keras 1.2 to the raw sqrt(v) (eps smaller
     by sqrt(1 - beta2^t)); immaterial at eps = 1e-8.
  3. DEVIATION  V, ||grad_D V||, ||grad_G V|| are logged every --log-every steps on the G-step batch, not
     every iteration on a third fresh batch as in the official loop.
  4. DEVIATION  The image setting (stacked MNIST, DCGAN, eta, lr, steps) is ours: the paper's could not be
     checked and no image code was released [unverified].
  5. DEVIATION  No unrolled-GAN baseline (official gaussian-toy-unrolled.py); --eta 0 is the baseline.
  6. DEVIATION  Mode metrics are ours (Metz et al. / VEEGAN practice); the paper shows figures only.
Run
  python gd_stable.py                                          # 8 Gaussians, eta 0.5 (official setting)
  python gd_stable.py --eta 0                                  # unregularized baseline, same RNG stream
  python gd_stable.py --dataset stacked_mnist                  # image run (ours): modes of 1000, KL
  python gd_stable.py --dataset stacked_mnist --eta 0 --d-width 0.25   # collapse-prone baseline
  python gd_stable.py --streamlines --steps 0 --device cpu     # streamline figure only
  python gd_stable.py --dataset shapes --steps 200 --log-every 50 --sample-every 0   # benchmark, 28x28x3
  python gd_stable.py --dataset mnist --fid-every 5000 --export-samples 10000   # FID via fid.py (not stacked_mnist)
Paper reports: figures only (8-Gaussian coverage over time, image samples, streamlines). Our numbers: README.
"""

import argparse
import itertools
import json
import math
import os
import random
import resource
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import common


# ==== Args ====
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("paper (None = derived from --dataset in main, printed at start)").add_argument
    g("--dataset", default="mog8", choices=("mog8", "stacked_mnist", "mnist", "cifar10", "shapes"),
      help="mog8 (official toy), stacked_mnist (image run, ours), mnist, cifar10, shapes (offline) [exp. sec.]")
    # DEVIATION: no unrolled-GAN baseline (official gaussian-toy-unrolled.py); --eta 0 is the baseline
    g("--eta", type=float, default=0.5, help="regularizer weight; 0 = unregularized [official regularizer_weight]")
    g("--loss", default="gan", choices=["gan", "wgan"], help="f(t) = -log(1 + e^-t) or f(t) = t [Sec. 2]")
    g("--g-objective", default="minimax", choices=["minimax", "nonsat"],
      help="G minimizes V (analysed, official) or -E f(D(G(z))) [Sec. 2; official]")
    g("--update", default="alternating", choices=["alternating", "simultaneous"],
      help="D step then G step (official), or simultaneous steps (analysis) [official; Sec. 2]")
    g("--optimizer", default="adam", choices=["adam", "sgd"], help="adam or plain steps [official; Sec. 2]")
    g("--lr", type=float, default=None, help="D and G step; mog8 1e-4, images 2e-4 [official; UNSPECIFIED: DCGAN]")
    g("--betas", type=float, nargs=2, default=(0.5, 0.999), help="Adam betas [official beta1; Keras default beta2]")
    g("--adam-eps", type=float, default=1e-8, help="Adam epsilon [official epsilon]")
    g("--batch-size", type=int, default=None, help="per D and per G step; mog8 512, images 64 [official; DCGAN]")
    g("--steps", type=int, default=None, help="G iterations; mog8 100001, images 50000 [official max_iter; ours]")
    g("--z-dim", type=int, default=None, help="latent size; mog8 256, images 100 [official z_dim; DCGAN]")
    g("--hidden", type=int, default=128, help="mog8 MLP width [official n_hidden]")
    g("--g-width", type=float, default=1.0, help="DCGAN G channel multiplier [ours]")
    g("--d-width", type=float, default=1.0, help="DCGAN D channel multiplier; Metz et al. use 1/4, 1/2 [ours]")
    g("--img-size", type=int, default=None, choices=[28, 32],
      help="28 for (stacked) MNIST and shapes, 32 for cifar10 [ours: shapes sized as stacked MNIST]")
    g("--d-clip", type=float, default=0.0,
      help="clip D weights to [-c, c] after each D step, 0 = off [ours: WGAN on data has no Lipschitz bound]")
    e = p.add_argument_group("evaluation").add_argument
    e("--eval-every", type=int, default=None, help="mode metrics every K steps, 0 = off; mog8 1000, MNIST 5000 [ours]")
    e("--mode-samples", type=int, default=None, help="mog8 2500, images 26000 [ours: Metz et al. / VEEGAN]")
    e("--classifier", default=None, help="MNIST classifier state dict; default: trained here [ours]")
    e("--classifier-steps", type=int, default=3000, help="classifier Adam steps, batch 128 [ours]")
    e("--classifier-min-acc", type=float, default=0.98, help="required MNIST test accuracy [ours: card Sec. 4]")
    e("--streamlines", action="store_true", help="write out_dir/streamlines.png [exp. sec. streamline figure]")
    r = p.add_argument_group("run").add_argument
    r("--data-root", default="data", help="torchvision dataset folder [run]")
    r("--out-dir", default=None, help="default runs/gd_stable-<dataset>-s<seed> [run]")
    r("--seed", type=int, default=0, help="seeds Python, numpy, torch, fixed z [run]")
    r("--device", default="cuda", help="cuda or cpu; never falls back [run]")
    r("--num-workers", type=int, default=4, help="DataLoader workers [run]")
    r("--log-every", type=int, default=100, help="print/log metrics every K steps [run]")
    r("--sample-every", type=int, default=1000, help="sample figure every K steps [official viz_every]")
    r("--ckpt-every", type=int, default=10_000, help="checkpoint every K steps [run]")
    r("--resume", action="store_true", help="continue from out_dir/ckpt.pt [run]")
    r("--deterministic", action="store_true",
      help="deterministic kernels (tests); on CUDA set CUBLAS_WORKSPACE_CONFIG=:4096:8 [run]")
    r("--amp", default="off", choices=["off", "bf16"], help="bf16 autocast of forward passes [run]")
    r("--export-samples", type=int, default=0, help="write out_dir/samples_N.npz at the end, 0 = off [run]")
    r("--fid-every", type=int, default=0, help="FID via fid.py every K G iterations and at the end, 0 = off [run]")
    r("--fid-samples", type=int, default=10_000, help="generated images per FID [run]")
    r("--fid-weights", default=None, help="Inception weight file for fid.py [run]")
    return p.parse_args(argv)


def derive_defaults(args):
    """The per-dataset values of card Sec. 2.7 in one visible place (STYLE 2.3)."""
    toy, mnist_like = args.dataset == "mog8", args.dataset in ("stacked_mnist", "mnist")
    for k, mog, img in (("lr", 1e-4, 2e-4), ("batch_size", 512, 64), ("steps", 100_001, 50_000), ("z_dim", 256, 100),
                        ("eval_every", 1000, 5000 * mnist_like), ("mode_samples", 2500, 26_000)):
        if getattr(args, k) is None:
            setattr(args, k, mog if toy else img)
    if args.eval_every and not (toy or mnist_like):
        raise ValueError(f"mode metrics exist for mog8 and (stacked_)mnist, not {args.dataset}: --eval-every 0")
    if not toy:
        size = {"stacked_mnist": 28, "mnist": 28, "cifar10": 32}.get(args.dataset, args.img_size or 28)
        if args.img_size not in (None, size):
            raise ValueError(f"--dataset {args.dataset} is {size}x{size}, not {args.img_size}")
        args.img_size = size
    if toy and (args.export_samples or args.fid_every):
        raise ValueError("--export-samples / --fid-every are for image datasets, not the 2-D mog8 toy")
    if args.fid_every and args.dataset == "stacked_mnist":
        raise ValueError("--fid-every needs a reference set common.load_dataset can load; stacked_mnist is not one: "
                         "use --export-samples and fid.py with your own reference statistics instead")
    return args


# ==== Data ====
def mog8_centers(radius=2.0):
    t = torch.arange(8, dtype=torch.float64) * 2 * math.pi / 8           # angles 2 pi k / 8 [official sample_mog]
    return (radius * torch.stack([t.sin(), t.cos()], 1)).float()         # (8, 2): (r sin t, r cos t)


def sample_mog8(n, device, std=0.02, generator=None):
    """Fresh equal-weight mixture samples, std 0.02 [official sample_mog]; global RNG unless given one."""
    k = torch.randint(8, (n,), device=device, generator=generator)
    return mog8_centers().to(device)[k] + std * torch.randn(n, 2, device=device, generator=generator)


class StackedMNIST(torch.utils.data.Dataset):
    """Three independent MNIST digits as R, G, B; y = 100 d_R + 10 d_G + d_B (1000 modes) [card Sec. 4]."""

    def __init__(self, mnist, seed, n=None):
        self.images, self.labels = mnist.data, mnist.targets            # (N, 28, 28) uint8, (N,)
        g = torch.Generator().manual_seed(seed)                          # indices from the run seed
        self.idx = torch.randint(len(self.images), (n or len(self.images), 3), generator=g)

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, i):
        j = self.idx[i]                                                  # (3,) MNIST indices
        x = self.images[j].float().div(127.5).sub(1.0)                   # (3, 28, 28) in [-1, 1]
        return x, int((self.labels[j] * torch.tensor([100, 10, 1])).sum())


# ==== Models ====
def orthogonal_init(m, gain=0.8):
    """Orthogonal weights (gain 0.8), zero biases on every FC layer [official slim arg_scope]."""
    if isinstance(m, nn.Linear):
        nn.init.orthogonal_(m.weight, gain=gain)
        nn.init.zeros_(m.bias)


class MLPGenerator(nn.Sequential):
    """z (256) -> 128 ReLU -> 128 ReLU -> 2 [official generator, n_layer=2]."""

    def __init__(self, z_dim=256, width=128):
        super().__init__(nn.Linear(z_dim, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 2))
        self.apply(orthogonal_init)


class MLPDiscriminator(nn.Sequential):
    """x / 4 -> 128 ReLU -> 1 logit [official discriminator, n_layer=1]."""

    def __init__(self, width=128):
        super().__init__(nn.Linear(2, width), nn.ReLU(), nn.Linear(width, 1))
        self.apply(orthogonal_init)

    def forward(self, x):
        return super().forward(x / 4.0)                                  # official tf.divide(x, 4.0)


# DEVIATION / UNSPECIFIED: no image architecture in the paper text we could check nor in the official repo;
# the card's DCGAN: (start size, G channels, D channels) for 28x28 (stacked MNIST) and 32x32 (CIFAR-10).
DCGAN = {28: (7, (128, 64), (64, 128)), 32: (4, (512, 256, 128), (64, 128, 256))}


def dcgan_init(m):
    """N(0, 0.02) conv/linear weights, BN weight N(1, 0.02), zero biases (DCGAN convention)."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.BatchNorm2d)):
        nn.init.normal_(m.weight, 1.0 if isinstance(m, nn.BatchNorm2d) else 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class DCGANGenerator(nn.Module):
    """z -> Linear -> BN ReLU (c0 x s0 x s0) -> [ConvT 4x4 s2, BN, ReLU]* -> ConvT 4x4 s2 -> tanh."""

    def __init__(self, z_dim=100, channels=3, img_size=28, width=1.0):
        super().__init__()
        s0, ch = DCGAN[img_size][0], [max(1, round(c * width)) for c in DCGAN[img_size][1]]
        self.shape = (ch[0], s0, s0)
        self.fc = nn.Linear(z_dim, ch[0] * s0 * s0, bias=False)         # == ConvT 4x4 s1 on a 1x1 input
        layers = [nn.BatchNorm2d(ch[0]), nn.ReLU()]
        for a, b in zip(ch, ch[1:]):
            layers += [nn.ConvTranspose2d(a, b, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU()]
        layers += [nn.ConvTranspose2d(ch[-1], channels, 4, stride=2, padding=1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.apply(dcgan_init)

    def forward(self, z):
        return self.net(self.fc(z).view(-1, *self.shape))               # (B, c0, s0, s0) -> (B, C, H, W)


class DCGANDiscriminator(nn.Module):
    """[Conv 4x4 s2 (BN from the second), LeakyReLU 0.2]* -> flatten -> Linear -> 1 logit."""

    def __init__(self, channels=3, img_size=28, width=1.0):
        super().__init__()
        ch = [max(1, round(c * width)) for c in DCGAN[img_size][2]]
        layers, a = [], channels
        for i, b in enumerate(ch):                                       # BN from the second conv on
            layers += [nn.Conv2d(a, b, 4, stride=2, padding=1, bias=i == 0)] + [nn.BatchNorm2d(b)] * (i > 0)
            layers, a = layers + [nn.LeakyReLU(0.2)], b
        self.net = nn.Sequential(*layers, nn.Flatten())                  # (B, c * s * s)
        self.fc = nn.Linear(ch[-1] * (img_size // 2 ** len(ch)) ** 2, 1)
        self.apply(dcgan_init)

    def forward(self, x):
        return self.fc(self.net(x))


class Monomial(nn.Module):
    """c * u^k, float64: the toys' D_psi(x) = psi x, D_w(x) = w x^2 and G_a(z) = a z [card 2.6]."""

    def __init__(self, c, k=1):
        super().__init__()
        self.c, self.k = nn.Parameter(torch.as_tensor(c, dtype=torch.float64).clone()), k

    def forward(self, u):                                                # (B, 1) -> (B, N games)
        return self.c * u ** self.k


def mnist_classifier(seed=0):
    """Per-channel digit classifier for the mode metric, (B, 1, 28, 28) -> (B, 10) logits [ours]."""
    with torch.random.fork_rng(devices=[]):                              # its init leaves the training RNG alone
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))


# ==== Losses ====
def f_concave(t, loss):
    """f(t) = -log(1 + e^{-t}) = log sigmoid(t) (GAN; f'(0) = 1/2, f''(0) = -1/4) or f(t) = t (WGAN) [Sec. 2]."""
    return -F.softplus(-t) if loss == "gan" else t


def expect(v, weights=None):
    """E over dim 0: batch mean, or quadrature with `weights`; summed over independent games (dims > 0)."""
    if weights is None:
        return v.mean(0).sum()
    return (weights.view(-1, *[1] * (v.dim() - 1)) * v).sum(0).sum()


def game_value(d_real, d_fake, loss, weights=None):
    """V(theta_G, theta_D) = E_x f(D(x)) + E_z f(-D(G(z))) [Sec. 2; official V = -(BCE(real,1) + BCE(fake,0))]."""
    return expect(f_concave(d_real, loss), weights) + expect(f_concave(-d_fake, loss), weights)


def gradient_norm_penalty(V, d_params):
    """R = ||grad_{theta_D} V||^2, one global squared norm over all D tensors, differentiable in theta_G
    [reg. sec.; official square(global_norm(gradients(V, disc_vars)))]."""
    grads = torch.autograd.grad(V, d_params, create_graph=True)         # pitfall 4: keep the graph
    return sum(g.pow(2).sum() for g in grads)


# ==== Train step ====
def player_grads(G, D, x_real, z, eta, loss="gan", g_objective="minimax", weights=None, amp=False,
                 need_d=False, diagnostics=False):
    """At one (theta_D, theta_G): grad_D V (D ascends it) and grad_G (V + eta R) (G descends it) [reg. sec.]."""
    d_params, g_params = list(D.parameters()), list(G.parameters())
    with torch.autocast(x_real.device.type, dtype=torch.bfloat16, enabled=amp):
        d_real = D(x_real)          # the real term is part of V, hence of R: the G step needs real data
        d_fake = D(G(z))            # UNSPECIFIED: real and fake in separate D passes (BN), as in the D step
    d_real, d_fake = (d_real.float(), d_fake.float()) if amp else (d_real, d_fake)
    V = game_value(d_real, d_fake, loss, weights)
    # minimax: G minimizes V itself (analysed, official); nonsat: -E f(D(G(z))) by flag only
    obj = V if g_objective == "minimax" else -expect(f_concave(d_fake, loss), weights)
    R = gradient_norm_penalty(V, d_params) if (eta > 0 or diagnostics) else None
    loss_G = obj + eta * R if eta > 0 else obj                       # eta = 0: exactly the plain G step
    g_G = torch.autograd.grad(loss_G, g_params, retain_graph=need_d or diagnostics)
    out = {"V": V.detach(), "loss_G": loss_G.detach()}
    # grad_D V for the simultaneous ascent; autograd.grad leaves .grad alone, so the G step never moves D
    g_D = torch.autograd.grad(V, d_params, retain_graph=diagnostics) if need_d else None
    if diagnostics:             # official logs ||grad_D V|| and ||grad_G V||
        g_V = g_G if eta == 0 and g_objective == "minimax" else torch.autograd.grad(V, g_params)
        out.update(R=R.detach(), grad_D=R.detach().sqrt(), grad_G=torch.sqrt(sum(g.pow(2).sum() for g in g_V)))
    return g_D, g_G, out


def _apply(opt, params, grads, clip=0.0):
    for p, g in zip(params, grads):
        p.grad = g.detach()
    opt.step()
    with torch.no_grad():
        for p in params if clip > 0 else []:
            p.clamp_(-clip, clip)                                        # --d-clip (WGAN weight clipping)


def train_step(G, D, opt_G, opt_D, batch_D, batch_G, eta, loss="gan", g_objective="minimax",
               update="alternating", weights=None, amp=False, d_clip=0.0, diagnostics=False):
    """One iteration: D ascends V (no regularizer), G descends V + eta ||grad_D V||^2 [Sec. 2; reg. sec.]."""
    d_params, g_params = list(D.parameters()), list(G.parameters())
    if update == "simultaneous":    # both players' gradients at the same point before either moves (Sec. 2)
        g_D, g_G, out = player_grads(G, D, *batch_D, eta, loss, g_objective, weights, amp, True, diagnostics)
        _apply(opt_D, d_params, [-g for g in g_D], d_clip)               # ascent on V
        _apply(opt_G, g_params, g_G)
        out["loss_D"] = -out["V"]
    else:                           # PAPER-VS-CODE: official alternating D step, then G step on a fresh batch
        x_real, z = batch_D
        with torch.autocast(x_real.device.type, dtype=torch.bfloat16, enabled=amp):
            with torch.no_grad():
                x_fake = G(z)
            d_real, d_fake = D(x_real), D(x_fake)
        d_real, d_fake = (d_real.float(), d_fake.float()) if amp else (d_real, d_fake)
        loss_D = -game_value(d_real, d_fake, loss, weights)             # D minimizes -V; eta absent
        _apply(opt_D, d_params, torch.autograd.grad(loss_D, d_params), d_clip)
        _, g_G, out = player_grads(G, D, *batch_G, eta, loss, g_objective, weights, amp, False, diagnostics)
        _apply(opt_G, g_params, g_G)
        out["loss_D"] = loss_D.detach()
    return out


def _toy_run(D, G, x, z, weights, loss, eta, lr, steps):                # plain simultaneous GD steps
    opt_D, opt_G = torch.optim.SGD(D.parameters(), lr=lr), torch.optim.SGD(G.parameters(), lr=lr)
    for _ in range(steps):
        train_step(G, D, opt_G, opt_D, (x, z), (x, z), eta, loss, update="simultaneous", weights=weights)


def dirac_gan(loss, eta, lr, steps, theta0, psi0):
    """Dirac GAN (Mescheder et al. 2018): p_data = delta_0, G = delta_theta, D_psi(x) = psi x; simultaneous
    plain gradient steps through train_step. Returns the final (theta, psi) [card 2.6b]."""
    D, G = Monomial(psi0), Monomial(theta0)                             # z = 1: G = delta_theta
    x, z = torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)
    _toy_run(D, G, x, z, None, loss, eta, lr, steps)
    return G.c.item(), D.c.item()


def gauss_legendre(n=64):
    """Nodes (n, 1) and weights / 2: exact E over Uniform[-1, 1] for polynomials up to degree 2n - 1."""
    x, w = np.polynomial.legendre.leggauss(n)
    return torch.tensor(x).view(n, 1), torch.tensor(w / 2)


def uniform_quadratic_gan(loss, eta, lr, steps, w0, a0):
    """The paper's streamline system: x, z ~ U[-1, 1], D_w(x) = w x^2, G_a(z) = a z, expectations by
    64-point Gauss-Legendre; simultaneous plain gradient steps. Returns the final (w, a) [exp. sec.]."""
    x, q = gauss_legendre()
    D, G = Monomial(w0, k=2), Monomial(a0)
    _toy_run(D, G, x, x, q, loss, eta, lr, steps)
    return D.c.item(), G.c.item()


def uniform_quadratic_field(loss, eta, w, a):
    """(dw/dt, da/dt) = (grad_w V, -grad_a (V + eta R)) for N independent games (w, a of shape (N,))."""
    x, q = gauss_legendre()
    D, G = Monomial(w, k=2), Monomial(a)
    g_D, g_G, _ = player_grads(G, D, x, x, eta, loss, weights=q, need_d=True)
    return g_D[0].detach(), -g_G[0].detach()


# ==== Eval ====
def _rasterize(img, pts, colour, lo, hi, dot=1):
    """Paints (x, y) points of [lo, hi] into img (3, S, S), y up, as (2 dot + 1)^2 squares of one colour."""
    s = img.shape[-1]
    col = ((pts[:, 0] - lo[0]) / (hi[0] - lo[0]) * (s - 1)).round().long()
    row = ((hi[1] - pts[:, 1]) / (hi[1] - lo[1]) * (s - 1)).round().long()
    for dr in range(-dot, dot + 1):
        for dc in range(-dot, dot + 1):
            r, c = row + dr, col + dc
            ok = (r >= 0) & (r < s) & (c >= 0) & (c < s)
            img[:, r[ok], c[ok]] = torch.tensor(colour, dtype=img.dtype).view(3, 1)


def scatter_png(path, real, fake, lim=3.0, size=256):
    """Samples (blue) over data (green) in [-lim, lim]^2, as the official scatter [official viz]."""
    img = torch.ones(3, size, size)
    for pts, c in ((real, (0.1, 0.7, 0.2)), (fake, (0.1, 0.3, 0.9))):
        _rasterize(img, pts.float().cpu(), c, (-lim, -lim), (lim, lim))
    torchvision.utils.save_image(img, path)


@torch.no_grad()
def streamline_figure(path, eta=0.5, size=160, grid=9, n_steps=150, dt=0.03):
    """Streamlines of the uniform/quadratic toy on w in [-1, 1] (horizontal, D) x a in [0, 2] (vertical, G);
    panels GAN | GAN + eta R | WGAN | WGAN + eta R; lines darken along the flow; red = (0, 1) [exp. sec.]."""
    lo, hi = (-1.0, 0.0), (1.0, 2.0)                                     # UNSPECIFIED: plotted region
    w0, a0 = torch.meshgrid(*[torch.linspace(lo[i], hi[i], grid + 2, dtype=torch.float64)[1:-1] for i in (0, 1)],
                            indexing="ij")
    panels = []
    for loss, e in itertools.product(("gan", "wgan"), (0.0, eta)):
        img, w, a = torch.ones(3, size, size), w0.flatten(), a0.flatten()  # (N,) independent games
        for t in range(n_steps):
            with torch.enable_grad():
                dw, da = uniform_quadratic_field(loss, e, w, a)
            move = dt / (dw ** 2 + da ** 2).sqrt().clamp_min(1e-9)       # unit-speed streamlines
            w1, a1 = w + move * dw, a + move * da
            for s in (0.0, 0.33, 0.67):                                  # segment points, < 1 px apart
                pts = torch.stack([w + s * (w1 - w), a + s * (a1 - a)], 1)
                _rasterize(img, pts, (0.85 * (1 - t / n_steps),) * 3, lo, hi, dot=0)
            w, a = w1, a1
        _rasterize(img, torch.tensor([[0.0, 1.0]]), (0.9, 0.1, 0.1), lo, hi, dot=2)
        panels.append(img)
    torchvision.utils.save_image(torch.stack(panels), path, nrow=4, padding=4, pad_value=0.5)


@torch.no_grad()
def mog8_modes(x, std=0.02, min_frac=0.01):
    """(modes covered of 8, high-quality fraction): high quality = within 3 std of the nearest centre;
    a mode is covered if it holds >= 1% of all samples as high-quality ones [DEVIATION: ours, card Sec. 4]."""
    dist, k = torch.cdist(x.float().cpu(), mog8_centers()).min(1)      # (N,)
    hq = dist <= 3 * std
    counts = torch.bincount(k[hq], minlength=8)
    return int((counts >= min_frac * len(x)).sum()), hq.float().mean().item()


@torch.no_grad()
def digit_modes(x, classifier, chunk=1000):
    """(distinct digit tuples, KL(mode histogram || uniform over 10^C)) for images x (N, C, 28, 28)
    [DEVIATION: ours, card Sec. 4; stacked MNIST has C = 3, 1000 modes]."""
    n, c = x.shape[:2]
    dev = next(classifier.parameters()).device
    digits = torch.cat([classifier(x[i:i + chunk].to(dev).reshape(-1, 1, 28, 28)).argmax(1).cpu()
                        for i in range(0, n, chunk)]).view(n, c)        # (N, C)
    mode = (digits * 10 ** torch.arange(c - 1, -1, -1)).sum(1)
    p = torch.bincount(mode, minlength=10 ** c).double() / n
    kl = (p[p > 0] * (p[p > 0] * 10 ** c).log()).sum().item()
    return int((p > 0).sum()), kl


def train_classifier(train_set, test_set, steps, device, seed, batch=128):
    """Small CNN on MNIST (uint8 .data/.targets) with its own RNG; returns (model, test accuracy) [ours]."""
    clf = mnist_classifier(seed).to(device)
    g, opt = torch.Generator().manual_seed(seed), torch.optim.Adam(clf.parameters(), lr=1e-3)
    for _ in range(steps):
        i = torch.randint(len(train_set.data), (batch,), generator=g)
        x = train_set.data[i].float().div(127.5).sub(1.0).unsqueeze(1)  # (B, 1, 28, 28) in [-1, 1]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(clf(x.to(device)), train_set.targets[i].to(device)).backward()
        opt.step()
    with torch.no_grad():
        pred = torch.cat([clf(x.float().div(127.5).sub(1.0).unsqueeze(1).to(device)).argmax(1).cpu()
                          for x in test_set.data.split(1000)])
    return clf.eval(), (pred == test_set.targets).float().mean().item()


@torch.no_grad()
def sample(G, z, device, chunk=2000):
    """G(z) in chunks, in eval mode (UNSPECIFIED: eval-mode BN statistics when sampling)."""
    G.eval()
    out = torch.cat([G(z[i:i + chunk].to(device)).float() for i in range(0, len(z), chunk)])
    G.train()                                                            # G always trains in train mode
    return out


def export_samples(G, args, device, chunk=1000):
    """out_dir/samples_N.npz, key "images": uint8 (N, H, W, C), quantised as save_image; own RNG."""
    z = torch.randn(args.export_samples, args.z_dim, generator=torch.Generator().manual_seed(args.seed + 2))
    x = torch.cat([((sample(G, zc, device) + 1) / 2 * 255 + 0.5).clamp(0, 255).to(torch.uint8).cpu()
                   for zc in z.split(chunk)]).permute(0, 2, 3, 1)       # (N, H, W, C) uint8
    np.savez_compressed(os.path.join(args.out_dir, f"samples_{args.export_samples}.npz"), images=x.numpy())


def evaluate_fid(G, args, device):
    import fid  # evaluation only: a copy of this script without fid.py still trains
    gen = torch.Generator().manual_seed(args.seed + 3)                   # training RNG untouched
    return fid.fid_for_training(lambda n: sample(G, torch.randn(n, args.z_dim, generator=gen), device), args.dataset,
                                args.data_root, args.img_size, args.fid_samples, device, weights=args.fid_weights)


def load_classifier(args, device, state):
    """From the checkpoint, from --classifier, or trained here and checked on the MNIST test set."""
    if (state is not None and "classifier" in state) or args.classifier:
        clf = mnist_classifier().to(device)
        clf.load_state_dict(state["classifier"] if state is not None and "classifier" in state
                            else torch.load(args.classifier, map_location=device, weights_only=True))
    else:
        clf, acc = train_classifier(common.load_dataset("mnist", args.data_root),
                                    common.load_dataset("mnist", args.data_root, train=False),
                                    args.classifier_steps, device, args.seed)
        print(f"MNIST classifier: test accuracy {acc:.4f}", flush=True)
        if acc < args.classifier_min_acc:
            raise RuntimeError(f"MNIST classifier accuracy {acc:.4f} < --classifier-min-acc "
                               f"{args.classifier_min_acc}; raise --classifier-steps")
        torch.save(clf.state_dict(), os.path.join(args.out_dir, "mnist_classifier.pt"))
    return clf.eval()


# ==== Main ====
def main(argv=None):
    args = derive_defaults(parse_args(argv))
    toy = args.dataset == "mog8"
    args.out_dir = args.out_dir or os.path.join("runs", f"gd_stable-{args.dataset}-s{args.seed}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("CUDA not available; pass --device cpu")
    device = torch.device(args.device)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.benchmark = not args.deterministic
    torch.use_deterministic_algorithms(args.deterministic)
    ckpt_path = common.prepare_run(args.out_dir, args.resume)
    if args.streamlines:
        streamline_figure(os.path.join(args.out_dir, "streamlines.png"), eta=args.eta or 0.5)
    if toy:
        G, D = MLPGenerator(args.z_dim, args.hidden).to(device), MLPDiscriminator(args.hidden).to(device)
    else:
        ds = (StackedMNIST(common.load_dataset("mnist", args.data_root), args.seed) if args.dataset == "stacked_mnist"
              else common.load_dataset(args.dataset, args.data_root, args.img_size))
        channels = ds[0][0].shape[0]
        G = DCGANGenerator(args.z_dim, channels, args.img_size, args.g_width).to(device)
        D = DCGANDiscriminator(channels, args.img_size, args.d_width).to(device)
    # DEVIATION: torch Adam's eps placement differs from the official Keras 1.2 Adam (immaterial at 1e-8)
    opt_G, opt_D = ((torch.optim.Adam(m.parameters(), lr=args.lr, betas=tuple(args.betas), eps=args.adam_eps)
                     if args.optimizer == "adam" else torch.optim.SGD(m.parameters(), lr=args.lr)) for m in (G, D))
    fixed_z = torch.randn(512 if toy else 64, args.z_dim, generator=torch.Generator().manual_seed(args.seed))
    step, state = 0, None
    if ckpt_path:
        state = common.load_checkpoint(ckpt_path, device, args, shape_flags=(
            "dataset", "z_dim", "hidden", "g_width", "d_width", "img_size"))
        for obj, k in ((G, "G"), (D, "D"), (opt_G, "opt_G"), (opt_D, "opt_D")):
            obj.load_state_dict(state[k])
        step, fixed_z = state["step"], state["fixed_z"].cpu()
    classifier = load_classifier(args, device, state) if args.eval_every and not toy else None
    per_step = 1 if args.update == "simultaneous" else 2                 # real batches drawn per iteration
    if toy:
        def draw():
            return sample_mog8(args.batch_size, device), torch.randn(args.batch_size, args.z_dim, device=device)
    else:
        batches = common.infinite_batches(ds, args.batch_size, args.seed, step * per_step, args.num_workers)

        def draw():
            x = next(batches)[0].to(device, non_blocking=True)
            return x, torch.randn(len(x), args.z_dim, device=device)
    if state is not None:
        common.set_rng_state(state["rng"])

    print(json.dumps(vars(args), indent=1), flush=True)
    print(f"device {device} | torch {torch.__version__} | params G {sum(p.numel() for p in G.parameters()):,}"
          f" | D {sum(p.numel() for p in D.parameters()):,}", flush=True)
    with open(os.path.join(args.out_dir, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=1)
    os.makedirs(os.path.join(args.out_dir, "samples"), exist_ok=True)
    metrics_path = os.path.join(args.out_dir, "metrics.jsonl")
    if ckpt_path and os.path.exists(metrics_path):                       # each step logged once across resume
        with open(metrics_path) as f:
            kept = [ln for ln in f if json.loads(ln)["step"] <= step]
        with open(metrics_path, "w") as f:
            f.writelines(kept)
    ref = sample_mog8(512, "cpu", generator=torch.Generator().manual_seed(args.seed)) if toy else None
    reals = os.path.join(args.out_dir, "reals.png")
    if not os.path.exists(reals):
        if toy:
            scatter_png(reals, ref, ref[:0])
        else:
            torchvision.utils.save_image(torch.stack([ds[i][0] for i in range(64)]), reals, nrow=8,
                                         normalize=True, value_range=(-1, 1))

    eval_z = torch.randn(args.mode_samples, args.z_dim, generator=torch.Generator().manual_seed(args.seed + 1))
    metrics, t0, t_start, step0 = {"step": step}, time.time(), time.time(), step
    while step < args.steps:
        batch_D = draw()
        batch_G = draw() if per_step == 2 else None
        fid_now = args.fid_every and ((step + 1) % args.fid_every == 0 or step + 1 == args.steps)
        log = fid_now or (step + 1) % args.log_every == 0 or step + 1 == args.steps  # DEVIATION: log-step diagnostics
        out = train_step(G, D, opt_G, opt_D, batch_D, batch_G, args.eta, args.loss, args.g_objective,
                         args.update, amp=args.amp == "bf16", d_clip=args.d_clip, diagnostics=log)
        step += 1
        if log:
            it_s = (step - metrics["step"]) / max(time.time() - t0, 1e-9)
            metrics = {"step": step, **{k: v.item() for k, v in out.items()}, "it_s": it_s}
            if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
                x = sample(G, eval_z, device)
                metrics.update(zip(("modes", "hq"), mog8_modes(x)) if toy else
                               zip(("modes", "kl"), digit_modes(x, classifier)))
            if fid_now:
                metrics["fid"] = float(evaluate_fid(G, args, device))
            left = (args.steps - step) / max(it_s, 1e-9)
            print(f"step {step}/{args.steps} | " + " | ".join(f"{k} {v:.4g}" for k, v in list(metrics.items())[1:])
                  + f" | ETA {int(left // 3600)}h{int(left % 3600 // 60):02d}m", flush=True)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
            t0 = time.time()
        if args.sample_every and (step % args.sample_every == 0 or step == args.steps):
            path, fake = os.path.join(args.out_dir, "samples", f"{step:07d}.png"), sample(G, fixed_z, device)
            if toy:
                scatter_png(path, ref, fake)
            else:
                torchvision.utils.save_image(fake, path, nrow=8, normalize=True, value_range=(-1, 1))
        if step % args.ckpt_every == 0 or step == args.steps:
            common.save_checkpoint(os.path.join(args.out_dir, "ckpt.pt"), {
                "step": step, "args": vars(args), "G": G.state_dict(), "D": D.state_dict(),
                "opt_G": opt_G.state_dict(), "opt_D": opt_D.state_dict(), "fixed_z": fixed_z,
                "rng": common.rng_state(), **({"classifier": classifier.state_dict()} if classifier else {})})
    if args.export_samples:
        export_samples(G, args, device)
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    rate = (step - step0) / max(time.time() - t_start, 1e-9)
    print(f"done: {step - step0} G iterations at {rate:.2f} steps/s (incl. logging/sampling) | peak memory "
          f"{peak:.0f} MiB ({'CUDA allocated' if device.type == 'cuda' else 'process max RSS'})", flush=True)
    return metrics


if __name__ == "__main__":
    main()
