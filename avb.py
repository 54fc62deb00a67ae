"""AVB: Adversarial Variational Bayes: Unifying Variational Autoencoders and Generative Adversarial Networks.
Mescheder, Nowozin, Geiger. ICML 2017. arXiv:1701.04722 (v4)
Official code: LMescheder/AdversarialVariationalBayes @ee29153 (avb/, notebooks/AVB_toy_example.ipynb)

Paper -> code   (sections after Sec. 3 are cited by name: their numbers were not checked)
  Sec. 3      neural sampler z_phi(x, eps), noise inside the net .. Encoder (conv0, conv0_ac), ToyEncoder
  Sec. 3      decoder p_theta(x|z), Bernoulli logits ............... Decoder (official decoders/conv0)
  Eq. (3.3)   adversary objective, maximized over T ............... adversary_loss(), Adversary, ToyAdversary
  Prop. 1     T* = log q(z|x) - log p(z); log p(z) built into T ... Adversary.forward (official issue #4)
  Eq. (3.7)   reparametrized primal objective (number unverified) . primal_loss(), elbo_terms()
  Prop. 2     T held fixed when differentiating w.r.t. phi ........ train_step(): backward(inputs=...)
  Alg. 1      theta, phi, psi updated from the same sample ........ train_step(), --update simultaneous
  AC section  r_alpha = N(mu(x), sd(x)^2), z~ = (z - mu) / sd ...... Encoder(ac=True), contrast_log_ratio()
  Tab. 2      VAE baseline; log p(x) by AIS with HMC .............. GaussianEncoder, ais_log_likelihood(), evaluate()
  Toy expt.   4-point data, per-input latent scatter .............. toy_batch(), latent_scatter()
Deviations and code facts (each also tagged in the code; grep DEVIATION|PAPER-VS-CODE)
  1. PAPER-VS-CODE  Simultaneous updates (official train.py, = Alg. 1); the toy notebook alternates
     1 primal and 2 adversary steps. Each default follows its official script (--update). Alg. 1
     uses one step size for all players; the code uses lr 5e-5 (primal) and 1e-4 (T): we follow it.
  2. PAPER-VS-CODE  AC: KL term = single-sample log r_alpha - log p at the drawn z, stop-gradient
     moments (official avb/__init__.py), not the closed-form Gaussian KL (same expectation).
  3. PAPER-VS-CODE  sd = sqrt(var + 1e-4) in z~, but log r_alpha uses log var without 1e-4 (kept).
  4. PAPER-VS-CODE  Primal loss times 1/(28*28) for images (official); the toy notebook uses 1.
  5. PAPER-VS-CODE  Test images are dynamically binarized too; AIS uses 20 batches x 128 images.
  6. PAPER-VS-CODE  AIS starts from the prior for AVB without AC (no encoder moments).
  7. PAPER-VS-CODE  The toy adversary adds ||z||^2 (notebook), not the log prior's 1/2 ||z||^2.
  8. PAPER-VS-CODE  Decoder ConvTs 1-3 use ReLU, the official conv2d_transpose default (the ELU
     arg-scope never reaches it); whether the paper's text says ELU is unverified.
  9. DEVIATION  --model vae: AVB's conv0 decoder, lr 5e-5, batch 128 (like-for-like) where the VAE
     scripts use conv1, lr 1e-4, batch 64; toy VAE: closed-form KL, not the notebook's 1-sample one.
 10. DEVIATION  MNIST via torchvision (first 5,000 train images = validation, as the official TF
     loader); `shapes` made gray, 28x28, binarized alike: an offline stand-in. No CelebA/8 schools.
Unverified in the card: Eq. number (3.7) (early versions: 3.9), Tab. 2 values other than the 32-dim
AIS column, the toy table number.
Run
  python avb.py --dataset mnist                                   # AVB + AC, d = 32 (Tab. 2), 1 GPU
  python avb.py --dataset mnist --z-dim 8 --eps-dim 32 --eps-nbasis 16   # AVB + AC, d = 8
  python avb.py --dataset mnist --z-dim 8 --eps-dim 32 --no-ac           # AVB, d = 8
  python avb.py --dataset mnist --model vae [--z-dim 8]           # VAE, d = 32 [8], same decoder
  python avb.py --evaluate runs/avb-mnist-s0/ckpt.pt              # ELBO estimate, AIS 8 x 2000
  python avb.py --evaluate CKPT --ais-chains 5 --ais-steps 1000   # AIS of the d = 8 no-AC row
  python avb.py --dataset toy4                                    # toy, samples/latent_*.png
  python avb.py --dataset shapes --steps 200 --log-every 50       # benchmark: steps/s, peak memory
  python avb.py --dataset mnist --fid-every 100000 --export-samples 10000   # FID monitor: not the paper's metric
Paper reports: AIS log p(x) = -80.2 nats, AVB + AC, d = 32, binarized MNIST (Tab. 2; +- and other
rows unverified). Our numbers: README.
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

LOG_2PI = math.log(2 * math.pi)
TOY_DEFAULTS = dict(z_dim=2, eps_dim=64, adv_hidden=256, batch_size=512, lr=2e-5, betas=[0.9, 0.999],
                    update="alternating", steps=100_000, ac=False)        # notebooks/AVB_toy_example
IMAGE_DEFAULTS = dict(z_dim=32, eps_dim=64, adv_hidden=1024, batch_size=128, lr=5e-5, betas=[0.5, 0.999],
                      update="simultaneous", steps=2_500_000, ac=True)    # experiments/avb_mnist_32_ac
SHAPE_FLAGS = ("dataset", "model", "ac", "z_dim", "eps_dim", "eps_nbasis", "width", "adv_hidden", "adv_feat")


# ==== Args ====
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("paper (None = set by --dataset in derive_defaults, printed at start)")
    o = "official experiments/*/run.py"
    g.add_argument("--dataset", default="mnist", choices=["mnist", "shapes", "toy4"],
                   help="binarized MNIST, binarized shapes (offline, DEVIATION), 4-point toy [Tab. 2, toy expt.]")
    g.add_argument("--model", default="avb", choices=["avb", "vae"], help="AVB or the VAE baseline [Tab. 2]")
    g.add_argument("--ac", action=argparse.BooleanOptionalAction, default=None,
                   help="adaptive contrast; on for AVB on images, off for the toy [AC section; " + o + "]")
    g.add_argument("--z-dim", type=int, default=None, help="latent d; 32 images, 2 toy [Tab. 2; " + o + "]")
    g.add_argument("--eps-dim", type=int, default=None, help="encoder noise size; 64 (32 for d=8) [" + o + "]")
    g.add_argument("--eps-nbasis", type=int, default=32, help="AC basis vectors m (16 for d=8) [" + o + "]")
    g.add_argument("--width", type=int, default=64, help="df_dim = gf_dim; toy MLP width [official run_avae.py]")
    g.add_argument("--adv-hidden", type=int, default=None,
                   help="adversary width; 1024 images, 256 toy [official models/conv0.py, toy notebook]")
    g.add_argument("--adv-feat", type=int, default=8192, help="size of theta(x), s(z) [official models/conv0.py]")
    g.add_argument("--update", default=None, choices=["simultaneous", "alternating"],
                   help="simultaneous (images), primal then adversary (toy) [Alg. 1; official train.py, notebook]")
    g.add_argument("--adv-steps", type=int, default=2, help="adversary steps per primal step if alternating [notebook]")
    g.add_argument("--lr", type=float, default=None, help="primal Adam lr; 5e-5 images, 2e-5 toy [" + o + ", notebook]")
    g.add_argument("--lr-adv", type=float, default=1e-4, help="adversary Adam lr [" + o + ", notebook]")
    g.add_argument("--betas", type=float, nargs=2, default=None,
                   help="Adam betas; (0.5, 0.999) images, (0.9, 0.999) toy [official train.py, notebook]")
    g.add_argument("--batch-size", type=int, default=None, help="128 images, 512 toy [" + o + ", notebook]")
    g.add_argument("--steps", type=int, default=None,
                   help="primal updates; 2.5M images (a bound), 100k toy [UNSPECIFIED: official nsteps, notebook]")
    g.add_argument("--val-size", type=int, default=5000, help="first N train images = val [official download_mnist.py]")
    e = p.add_argument_group("evaluation")
    e.add_argument("--evaluate", default=None, metavar="CKPT", help="ELBO estimate and AIS log p(x) of CKPT [Tab. 2]")
    e.add_argument("--ais-chains", type=int, default=8, help="chains per image (5 for d=8 no AC) [" + o + "]")
    e.add_argument("--ais-steps", type=int, default=2000, help="annealing steps K (1000 for d=8 no AC) [" + o + "]")
    e.add_argument("--ais-batches", type=int, default=20, help="test batches for AIS [" + o + " --test-nais]")
    e.add_argument("--ais-eps", type=float, default=0.01, help="initial HMC step, times sd(x) [official ais.py]")
    e.add_argument("--elbo-batches", type=int, default=200, help="test batches, ELBO estimate [official validate]")
    r = p.add_argument_group("run")
    r.add_argument("--data-root", default="data", help="torchvision download folder [run]")
    r.add_argument("--out-dir", default=None, help="default runs/avb-<dataset>-s<seed> [run]")
    r.add_argument("--seed", type=int, default=0, help="seeds python, numpy, torch [run]")
    r.add_argument("--device", default="cuda", help="cuda or cpu; no silent fallback [run]")
    r.add_argument("--num-workers", type=int, default=4, help="DataLoader workers [run]")
    r.add_argument("--log-every", type=int, default=100, help="steps between log lines [run]")
    r.add_argument("--sample-every", type=int, default=1000, help="steps between grids (toy: scatters), 0 = off [run]")
    r.add_argument("--ckpt-every", type=int, default=10_000, help="steps between checkpoints [run]")
    r.add_argument("--resume", action="store_true", help="continue out_dir/ckpt.pt [run]")
    r.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels; on CUDA set CUBLAS_WORKSPACE_CONFIG=:4096:8 [run]")
    r.add_argument("--export-samples", type=int, default=0, help="images: N Bernoulli means p of p(x|z), "
                   "z ~ N(0, I), round(255 p), to samples_N.npz at the end, 0 = off (UNSPECIFIED: means, the usual "
                   "choice for binarized-MNIST sample figures) [run]")
    r.add_argument("--fid-every", type=int, default=0, help="images: FID of 2p - 1 via fid.py every K steps, 0 = off; "
                   "not the paper's metric (AIS log p(x), --evaluate) [run]")
    r.add_argument("--fid-samples", type=int, default=10_000, help="generated images per FID [run]")
    r.add_argument("--fid-weights", default=None, help="FID Inception weight file (fid.py) [run]")
    return p.parse_args(argv)


def derive_defaults(args):
    """The per-configuration values of the official scripts, in one visible place (STYLE 2.3)."""
    for k, v in (TOY_DEFAULTS if args.dataset == "toy4" else IMAGE_DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v and args.model == "avb" if k == "ac" else v)
    if args.ac and (args.dataset == "toy4" or args.model == "vae"):
        raise ValueError("--ac needs AVB's basis-vector image encoder (--model avb, an image --dataset)")
    if args.dataset == "toy4" and (args.fid_every or args.export_samples):
        raise ValueError("--fid-every / --export-samples are for the image datasets (mnist, shapes)")
    return args


# ==== Data ====
def toy_batch(n, device):
    """x uniform over the four one-hot 2x2 images [toy expt.; notebook get_data_samples]."""
    return F.one_hot(torch.randint(0, 4, (n,), device=device), 4).float()     # (n, 4)


def binarize(x):
    """Dynamic binarization 1[u <= intensity], fresh on every read [official inputs.py]."""
    p = (x + 1) / 2                                                            # [-1, 1] -> [0, 1]
    if p.shape[1] == 3:                                       # DEVIATION: shapes RGB -> ITU-R 601 gray
        p = (p * p.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)  # (B, 1, H, W)
    return (torch.rand_like(p) <= p).float()


def binary_batches(dataset, args, start_step, device):
    """Endless binarized batches (B, 1, 28, 28); batch k is the same after a resume."""
    for x, _ in common.infinite_batches(dataset, args.batch_size, args.seed, start_step, args.num_workers):
        yield binarize(x.to(device, non_blocking=True))                  # torch RNG: part of the checkpoint


def split_mnist(args):
    """(train, val, test); the first val_size training images are validation [official download_mnist.py].
    DEVIATION: torchvision's MNIST files instead of the official TFRecords (same images and split)."""
    size = 28 if args.dataset == "shapes" else None
    full = common.load_dataset(args.dataset, args.data_root, size, train=True)
    return (torch.utils.data.Subset(full, range(args.val_size, len(full))),
            torch.utils.data.Subset(full, range(args.val_size)),
            common.load_dataset(args.dataset, args.data_root, size, train=False))


