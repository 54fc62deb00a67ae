"""AVB: Adversarial Variational Bayes: Unifying Variational Autoencoders and GANs.
Mescheder, Nowozin, Geiger. ICML 2017. arXiv:1701.04722 (v4)
Official code: LMescheder/AdversarialVariationalBayes @ee29153 (avb/, notebooks/AVB_toy_example)

Paper -> code   (sections after Sec. 3 are cited by name: their numbers were not checked)
  Sec. 3     neural sampler z_phi(x, eps), noise inside the net ..... Encoder, ToyEncoder
  Sec. 3     decoder p_theta(x|z), Bernoulli logits ................. Decoder (official conv0)
  Eq. (3.3)  adversary objective, maximized over T .................. adversary_loss(), Adversary
  Prop. 1    T* = log q(z|x) - log p(z); log p(z) built into T ...... Adversary.forward
  Eq. (3.7)  reparametrized primal objective (number unverified) .... primal_loss(), elbo_terms()
  Prop. 2    T held fixed when differentiating w.r.t. phi ........... train_step(), backward(inputs)
  Alg. 1     theta, phi, psi updated from the same sample ........... train_step()
  AC sect.   r_alpha = N(mu(x), sd(x)^2), z~ = (z - mu) / sd ......... Encoder(ac=True), elbo_terms
  Tab. 2     VAE baseline; log p(x) by AIS with HMC ................. GaussianEncoder, evaluate()
  Toy expt.  4-point data, per-input latent scatter ................. toy_batch(), posterior_figure
Deviations and code facts (each also tagged in the code; grep DEVIATION|PAPER-VS-CODE)
  1. PAPER-VS-CODE  Simultaneous updates (official train.py, = Alg. 1); the toy notebook: 1 primal,
     then 2 adversary steps (--update). Alg. 1: one step size; the code: 5e-5 / 1e-4 (we follow it).
  2. PAPER-VS-CODE  AC: KL term = single-sample log r_alpha - log p at the drawn z, stop-gradient
     moments (official avb/__init__.py), not the closed-form Gaussian KL (same expectation).
  3. PAPER-VS-CODE  sd = sqrt(var + 1e-4) in z~, but log r_alpha uses log var without 1e-4 (kept).
  4. PAPER-VS-CODE  Primal loss times 1/(28*28) for images (official); the toy notebook uses 1.
  5. PAPER-VS-CODE  Test images are dynamically binarized too; AIS uses 20 batches x 128 images.
  6. PAPER-VS-CODE  AIS starts from the prior for AVB without AC (no encoder moments).
  7. PAPER-VS-CODE  The toy adversary adds ||z||^2 (notebook), not the log prior's 1/2 ||z||^2.
  8. PAPER-VS-CODE  Decoder ConvTs 1-3 use ReLU, the official conv2d_transpose default (the ELU
     arg-scope never reaches it); whether the paper's text says ELU is unverified.
  9. DEVIATION  --model vae: AVB's conv0 decoder, lr 5e-5, batch 128 (like-for-like; the official
     VAE scripts: conv1, 1e-4, 64); toy VAE: closed-form KL, not the notebook's 1-sample one.
 10. DEVIATION  MNIST via torchvision (first 5,000 train images = validation, as the official TF
     loader); shapes and folder:<path> made gray, 28x28, binarized alike. No CelebA, 8 schools.
 11. DEVIATION  AIS: the official code adapts the HMC step inside each weighted chain, so a chain's
     kernel depends on its own past (biased on small batches); --ais-adapt pilot (default) adapts it
     by the same rule on one extra chain per image, and the weighted chains replay it.
Unverified (card): Eq. number (3.7) (early: 3.9), Tab. 2 except the 32-dim AIS column, toy table.
Datasets: mnist, shapes (offline), folder:<path> (first --val-size images: validation and test),
toy4. --steps counts primal (encoder + decoder) updates.
Run
  python avb.py --dataset mnist                                   # AVB + AC, d = 32 (Tab. 2), 1 GPU
  python avb.py --dataset mnist --z-dim 8 --eps-dim 32 --eps-nbasis 16   # AVB + AC, d = 8
  python avb.py --dataset mnist --z-dim 8 --eps-dim 32 --no-ac           # AVB, d = 8
  python avb.py --dataset mnist --model vae [--z-dim 8]           # VAE, d = 32 [8], same decoder
  python avb.py --evaluate runs/avb-mnist-s0/ckpt.pt  # ELBO, AIS 8 x 2000 (d=8 no AC: 5 x 1000)
  python avb.py --dataset toy4 [--model vae]                      # samples/*.png: posteriors
  python avb.py --resume --out-dir RUN --export-samples 10000     # samples_10000.npz for fid.py
Sampling: decoder, z_dim = avb.load_generator("runs/avb-mnist-s0/ckpt.pt", "cpu")  # no BN in it
  x = torch.sigmoid(decoder(torch.randn(64, z_dim)))   # Bernoulli means, (64, 1, 28, 28) in [0, 1]
Paper reports: AIS log p(x) = -80.2 nats, AVB + AC, d = 32, binarized MNIST (Tab. 2; +- and other
rows unverified). Our numbers: README.
"""

import argparse
import contextlib
import itertools
import json
import math
import os
import random

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import common

LOG_2PI = math.log(2 * math.pi)
EVAL_FLAGS = ("evaluate", "ais_chains", "ais_steps", "ais_batches", "ais_eps", "ais_schedule",
              "ais_adapt", "elbo_batches")  # used by --evaluate only: free to change on --resume


