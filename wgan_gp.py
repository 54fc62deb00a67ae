"""WGAN-GP: Improved Training of Wasserstein GANs.
Gulrajani, Ahmed, Arjovsky, Dumoulin, Courville. NeurIPS 2017. arXiv:1704.00028 (v3)
Official code: igul222/improved_wgan_training (gan_toy.py, gan_cifar.py, gan_cifar_resnet.py, gan_64x64.py)

Paper -> code
  Eq. (2)    WGAN value E[D(x)] - E[D(G(z))] ...................... critic_loss(), generator_loss()
  Eq. (3)    critic loss with the gradient penalty ............... critic_loss(), gradient_penalty()
  App. C     one-sided penalty max(0, ||g|| - 1)^2 ............... gradient_penalty(one_sided=True)
  Alg. 1     n_critic critic steps, then one G step .............. train_step()
  Sec. 3     toy data: 8 Gaussians, 25 Gaussians, Swiss roll ..... toy_batch(), ToyGrid25
  Sec. 3     toy MLPs, critic value surface (Fig. 1) ............. MLPGenerator, MLPCritic, draw_toy()
  Sec. 5.3   DCGAN-like CIFAR-10 nets (Fig. 3; official gan_cifar) DCGANGenerator, DCGANCritic
  App. F     CIFAR-10 ResNet (Tab. 3) ............................ ResNetGenerator, ResNetCritic32
  Tab. 3     supervised (AC) variant: cond. BN in G, AC head in D  ConditionalBatchNorm2d, --conditional
  App. E     64x64 ResNet (Fig. 2, "Good" nets), layer-norm critic ResNetCritic64, LayerNormCHW
  Sec. 3/5.3 baselines: weight clipping (WGAN), standard GAN ...... --mode wgan, --mode dcgan
Deviations (each also tagged in the code; grep DEVIATION|PAPER-VS-CODE)
  1. PAPER-VS-CODE  ResNet: lr 2e-4 decayed linearly to 0 over 100k G iterations (official
     gan_cifar_resnet.py) vs alpha = 1e-4 in Alg. 1. We follow the code, which produced Tab. 3.
  2. PAPER-VS-CODE  ResNet: generator batch 128 = 2x the critic batch (official GEN_BS_MULTIPLE)
     vs "batch size 64" in App. F. --g-batch-size 64 gives the paper text.
  3. PAPER-VS-CODE  ResNet: nearest upsampling at the first conv of the residual branch (code) vs
     "before the second convolution" (App. F). We follow the code.
  4. PAPER-VS-CODE  toys: lambda = 0.1 in gan_toy.py vs 10 in the paper. Default 10 (paper);
     --lam 0.1 reproduces the official toy script.
  5. PAPER-VS-CODE  64x64: Adam beta1 = 0 in gan_64x64.py vs 0.5 in App. E. Default App. E.
  6. PAPER-VS-CODE  ResNet data: x = 2(pixel/256 - 1/2) + U(0, 1/128) (official dequantisation);
     the other configurations use 2(pixel/255) - 1.
  7. PAPER-VS-CODE  BN in G uses batch statistics also when sampling (official code); we sample in
     train mode as well.
  8. DEVIATION  Alg. 1 order (critic steps, then G step) instead of the official loop (G step, then
     critic steps, G skipped at iteration 0): the same sequence shifted by one half-iteration.
  9. DEVIATION  LSUN bedrooms (App. E) is read from an exported image folder (no lmdb dependency);
     the official 64x64 script used downsampled ImageNet instead.
 10. DEVIATION  The character-level language model (Sec. 5.5) is not implemented.
Run
  python wgan_gp.py --dataset cifar10                             # Tab. 3 unsupervised (paper setting, 1 GPU)
  python wgan_gp.py --dataset cifar10 --conditional               # Tab. 3 supervised (AC-WGAN-GP)
  python wgan_gp.py --dataset cifar10 --arch dcgan                # Fig. 3 (Adam curve)
  python wgan_gp.py --dataset cifar10 --arch dcgan --mode wgan    # Fig. 3 weight clipping baseline
  python wgan_gp.py --dataset folder:/data/lsun_bedroom --arch resnet64   # App. E / Fig. 2
  python wgan_gp.py --dataset 8gaussians --device cpu --steps 2000 --lam 0.1 --dim-g 128 --dim-d 128
                                                     # Fig. 1 in 45 s on 2 CPU cores: 8/8 modes
  python wgan_gp.py --dataset swissroll --device cpu --fixed-generator --mode wgan  # Fig. 1a
  python wgan_gp.py --dataset shapes --steps 200 --log-every 50   # benchmark: it/s, peak memory
Paper reports: Inception score 7.86 +- .07 unsupervised, 8.42 +- .10 supervised, CIFAR-10 (Tab. 3).
Our numbers: README.
"""

import argparse
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

TOYS = ("8gaussians", "25gaussians", "swissroll")