# ==== Models ====
def init_tf(module, tiny=()):
    """slim defaults: Xavier-uniform weights, zero biases; `tiny` layers truncated normal, std 1e-5
    (TF cuts at 2 sd) [official ops.py, models/conv0*.py]."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            if any(m is t for t in tiny):
                nn.init.trunc_normal_(m.weight, std=1e-5, a=-2e-5, b=2e-5)
            else:
                nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias) if m.bias is not None else None
    return module


def mlp(sizes, act):
    layers = [m for i, o in zip(sizes[:-1], sizes[1:]) for m in (nn.Linear(i, o), act())]
    return nn.Sequential(*layers[:-1])                                   # no activation on the output


def convs_5x5(width, bias):
    """Conv 5x5 w, 2w, 4w, 8w with strides 1, 1, 2, 2: 28x28 -> 7x7 [official conv0*.py]."""
    ch = [1, width, 2 * width, 4 * width, 8 * width]
    return nn.ModuleList(nn.Conv2d(ch[i], ch[i + 1], 5, stride=(1, 1, 2, 2)[i], padding=2,
                                   bias=bias or i == 3) for i in range(4))


class ConvTrunk(nn.Module):
    """x -> 2x - 1 -> convs_5x5, BN + ELU on convs 1-3, ELU on conv 4 [official conv0_ac.py, vae conv0]."""

    def __init__(self, width):
        super().__init__()
        self.convs = convs_5x5(width, bias=False)                        # slim drops the bias under BN
        # slim batch_norm: decay 0.999 -> momentum 0.001, eps 1e-3; batch stats in train mode
        self.bns = nn.ModuleList(nn.BatchNorm2d(c.out_channels, momentum=0.001, eps=1e-3)
                                 for c in self.convs[:3])

    def forward(self, x):
        h = 2 * x - 1                                                    # centred input [official]
        for i, conv in enumerate(self.convs):
            h = F.elu(self.bns[i](conv(h)) if i < 3 else conv(h))
        return h.flatten(1)                                              # (B, 8w*7*7)


class BasisMLP(nn.Module):
    """m independent MLPs v_i(eps_i): eps_dim -> 128 -> 128 -> 128 -> d, ELU [official conv0_ac.py]."""

    def __init__(self, m, eps_dim, z_dim, hidden=128):
        super().__init__()
        sizes = [eps_dim, hidden, hidden, hidden, z_dim]                 # Xavier-uniform per basis
        self.W = nn.ParameterList(nn.Parameter((torch.rand(m, i, o) * 2 - 1) * math.sqrt(6 / (i + o)))
                                  for i, o in zip(sizes[:-1], sizes[1:]))
        self.b = nn.ParameterList(nn.Parameter(torch.zeros(m, 1, o)) for o in sizes[1:])

    def forward(self, eps):                                              # eps (m, B, eps_dim)
        for k, (W, b) in enumerate(zip(self.W, self.b)):
            eps = torch.baddbmm(b, eps, W)                               # (m, B, out)
            eps = F.elu(eps) if k < len(self.W) - 1 else eps
        return eps                                                       # (m, B, d)


class Encoder(nn.Module):
    """Neural sampler z_phi(x, eps) for 28x28 binary x; returns z, E[z|x], Var[z|x] [Sec. 3, AC section].

    ac=False (official conv0): eps (B, eps_dim) enters after every conv through a learned Linear.
    ac=True (official conv0_ac): z = z0(x) + sum_i a_i(x) * v_i(eps_i), moments from batch stats of v_i."""

    def __init__(self, z_dim, eps_dim, eps_nbasis, width, ac):
        super().__init__()
        self.ac, self.eps_dim, self.m, self.z_dim, feat = ac, eps_dim, eps_nbasis, z_dim, 8 * width * 49
        if ac:
            self.trunk, self.z0 = ConvTrunk(width), nn.Linear(feat, z_dim)
            self.a = nn.ModuleList(nn.Linear(feat, z_dim) for _ in range(eps_nbasis))
            self.v = BasisMLP(eps_nbasis, eps_dim, z_dim)
        else:
            self.convs = convs_5x5(width, bias=True)
            sizes = [width * 784, 2 * width * 784, 4 * width * 196, 8 * width * 49]
            self.inject = nn.ModuleList(nn.Linear(eps_dim, s) for s in sizes)  # official ops.add_linear
            self.fc = nn.Linear(feat, z_dim)
        init_tf(self, tiny=[self.z0] if ac else [])

    def forward(self, x, eps=None):
        B = x.shape[0]
        if not self.ac:
            eps = torch.randn(B, self.eps_dim, device=x.device) if eps is None else eps
            h = 2 * x - 1                                                # centred input [official]
            for conv, inject in zip(self.convs, self.inject):
                h = conv(h)
                h = F.elu(h + inject(eps).view_as(h))                    # noise added, then ELU
            return self.fc(h.flatten(1)), None, None
        h = self.trunk(x)                                                # (B, 8w*7*7)
        z0 = self.z0(h)
        a = torch.stack([F.elu(lin(h) - 5) + 1 for lin in self.a], 1)   # (B, m, d), a_i > 0
        eps = torch.randn(self.m, B, self.eps_dim, device=x.device) if eps is None else eps
        v = self.v(eps)                                                  # (m, B, d)
        z = z0 + (a * v.transpose(0, 1)).sum(1)                          # z0 + sum_i a_i * v_i
        mean = z0 + (a * v.mean(1)).sum(1)                               # E[v_i] over the B draws
        var = (a ** 2 * v.var(1, unbiased=False)).sum(1)                 # divide-by-B [tf.nn.moments]
        return z, mean, var


class GaussianEncoder(nn.Module):
    """VAE baseline q(z|x) = N(mu, sd^2): ConvTrunk, or 3 x [Linear 64, ELU] (toy) [official vae/].
    DEVIATION: paired with AVB's conv0 decoder; the released VAE scripts use the smaller conv1 nets."""

    def __init__(self, z_dim, width, toy):
        super().__init__()
        self.trunk = nn.Sequential(mlp([4, width, width, width], nn.ELU), nn.ELU()) if toy else ConvTrunk(width)
        feat = width if toy else 8 * width * 49
        self.mean, self.log_sd = nn.Linear(feat, z_dim), nn.Linear(feat, z_dim)
        init_tf(self)

    def forward(self, x, eps=None):
        h = self.trunk(x)
        mean, log_sd = self.mean(h), self.log_sd(h)
        eps = torch.randn_like(mean) if eps is None else eps
        return mean + log_sd.exp() * eps, mean, (2 * log_sd).exp()      # reparameterized sample