# ==== Args ====
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                formatter_class=common.HelpFormatter)
    pos, nonneg, lr = common.positive_int, common.nonnegative_int, common.positive_float
    o, nb = "official experiments/*/run.py", "toy notebook"
    g = p.add_argument_group("paper").add_argument
    g("--dataset", default="mnist", help="mnist; shapes, folder:<path> (gray 28x28: DEVIATION); "
      "toy4 [Tab. 2, toy expt.]")
    g("--model", default="avb", choices=["avb", "vae"], help="AVB or the VAE baseline [Tab. 2]")
    g("--ac", action=argparse.BooleanOptionalAction, help="adaptive contrast; default: on for "
      f"AVB on images, off for the toy and the VAE [AC sect.; {o}]")
    g("--z-dim", type=pos, help=f"latent d; default 32 images, 2 toy [Tab. 2; {o}]")
    g("--eps-dim", type=pos, help=f"encoder noise size; default 64 [{o}, {nb}]")
    g("--eps-nbasis", type=pos, default=32, help=f"AC basis vectors m [{o}]")
    g("--g-width", type=pos, default=64, help="encoder, decoder width [official df_dim = gf_dim]")
    g("--d-width", type=pos, help=f"adversary width; default 1024, toy 256 [official conv0, {nb}]")
    g("--adv-feat", type=pos, default=8192, help="size of theta(x), s(z) [official conv0.py]")
    g("--update", choices=["simultaneous", "alternating"], help="default: simultaneous for images, "
      f"alternating for the toy [Alg. 1; official train.py, {nb}]")
    g("--d-steps", "--adv-steps", dest="d_steps", type=pos, default=2, help=f"T steps per primal "
      f"step if alternating [{nb}]")
    g("--lr", type=lr, help=f"primal Adam lr; default 5e-5 images, 2e-5 toy [{o}, {nb}]")
    g("--lr-d", "--lr-adv", dest="lr_d", type=lr, default=1e-4, help=f"adversary lr [{o}, {nb}]")
    g("--betas", type=common.unit_float, nargs=2, help="Adam betas; default 0.5 0.999 images, "
      f"0.9 0.999 toy [official train.py, {nb}]")
    g("--batch-size", type=pos, help=f"default 128 images, 512 toy [{o}, {nb}]")
    g("--steps", type=pos, help="primal updates; default 2.5M images (an upper bound), 100k toy "
      "[UNSPECIFIED: official nsteps, notebook]")
    g("--val-size", type=nonneg, default=5000, help="first N train images = validation [official]")
    e = p.add_argument_group("eval").add_argument
    e("--evaluate", metavar="CKPT", help="ELBO and AIS log p(x) of CKPT (+ eval.json) [Tab. 2]")
    e("--ais-chains", type=pos, default=8, help=f"chains per image (5 for d=8 no AC) [{o}]")
    e("--ais-steps", type=pos, default=2000, help=f"annealing steps K (1000 for d=8 no AC) [{o}]")
    e("--ais-batches", type=pos, default=20, help=f"test batches [{o} --test-nais]")
    e("--ais-eps", type=lr, default=0.01, help="initial HMC step, times sd(x) [official ais.py]")
    e("--ais-schedule", choices=["linear", "sigmoid"], default="linear",
      help="beta schedule [official ais.py: linear; Wu et al. 2017: sigmoid]")
    e("--ais-adapt", choices=["pilot", "chain", "off"], default="pilot", help="step adaptation "
      "(/1.1 below acceptance 0.6, x1.1 above 0.7) on a pilot chain replayed by the weighted "
      "ones, within each chain (official: biased), or none [DEVIATION, official ais.py]")
    e("--elbo-batches", type=pos, default=200, help="test batches of the ELBO [official validate]")
    r = p.add_argument_group("run").add_argument
    r("--data-root", default="data", help="torchvision download folder [run]")
    r("--out-dir", help="default: runs/avb-<dataset>-s<seed>[-<hash of other flags>] [run]")
    r("--seed", type=nonneg, default=0, help="seeds python, numpy, torch [run]")
    r("--device", default="cuda", help="cuda or cpu; no silent fallback [run]")
    r("--num-workers", type=nonneg, default=4, help="DataLoader workers [run]")
    r("--log-every", type=pos, default=100, help="steps between log lines [run]")
    r("--sample-every", type=nonneg, default=1000, help="steps between grids, 0 = off [run]")
    r("--ckpt-every", type=pos, default=10_000, help="steps between checkpoints [run]")
    r("--resume", action="store_true", help="continue out_dir/ckpt.pt [run]")
    r("--deterministic", action="store_true", help="deterministic kernels (CUDA: sets "
      "CUBLAS_WORKSPACE_CONFIG=:4096:8) [run]")
    r("--amp", choices=["off", "bf16"], default="off", help="bf16 autocast (paper: fp32) [run]")
    r("--export-samples", type=nonneg, default=0, help="N decoder means at the end, uint8, to "
      "samples_N.npz, 0 = off [UNSPECIFIED: means]")
    r("--fid-every", type=nonneg, default=0, help="FID, IS via fid.py every K steps, 0 = off; "
      "not the paper's metric [run]")
    r("--fid-samples", type=pos, default=10_000, help="generated images per FID [run]")
    r("--fid-weights", help="FID Inception weight file (fid.py) [run]")
    args = p.parse_args(argv)

    # Values that depend on the configuration (the card's defaults table), in one place
    if args.out_dir is None:
        args.out_dir = common.default_out_dir("avb", args, vars(p.parse_args([])))
    toy = args.dataset == "toy4"
    if not (toy or args.dataset in ("mnist", "shapes") or args.dataset.startswith("folder:")):
        raise common.UserError(f"unknown dataset {args.dataset!r}; avb.py takes mnist, shapes, "
                               "folder:<path> or toy4")
    if toy:      # notebooks/AVB_toy_example.ipynb
        table = dict(z_dim=2, eps_dim=64, d_width=256, batch_size=512, lr=2e-5,
                     betas=[0.9, 0.999], update="alternating", steps=100_000)
    else:        # experiments/avb_mnist_32_ac/run.py
        table = dict(z_dim=32, eps_dim=64, d_width=1024, batch_size=128, lr=5e-5,
                     betas=[0.5, 0.999], update="simultaneous", steps=2_500_000)
    for k, v in table.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.ac is None:
        args.ac = args.model == "avb" and not toy
    if args.ac and (toy or args.model == "vae"):
        raise common.UserError("--ac needs AVB's image encoder (--model avb, an image --dataset)")
    if toy and (args.fid_every or args.export_samples):
        raise common.UserError("--fid-every / --export-samples are for the image datasets")
    if max(args.betas) >= 1:
        raise common.UserError(f"--betas {args.betas}: Adam needs each beta < 1")
    return args