# ==== Args ====
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("paper (None = derived from --dataset/--arch in main, printed at start)")
    g.add_argument("--dataset", default="cifar10",
                   help=f"{', '.join(TOYS)} or a common.load_dataset name (cifar10, shapes, "
                        "folder:<dir>, ...) [Sec. 3, 5]")
    g.add_argument("--arch", default=None, choices=["mlp", "resnet", "dcgan", "resnet64", "dcgan64"],
                   help="mlp for toys, resnet for images [Sec. 3, App. F, Sec. 5.3, App. E]")
    g.add_argument("--mode", default="wgan-gp", choices=["wgan-gp", "wgan", "dcgan"],
                   help="wgan-gp, or the weight-clipping / standard-GAN baselines [Sec. 3, 5.3]")
    g.add_argument("--lam", type=float, default=10.0,
                   help="penalty weight lambda; PAPER-VS-CODE: the official toy script uses 0.1 [Alg. 1, Eq. 3]")
    g.add_argument("--one-sided", action="store_true", help="penalty max(0, ||g||-1)^2 [App. C]")
    g.add_argument("--n-critic", type=int, default=None,
                   help="critic steps per G step; 5, or 1 in --mode dcgan [Alg. 1; official gan_cifar.py]")
    g.add_argument("--lr", type=float, default=None,
                   help="2e-4 resnet (PAPER-VS-CODE: Alg. 1 says 1e-4), 1e-4 otherwise, RMSProp 5e-5 in "
                        "--mode wgan, 2e-4 in --mode dcgan [official gan_cifar_resnet.py, Alg. 1, Sec. 5.3]")
    g.add_argument("--betas", type=float, nargs=2, default=None,
                   help="Adam betas; (0, 0.9) resnet, (0.5, 0.9) otherwise [Alg. 1, App. E, official gan_toy.py]")
    g.add_argument("--lr-decay", action=argparse.BooleanOptionalAction, default=None,
                   help="linear decay to 0 over --steps; on for resnet only [official gan_cifar_resnet.py]")
    g.add_argument("--steps", type=int, default=None,
                   help="generator iterations; 100k resnet/toys, 200k dcgan/64x64 [App. F, Sec. 5.3, App. E]")
    g.add_argument("--batch-size", type=int, default=None,
                   help="critic batch (real and fake each); 64 images, 256 toys [App. F, official gan_toy.py]")
    g.add_argument("--g-batch-size", type=int, default=None,
                   help="generator batch; 2x critic batch for resnet [official gan_cifar_resnet.py]")
    g.add_argument("--z-dim", type=int, default=None,
                   help="noise size; 128 images, 2 toys [App. F, official gan_toy.py]")
    g.add_argument("--dim-g", type=int, default=None,
                   help="G width; 128 resnet/dcgan, 64 for 64x64, 512 toys [App. F, E]")
    g.add_argument("--dim-d", type=int, default=None, help="critic width; as --dim-g [App. F, E]")
    g.add_argument("--conditional", action="store_true",
                   help="AC-WGAN-GP: conditional BN in G, auxiliary classifier in D; the official script "
                        "defaults to this run, and that the 7.86 run had it off rests on issue #58 "
                        "(maintainer confirmation unverified) [Tab. 3 supervised]")
    g.add_argument("--ac-weight-d", type=float, default=1.0, help="critic CE weight (real only) [official ACGAN_SCALE]")
    g.add_argument("--ac-weight-g", type=float, default=0.1, help="generator CE weight [official ACGAN_SCALE_G]")
    g.add_argument("--clip", type=float, default=0.01, help="weight clipping bound c in --mode wgan [Sec. 3]")
    g.add_argument("--fixed-generator", action="store_true",
                   help="toys: fake = real + N(0, I), train the critic only [Fig. 1a, official gan_toy.py]")
    g.add_argument("--dequantize", action=argparse.BooleanOptionalAction, default=None,
                   help="x = 2(pixel/256 - 1/2) + U(0, 1/128); on for resnet [official gan_cifar_resnet.py]")
    r = p.add_argument_group("run")
    r.add_argument("--img-size", type=int, default=None, help="32, or 64 for the 64x64 nets [run]")
    r.add_argument("--data-root", default="data", help="torchvision download folder [run]")
    r.add_argument("--out-dir", default=None, help="default runs/wgan_gp-<dataset>-s<seed> [run]")
    r.add_argument("--seed", type=int, default=0, help="seeds python, numpy, torch [run]")
    r.add_argument("--device", default="cuda", help="cuda or cpu; no silent fallback [run]")
    r.add_argument("--num-workers", type=int, default=4, help="DataLoader workers [run]")
    r.add_argument("--log-every", type=int, default=100, help="G iterations between log lines [run]")
    r.add_argument("--sample-every", type=int, default=1000, help="G iterations between grids, 0 = off [run]")
    r.add_argument("--ckpt-every", type=int, default=5000, help="G iterations between checkpoints [run]")
    r.add_argument("--resume", action="store_true", help="continue out_dir/ckpt.pt [run]")
    r.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels; on CUDA set CUBLAS_WORKSPACE_CONFIG=:4096:8 [run]")
    r.add_argument("--amp", default="off", choices=["off", "bf16"], help="autocast forward passes [run]")
    r.add_argument("--export-samples", type=int, default=0, help="write N samples to samples_N.npz at the end [run]")
    r.add_argument("--fid-every", type=int, default=0, help="FID through fid.py every K G iterations, 0 = off [run]")
    r.add_argument("--fid-samples", type=int, default=10_000, help="generated images per FID [run]")
    r.add_argument("--fid-weights", default=None, help="FID Inception weight file (fid.py) [run]")
    return p.parse_args(argv)