class Decoder(nn.Module):
    """Bernoulli logits: Linear + ELU, ConvT 5x5 4w s2, 2w s2, w s1 (ReLU), 1 s1 [official decoders/conv0]."""

    def __init__(self, z_dim, width):
        super().__init__()
        self.width, self.fc = width, nn.Linear(z_dim, 8 * width * 49)
        # PAPER-VS-CODE: ReLU, the default of the custom conv2d_transpose (the ELU scope misses it).
        # UNSPECIFIED-equivalent: TF SAME pads stride-2 ConvT asymmetrically; same shapes, 1-px shift.
        self.net = nn.Sequential(
            nn.ConvTranspose2d(8 * width, 4 * width, 5, stride=2, padding=2, output_padding=1), nn.ReLU(),
            nn.ConvTranspose2d(4 * width, 2 * width, 5, stride=2, padding=2, output_padding=1), nn.ReLU(),
            nn.ConvTranspose2d(2 * width, width, 5, stride=1, padding=2), nn.ReLU(),
            nn.ConvTranspose2d(width, 1, 5, stride=1, padding=2))
        init_tf(self)

    def forward(self, z):
        h = F.elu(self.fc(z)).view(-1, 8 * self.width, 7, 7)             # (B, 8w, 7, 7)
        return self.net(h)                                               # (B, 1, 28, 28) logits