# ==== Data ====
def toy_batch(n, device, gen=None):
    """x uniform over the four one-hot 2x2 images [toy expt.; notebook get_data_samples]."""
    return F.one_hot(torch.randint(0, 4, (n,), device=device, generator=gen), 4).float()  # (n, 4)


def binarize(x, gen=None):
    """Dynamic binarization 1[u <= intensity], fresh on every read [official inputs.py]."""
    p = (x + 1) / 2                                                      # [-1, 1] -> [0, 1]
    if p.shape[1] == 3:                              # DEVIATION: RGB stand-ins -> ITU-R 601 gray
        p = (p * p.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return (torch.rand(p.shape, generator=gen, device=p.device) <= p).float()  # (B, 1, H, W)


def load_images(args):
    """(train, test); the first val_size training images are validation, left out [official
    download_mnist.py]. DEVIATION: torchvision's MNIST files, not the official TFRecords."""
    size = None if args.dataset == "mnist" else 28
    full = common.load_dataset(args.dataset, args.data_root, size, train=True)
    full[0]                                          # an unreadable image fails now, at start-up
    train = torch.utils.data.Subset(full, range(args.val_size, len(full)))
    if len(train) < args.batch_size:
        raise common.UserError(f"{args.dataset}: {len(full)} images, --val-size {args.val_size} "
                               f"leaves {len(train)} for training, fewer than --batch-size")
    if args.dataset.startswith("folder:"):           # no test split: the validation images
        return train, torch.utils.data.Subset(full, range(args.val_size))
    return train, common.load_dataset(args.dataset, args.data_root, size, train=False)


def data_stream(train_set, args, step, device):
    """draw_x() -> the next training batch; batch k is the same after a resume."""
    if train_set is None:
        return lambda: toy_batch(args.batch_size, device)                # training RNG: resumable
    per_step = 1 + args.d_steps if args.update == "alternating" and args.model == "avb" else 1
    batches = common.infinite_batches(train_set, args.batch_size, args.seed, step * per_step,
                                      args.num_workers, device=device)
    return lambda: binarize(next(batches)[0].to(device, non_blocking=True))


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
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def mlp(sizes, act):
    layers = [m for i, o in zip(sizes[:-1], sizes[1:]) for m in (nn.Linear(i, o), act())]
    return nn.Sequential(*layers[:-1])                                   # no output activation


def convs_5x5(width, bias):
    """Conv 5x5 w, 2w, 4w, 8w with strides 1, 1, 2, 2: 28x28 -> 7x7 [official conv0*.py]."""
    ch = [1, width, 2 * width, 4 * width, 8 * width]
    return nn.ModuleList(nn.Conv2d(ch[i], ch[i + 1], 5, stride=(1, 1, 2, 2)[i], padding=2,
                                   bias=bias or i == 3) for i in range(4))


class ConvTrunk(nn.Module):
    """x -> 2x - 1 -> convs_5x5, BN + ELU on convs 1-3, ELU on conv 4 [official conv0_ac.py]."""

    def __init__(self, width):
        super().__init__()
        self.convs = convs_5x5(width, bias=False)                        # no bias under BN (slim)
        # slim batch_norm: decay 0.999 -> momentum 0.001, eps 1e-3; batch stats in train mode
        self.bns = nn.ModuleList(nn.BatchNorm2d(c.out_channels, momentum=0.001, eps=1e-3)
                                 for c in self.convs[:3])

    def forward(self, x):
        h = 2 * x - 1                                                    # centred input [official]
        for i, conv in enumerate(self.convs):
            h = F.elu(self.bns[i](conv(h)) if i < 3 else conv(h))
        return h.flatten(1)                                              # (B, 8w*7*7)


class BasisMLP(nn.Module):
    """m independent MLPs v_i(eps_i): eps_dim -> 128 -> 128 -> 128 -> d, ELU [official conv0_ac]."""

    def __init__(self, m, eps_dim, z_dim, hidden=128):
        super().__init__()
        sizes = list(zip([eps_dim, hidden, hidden, hidden], [hidden, hidden, hidden, z_dim]))
        xavier = lambda i, o: (torch.rand(m, i, o) * 2 - 1) * math.sqrt(6 / (i + o))  # per basis
        self.W = nn.ParameterList(nn.Parameter(xavier(i, o)) for i, o in sizes)
        self.b = nn.ParameterList(nn.Parameter(torch.zeros(m, 1, o)) for _, o in sizes)

    def forward(self, eps):                                              # eps (m, B, eps_dim)
        for k, (W, b) in enumerate(zip(self.W, self.b)):
            eps = torch.baddbmm(b, eps, W)                               # (m, B, out)
            eps = F.elu(eps) if k < len(self.W) - 1 else eps
        return eps                                                       # (m, B, d)


class Encoder(nn.Module):
    """Neural sampler z_phi(x, eps) for 28x28 binary x -> z, E[z|x], Var[z|x] [Sec. 3, AC sect.].
    ac=False (official conv0): eps (B, eps_dim) enters after every conv through a learned Linear.
    ac=True (official conv0_ac): z = z0(x) + sum_i a_i(x) v_i(eps_i), moments from batch stats."""

    def __init__(self, z_dim, eps_dim, eps_nbasis, width, ac):
        super().__init__()
        self.ac, self.eps_dim, self.m, feat = ac, eps_dim, eps_nbasis, 8 * width * 49
        if ac:
            self.trunk, self.z0 = ConvTrunk(width), nn.Linear(feat, z_dim)
            self.a = nn.ModuleList(nn.Linear(feat, z_dim) for _ in range(eps_nbasis))
            self.v = BasisMLP(eps_nbasis, eps_dim, z_dim)
        else:
            self.convs = convs_5x5(width, bias=True)
            sizes = [width * 784, 2 * width * 784, 4 * width * 196, 8 * width * 49]
            self.inject = nn.ModuleList(nn.Linear(eps_dim, s) for s in sizes)  # ops.add_linear
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
        var = (a ** 2 * v.var(1, unbiased=False)).sum(1)                 # divide-by-B [tf moments]
        return z, mean, var


class GaussianEncoder(nn.Module):
    """VAE baseline q(z|x) = N(mu, sd^2): ConvTrunk, or 3 x [Linear 64, ELU] (toy) [official vae/].
    DEVIATION: paired with AVB's conv0 decoder; the released VAE scripts use the smaller conv1."""

    def __init__(self, z_dim, width, toy):
        super().__init__()
        self.trunk = (nn.Sequential(mlp([4, width, width, width], nn.ELU), nn.ELU()) if toy
                      else ConvTrunk(width))
        feat = width if toy else 8 * width * 49
        self.mean, self.log_sd = nn.Linear(feat, z_dim), nn.Linear(feat, z_dim)
        init_tf(self)

    def forward(self, x, eps=None):
        h = self.trunk(x)
        mean, log_sd = self.mean(h), self.log_sd(h)
        eps = torch.randn_like(mean) if eps is None else eps
        return mean + log_sd.exp() * eps, mean, (2 * log_sd).exp()      # reparameterized sample


class Decoder(nn.Module):
    """Bernoulli logits: Linear + ELU, ConvT 5x5 4w s2, 2w s2, w s1 (ReLU), 1 s1 [official]."""

    def __init__(self, z_dim, width):
        super().__init__()
        self.width, self.fc = width, nn.Linear(z_dim, 8 * width * 49)
        # PAPER-VS-CODE: ReLU, the default of the custom conv2d_transpose (the ELU scope misses it).
        # UNSPECIFIED-equivalent: TF SAME pads stride-2 ConvT unevenly (same shapes, 1-px shift)
        convt = lambda i, o, s: nn.ConvTranspose2d(i, o, 5, stride=s, padding=2,
                                                   output_padding=s - 1)
        w = [8 * width, 4 * width, 2 * width, width]
        self.net = nn.Sequential(convt(w[0], w[1], 2), nn.ReLU(), convt(w[1], w[2], 2), nn.ReLU(),
                                 convt(w[2], w[3], 1), nn.ReLU(), convt(w[3], 1, 1))
        init_tf(self)

    def forward(self, z):
        h = F.elu(self.fc(z)).view(-1, 8 * self.width, 7, 7)             # (B, 8w, 7, 7)
        return self.net(h)                                               # (B, 1, 28, 28) logits


class Adversary(nn.Module):
    """T(x, z) = sum_k theta_k(x) s_k(z) + T_x(x) + T_z(z) + 1/2 ||z||^2 [official models/conv0]."""

    def __init__(self, z_dim, hidden=1024, feat=8192, x_dim=784):
        super().__init__()
        tower = lambda i, o: mlp([i, hidden, hidden, hidden, o], lambda: nn.LeakyReLU(0.2))
        self.theta, self.s = tower(x_dim, feat), tower(z_dim, feat)
        self.T_x, self.T_z = tower(x_dim, 1), tower(z_dim, 1)
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
        self.eps_dim = eps_dim
        self.net = init_tf(mlp([4 + eps_dim, width, width, width, z_dim], nn.ELU))

    def forward(self, x, eps=None):
        eps = torch.randn(x.shape[0], self.eps_dim, device=x.device) if eps is None else eps
        return self.net(torch.cat([x, eps], 1)), None, None


class ToyAdversary(nn.Module):
    """Linear 256 + ELU, 5 x [h <- ELU(h + L1(ReLU(L0 h)))], L1 = 0 at init, Linear 1 [notebook]."""

    def __init__(self, z_dim, hidden=256, n_blocks=5):
        super().__init__()
        self.inp, self.out = nn.Linear(4 + z_dim, hidden), nn.Linear(hidden, 1)
        self.blocks = nn.ModuleList(mlp([hidden, hidden, hidden], nn.ReLU) for _ in range(n_blocks))
        init_tf(self)
        for block in self.blocks:
            nn.init.zeros_(block[-1].weight)                             # residual branch = 0

    def forward(self, x, z):
        h = F.elu(self.inp(torch.cat([x, z], 1)))
        for block in self.blocks:
            h = F.elu(h + block(h))
        # PAPER-VS-CODE: the notebook adds ||z||^2, not the log prior's 1/2 ||z||^2
        return self.out(h).squeeze(1) + (z ** 2).sum(1)


def build_models(args, device="cpu"):
    """(encoder, decoder, T) on `device`; T is None for the VAE."""
    toy, w, T = args.dataset == "toy4", args.g_width, None
    if args.model == "vae":
        encoder = GaussianEncoder(args.z_dim, w, toy)
    elif toy:
        encoder = ToyEncoder(args.z_dim, args.eps_dim, w)
    else:
        encoder = Encoder(args.z_dim, args.eps_dim, args.eps_nbasis, w, args.ac)
    decoder = init_tf(mlp([args.z_dim, w, w, w, 4], nn.ELU)) if toy else Decoder(args.z_dim, w)
    if args.model == "avb":
        T = (ToyAdversary(args.z_dim, args.d_width) if toy
             else Adversary(args.z_dim, args.d_width, args.adv_feat))
    return encoder.to(device), decoder.to(device), None if T is None else T.to(device)


def build_training(args, device):
    """encoder, decoder, T and Adam for {encoder, decoder} (opt_G) and T (opt_D). PAPER-VS-CODE:
    two learning rates (official run.py) where Alg. 1 has one step size h_i."""
    encoder, decoder, T = build_models(args, device)
    adam = lambda params, lr: torch.optim.Adam(params, lr=lr, betas=tuple(args.betas))
    return dict(encoder=encoder, decoder=decoder, T=T,
                opt_G=adam([*encoder.parameters(), *decoder.parameters()], args.lr),
                opt_D=None if T is None else adam(T.parameters(), args.lr_d))


def load_generator(ckpt_path, device="cpu"):
    """(decoder, z_dim) from the checkpoint alone: sigmoid(decoder(z)), z ~ N(0, I), are the
    Bernoulli means the paper shows as samples (toy: 4 logits per sample)."""
    state = common.load_checkpoint(ckpt_path, device)
    args = argparse.Namespace(**state["args"])
    decoder = build_models(args, device)[1]
    decoder.load_state_dict(state["decoder"])
    return decoder.eval().requires_grad_(False), args.z_dim


# ==== Losses ====
def reconstruction_error(logits, x):
    """-log p_theta(x|z) per example, Bernoulli summed over pixels [official get_reconstr_err]."""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)