def derive_defaults(args):
    """The paper's per-configuration values, in one visible place (STYLE 2.3)."""
    toy = args.dataset in TOYS
    a = args.arch = args.arch or ("mlp" if toy else "resnet")
    if toy != (a == "mlp"):
        raise ValueError(f"--arch {a} does not fit --dataset {args.dataset}: toys use mlp, images the CNNs")
    resnet32 = a == "resnet"
    big = a.endswith("64")
    set_ = lambda k, v: getattr(args, k) is None and setattr(args, k, v)  # noqa: E731
    set_("n_critic", 1 if args.mode == "dcgan" else 5)                     # Alg. 1; gan_cifar.py dcgan mode
    # PAPER-VS-CODE (dev. 1): resnet lr 2e-4 decayed linearly (official) vs alpha = 1e-4 (Alg. 1)
    set_("lr", {"wgan": 5e-5, "dcgan": 2e-4}.get(args.mode, 2e-4 if resnet32 else 1e-4))
    # PAPER-VS-CODE (dev. 5): 64x64 beta1 = 0.5 (App. E), not gan_64x64.py's 0; resnet (0, 0.9) = Alg. 1
    set_("betas", [0.0, 0.9] if resnet32 else [0.5, 0.9])
    set_("lr_decay", resnet32)
    set_("steps", 200_000 if a in ("dcgan", "resnet64", "dcgan64") else 100_000)
    set_("batch_size", 256 if toy else 64)
    set_("g_batch_size", 2 * args.batch_size if resnet32 else args.batch_size)  # PAPER-VS-CODE (dev. 2)
    set_("z_dim", 2 if toy else 128)
    set_("dim_g", 512 if toy else 64 if big else 128)
    set_("dim_d", args.dim_g)
    set_("dequantize", resnet32)                                          # PAPER-VS-CODE (dev. 6)
    set_("img_size", 64 if big else 32)
    if not toy and args.img_size != (64 if big else 32):
        s = 64 if big else 32
        raise ValueError(f"--arch {a} generates {s}x{s} images, not --img-size {args.img_size}")
    if args.fixed_generator and not toy:
        raise ValueError("--fixed-generator is the toy experiment of Fig. 1a; use a toy --dataset")
    if args.conditional and (a != "resnet" or args.mode != "wgan-gp"):
        raise ValueError("--conditional is the AC-WGAN-GP CIFAR ResNet configuration (Tab. 3): --arch resnet")
    return args


# ==== Data ====
def toy_centres(name):
    if name == "8gaussians":                                     # 8 points on a circle of radius 2
        s = 1 / math.sqrt(2)
        c = [(1, 0), (-1, 0), (0, 1), (0, -1), (s, s), (s, -s), (-s, s), (-s, -s)]
        return torch.tensor(c) * 2 / 1.414, 0.02 / 1.414        # (centres, std) after the /1.414
    g = torch.arange(-2, 3, dtype=torch.float32) * 2            # 25 centres (2i, 2j), i, j in -2..2
    return torch.cartesian_prod(g, g) / 2.828, 0.05 / 2.828


class ToyGrid25:
    """25 Gaussians: 100,000 points made once, shuffled once, served in order [official gan_toy.py]."""

    def __init__(self, seed, device):
        g = torch.Generator().manual_seed(seed)
        c, _ = toy_centres("25gaussians")
        pts = c.repeat(4000, 1) * 2.828 + 0.05 * torch.randn(100_000, 2, generator=g)
        self.data = (pts[torch.randperm(100_000, generator=g)] / 2.828).to(device)

    def batch(self, k, b):                                       # k-th batch of the endless stream
        n = self.data.size(0) // b
        return self.data[(k % n) * b:(k % n + 1) * b]


def toy_batch(name, b, device):
    """A fresh batch of toy data from the global torch RNG [Sec. 3; official gan_toy.py]."""
    if name == "8gaussians":
        c, _ = toy_centres(name)
        idx = torch.randint(0, 8, (b,), device=device)
        return (c.to(device)[idx] * 1.414 + 0.02 * torch.randn(b, 2, device=device)) / 1.414
    t = 1.5 * math.pi * (1 + 2 * torch.rand(b, device=device))      # sklearn make_swiss_roll
    x = torch.stack([t * torch.cos(t), t * torch.sin(t)], 1) + 0.25 * torch.randn(b, 2, device=device)
    return x / 7.5                                                   # coordinates 0 and 2, / 7.5


def dequantize(x):
    """PAPER-VS-CODE (dev. 6): 2(pixel/256 - 1/2) + U(0, 1/128) from x = pixel/127.5 - 1; in the
    official gan_cifar_resnet.py only, not in the paper."""
    pixel = torch.round((x + 1) * 127.5)
    return 2 * (pixel / 256 - 0.5) + torch.rand_like(x) / 128


# ==== Models ====
def tflib_init(m, he):
    """Uniform init with std sqrt(4/(fan_in+fan_out)) (he) or sqrt(2/(fan_in+fan_out)) (glorot),
    fan = channels * k^2, zero bias [official tflib/ops]."""
    fan_in, fan_out = m.weight[0].numel(), m.weight.size(0) * m.weight[0, 0].numel()
    std = math.sqrt((4.0 if he else 2.0) / (fan_in + fan_out))
    nn.init.uniform_(m.weight, -std * math.sqrt(3), std * math.sqrt(3))
    if m.bias is not None:
        nn.init.zeros_(m.bias)
    return m