class Adversary(nn.Module):
    """T(x, z) = sum_k theta_k(x) s_k(z) + T_x(x) + T_z(z) + 1/2 ||z||^2 [official models/conv0.py]."""

    def __init__(self, z_dim, hidden=1024, feat=8192, x_dim=784):
        super().__init__()
        tower = lambda i, o: mlp([i, hidden, hidden, hidden, o], lambda: nn.LeakyReLU(0.2))
        self.theta, self.s, self.T_x, self.T_z = tower(x_dim, feat), tower(z_dim, feat), tower(x_dim, 1), tower(z_dim, 1)
        init_tf(self, tiny=[self.theta[-1], self.T_x[-1], self.T_z[-1]])  # std 1e-5 output layers

    def forward(self, x, z):
        x = x.flatten(1)                                                 # (B, 784), x in {0, 1}
        bilinear = (F.elu(self.theta(x)) * self.s(z)).sum(1)
        # log prior inside T, so T only has to learn log q(z|x) [official issue #4]
        return bilinear + self.T_x(x).squeeze(1) + self.T_z(z).squeeze(1) + 0.5 * (z ** 2).sum(1)


class ToyEncoder(nn.Module):
    """concat(x, eps) -> 3 x [Linear 64, ELU] -> Linear d [toy notebook encoder_func]."""

    def __init__(self, z_dim, eps_dim, width):
        super().__init__()
        self.eps_dim, self.net = eps_dim, init_tf(mlp([4 + eps_dim, width, width, width, z_dim], nn.ELU))

    def forward(self, x, eps=None):
        eps = torch.randn(x.shape[0], self.eps_dim, device=x.device) if eps is None else eps
        return self.net(torch.cat([x, eps], 1)), None, None