def log_prior(z):
    return -0.5 * (z ** 2 + LOG_2PI).sum(1)                              # log N(z; 0, I)


def contrast_log_ratio(z, z_norm, var):
    """log r_alpha(z|x) - log p(z) at the drawn z [AC sect.; official avb/__init__.py]."""
    log_r = -0.5 * (z_norm ** 2 + var.log() + LOG_2PI).sum(1)           # PAPER-VS-CODE: no 1e-4
    return log_r - log_prior(z)


def gaussian_kl(mean, var):
    """KL(N(mu, var), N(0, I)) = 1/2 sum(mu^2 + var - 1 - log var) [Sec. 2; official vae get_KL].
    DEVIATION for the toy VAE, whose notebook uses the single-sample estimate (same expectation)."""
    return 0.5 * (mean ** 2 + var - 1 - var.log()).sum(1)


def primal_loss(recon, kl, scale):
    """Negated Eq. (3.7): mean over the batch of recon + KL^, times 1/(H*W*C) [official]."""
    return scale * (recon + kl).mean()


def adversary_loss(T_q, T_p):
    """Eq. (3.3) as a minimization: (x, z ~ q) pairs get label 1, (x, z ~ p) pairs label 0."""
    return (F.binary_cross_entropy_with_logits(T_q, torch.ones_like(T_q))
            + F.binary_cross_entropy_with_logits(T_p, torch.zeros_like(T_p)))