def conv(cin, cout, k, he=True, bias=True):
    return tflib_init(nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias), he)


def toy_mlp(d_in, d_out, dim):
    """Linear(dim)-ReLU x 3 -> Linear(d_out); He-uniform (std sqrt(2/fan_in)) before each ReLU,
    Glorot-uniform at the output, zero biases [Sec. 3; official gan_toy.py]."""
    layers = [nn.Linear(d_in, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(),
              nn.Linear(dim, d_out)]
    for m in layers[::2]:
        std = math.sqrt(2 / (m.in_features + (m.out_features if m.out_features == d_out else 0)))
        nn.init.uniform_(m.weight, -std * math.sqrt(3), std * math.sqrt(3))   # uniform(+-a) has std a/sqrt(3)
        nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)


class MLPGenerator(nn.Module):
    """Toy G: z ~ N(0, I_2) -> MLP -> R^2 [Sec. 3; official gan_toy.py]."""

    def __init__(self, z_dim=2, dim=512):
        super().__init__()
        self.net = toy_mlp(z_dim, 2, dim)

    def forward(self, z, y=None):
        return self.net(z)                                              # (B, 2)


class MLPCritic(nn.Module):
    """Toy critic: R^2 -> MLP -> scalar, identity output [Sec. 3; official gan_toy.py]."""

    def __init__(self, dim=512):
        super().__init__()
        self.net = toy_mlp(2, 1, dim)

    def forward(self, x):
        return self.net(x).squeeze(1), None                             # (B,), no AC logits


class ConditionalBatchNorm2d(nn.Module):
    """BN with batch statistics, then per-class scale and shift (init 1 and 0) [official tflib cond_batchnorm]."""

    def __init__(self, c, n_classes):
        super().__init__()
        self.bn = nn.BatchNorm2d(c, affine=False)
        self.gamma, self.beta = nn.Embedding(n_classes, c), nn.Embedding(n_classes, c)
        nn.init.ones_(self.gamma.weight)
        nn.init.zeros_(self.beta.weight)

    def forward(self, x, y):
        return self.bn(x) * self.gamma(y)[:, :, None, None] + self.beta(y)[:, :, None, None]


class LayerNormCHW(nn.Module):
    """tflib layer norm: statistics over (C, H, W) jointly, per-channel scale/shift [official tflib]."""

    def __init__(self, c, eps=1e-5):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c)), eps

    def forward(self, x):
        mu, var = x.mean((1, 2, 3), keepdim=True), x.var((1, 2, 3), unbiased=False, keepdim=True)
        return (x - mu) / torch.sqrt(var + self.eps) * self.weight[:, None, None] + self.bias[:, None, None]


class GBlock(nn.Module):
    """Pre-activation up block: Norm-ReLU-up-conv3x3-Norm-ReLU-conv3x3, shortcut up-conv1x1
    [App. F; PAPER-VS-CODE: upsampling at the first conv as in gan_cifar_resnet.py]."""

    def __init__(self, cin, cout, n_classes=0, conv1_bias=True):
        super().__init__()
        self.n1 = ConditionalBatchNorm2d(cin, n_classes) if n_classes else nn.BatchNorm2d(cin)
        self.n2 = ConditionalBatchNorm2d(cout, n_classes) if n_classes else nn.BatchNorm2d(cout)
        self.c1, self.c2 = conv(cin, cout, 3, bias=conv1_bias), conv(cout, cout, 3)
        self.sc = conv(cin, cout, 1, he=False)

    def norm(self, n, h, y):
        return n(h, y) if isinstance(n, ConditionalBatchNorm2d) else n(h)

    def forward(self, x, y=None):
        up = lambda t: F.interpolate(t, scale_factor=2, mode="nearest")  # noqa: E731
        h = self.c1(up(F.relu(self.norm(self.n1, x, y))))
        h = self.c2(F.relu(self.norm(self.n2, h, y)))
        return self.sc(up(x)) + h


class DBlock(nn.Module):
    """Pre-activation critic block: [Norm]-ReLU-conv3x3(in->in)-[Norm]-ReLU-conv3x3(in->out)-meanpool;
    shortcut conv1x1-meanpool, or identity without resampling [App. F; official ResidualBlock]."""

    def __init__(self, cin, cout, down, layer_norm=False):
        super().__init__()
        mid = cin if down else cout
        self.n1 = LayerNormCHW(cin) if layer_norm else nn.Identity()    # no BN in any critic [Sec. 4]
        self.n2 = LayerNormCHW(mid) if layer_norm else nn.Identity()
        self.c1, self.c2 = conv(cin, mid, 3, bias=not layer_norm), conv(mid, cout, 3)
        self.down = down
        self.sc = conv(cin, cout, 1, he=False) if (down or cin != cout) else nn.Identity()

    def forward(self, x):
        pool = (lambda t: F.avg_pool2d(t, 2)) if self.down else (lambda t: t)  # ConvMeanPool
        h = self.c1(F.relu(self.n1(x)))                                  # not in-place: x feeds the shortcut
        h = pool(self.c2(F.relu(self.n2(h))))
        return pool(self.sc(x)) + h