class ToyAdversary(nn.Module):
    """Linear 256 + ELU, 5 blocks h <- ELU(h + L1(ReLU(L0 h))) with L1 = 0 at init, Linear 1 [notebook]."""

    def __init__(self, z_dim, hidden=256, n_blocks=5):
        super().__init__()
        self.inp, self.out = nn.Linear(4 + z_dim, hidden), nn.Linear(hidden, 1)
        self.blocks = nn.ModuleList(mlp([hidden, hidden, hidden], nn.ReLU) for _ in range(n_blocks))
        init_tf(self)
        for block in self.blocks:
            nn.init.zeros_(block[-1].weight)                             # residual branch starts at 0

    def forward(self, x, z):
        h = F.elu(self.inp(torch.cat([x, z], 1)))
        for block in self.blocks:
            h = F.elu(h + block(h))
        # PAPER-VS-CODE: the notebook adds ||z||^2, not the log prior's 1/2 ||z||^2
        return self.out(h).squeeze(1) + (z ** 2).sum(1)


def build_models(args):
    """(encoder, decoder, T); T is None for the VAE."""
    toy, w = args.dataset == "toy4", args.width
    if args.model == "vae":
        encoder = GaussianEncoder(args.z_dim, w, toy)
    else:
        encoder = (ToyEncoder(args.z_dim, args.eps_dim, w) if toy
                   else Encoder(args.z_dim, args.eps_dim, args.eps_nbasis, w, args.ac))
    decoder = init_tf(mlp([args.z_dim, w, w, w, 4], nn.ELU)) if toy else Decoder(args.z_dim, w)  # notebook
    return encoder, decoder, (None if args.model == "vae" else ToyAdversary(args.z_dim, args.adv_hidden) if toy
                              else Adversary(args.z_dim, args.adv_hidden, args.adv_feat))


# ==== Losses ====
def reconstruction_error(logits, x):
    """-log p_theta(x|z) per example, Bernoulli summed over pixels [official get_reconstr_err]."""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)


def log_prior(z):
    return -0.5 * (z ** 2 + LOG_2PI).sum(1)                              # log N(z; 0, I)


def contrast_log_ratio(z, z_norm, var):
    """log r_alpha(z|x) - log p(z) at the drawn z [AC section; official avb/__init__.py]."""
    log_r = -0.5 * (z_norm ** 2 + var.log() + LOG_2PI).sum(1)           # PAPER-VS-CODE: log var, no 1e-4
    return log_r - log_prior(z)


def gaussian_kl(mean, var):
    """KL(N(mu, var), N(0, I)) = 1/2 sum(mu^2 + var - 1 - log var) [Sec. 2; official vae get_KL].
    DEVIATION for the toy VAE, whose notebook uses the single-sample estimate (same expectation)."""
    return 0.5 * (mean ** 2 + var - 1 - var.log()).sum(1)


def primal_loss(recon, kl, scale):
    """Negated Eq. (3.7): mean over the batch of recon + KL^, times 1/(H*W*C) [official loss_primal]."""
    return scale * (recon + kl).mean()


def adversary_loss(T_q, T_p):
    """Eq. (3.3) as a minimization: (x, z ~ q) pairs get label 1, (x, z ~ p) pairs label 0."""
    return (F.binary_cross_entropy_with_logits(T_q, torch.ones_like(T_q))
            + F.binary_cross_entropy_with_logits(T_p, torch.zeros_like(T_p)))


def elbo_terms(encoder, decoder, T, x, ac):
    """One forward pass: per-example recon and KL^ (phi gets T's gradient through z~ only), plus T on
    the detached q-pairs and on prior pairs with the same x [Eq. 3.3, 3.7; official AVB class]."""
    z, mean, var = encoder(x)
    recon = reconstruction_error(decoder(z), x)
    if T is None:                                                        # VAE: closed-form KL
        return dict(recon=recon, kl=gaussian_kl(mean, var))
    if ac:                                                               # KL^ = T(x, z~) + log r_alpha - log p
        mean, var = mean.detach(), var.detach()                          # stop-gradient moments
        z_norm = (z - mean) / (var + 1e-4).sqrt()                        # z~ = (z - mu) / sd
        kl = T(x, z_norm) + contrast_log_ratio(z, z_norm, var)          # PAPER-VS-CODE: 1-sample, not closed form
    else:
        z_norm = z                                                       # mu = 0, sd = 1: KL^ = T(x, z)
        kl = T(x, z)
    return dict(recon=recon, kl=kl, T_q=T(x, z_norm.detach()), T_p=T(x, torch.randn_like(z)))