def elbo_terms(encoder, decoder, T, x, ac):
    """One forward pass: per-example recon and KL^ (phi gets T's gradient through z~ only), plus T
    on the detached q-pairs and on prior pairs with the same x [Eq. 3.3, 3.7; official AVB]."""
    z, mean, var = encoder(x)
    recon = reconstruction_error(decoder(z), x)
    if T is None:                                                        # VAE: closed-form KL
        return dict(recon=recon, kl=gaussian_kl(mean, var))
    if ac:                                                               # KL^ = T(x, z~) + log r/p
        mean, var = mean.detach(), var.detach()                          # stop-gradient moments
        z_norm = (z - mean) / (var + 1e-4).sqrt()                        # z~ = (z - mu) / sd
        kl = T(x, z_norm) + contrast_log_ratio(z, z_norm, var)          # PAPER-VS-CODE: 1 sample
    else:
        z_norm = z                                                       # mu = 0, sd = 1: KL^ = T
        kl = T(x, z)
    return dict(recon=recon, kl=kl, T_q=T(x, z_norm.detach()), T_p=T(x, torch.randn_like(z)))


# ==== Train step ====
def train_step(encoder, decoder, T, opt_G, opt_D, draw_x, args, scale,
               autocast=contextlib.nullcontext):
    """Alg. 1: theta, phi descend the negated Eq. (3.7), psi (T) ascends Eq. (3.3)."""
    def forward():
        with autocast():
            return elbo_terms(encoder, decoder, T, draw_x(), args.ac)

    def step_D(t):
        loss_D = adversary_loss(t["T_q"].float(), t["T_p"].float())
        opt_D.zero_grad(set_to_none=True)
        loss_D.backward(inputs=list(T.parameters()))                     # z~ detached: psi only
        opt_D.step()
        return loss_D

    t = forward()
    recon, kl = t["recon"].float(), t["kl"].float()
    loss_G = primal_loss(recon, kl, scale)
    opt_G.zero_grad(set_to_none=True)
    loss_G.backward(inputs=[*encoder.parameters(), *decoder.parameters()])  # T fixed (Prop. 2)
    out = dict(loss_G=loss_G, elbo=-(recon + kl).mean(), recon=recon.mean(), kl=kl.mean())
    if T is not None and args.update == "simultaneous":
        out["loss_D"] = step_D(t)          # same sample, grads at the same parameters [train.py]
    opt_G.step()
    if T is not None and args.update == "alternating":
        for _ in range(args.d_steps):      # PAPER-VS-CODE: toy notebook, fresh x, eps, z_p per step
            out["loss_D"] = step_D(forward())
    if T is not None:                      # T on q- and prior pairs of the primal sample
        out.update(T_q=t["T_q"].float().mean(), T_p=t["T_p"].float().mean())
    return {k: v.detach() for k, v in out.items()}