class ResNetGenerator(nn.Module):
    """Linear -> c0 x 4 x 4 -> up blocks -> BN-ReLU-conv3x3-tanh [App. F (32x32); App. E "Good" G (64x64)]."""

    def __init__(self, z_dim=128, channels=(128, 128, 128, 128), out_ch=3, n_classes=0):
        super().__init__()
        self.c0 = channels[0]
        self.fc = tflib_init(nn.Linear(z_dim, 16 * channels[0]), he=False)
        bias1 = len(channels) == 4                    # the 64x64 blocks drop conv1's bias (norm follows)
        self.blocks = nn.ModuleList(GBlock(a, b, n_classes, bias1) for a, b in zip(channels, channels[1:]))
        self.bn = nn.BatchNorm2d(channels[-1])        # the output BN stays unconditional [official]
        self.out = conv(channels[-1], out_ch, 3, he=False)

    def forward(self, z, y=None):
        h = self.fc(z).view(-1, self.c0, 4, 4)                            # (B, c0, 4, 4)
        for b in self.blocks:
            h = b(h, y)
        return torch.tanh(self.out(F.relu(self.bn(h))))                 # (B, C, H, W) in [-1, 1]


class ResNetCritic32(nn.Module):
    """Optimized block 3->d (down), block d->d (down), 2 plain blocks, ReLU, global MEAN pool,
    Linear(d->1), no normalization; AC head Linear(d->n_classes) [App. F; official gan_cifar_resnet.py]."""

    def __init__(self, dim=128, in_ch=3, n_classes=0):
        super().__init__()
        self.b1c1, self.b1c2 = conv(in_ch, dim, 3), conv(dim, dim, 3)   # OptimizedResBlockDisc1
        self.b1sc = conv(in_ch, dim, 1, he=False)
        self.blocks = nn.Sequential(DBlock(dim, dim, True), DBlock(dim, dim, False), DBlock(dim, dim, False))
        self.fc = tflib_init(nn.Linear(dim, 1), he=False)
        self.ac = tflib_init(nn.Linear(dim, n_classes), he=False) if n_classes else None

    def forward(self, x):
        h = F.avg_pool2d(self.b1c2(F.relu(self.b1c1(x))), 2) + self.b1sc(F.avg_pool2d(x, 2))  # MeanPoolConv
        h = F.relu(self.blocks(h)).mean((2, 3))                          # (B, d) global mean pool
        return self.fc(h).squeeze(1), (self.ac(h) if self.ac is not None else None)


class ResNetCritic64(nn.Module):
    """conv3x3 3->d, down blocks d->2d->4d->8d->8d with layer norm, flatten, Linear [App. E; gan_64x64.py]."""

    def __init__(self, dim=64, in_ch=3):
        super().__init__()
        ch = [dim, 2 * dim, 4 * dim, 8 * dim, 8 * dim]
        self.inp = conv(in_ch, dim, 3, he=False)
        self.blocks = nn.Sequential(*[DBlock(a, b, True, layer_norm=True) for a, b in zip(ch, ch[1:])])
        self.fc = tflib_init(nn.Linear(16 * ch[-1], 1), he=False)

    def forward(self, x):
        return self.fc(self.blocks(self.inp(x)).flatten(1)).squeeze(1), None   # (B, 8d*4*4) -> (B,)


class DCGANGenerator(nn.Module):
    """Linear -> BN -> ReLU -> (2^n d) x 4 x 4 -> n deconv 5x5 s2 (BN-ReLU between) -> tanh
    [Sec. 5.3, official gan_cifar.py (n = 3, d = 128); App. E DCGAN (n = 4, d = 64)]."""

    def __init__(self, z_dim=128, dim=128, n_up=3, out_ch=3):
        super().__init__()
        self.c0 = dim * 2 ** (n_up - 1)
        self.fc = nn.Sequential(nn.Linear(z_dim, 16 * self.c0), nn.BatchNorm1d(16 * self.c0), nn.ReLU())
        layers = []
        for i in range(n_up):
            cin, cout = self.c0 // 2 ** i, (self.c0 // 2 ** (i + 1) if i < n_up - 1 else out_ch)
            layers.append(nn.ConvTranspose2d(cin, cout, 5, stride=2, padding=2, output_padding=1))  # "same", x2
            layers += [nn.BatchNorm2d(cout), nn.ReLU()] if i < n_up - 1 else [nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z, y=None):
        return self.net(self.fc(z).view(-1, self.c0, 4, 4))             # (B, C, 4*2^n, 4*2^n)


class DCGANCritic(nn.Module):
    """n conv 5x5 s2 with LeakyReLU(0.2), flatten, Linear(1). Norm after every conv but the first:
    none for WGAN-GP at 32x32, layer norm at 64x64, BN in the wgan/dcgan baselines [Sec. 4, 5.3, App. E]."""

    def __init__(self, dim=128, n_down=3, in_ch=3, norm="none"):
        super().__init__()
        layers, c = [], in_ch
        for i in range(n_down):
            layers.append(nn.Conv2d(c, dim * 2 ** i, 5, stride=2, padding=2))
            if i > 0 and norm != "none":
                layers.append(nn.BatchNorm2d(dim * 2 ** i) if norm == "bn" else LayerNormCHW(dim * 2 ** i))
            layers.append(nn.LeakyReLU(0.2))                            # slope 0.2 [official gan_cifar.py]
            c = dim * 2 ** i
        self.net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(16 * c, 1))

    def forward(self, x):
        return self.net(x).squeeze(1), None