# ==== Train step ====
def train_step(encoder, decoder, T, opt_G, opt_D, draw_x, args, scale):
    """Alg. 1: theta, phi descend the negated Eq. (3.7), psi (T) ascends Eq. (3.3)."""
    def step_D(t):
        loss_D = adversary_loss(t["T_q"], t["T_p"])
        opt_D.zero_grad(set_to_none=True)
        loss_D.backward(inputs=list(T.parameters()))                     # z~ detached: psi only
        opt_D.step()
        return loss_D

    t = elbo_terms(encoder, decoder, T, draw_x(), args.ac)
    loss_G = primal_loss(t["recon"], t["kl"], scale)
    opt_G.zero_grad(set_to_none=True)
    loss_G.backward(inputs=[*encoder.parameters(), *decoder.parameters()])  # T held fixed (Prop. 2)
    out = dict(loss_G=loss_G, elbo=-(t["recon"] + t["kl"]).mean(), recon=t["recon"].mean(), kl=t["kl"].mean())
    if T is not None and args.update == "simultaneous":
        out["loss_D"] = step_D(t)            # same sample, gradients at the same parameters [official train.py]
    opt_G.step()
    if T is not None and args.update == "alternating":
        for _ in range(args.adv_steps):      # PAPER-VS-CODE: toy notebook, fresh x, eps, z_p per step
            out["loss_D"] = step_D(elbo_terms(encoder, decoder, T, draw_x(), args.ac))
    if T is not None:                        # T on q- and prior pairs of the primal sample
        out.update(T_q=t["T_q"].mean(), T_p=t["T_p"].mean())
    return {k: v.detach() for k, v in out.items()}


# ==== Eval ====
def ais_log_likelihood(x, log_joint, init_mean, init_std, n_chains=8, n_steps=1000, eps=0.01, n_leapfrog=10):
    """AIS with HMC (Wu et al. 2017; official validate/ais.py): log p^(x) per example, shape (B,).

    r_0 = N(init_mean, diag init_std^2), both (B, d); log_joint(z, x) = log p(x, z) per example;
    U_beta = -beta log p(x, z) - (1 - beta) log r_0(z) with beta linear over n_steps + 1 points."""
    C, (B, d) = n_chains, init_mean.shape
    mean, std = init_mean.expand(C, B, d), init_std.expand(C, B, d)
    xs = x.repeat(C, *[1] * (x.dim() - 1))                               # (C*B, ...), chain-major

    def terms(z):  # log p(x, z) and its gradient, log r_0(z) and its gradient (normalized densities)
        with torch.enable_grad():
            zg = z.detach().requires_grad_(True)
            lj = log_joint(zg.reshape(C * B, d), xs).view(C, B)
            g, = torch.autograd.grad(lj.sum(), zg)
        lr = (-0.5 * ((z - mean) / std) ** 2 - std.log() - 0.5 * LOG_2PI).sum(-1)
        return lj.detach(), g, lr, -(z - mean) / std ** 2

    def energy(c, beta):  # U_beta and its gradient from terms()
        return -(beta * c[0] + (1 - beta) * c[2]), -(beta * c[1] + (1 - beta) * c[3])

    betas = torch.linspace(0, 1, n_steps + 1, dtype=torch.float64).tolist()
    z = mean + std * torch.randn_like(mean)                              # z ~ r_0
    cur, log_w = terms(z), torch.zeros(C, B, dtype=mean.dtype, device=mean.device)
    step = torch.full((C, 1, 1), eps, dtype=mean.dtype, device=mean.device)  # adapted per chain
    for i in range(n_steps):
        log_w += (betas[i + 1] - betas[i]) * (cur[0] - cur[2])          # U_i(z) - U_{i+1}(z) at the current z
        if i == n_steps - 1:
            break
        beta, h = betas[i + 1], step * std                               # per-dimension step eps * sd(x)
        U0, gU = energy(cur, beta)
        p = torch.randn_like(z)
        H0, p, zq = U0 + 0.5 * (p ** 2).sum(-1), p - 0.5 * h * gU, z    # half momentum step
        for l in range(n_leapfrog + 1):                                  # 11 position updates
            zq = zq + h * p
            new = terms(zq)
            U1, gU = energy(new, beta)
            p = p - h * gU if l < n_leapfrog else p - 0.5 * h * gU      # 10 full steps, closing half step
        accept = torch.rand_like(H0) < torch.exp(H0 - U1 - 0.5 * (p ** 2).sum(-1))  # Metropolis; NaN rejects
        z = torch.where(accept[..., None], zq, z)
        cur = tuple(torch.where(accept if c.dim() == 2 else accept[..., None], n, c) for n, c in zip(new, cur))
        rate = accept.to(mean.dtype).mean(1).view(C, 1, 1)               # batch acceptance per chain
        step = torch.where(rate < 0.6, step / 1.1, torch.where(rate > 0.7, step * 1.1, step))
    return torch.logsumexp(log_w, 0) - math.log(C)                      # log-mean-exp over chains