# ==== Eval ====
def annealing_schedule(n_steps, kind="linear", rad=4.0):
    """beta_0 = 0, ..., beta_K = 1: linear [official ais.py], or sigmoid(rad (2t/K - 1)) rescaled
    to [0, 1] (Wu et al. 2017, after Grosse et al.: denser near 0 and 1)."""
    t = torch.linspace(0, 1, n_steps + 1, dtype=torch.float64)
    if kind == "sigmoid":
        s = torch.sigmoid(rad * (2 * t - 1))
        t = (s - s[0]) / (s[-1] - s[0])
    return t.tolist()


def ais_log_likelihood(x, log_joint, init_mean, init_std, n_chains=8, n_steps=1000, eps=0.01,
                       schedule="linear", adapt="pilot", n_leapfrog=10, gen=None, progress=None):
    """AIS with HMC (Wu et al. 2017; official validate/ais.py) -> (log p^(x) per example (B,), HMC
    steps used (K - 1,), mean acceptance). r_0 = N(init_mean, diag init_std^2), both (B, d);
    log_joint(z, x) = log p(x, z) per example. The step eps * sd(x) adapts by the official rule
    (/1.1 below batch acceptance 0.6, x1.1 above 0.7) on adapt="pilot": one extra chain, weights
    discarded, replayed by the weighted chains (DEVIATION); "chain": inside each chain (official,
    biased: a chain's kernel depends on its own past); "off": fixed."""
    betas, (B, d) = annealing_schedule(n_steps, schedule), init_mean.shape
    dev, dt = x.device, x.dtype

    def run(C, steps):  # C x B chains; steps (K - 1,) fixed, or None: each chain adapts its own
        mean, std = init_mean.expand(C, B, d), init_std.expand(C, B, d)
        xs = x.repeat(C, *[1] * (x.dim() - 1))                           # (C*B, ...), chain-major
        randn = lambda: torch.randn(mean.shape, generator=gen, device=dev, dtype=dt)

        def terms(z):  # log p(x, z), log r_0(z) (normalized) and their gradients
            with torch.enable_grad():
                zg = z.detach().requires_grad_(True)
                lj = log_joint(zg.reshape(C * B, d), xs).view(C, B)
                g, = torch.autograd.grad(lj.sum(), zg)
            lr = (-0.5 * ((z - mean) / std) ** 2 - std.log() - 0.5 * LOG_2PI).sum(-1)
            return lj.detach(), lr, g, -(z - mean) / std ** 2

        # U_beta = -beta log p(x, z) - (1 - beta) log r_0(z), and its gradient
        energy = lambda c, b: (-(b * c[0] + (1 - b) * c[1]), -(b * c[2] + (1 - b) * c[3]))
        z = mean + std * randn()                                         # z ~ r_0
        cur, log_w = terms(z), torch.zeros(C, B, dtype=dt, device=dev)
        step, used, acc = torch.full((C, 1, 1), eps, dtype=dt, device=dev), [], 0.0
        for i in range(n_steps):
            log_w += (betas[i + 1] - betas[i]) * (cur[0] - cur[1])      # U_i(z) - U_i+1(z)
            if progress is not None:
                progress.update(1)
            if i == n_steps - 1:
                break
            step = step if steps is None else steps[i].expand(C, 1, 1)
            used.append(step[:, 0, 0])
            h, beta = step * std, betas[i + 1]                           # per-dimension eps * sd(x)
            U0, gU = energy(cur, beta)
            p = randn()
            H0, p, zq = U0 + 0.5 * (p ** 2).sum(-1), p - 0.5 * h * gU, z    # half momentum step
            for l in range(n_leapfrog + 1):                                  # 11 position updates
                zq = zq + h * p
                new = terms(zq)
                U1, gU = energy(new, beta)
                p = p - h * gU if l < n_leapfrog else p - 0.5 * h * gU  # 10 full, 1 closing half
            u = torch.rand(H0.shape, generator=gen, device=dev, dtype=dt)
            accept = u < torch.exp(H0 - U1 - 0.5 * (p ** 2).sum(-1))    # Metropolis; NaN rejects
            z = torch.where(accept[..., None], zq, z)
            cur = [torch.where(accept if c.dim() == 2 else accept[..., None], n, c)
                   for n, c in zip(new, cur)]
            rate = accept.to(dt).mean(1).view(C, 1, 1)                   # batch rate, per chain
            acc = acc + rate.mean() / (n_steps - 1)
            if steps is None:
                step = torch.where(rate < 0.6, step / 1.1,
                                   torch.where(rate > 0.7, step * 1.1, step))
        return log_w, torch.stack(used) if used else step.new_zeros(0, C), float(acc)

    steps = torch.full((max(n_steps - 1, 0),), eps, dtype=dt, device=dev)  # adapt="off"
    if adapt == "pilot":
        steps = run(1, None)[1][:, 0]
    log_w, used, acc = run(n_chains, None if adapt == "chain" else steps)
    return torch.logsumexp(log_w, 0) - math.log(n_chains), used[:, 0], acc  # log-mean-exp


def decoder_means(decoder, n, z_dim, gen, device):
    """sigmoid(decoder(z)), z ~ N(0, I) from `gen` (never the training RNG): (n, 1, 28, 28)."""
    with torch.no_grad():
        return torch.sigmoid(decoder(torch.randn(n, z_dim, generator=gen).to(device)))