def build_models(args, channels, n_classes):
    a, k = args.arch, (n_classes if args.conditional else 0)
    if a == "mlp":
        return MLPGenerator(args.z_dim, args.dim_g), MLPCritic(args.dim_d)
    if a == "resnet":
        return (ResNetGenerator(args.z_dim, (args.dim_g,) * 4, channels, k),
                ResNetCritic32(args.dim_d, channels, k))
    if a == "resnet64":
        d = args.dim_g
        return (ResNetGenerator(args.z_dim, (8 * d, 8 * d, 4 * d, 2 * d, d), channels),
                ResNetCritic64(args.dim_d, channels))
    n = 3 if a == "dcgan" else 4
    norm = "bn" if args.mode != "wgan-gp" else ("ln" if a == "dcgan64" else "none")
    G, D = DCGANGenerator(args.z_dim, args.dim_g, n, channels), DCGANCritic(args.dim_d, n, channels, norm)
    if a == "dcgan64":                                                  # N(0, 0.02) init [App. E]
        for m in list(G.modules()) + list(D.modules()):
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
    return G, D


# ==== Losses ====
def gradient_penalty(critic, x_real, x_fake, one_sided=False):
    """lambda-free penalty of Eq. (3): E[(||grad_x_hat D(x_hat)||_2 - 1)^2], x_hat on real-fake lines."""
    eps = torch.rand(x_real.size(0), *[1] * (x_real.dim() - 1), device=x_real.device)  # Alg. 1 l.4: per sample
    x_hat = (eps * x_real + (1 - eps) * x_fake).requires_grad_(True)                 # Alg. 1 l.6
    out = critic(x_hat)
    out = out[0] if isinstance(out, tuple) else out
    grad, = torch.autograd.grad(out.sum(), x_hat, create_graph=True)   # create_graph: the penalty trains D
    norm = grad.flatten(1).norm(2, dim=1)                               # (B,) over ALL non-batch dims
    return ((norm - 1).clamp(min=0) ** 2 if one_sided else (norm - 1) ** 2).mean()  # App. C / Eq. (3)


def critic_loss(d_real, d_fake, mode):
    """Critic minimises E[D(x~)] - E[D(x)] (Eq. 2/3 without the penalty); dcgan: -log D(x) - log(1 - D(x~)) (Eq. 1)."""
    if mode == "dcgan":
        return F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
    return d_fake.mean() - d_real.mean()


def generator_loss(d_fake, mode):
    """G minimises -E[D(G(z))] [Alg. 1 l.11]; dcgan: non-saturating -log D(G(z)) [official gan_cifar.py]."""
    return F.softplus(-d_fake).mean() if mode == "dcgan" else -d_fake.mean()


# ==== Train step ====
def train_step(G, D, opt_G, opt_D, real_batches, args, n_classes, amp):
    """One generator iteration of Alg. 1: n_critic critic updates, then one G update.
    DEVIATION (dev. 8): the official loop does the G step first (skipped at iteration 0), then the
    critic steps; the same sequence shifted by half an iteration."""
    dev = next(G.parameters()).device
    for _ in range(args.n_critic):                                      # Alg. 1 l.2
        x_real, y_real = next(real_batches)                             # fresh real batch and z each step
        b = x_real.size(0)
        with torch.no_grad(), amp():                                    # G is a constant in the critic step
            x_fake = (x_real + torch.randn_like(x_real) if args.fixed_generator
                      else G(torch.randn(b, args.z_dim, device=dev), y_real))
        with amp():
            d_real, logits = D(x_real)
            d_fake, _ = D(x_fake.float())
            w_loss = critic_loss(d_real, d_fake, args.mode)
        gp = (gradient_penalty(D, x_real, x_fake.float(), args.one_sided) if args.mode == "wgan-gp"
              else torch.zeros((), device=dev))
        loss_D = w_loss + args.lam * gp                                 # Eq. (3)
        if logits is not None:                                          # AC on real samples only [official]
            loss_D = loss_D + args.ac_weight_d * F.cross_entropy(logits.float(), y_real)
        opt_D.zero_grad(set_to_none=True)
        loss_D.backward()
        opt_D.step()
        if args.mode == "wgan":                                         # weight clipping [Sec. 3; WGAN]
            with torch.no_grad():
                for p in D.parameters():
                    p.clamp_(-args.clip, args.clip)
    out = {"loss_D": loss_D.detach(), "gp": gp.detach(), "w_dist": -w_loss.detach()}
    if logits is not None:
        out["ac_acc_real"] = (logits.argmax(1) == y_real).float().mean()
    if args.fixed_generator:                                            # Fig. 1a: the critic alone trains
        return out
    y = torch.randint(0, n_classes, (args.g_batch_size,), device=dev) if args.conditional else None
    for p in D.parameters():                                            # no critic grads in the G step
        p.requires_grad_(False)
    with amp():
        d_gen, logits = D(G(torch.randn(args.g_batch_size, args.z_dim, device=dev), y))
        loss_G = generator_loss(d_gen.float(), args.mode)
        if logits is not None:
            loss_G = loss_G + args.ac_weight_g * F.cross_entropy(logits.float(), y)
    opt_G.zero_grad(set_to_none=True)
    loss_G.backward()
    opt_G.step()
    for p in D.parameters():
        p.requires_grad_(True)
    out["loss_G"] = loss_G.detach()
    return out