def latent_scatter(encoder, path, noise_dim, n=512, size=256, seed=0):
    """z ~ q(z|x) for each of the 4 toy inputs, on [-3, 3] x [-3.5, 3.5] as the notebook's figure."""
    dev = next(encoder.parameters()).device
    colors = torch.tensor([[.12, .47, .71], [1., .5, .05], [.17, .63, .17], [.84, .15, .16]])
    canvas = torch.ones(3, size, size)
    eps = torch.randn(n, noise_dim, generator=torch.Generator().manual_seed(seed)).to(dev)  # shared noise
    with torch.no_grad():
        for i in range(4):
            z = encoder(F.one_hot(torch.full((n,), i, device=dev), 4).float(), eps)[0].cpu()
            row, col = ((3.5 - z[:, 1]) / 7 * size).long(), ((z[:, 0] + 3) / 6 * size).long()
            for dr, dc in itertools.product((-1, 0, 1), repeat=2):       # 3x3 dots, alpha 0.5
                r, c = (row + dr).clamp(0, size - 1), (col + dc).clamp(0, size - 1)
                canvas[:, r, c] = 0.5 * canvas[:, r, c] + 0.5 * colors[i][:, None]
    torchvision.utils.save_image(canvas, path)


def decoder_means(decoder, n, args, gen):
    """Bernoulli means sigmoid(decoder(z)), z ~ N(0, I) drawn from `gen` (training RNG untouched): (n, 1, 28, 28)."""
    with torch.no_grad():
        return torch.sigmoid(decoder(torch.randn(n, args.z_dim, generator=gen).to(args.device)))