def export_samples(decoder, args, device, chunk=500):
    """samples_N.npz, uint8 NHWC for `python fid.py`: decoder means rounded as save_image rounds
    (UNSPECIFIED: means, not binary draws)."""
    gen, n = torch.Generator().manual_seed(args.seed + 2), args.export_samples
    x = [common.quantize(2 * decoder_means(decoder, min(chunk, n - i), args.z_dim, gen, device) - 1)
         for i in range(0, n, chunk)]
    np.savez_compressed(os.path.join(args.out_dir, f"samples_{n}.npz"), images=torch.cat(x).numpy())


def build_fid(args, device):
    """fid.TrainingFID, built at start-up: missing weights or reference data fail before step 1."""
    try:
        import fid  # evaluation only: a copy of this script without fid.py still trains
    except ImportError:
        raise common.UserError("--fid-every needs fid.py (the project's metric file) next to "
                               "avb.py") from None
    ev = fid.TrainingFID(args.dataset, args.data_root, 28, device, args.fid_samples,
                         weights=args.fid_weights)

    def evaluate_fid(decoder):  # {"fid", "is", "is_std"} of 2p - 1, p the decoder means
        gen = torch.Generator().manual_seed(args.seed + 3)  # re-seeded per use: not training RNG
        return ev(lambda n: 2 * decoder_means(decoder, n, args.z_dim, gen, device) - 1)
    return evaluate_fid


TOY_RGB = ((31, 119, 180), (214, 39, 40), (148, 103, 189), (23, 190, 207))  # x = e1 .. e4


def posterior_figure(encoder, path, lines, noise_dim, n=600, size=360, lim=3.5, seed=0):
    """z ~ q(z|x) for each toy input on [-lim, lim]^2, grey prior circles at radius 1, 2, 3 (the
    paper's toy latent-space figure), with a title strip and a colour key."""
    dev, m = next(encoder.parameters()).device, 28                       # m: margin for the axes
    eps = torch.randn(n, noise_dim, generator=torch.Generator().manual_seed(seed)).to(dev)
    px = lambda v: m + (v + lim) / (2 * lim) * size                      # z1 -> column, -z2 -> row
    img = common.canvas(size + 2 * m, size + 2 * m)
    turn = torch.linspace(0, 2 * math.pi, 720)
    for r in (1, 2, 3):                                                  # prior N(0, I) contours
        common.draw_polyline(img, list(zip(px(r * turn.cos()).tolist(),
                                           px(r * turn.sin()).tolist())), (190, 190, 190), 1)
    common.draw_polyline(img, [(m, m), (m + size, m), (m + size, m + size), (m, m + size),
                               (m, m)], (120, 120, 120), 1)
    ticks = [t for v in (-3, 0, 3) for t in ((px(v) - 4, m + size + 4, v), (6, px(-v) - 6, v))]
    img = common.draw_text(img, [(round(x), round(y), v) for x, y, v in ticks])
    for i, rgb in enumerate(TOY_RGB):          # each posterior a layer of 3x3 dots at alpha 150
        with torch.no_grad():
            z = encoder(F.one_hot(torch.full((n,), i, device=dev), 4).float(), eps)[0].cpu()
        cover = torch.zeros(img.shape[1:], dtype=torch.bool)
        cols, rows = px(z[:, 0]).round().long(), px(-z[:, 1]).round().long()
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                ok = ((cols + dx).clamp(0, img.shape[2] - 1) == cols + dx) & (
                    (rows + dy).clamp(0, img.shape[1] - 1) == rows + dy)
                cover[rows[ok] + dy, cols[ok] + dx] = True
        blend = (img.float() * 105 + torch.tensor(rgb).view(3, 1, 1) * 150) / 255
        img = torch.where(cover, blend.round().to(torch.uint8), img)
    key = [(f"q(z|x=e{i + 1})", rgb) for i, rgb in enumerate(TOY_RGB)]
    common.save_png(common.title_strip(img, lines, key=key), path)


def save_samples(step, encoder, decoder, fixed_z, args):
    """samples/<step>.png: 8x8 decoder means of the fixed z (images) or the posteriors (toy)."""
    path = os.path.join(args.out_dir, "samples", f"{step:07d}.png")
    if args.dataset != "toy4":
        with torch.no_grad():
            torchvision.utils.save_image(torch.sigmoid(decoder(fixed_z)), path, nrow=8)
        return
    lines = [f"avb.py --model {args.model} | toy4 | step {step} | 600 z ~ q(z|x) per input x",
             "z1 (right), z2 (up) in [-3.5, 3.5]; grey: prior N(0, I) at radius 1, 2, 3"]
    posterior_figure(encoder, path, lines, args.eps_dim if args.model == "avb" else args.z_dim,
                     seed=args.seed)