# ==== Eval ====
@torch.no_grad()
def mode_coverage(x_fake, dataset):
    """High-quality samples lie within 3 std of a mode centre; a mode is covered when it holds at least
    1% of all samples as high-quality ones. UNSPECIFIED: the paper judges Fig. 1 by eye; this is the
    8/25-Gaussian measure of Metz et al. / VEEGAN, with our 1% threshold."""
    c, std = toy_centres(dataset)
    d = torch.cdist(x_fake.float().cpu(), c)                           # (N, modes)
    dist, idx = d.min(1)
    hq = dist <= 3 * std
    counts = torch.bincount(idx[hq], minlength=len(c))
    return int((counts >= 0.01 * len(x_fake)).sum()), hq.float().mean().item()


@torch.no_grad()
def draw_toy(D, x_real, x_fake, path, lim=3.0, res=256):
    """Critic value over [-lim, lim]^2 (grey levels), real points orange, fake points green [Fig. 1]."""
    dev = next(D.parameters()).device
    t = torch.linspace(-lim, lim, res, device=dev)
    grid = torch.stack(torch.meshgrid(-t, t, indexing="ij")[::-1], -1).view(-1, 2)  # row 0 = top (y = +lim)
    v = D(grid)[0].view(res, res).float()
    v = (v - v.min()) / (v.max() - v.min() + 1e-12)
    img = torch.stack([0.15 + 0.6 * v, 0.2 + 0.6 * v, 0.35 + 0.6 * v]).cpu()      # (3, res, res)
    for pts, colour in ((x_fake, (0.1, 0.9, 0.2)), (x_real, (1.0, 0.55, 0.0))):   # reals drawn on top
        ij = ((pts.float().cpu() + lim) / (2 * lim) * (res - 1)).round().long()
        ok = ((ij >= 1) & (ij < res - 1)).all(1)
        col, row = ij[ok, 0], res - 1 - ij[ok, 1]
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                for ch in range(3):
                    img[ch, row + dr, col + dc] = colour[ch]
    torchvision.utils.save_image(img, path)


@torch.no_grad()
def sample(G, n, args, device, gen=None, y=None):
    z = torch.randn(n, args.z_dim, generator=gen, device="cpu" if gen is not None else device).to(device)
    return G(z, y)


def export_samples(G, args, device, n_classes, path, chunk=500):
    """uint8 NHWC, quantised int((x + 1) * 255.99 / 2) as the official IS code [official gan_cifar_resnet.py]."""
    gen, out = torch.Generator().manual_seed(args.seed + 2), []
    for i in range(0, args.export_samples, chunk):
        m = min(chunk, args.export_samples - i)
        y = torch.arange(i, i + m, device=device) % n_classes if args.conditional else None
        x = sample(G, m, args, device, gen, y).float()
        out.append(((x + 1) * 255.99 / 2).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu())
    np.savez_compressed(path, images=torch.cat(out).numpy())


def evaluate_fid(G, args, device, n_classes):
    import fid  # evaluation only: a copy of this script without fid.py still trains
    gen = torch.Generator().manual_seed(args.seed + 3)

    def sample_fn(n):
        y = torch.randint(0, n_classes, (n,), generator=gen).to(device) if args.conditional else None
        return sample(G, n, args, device, gen, y)
    return fid.fid_for_training(sample_fn, args.dataset, args.data_root, args.img_size, args.fid_samples,
                                device, weights=args.fid_weights)