def export_samples(decoder, args, path, chunk=500):
    """uint8 NHWC, round(255 p) of the decoder means (UNSPECIFIED: means, not binary draws)."""
    gen, n = torch.Generator().manual_seed(args.seed + 2), args.export_samples
    x = torch.cat([decoder_means(decoder, min(chunk, n - i), args, gen).cpu() for i in range(0, n, chunk)])
    np.savez_compressed(path, images=(x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())


def evaluate_fid(decoder, args):
    import fid  # evaluation only: a copy of this script without fid.py still trains
    gen = torch.Generator().manual_seed(args.seed + 3)
    return fid.fid_for_training(lambda n: 2 * decoder_means(decoder, n, args, gen) - 1, args.dataset,
                                args.data_root, 28, args.fid_samples, args.device, weights=args.fid_weights)


def evaluate(args):
    """ELBO estimate (not a bound for AVB) and AIS log p(x), mean +- std / sqrt(#batches) [Tab. 2]."""
    state = common.load_checkpoint(args.evaluate, args.device)
    a, device = argparse.Namespace(**state["args"]), torch.device(args.device)
    encoder, decoder, T = (m if m is None else m.to(device).eval() for m in build_models(a))
    for m, k in ((encoder, "encoder"), (decoder, "decoder"), (T, "T")):
        m is None or m.load_state_dict(state[k])
    decoder.requires_grad_(False)
    if a.dataset == "toy4":
        draw = lambda s, n: [toy_batch(a.batch_size, device) for _ in range(n)]
    else:
        a.data_root = args.data_root
        test = split_mnist(a)[2]
        draw = lambda s, n: [binarize(x.to(device)) for x, _ in itertools.islice(
            common.infinite_batches(test, a.batch_size, s, 0, args.num_workers), n)]  # seeded test batches
    with torch.no_grad():
        elbos = [-(t["recon"] + t["kl"]).mean().item() for t in
                 (elbo_terms(encoder, decoder, T, x, a.ac) for x in draw(args.seed, args.elbo_batches))]
    ais, log_joint = [], lambda z, x: -reconstruction_error(decoder(z), x) + log_prior(z)
    # PAPER-VS-CODE: dynamically binarized test images (one binarization for all chains), 20 x 128 of them
    for k, x in enumerate(draw(args.seed + 1, args.ais_batches)):
        with torch.no_grad():  # r_0: AC moments (sd = sqrt(var + 1e-4)), the VAE's q, else the prior
            z, mean, var = encoder(x)
        if var is None:                                                  # PAPER-VS-CODE: prior without AC
            mean, var = torch.zeros_like(z), torch.ones_like(z)
        std = (var + 1e-4 * a.ac).sqrt()
        ais.append(ais_log_likelihood(x, log_joint, mean, std, args.ais_chains, args.ais_steps, args.ais_eps)
                   .mean().item())
        print(f"AIS batch {k + 1}/{args.ais_batches}: log p(x) {ais[-1]:.3f}", flush=True)
    se = lambda v: float(np.std(v) / math.sqrt(len(v)))  # [official validate process_stats]
    res = {"step": state["step"], "elbo_estimate": float(np.mean(elbos)), "elbo_se": se(elbos),
           "ais_log_px": float(np.mean(ais)), "ais_se": se(ais), "ais_images": len(ais) * a.batch_size,
           "ais_chains": args.ais_chains, "ais_steps": args.ais_steps}
    print(f"ELBO {'estimate (not a bound)' if T is not None else 'bound'} {res['elbo_estimate']:.2f} +- "
          f"{res['elbo_se']:.2f} | AIS log p(x) {res['ais_log_px']:.2f} +- {res['ais_se']:.2f} | " + json.dumps(res))
    with open(os.path.join(os.path.dirname(os.path.abspath(args.evaluate)), "eval.json"), "w") as f:
        json.dump(res, f, indent=1)
    return res


# ==== Main ====
def main(argv=None):
    args = derive_defaults(parse_args(argv))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("CUDA not available; pass --device cpu")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.benchmark = not args.deterministic
    torch.use_deterministic_algorithms(args.deterministic)
    if args.evaluate:
        return evaluate(args)
    device, toy = torch.device(args.device), args.dataset == "toy4"
    args.out_dir = args.out_dir or os.path.join("runs", f"avb-{args.dataset}-s{args.seed}")
    ckpt_path = common.prepare_run(args.out_dir, args.resume)
    scale = 1.0 if toy else 1.0 / (28 * 28)                              # PAPER-VS-CODE: official 1/(H*W*C)
    train_set = None if toy else split_mnist(args)[0]
    encoder, decoder, T = (m if m is None else m.to(device) for m in build_models(args))
    opt_G = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=args.lr, betas=tuple(args.betas))
    # PAPER-VS-CODE: two learning rates (official run.py) where Alg. 1 has one step size h_i
    opt_D = None if T is None else torch.optim.Adam(T.parameters(), lr=args.lr_adv, betas=tuple(args.betas))
    nets = dict(encoder=encoder, decoder=decoder, T=T, opt_G=opt_G, opt_D=opt_D)
    fixed_z = torch.randn(64, args.z_dim, generator=torch.Generator().manual_seed(args.seed)).to(device)
    step = 0
    if ckpt_path:
        s = common.load_checkpoint(ckpt_path, device, args, shape_flags=SHAPE_FLAGS)
        for k, obj in nets.items():
            obj is None or obj.load_state_dict(s[k])
        step, fixed_z = s["step"], s["fixed_z"]
        common.set_rng_state(s["rng"])
    print(json.dumps(vars(args), indent=1), flush=True)
    print(f"device {device} | torch {torch.__version__} | params " + " | ".join(
        f"{k} {sum(p.numel() for p in m.parameters()):,}" for k, m in list(nets.items())[:3] if m is not None)
        + f" | loss scale {scale:.6g}", flush=True)
    with open(os.path.join(args.out_dir, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=1)
    mpath = os.path.join(args.out_dir, "metrics.jsonl")
    if ckpt_path and os.path.exists(mpath):                              # log each step once across resumes
        with open(mpath) as f:
            keep = [ln for ln in f if json.loads(ln)["step"] <= step]
        with open(mpath, "w") as f:
            f.writelines(keep)
    if toy:
        draw_x = lambda: toy_batch(args.batch_size, device)              # torch RNG, resumable
    else:
        per_step = 1 + args.adv_steps if (args.update == "alternating" and T is not None) else 1
        batches = binary_batches(train_set, args, step * per_step, device)
        draw_x = lambda: next(batches)
    os.makedirs(os.path.join(args.out_dir, "samples"), exist_ok=True)
    if not ckpt_path:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # training RNG untouched
            reals = (toy_batch(64, device).view(64, 1, 2, 2) if toy
                     else binarize(torch.stack([train_set[i][0] for i in range(min(64, len(train_set)))]).to(device)))
        torchvision.utils.save_image(reals, os.path.join(args.out_dir, "reals.png"), nrow=8)
    metrics, t0, t_start, step0 = {"step": step}, time.time(), time.time(), step
    while step < args.steps:
        out = train_step(encoder, decoder, T, opt_G, opt_D, draw_x, args, scale)
        step += 1
        fid_now = args.fid_every and (step % args.fid_every == 0 or step == args.steps)
        if step % args.log_every == 0 or step == args.steps or fid_now:   # a FID step is a log step
            it_s = (step - metrics["step"]) / max(time.time() - t0, 1e-9)
            metrics = {"step": step, **{k: v.item() for k, v in out.items()},
                       "it_s": it_s, "eta_s": (args.steps - step) / max(it_s, 1e-9)}
            if fid_now:
                metrics["fid"] = evaluate_fid(decoder, args)
            print(f"step {step}/{args.steps} | " + " | ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                                                             if k not in ("step", "eta_s"))
                  + f" | eta {metrics['eta_s'] / 3600:.1f}h", flush=True)
            with open(mpath, "a") as f:
                f.write(json.dumps(metrics) + "\n")
            t0 = time.time()
        if args.sample_every and (step % args.sample_every == 0 or step == args.steps):
            with torch.no_grad():                                        # decoder means of fixed z ~ p(z)
                grid = torch.sigmoid(decoder(fixed_z)).view(64, 1, *((2, 2) if toy else (28, 28)))
            torchvision.utils.save_image(grid, os.path.join(args.out_dir, "samples", f"{step:07d}.png"), nrow=8)
            if toy:
                latent_scatter(encoder, os.path.join(args.out_dir, "samples", f"latent_{step:07d}.png"),
                               args.eps_dim if args.model == "avb" else args.z_dim, seed=args.seed)
        if step % args.ckpt_every == 0 or step == args.steps:
            common.save_checkpoint(os.path.join(args.out_dir, "ckpt.pt"), {
                "step": step, "args": vars(args), "fixed_z": fixed_z, "rng": common.rng_state(),
                **{k: None if m is None else m.state_dict() for k, m in nets.items()}})
    if args.export_samples:
        export_samples(decoder, args, os.path.join(args.out_dir, f"samples_{args.export_samples}.npz"))
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    rate = (step - step0) / max(time.time() - t_start, 1e-9)
    print(f"done: {step - step0} steps at {rate:.2f} steps/s (incl. logging/sampling) | peak memory {peak:.0f} "
          f"MiB ({'CUDA allocated' if device.type == 'cuda' else 'process RSS'})", flush=True)
    return metrics


if __name__ == "__main__":
    main()