def evaluate(args, device):
    """ELBO estimate (not a bound for AVB) and AIS log p(x), mean +- std/sqrt(#batches) [Tab. 2]."""
    state = common.load_checkpoint(args.evaluate, device)
    if state.get("script") != "avb":
        raise common.UserError(f"{args.evaluate!r} is not a checkpoint of avb.py")
    a = argparse.Namespace(**{**state["args"], "data_root": args.data_root})
    encoder, decoder, T = build_models(a, device)
    for k, m in (("encoder", encoder), ("decoder", decoder), ("T", T)):
        if m is not None:
            m.load_state_dict(state[k])
            m.eval()                                 # BN running statistics (card pitfall 8)
    decoder.requires_grad_(False)
    gen = torch.Generator(device).manual_seed(args.seed)                 # evaluation RNG
    test = None if a.dataset == "toy4" else load_images(a)[1]

    def batches(seed, n):  # PAPER-VS-CODE: test images binarized afresh (once for all chains)
        if test is None:
            return (toy_batch(a.batch_size, device, gen) for _ in range(n))
        stream = common.infinite_batches(test, a.batch_size, seed, 0, args.num_workers)
        return (binarize(x.to(device), gen) for x, _ in itertools.islice(stream, n))

    elbos, prog = [], common.Progress("ELBO estimate", args.elbo_batches, unit="batch")
    for x in batches(args.seed, args.elbo_batches):
        with torch.no_grad():
            t = elbo_terms(encoder, decoder, T, x, a.ac)
        elbos.append(-(t["recon"] + t["kl"]).mean().item())
        prog.update(1)

    def log_joint(z, x):                                                 # log p(z) + log p(x|z)
        return log_prior(z) - reconstruction_error(decoder(z), x)

    ais, rates = [], []
    prog = common.Progress("AIS", args.ais_batches * args.ais_steps * (
        2 if args.ais_adapt == "pilot" else 1), unit="annealing step")
    for k, x in enumerate(batches(args.seed + 1, args.ais_batches)):
        with torch.no_grad():  # r_0: AC moments (sd = sqrt(var + 1e-4)), the VAE's q, else prior
            z, mean, var = encoder(x)
        if var is None:                                                  # PAPER-VS-CODE: prior
            mean, var = torch.zeros_like(z), torch.ones_like(z)
        std = (var + 1e-4).sqrt() if a.ac else var.sqrt()
        log_px, _, rate = ais_log_likelihood(x, log_joint, mean, std, args.ais_chains,
                                             args.ais_steps, args.ais_eps, args.ais_schedule,
                                             args.ais_adapt, gen=gen, progress=prog)
        ais.append(log_px.mean().item())
        rates.append(rate)
        print(f"AIS batch {k + 1}/{args.ais_batches}: log p(x) {ais[-1]:.3f} | acceptance "
              f"{rate:.2f}", flush=True)
    se = lambda v: float(np.std(v) / math.sqrt(len(v)))  # [official validate process_stats]
    res = {"step": state["step"], "elbo_estimate": float(np.mean(elbos)), "elbo_se": se(elbos),
           "ais_log_px": float(np.mean(ais)), "ais_se": se(ais),
           "ais_images": len(ais) * a.batch_size,
           **{k: getattr(args, k) for k in EVAL_FLAGS[1:]}, "ais_acceptance": float(np.mean(rates))}
    kind = "estimate (not a bound)" if T is not None else "bound"
    print(f"ELBO {kind} {res['elbo_estimate']:.2f} +- {res['elbo_se']:.2f} | AIS log p(x) "
          f"{res['ais_log_px']:.2f} +- {res['ais_se']:.2f} | {json.dumps(res)}", flush=True)
    with open(os.path.join(os.path.dirname(os.path.abspath(args.evaluate)), "eval.json"), "w") as f:
        json.dump(res, f, indent=1)
    return res


# ==== Main ====
def main(argv=None):
    common.single_process("avb")
    args = parse_args(argv)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = common.get_device(args.device)
    if args.deterministic and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = not args.deterministic
    torch.use_deterministic_algorithms(args.deterministic)
    if args.evaluate:
        return evaluate(args, device)
    run = common.Run(args, "avb", total=args.steps, mutable=("steps", *EVAL_FLAGS))
    autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.amp == "bf16"
                else contextlib.nullcontext)
    toy = args.dataset == "toy4"
    train_set = None if toy else load_images(args)[0]
    nets = build_training(args, device)
    encoder, decoder, T, opt_G, opt_D = nets.values()
    evaluate_fid = build_fid(args, device) if args.fid_every else None
    fixed_z = torch.randn(64, args.z_dim, generator=torch.Generator().manual_seed(args.seed))
    if not toy:                                      # reals.png, read now: bad files fail here
        reals = binarize(torch.stack([train_set[i][0] for i in range(min(64, len(train_set)))]),
                         torch.Generator().manual_seed(args.seed))
    step, fixed_z = 0, fixed_z.to(device)
    state = run.load(device)
    if state:
        for k, obj in nets.items():
            if obj is not None:
                obj.load_state_dict(state[k])
        step, fixed_z = state["step"], state["fixed_z"].to(device)
        common.set_rng_state(state["rng"])

    run.start(step, device, encoder=encoder, decoder=decoder, **({"T": T} if T is not None else {}))
    scale = 1.0 if toy else 1.0 / (28 * 28)                              # PAPER-VS-CODE: 1/(H*W*C)
    print(f"loss scale {scale:.6g} (official: 1/(H*W*C) for images, 1 for the toy)", flush=True)
    os.makedirs(os.path.join(args.out_dir, "samples"), exist_ok=True)
    if step == 0 and not toy:
        torchvision.utils.save_image(reals, os.path.join(args.out_dir, "reals.png"), nrow=8)
    draw_x = data_stream(train_set, args, step, device)
    while step < args.steps and not run.stopping:
        out = train_step(encoder, decoder, T, opt_G, opt_D, draw_x, args, scale, autocast)
        step += 1
        fid_now = args.fid_every > 0 and (step % args.fid_every == 0 or step == args.steps)
        if step % args.log_every == 0 or step == args.steps or fid_now:  # a FID step is a log step
            if fid_now:
                out.update(evaluate_fid(decoder))
            run.log(step, out)
        if args.sample_every and (step % args.sample_every == 0 or step == args.steps):
            save_samples(step, encoder, decoder, fixed_z, args)
        if step % args.ckpt_every == 0 or step == args.steps or run.stopping:
            run.save(step, {"fixed_z": fixed_z.cpu(), "rng": common.rng_state(),
                            **{k: None if m is None else m.state_dict() for k, m in nets.items()}})
    if args.export_samples and not run.stopping:
        export_samples(decoder, args, device)
    return run.finish(step, device)


if __name__ == "__main__":
    common.cli(main)