# ==== Main ====
def main(argv=None):
    args = derive_defaults(parse_args(argv))
    toy = args.dataset in TOYS
    args.out_dir = args.out_dir or os.path.join(
        "runs", f"wgan_gp-{args.dataset.replace(':', '_').replace('/', '_')}-s{args.seed}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("CUDA not available; pass --device cpu")
    if toy and (args.fid_every or args.export_samples):
        raise ValueError("--fid-every / --export-samples are for image datasets")
    device = torch.device(args.device)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.benchmark = not args.deterministic
    torch.use_deterministic_algorithms(args.deterministic)
    ckpt_path = common.prepare_run(args.out_dir, args.resume)

    if toy:
        channels, n_classes = 2, 1
        grid25 = ToyGrid25(args.seed, device) if args.dataset == "25gaussians" else None
    else:
        # DEVIATION (dev. 9): LSUN (App. E) comes as an exported image folder (lsun-<cat> or folder:)
        ds = common.load_dataset(args.dataset, args.data_root, args.img_size)
        channels = ds[0][0].shape[0]
        n_classes = len(ds.classes) if hasattr(ds, "classes") else getattr(ds, "num_classes", 1)
    G, D = build_models(args, channels, n_classes)
    G, D = G.to(device), D.to(device)
    if args.mode == "wgan":                                             # RMSProp for clipping [Sec. 3; WGAN]
        opt_G, opt_D = (torch.optim.RMSprop(m.parameters(), lr=args.lr) for m in (G, D))
    else:
        opt_G, opt_D = (torch.optim.Adam(m.parameters(), lr=args.lr, betas=tuple(args.betas)) for m in (G, D))
    decay = (lambda t: max(0.0, 1.0 - t / args.steps)) if args.lr_decay else (lambda t: 1.0)
    sched_G, sched_D = (torch.optim.lr_scheduler.LambdaLR(o, decay) for o in (opt_G, opt_D))
    fixed_z = torch.randn(64, args.z_dim, generator=torch.Generator().manual_seed(args.seed))
    step = 0
    if ckpt_path:
        s = common.load_checkpoint(ckpt_path, device, args, shape_flags=(
            "dataset", "arch", "z_dim", "dim_g", "dim_d", "conditional", "img_size", "mode"))
        for obj, k in ((G, "G"), (D, "D"), (opt_G, "opt_G"), (opt_D, "opt_D"), (sched_G, "sched_G"),
                       (sched_D, "sched_D")):
            obj.load_state_dict(s[k])
        step, fixed_z = s["step"], s["fixed_z"].cpu()
        common.set_rng_state(s["rng"])
    print(json.dumps(vars(args), indent=1), flush=True)
    print(f"device {device} | torch {torch.__version__} | params G {sum(p.numel() for p in G.parameters()):,}"
          f" | D {sum(p.numel() for p in D.parameters()):,}", flush=True)
    with open(os.path.join(args.out_dir, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=1)
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.amp == "bf16" else (
        lambda: torch.autocast(device.type, enabled=False))

    if toy:                                                             # endless (x, y) stream, resumable
        def stream(k):
            while True:
                x = (grid25.batch(k, args.batch_size) if grid25 is not None
                     else toy_batch(args.dataset, args.batch_size, device))
                k += 1
                yield x, None
        real_batches = stream(step * args.n_critic)
    else:
        loader = common.infinite_batches(ds, args.batch_size, args.seed, step * args.n_critic, args.num_workers)

        def to_device(it):
            for x, y in it:
                x = x.to(device, non_blocking=True)
                yield (dequantize(x) if args.dequantize else x), y.to(device, non_blocking=True)
        real_batches = to_device(loader)
        if not ckpt_path:
            torchvision.utils.save_image(next(iter(common.infinite_batches(ds, 64, args.seed, 0, 0)))[0],
                                         os.path.join(args.out_dir, "reals.png"), normalize=True, value_range=(-1, 1))
    os.makedirs(os.path.join(args.out_dir, "samples"), exist_ok=True)
    fixed_y = torch.arange(64, device=device) // 8 % n_classes if args.conditional else None  # one class per row
    eval_gen = torch.Generator().manual_seed(args.seed + 1)            # eval never touches the training RNG

    def save(step):
        common.save_checkpoint(os.path.join(args.out_dir, "ckpt.pt"), {
            "step": step, "args": vars(args), "G": G.state_dict(), "D": D.state_dict(),
            "opt_G": opt_G.state_dict(), "opt_D": opt_D.state_dict(), "sched_G": sched_G.state_dict(),
            "sched_D": sched_D.state_dict(), "fixed_z": fixed_z, "rng": common.rng_state()})

    metrics, t0, t_start, step0 = {"step": step}, time.time(), time.time(), step
    while step < args.steps:
        out = train_step(G, D, opt_G, opt_D, real_batches, args, n_classes, amp)
        if not args.fixed_generator:                                     # Fig. 1a: G never steps
            sched_G.step()
        sched_D.step()
        step += 1
        if step % args.log_every == 0 or step == args.steps:
            dt = time.time() - t0
            it_s = (step - metrics["step"]) / max(dt, 1e-9)
            metrics = {"step": step, **{k: v.item() for k, v in out.items()},
                       "lr": opt_D.param_groups[0]["lr"], "it_s": it_s}
            if toy and args.dataset != "swissroll" and not args.fixed_generator:
                metrics["modes"], metrics["hq"] = mode_coverage(sample(G, 2500, args, device, eval_gen), args.dataset)
            if args.fid_every and (step % args.fid_every == 0 or step == args.steps):
                metrics["fid"] = evaluate_fid(G, args, device, n_classes)
            eta = (args.steps - step) / max(it_s, 1e-9)
            print(f"step {step}/{args.steps} | " + " | ".join(
                f"{k} {v:.4g}" for k, v in metrics.items() if k != "step") + f" | eta {eta / 60:.0f}m", flush=True)
            with open(os.path.join(args.out_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(metrics) + "\n")
            t0 = time.time()
        if args.sample_every and (step % args.sample_every == 0 or step == args.steps):
            path = os.path.join(args.out_dir, "samples", f"{step:07d}.png")
            if toy:
                real = (grid25.data[:512] if grid25 is not None else toy_batch(args.dataset, 512, device))
                fake = real + torch.randn_like(real) if args.fixed_generator else sample(G, 512, args, device, eval_gen)
                draw_toy(D, real, fake, path)
            else:        # PAPER-VS-CODE (dev. 7): train-mode BN (batch statistics), as the official code
                with torch.no_grad():
                    grid = G(fixed_z.to(device), fixed_y)
                torchvision.utils.save_image(grid, path, nrow=8, normalize=True, value_range=(-1, 1))
        if step % args.ckpt_every == 0 or step == args.steps:
            save(step)
    if args.export_samples:
        export_samples(G, args, device, n_classes, os.path.join(args.out_dir, f"samples_{args.export_samples}.npz"))
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    rate = (step - step0) / max(time.time() - t_start, 1e-9)
    print(f"done: {step - step0} G iterations at {rate:.2f} it/s (incl. logging/sampling) | "
          f"peak memory {peak:.0f} MiB ({'CUDA allocated' if device.type == 'cuda' else 'process RSS'})", flush=True)
    return metrics


if __name__ == "__main__":
    main()
