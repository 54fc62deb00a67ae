"""cGANs with Projection Discriminator.
Miyato, Koyama. ICLR 2018. arXiv:1802.05637 (Eq. numbers of the OpenReview text ByS1VpgRZ; the final
version's numbering is unverified)
Official code: pfnet-research/sngan_projection (Chainer; shared with SN-GAN)

Paper -> code
  Eq. (3)    f(x, y) = y^T V phi(x) + psi(phi(x)) ................ ProjectionDiscriminator.forward()
  Sec. 5     SN on every D weight, the embedding V included ....... sn(), ProjectionDiscriminator
  Eq. (8)    hinge loss for D and G .............................. hinge_loss_D(), hinge_loss_G()
  Sec. 5.1   conditional batch norm in every G block ............. ConditionalBatchNorm2d, GBlock
  Sec. 5     Adam 2e-4 (0, 0.9), n_dis = 5, linear lr decay ....... train_step(), linear_decay_lr()
  official   32x32 nets (resnet_32.py, snresnet_32.py) ........... Generator, ProjectionDiscriminator
  Sec. 5.1   128x128 ImageNet nets (resnet.py, snresnet.py) ...... --img-size 128
  Sec. 5.1   concat baseline (SNResNetConcatDiscriminator) ...... --disc concat
  Sec. 5.1   category morphing through CBN (Fig. 8) ............. --morph C1 C2, morph_grid()
  Sec. 5.1   intra-FID = mean of per-class FIDs ................. evaluate_fid()
Deviations (each also tagged in the code; grep DEVIATION|PAPER-VS-CODE)
  1. PAPER-VS-CODE  --disc concat joins the label embedding after the third D block (official
     snresnet.py; SN-GAN Tab. 6c); the text says "fourth ResBlock". We follow the code.
  2. PAPER-VS-CODE  CIFAR budget and schedule exist only in the official config (50K iterations, lr
     decayed linearly from iteration 0); the ICLR text gives the ImageNet schedule only.
  3. PAPER-VS-CODE  psi has no bias in the official 32x32 D and a bias in the 128x128 D; we follow each.
  4. DEVIATION  one device: the ImageNet run used 4 GPUs x (16 real, 32 G) images. Batch sizes are the
     same in total, but G's batch-norm statistics here span the whole batch, not a quarter of it.
  5. DEVIATION  ImageNet preprocessing is common.load_dataset's (antialiased short-side resize to 128,
     centre crop) instead of the official centre crop + bilinear resize, and images under 256 px are
     not dropped (official preprocess.sh).
  6. DEVIATION  torch's spectral_norm starts u with 15 power iterations; the official SNLinear /
     SNConvolution2D / SNEmbedID start from a random u. One iteration per training forward in both.
  7. DEVIATION  FID and intra-FID come from fid.py (its Inception and reference protocol), not the
     TensorFlow Inception the paper used (official issue #34).
  Not implemented: the AC-GAN baseline (its loss weights are not given, official issue #33) and the
  super-resolution model (Eqs. 7, 9).
Run
  python projection.py --dataset cifar10                      # CIFAR-10 32x32, official config, 1 GPU
  python projection.py --dataset cifar100                     # CIFAR-100 32x32
  python projection.py --dataset folder:/data/imagenet/train  # ImageNet 128x128, 450K it (main result)
  python projection.py --dataset folder:/data/imagenet/train --disc concat   # concat baseline
  python projection.py --dataset shapes --steps 200 --log-every 50           # benchmark, offline
  python projection.py --dataset shapes --device cpu --steps 2 --g-ch 16 --d-ch 16 --batch-size 8
Paper reports: ImageNet 128 IS 29.7 / intra-FID 103.1 at 450K iterations (official README_paper.md;
that the final Tab. 1 prints the same values is unverified); CIFAR-10 IS 8.62 / FID 17.5 and CIFAR-100
FID 23.2 (final-version Tab. 3, p. 14; FID protocol and the CIFAR-100 values are unverified).
Our numbers: README.
"""

import argparse
import itertools
import json
import math
import os
import random
import re
import resource
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.utils.parametrizations import spectral_norm

import common


# ==== Args ====
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("paper (None = derived from --img-size in main, printed at start)")
    g.add_argument("--dataset", default="cifar10",
                   help="cifar10, cifar100, folder:<ImageNet train dir with class subfolders>, shapes "
                        "(6 classes, offline) [Sec. 5; official configs]")
    g.add_argument("--img-size", type=int, default=None, choices=[32, 128],
                   help="32 (CIFAR nets) or 128 (ImageNet nets); 128 for folder:, else 32 [Sec. 5.1]")
    g.add_argument("--disc", default="projection", choices=["projection", "concat"],
                   help="projection D or the concat baseline [Eq. 3, Sec. 5.1; official snresnet.py]")
    g.add_argument("--steps", type=int, default=None,
                   help="generator iterations; 50K at 32 px, 450K at 128 px "
                        "[official sn_cifar10.yml, Sec. 5.1]")
    g.add_argument("--decay-start", type=int, default=None,
                   help="iteration where the linear lr decay to 0 starts; 0 at 32 px, 400K at 128 px "
                        "[official sn_cifar10.yml, Sec. 5.1]")
    g.add_argument("--lr", type=float, default=2e-4, help="Adam step size, both nets [Sec. 5]")
    g.add_argument("--betas", type=float, nargs=2, default=(0.0, 0.9), help="Adam beta1 beta2 [Sec. 5]")
    g.add_argument("--n-dis", type=int, default=5, help="D updates per G update [Sec. 5]")
    g.add_argument("--batch-size", type=int, default=64,
                   help="D batch: real images and fakes each [official configs; 16 x 4 GPUs at 128 px]")
    g.add_argument("--g-batch-size", type=int, default=128,
                   help="G-update batch [UNSPECIFIED: official n_gen_samples 128; 32 x 4 GPUs at 128 px]")
    g.add_argument("--z-dim", type=int, default=128, help="z ~ N(0, I) size [Sec. 5; official configs]")
    g.add_argument("--g-ch", type=int, default=None,
                   help="G width: 256 at 32 px, 64 at 128 px [official configs]")
    g.add_argument("--d-ch", type=int, default=None,
                   help="D width: 128 at 32 px, 64 at 128 px [official configs]")
    g.add_argument("--concat-dim", type=int, default=128,
                   help="label-embedding size of --disc concat [official snresnet.py dim_emb]")
    g.add_argument("--dequantize", action=argparse.BooleanOptionalAction, default=True,
                   help="x = pixel/128 - 1 + U(0, 1/128) [official datasets/cifar10.py, imagenet.py]")
    e = p.add_argument_group("eval")
    e.add_argument("--fid-every", type=int, default=0,
                   help="FID and intra-FID through fid.py every K iterations and at the end, 0 = off [run]")
    e.add_argument("--fid-samples", type=int, default=5000,
                   help="generated images for FID, uniform labels [UNSPECIFIED: paper CIFAR FID uses 5K "
                        "generated (card; unverified)]")
    e.add_argument("--intra-fid-samples", type=int, default=5000,
                   help="generated images per class for intra-FID, 0 = off [official calc_intra_FID.py]")
    e.add_argument("--fid-weights", default=None, help="Inception weight file for fid.py [run]")
    e.add_argument("--export-samples", type=int, default=0,
                   help="write N samples (labels cycling 0..K-1) to samples_N.npz at the end [run]")
    e.add_argument("--morph", type=int, nargs=2, default=None, metavar=("C1", "C2"),
                   help="write morph.png at the end: CBN parameters interpolated from class C1 to C2 "
                        "with z fixed per row [Sec. 5.1, Fig. 8]")
    r = p.add_argument_group("run")
    r.add_argument("--data-root", default="data", help="torchvision download folder [run]")
    r.add_argument("--out-dir", default=None, help="default runs/projection-<dataset>-s<seed> [run]")
    r.add_argument("--seed", type=int, default=0, help="seeds python, numpy, torch [run]")
    r.add_argument("--device", default="cuda", help="cuda or cpu; no silent fallback [run]")
    r.add_argument("--num-workers", type=int, default=4, help="DataLoader workers [run]")
    r.add_argument("--log-every", type=int, default=100,
                   help="iterations between log lines [official display_interval]")
    r.add_argument("--sample-every", type=int, default=1000,
                   help="iterations between sample grids, 0 = off [official evaluation_interval]")
    r.add_argument("--ckpt-every", type=int, default=10_000,
                   help="iterations between checkpoints [official snapshot_interval]")
    r.add_argument("--resume", action="store_true", help="continue out_dir/ckpt.pt [run]")
    r.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels, cudnn.benchmark off; on CUDA also set "
                        "CUBLAS_WORKSPACE_CONFIG=:4096:8 [run]")
    r.add_argument("--amp", default="off", choices=["off", "bf16"],
                   help="bf16 autocast of the forward passes; SN's power iteration then runs in bf16 too "
                        "[ours: the paper trained in fp32]")
    return p.parse_args(argv)


def derive_defaults(args):
    """Per-resolution values of the official configs, in one visible place (STYLE 2.3)."""
    if args.img_size is None:
        args.img_size = 128 if args.dataset.startswith("folder:") else 32
    big = args.img_size == 128
    args.g_ch = args.g_ch or (64 if big else 256)                     # resnet.py ch=64 / resnet_32.py ch=256
    args.d_ch = args.d_ch or (64 if big else 128)                     # snresnet.py ch=64 / snresnet_32.py 128
    # PAPER-VS-CODE: the CIFAR budget (50K, decay from iteration 0) is only in official sn_cifar10.yml
    args.steps = args.steps or (450_000 if big else 50_000)           # sn_projection.yml / sn_cifar10.yml
    if args.decay_start is None:
        args.decay_start = 400_000 if big else 0                       # Sec. 5.1 / sn_cifar10.yml
    if args.morph and min(args.morph) < 0:
        raise ValueError("--morph takes two class indices")
    return args


# ==== Data ====
def dequantize(x):
    """Official loader: x = pixel/128 - 1 + U(0, 1/128); common.load_dataset gives pixel/127.5 - 1."""
    # UNSPECIFIED: the paper does not mention dequantisation; the official CIFAR and ImageNet loaders do it
    pixels = torch.round((x + 1) * 127.5)                              # back to the 8-bit values
    return pixels / 128 - 1 + torch.rand_like(x) / 128


def num_classes_of(name, ds):
    """K, the number of labels y in {0..K-1}: the size of V and of the CBN tables."""
    if name == "shapes":
        return common.ShapesDataset.num_classes
    if name in ("cifar10", "cifar100", "mnist", "fashion-mnist") or name.startswith(("folder:", "lsun-")):
        return len(ds.classes)
    raise ValueError(f"projection.py needs class labels; {name!r} has none (use cifar10, cifar100, "
                     "folder:<dir with class subfolders> or shapes)")


# ==== Models ====
def init_(layer, gain):
    """Glorot-uniform weights, zero bias [official resblocks.py: GlorotUniform(sqrt 2) for residual 3x3
    convs, GlorotUniform() for shortcuts, linears, embeddings and the output conv]."""
    nn.init.xavier_uniform_(layer.weight, gain=gain)
    if getattr(layer, "bias", None) is not None:
        nn.init.zeros_(layer.bias)
    return layer


def conv(c_in, c_out, k, gain):
    return init_(nn.Conv2d(c_in, c_out, kernel_size=k, padding=k // 2), gain)


def sn(layer):
    """Spectral normalisation (Miyato et al. 2018, the SN-GAN paper) is not this paper's contribution,
    so torch's built-in is used (STYLE 2.1): one power iteration per training forward, persistent u as
    a buffer. dim 0 = rows, so for the embedding V (K x C) u has length K, as official SNEmbedID."""
    # DEVIATION: torch starts u with 15 power iterations; official SN links start from a random u
    return spectral_norm(layer, n_power_iterations=1, eps=1e-12, dim=0)


class ConditionalBatchNorm2d(nn.Module):
    """CBN(x, y) = gamma_y * BN0(x) + beta_y, BN0 without affine [Sec. 5.1; official
    categorical_conditional_batch_normalization.py]. y: labels (N,) or class weights (N, K)."""

    def __init__(self, num_features, num_classes, eps=2e-5, momentum=0.1):
        super().__init__()
        # Chainer defaults: eps 2e-5, running-average decay 0.9 (= torch momentum 0.1)
        self.bn = nn.BatchNorm2d(num_features, eps=eps, momentum=momentum, affine=False)
        self.gamma = nn.Embedding(num_classes, num_features)
        self.beta = nn.Embedding(num_classes, num_features)
        nn.init.ones_(self.gamma.weight)                               # official: gamma = 1, beta = 0
        nn.init.zeros_(self.beta.weight)

    def forward(self, x, y):
        h = self.bn(x)
        if y.dim() == 1:
            gamma, beta = self.gamma(y), self.beta(y)                  # (N, C) rows of the class tables
        else:                                                          # mixed classes: morphing [Fig. 8]
            gamma, beta = y @ self.gamma.weight, y @ self.beta.weight  # (N, K) @ (K, C) -> (N, C)
        return gamma[:, :, None, None] * h + beta[:, :, None, None]    # (N, C, 1, 1) broadcast


class GBlock(nn.Module):
    """CBN-ReLU-up-conv3x3-CBN-ReLU-conv3x3, shortcut up-conv1x1 [official gen_models/resblocks.py]."""

    def __init__(self, c_in, c_out, num_classes):
        super().__init__()
        self.b1 = ConditionalBatchNorm2d(c_in, num_classes)
        self.c1 = conv(c_in, c_out, 3, math.sqrt(2))
        self.b2 = ConditionalBatchNorm2d(c_out, num_classes)
        self.c2 = conv(c_out, c_out, 3, math.sqrt(2))
        self.c_sc = conv(c_in, c_out, 1, 1.0)                          # learnable: every G block upsamples

    def forward(self, x, y):
        h = F.interpolate(F.relu(self.b1(x, y)), scale_factor=2, mode="nearest")  # nearest x2, 1st conv
        h = self.c2(F.relu(self.b2(self.c1(h), y)))
        return h + self.c_sc(F.interpolate(x, scale_factor=2, mode="nearest"))


class Generator(nn.Module):
    """z (N, z_dim), y (N,) -> x (N, C, H, W) in [-1, 1]. Labels enter only through CBN [Sec. 5.1]."""

    def __init__(self, num_classes, z_dim=128, ch=256, img_size=32, img_channels=3):
        super().__init__()
        # official resnet_32.py: 3 up-blocks at ch; resnet.py: 16ch, 16ch, 8ch, 4ch, 2ch, ch
        chans = [ch] * 4 if img_size == 32 else [16 * ch, 16 * ch, 8 * ch, 4 * ch, 2 * ch, ch]
        self.linear = init_(nn.Linear(z_dim, chans[0] * 4 * 4), 1.0)  # no norm or activation after it
        self.blocks = nn.ModuleList(GBlock(a, b, num_classes) for a, b in itertools.pairwise(chans))
        self.bn = nn.BatchNorm2d(chans[-1], eps=2e-5, momentum=0.1)    # plain BN before the output
        self.conv_out = conv(chans[-1], img_channels, 3, 1.0)

    def forward(self, z, y):
        h = self.linear(z).view(z.size(0), -1, 4, 4)                   # (N, C, 4, 4)
        for block in self.blocks:
            h = block(h, y)
        return torch.tanh(self.conv_out(F.relu(self.bn(h))))


class DBlock(nn.Module):
    """ReLU-SNconv3x3-ReLU-SNconv3x3(-avgpool), shortcut SNconv1x1(-avgpool) [official
    dis_models/resblocks.py]. ReLU is not in-place: the shortcut sees x, not relu(x) (card pitfall 9)."""

    def __init__(self, c_in, c_out, down):
        super().__init__()
        self.c1 = sn(conv(c_in, c_in, 3, math.sqrt(2)))                # hidden width = c_in (official)
        self.c2 = sn(conv(c_in, c_out, 3, math.sqrt(2)))
        self.c_sc = sn(conv(c_in, c_out, 1, 1.0)) if (c_in != c_out or down) else None
        self.down = down

    def forward(self, x):
        h = self.c2(F.relu(self.c1(F.relu(x))))
        s = self.c_sc(x) if self.c_sc is not None else x
        if self.down:                                                  # 2x2 mean pool after the 2nd conv
            h, s = F.avg_pool2d(h, 2), F.avg_pool2d(s, 2)
        return h + s


class OptimizedBlock(nn.Module):
    """First D block: SNconv-ReLU-SNconv-avgpool, shortcut avgpool-SNconv1x1 [official resblocks.py]."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.c1 = sn(conv(c_in, c_out, 3, math.sqrt(2)))
        self.c2 = sn(conv(c_out, c_out, 3, math.sqrt(2)))
        self.c_sc = sn(conv(c_in, c_out, 1, 1.0))

    def forward(self, x):
        h = F.avg_pool2d(self.c2(F.relu(self.c1(x))), 2)
        return h + self.c_sc(F.avg_pool2d(x, 2))                       # pool before the 1x1 shortcut


def sum_pool(h):
    """phi(x) = sum over H, W of ReLU(last block) [official snresnet_32.py; a sum, not a mean]."""
    return F.relu(h).sum(dim=(2, 3))                                   # (N, C, H, W) -> (N, C)


class ProjectionDiscriminator(nn.Module):
    """f(x, y) = psi(phi(x)) + <V[y], phi(x)>, one logit per sample (N, 1) [Eq. 3]. With
    disc="concat": an SN label embedding tiled and concatenated after block 3, no projection."""

    def __init__(self, num_classes, ch=128, img_size=32, img_channels=3, disc="projection", concat_dim=128):
        super().__init__()
        if img_size == 32:                                             # official snresnet_32.py
            chans, downs = [ch] * 4, [True, False, False]
        else:                                                          # official snresnet.py (128 px)
            chans, downs = [ch, 2 * ch, 4 * ch, 8 * ch, 16 * ch, 16 * ch], [True, True, True, True, False]
        self.disc = disc
        blocks = [OptimizedBlock(img_channels, chans[0])]
        for i in range(1, len(chans)):
            # PAPER-VS-CODE: concat after the third block (official snresnet.py), text: "fourth ResBlock".
            # UNSPECIFIED: the official code has no 32-px concat D; we use the same place.
            extra = concat_dim if (disc == "concat" and i == 3) else 0
            blocks.append(DBlock(chans[i - 1] + extra, chans[i], downs[i - 1]))
        self.blocks = nn.ModuleList(blocks)
        # PAPER-VS-CODE: psi has no bias at 32 px (snresnet_32.py nobias=True), a bias at 128 px
        self.psi = sn(init_(nn.Linear(chans[-1], 1, bias=img_size != 32), 1.0))
        # Sec. 5: V is spectrally normalised like every other D weight (card pitfall 1)
        emb_dim = chans[-1] if disc == "projection" else concat_dim
        self.embed = sn(init_(nn.Embedding(num_classes, emb_dim), 1.0))

    def phi(self, x, y):
        h = x
        for i, block in enumerate(self.blocks):
            if self.disc == "concat" and i == 3:
                e = self.embed(y)[:, :, None, None].expand(-1, -1, h.size(2), h.size(3))  # (N, E, H, W)
                h = torch.cat([h, e], dim=1)                                  # (N, C + E, H, W)
            h = block(h)
        return sum_pool(h)

    def forward(self, x, y):
        phi = self.phi(x, y)
        out = self.psi(phi)                                            # psi(phi(x)): unconditional term
        if self.disc == "projection":                                  # y^T V phi(x) for one-hot y [Eq. 3]
            out = out + (self.embed(y) * phi).sum(dim=1, keepdim=True)
        return out                                                     # (N, 1)


# ==== Losses ====
def hinge_loss_D(d_real, d_fake):
    """Eq. (8): E[max(0, 1 - D(x, y))] + E[max(0, 1 + D(G(z, y), y))]."""
    return F.relu(1.0 - d_real).mean() + F.relu(1.0 + d_fake).mean()


def hinge_loss_G(d_fake):
    """Eq. (8): -E[D(G(z, y), y)]."""
    return -d_fake.mean()


def linear_decay_lr(step, lr, decay_start, total):
    """lr constant until decay_start, then linear to 0 at total [official train.py LinearShift]."""
    if step <= decay_start:
        return lr
    return lr * max(0.0, 1.0 - (step - decay_start) / max(1, total - decay_start))


# ==== Train step ====
def sample_zy(n, z_dim, num_classes, device):
    """z ~ N(0, I); y ~ q(y), uniform over classes [official random_samples.py sample_categorical]."""
    return torch.randn(n, z_dim, device=device), torch.randint(0, num_classes, (n,), device=device)


def train_step(G, D, opt_G, opt_D, real_batches, args, num_classes, amp):
    """One iteration = one G update, then n_dis D updates [official updater.py, conditional=True]."""
    # DEVIATION: one device. The ImageNet run split each batch over 4 GPUs (16 real, 32 G per GPU), so
    # G's BN statistics spanned a quarter of the batch; here they span all of it
    device = next(G.parameters()).device
    # G update on a fresh batch; the same y goes to G and to D (card pitfall 2)
    D.requires_grad_(False)                                            # no D weight gradients here
    z, y = sample_zy(args.g_batch_size, args.z_dim, num_classes, device)
    with amp():
        loss_G = hinge_loss_G(D(G(z, y), y).float())
    opt_G.zero_grad(set_to_none=True)
    loss_G.backward()
    opt_G.step()
    D.requires_grad_(True)
    for _ in range(args.n_dis):
        x_real, y_real = next(real_batches)                            # data pairs (x, y) ~ q
        if args.dequantize:
            x_real = dequantize(x_real)
        z, y_fake = sample_zy(x_real.size(0), args.z_dim, num_classes, device)
        with torch.no_grad(), amp():
            x_fake = G(z, y_fake)                                      # G in train mode, as official
        with amp():
            # UNSPECIFIED: real and fake pass D separately (official updater.py); D has no BN, so
            # this only means two SN power iterations per D step, as in the official code
            d_real = D(x_real, y_real).float()
            d_fake = D(x_fake, y_fake).float()                         # scored with its own labels
        loss_D = hinge_loss_D(d_real, d_fake)
        opt_D.zero_grad(set_to_none=True)
        loss_D.backward()
        opt_D.step()
    return {"loss_D": loss_D.detach(), "loss_G": loss_G.detach(),
            "d_real": d_real.detach().mean(), "d_fake": d_fake.detach().mean()}


# ==== Eval ====
# UNSPECIFIED: the paper does not say which BN statistics sampling uses; we sample in eval mode
# (running averages), as official evaluation.py does (chainer.using_config('train', False)).
@torch.no_grad()
def generate(G, y, gen, z_dim, chunk=250):
    """G(z, y) in eval mode for labels (or class weights) y, z from the CPU generator `gen`."""
    was_training, device = G.training, next(G.parameters()).device
    G.eval()
    out = []
    for i in range(0, y.size(0), chunk):
        yi = y[i:i + chunk].to(device)
        z = torch.randn(yi.size(0), z_dim, generator=gen).to(device)
        out.append(G(z, yi).float())
    G.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def sample_grid(G, fixed_z, grid_classes, path):
    """One class per row, the same fixed z in every column [ours; official sample_generate_conditional
    shows 10 classes spread over K]."""
    was_training, device = G.training, next(G.parameters()).device
    G.eval()
    z = fixed_z.to(device).repeat(len(grid_classes), 1)                # (rows * 8, z_dim)
    y = torch.tensor(grid_classes, device=device).repeat_interleave(fixed_z.size(0))
    torchvision.utils.save_image(G(z, y).float(), path, nrow=fixed_z.size(0), normalize=True,
                                 value_range=(-1, 1))
    G.train(was_training)


@torch.no_grad()
def morph_grid(G, fixed_z, c1, c2, num_classes, path, cols=8):
    """Category morphing: CBN parameters (1 - t) * class c1 + t * class c2, z fixed per row [Fig. 8]."""
    was_training, device = G.training, next(G.parameters()).device
    G.eval()
    t = torch.linspace(0, 1, cols, device=device).repeat(fixed_z.size(0))[:, None]  # (rows * cols, 1)
    one_hot = torch.eye(num_classes, device=device)
    y = (1 - t) * one_hot[c1] + t * one_hot[c2]                        # (rows * cols, K) class weights
    z = fixed_z.to(device).repeat_interleave(cols, dim=0)              # (rows * cols, z_dim)
    torchvision.utils.save_image(G(z, y).float(), path, nrow=cols, normalize=True, value_range=(-1, 1))
    G.train(was_training)


def export_samples(G, args, num_classes, path):
    """uint8 NHWC, clip(x * 127.5 + 127.5) truncated as official evaluation.py; labels cycle 0..K-1."""
    y = torch.arange(args.export_samples) % num_classes
    x = generate(G, y, torch.Generator().manual_seed(args.seed + 2), args.z_dim)
    images = (x * 127.5 + 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)  # (N, H, W, C)
    np.savez_compressed(path, images=images.cpu().numpy(), labels=y.numpy())


def evaluate_fid(G, args, num_classes, device):
    """FID with uniform labels; intra-FID = mean over classes of the per-class FID (official issue #34,
    calc_intra_FID.py: each class's samples against that class's training images)."""
    import fid  # evaluation only: a copy of this script without fid.py still trains
    # DEVIATION: fid.py's Inception and reference statistics, not the paper's TF Inception (issue #34)
    gen = torch.Generator().manual_seed(args.seed + 3)                 # eval never touches training RNG

    def sampler(c):
        def sample_fn(n):
            y = torch.randint(0, num_classes, (n,), generator=gen) if c is None else torch.full((n,), c)
            return generate(G, y, gen, args.z_dim)
        return sample_fn
    kw = {"weights": args.fid_weights}
    out = {"fid": fid.fid_for_training(sampler(None), args.dataset, args.data_root, args.img_size,
                                       args.fid_samples, device, **kw)}
    if args.intra_fid_samples:
        per_class = [fid.fid_for_training(sampler(c), args.dataset, args.data_root, args.img_size,
                                          args.intra_fid_samples, device, class_label=c, **kw)
                     for c in range(num_classes)]
        out["intra_fid"] = float(np.mean(per_class))
    return out


# ==== Main ====
def main(argv=None):
    args = derive_defaults(parse_args(argv))
    args.out_dir = args.out_dir or os.path.join(
        "runs", f"projection-{re.sub(r'[^A-Za-z0-9_.-]+', '_', args.dataset)}-s{args.seed}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("CUDA not available; pass --device cpu")
    device = torch.device(args.device)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.benchmark = not args.deterministic
    torch.use_deterministic_algorithms(args.deterministic)
    ckpt_path = common.prepare_run(args.out_dir, args.resume)

    # DEVIATION: ImageNet through common's folder loader (short-side resize + centre crop to 128); the
    # official preprocess.sh also drops images under 256 px and resizes bilinearly
    ds = common.load_dataset(args.dataset, args.data_root, args.img_size)
    args.num_classes = num_classes_of(args.dataset, ds)               # derived: printed, in args.json
    args.img_channels = int(ds[0][0].shape[0])
    K = args.num_classes
    if args.morph and max(args.morph) >= K:
        raise ValueError(f"--morph classes must be < {K}")
    G = Generator(K, args.z_dim, args.g_ch, args.img_size, args.img_channels).to(device)
    D = ProjectionDiscriminator(K, args.d_ch, args.img_size, args.img_channels, args.disc,
                                args.concat_dim).to(device)
    opt_G = torch.optim.Adam(G.parameters(), lr=args.lr, betas=tuple(args.betas))
    opt_D = torch.optim.Adam(D.parameters(), lr=args.lr, betas=tuple(args.betas))
    fixed_z = torch.randn(8, args.z_dim, generator=torch.Generator().manual_seed(args.seed))
    step = 0
    if ckpt_path:
        s = common.load_checkpoint(ckpt_path, device, args, shape_flags=(
            "img_size", "disc", "z_dim", "g_ch", "d_ch", "concat_dim", "num_classes", "img_channels"))
        for obj, k in ((G, "G"), (D, "D"), (opt_G, "opt_G"), (opt_D, "opt_D")):
            obj.load_state_dict(s[k])
        step, fixed_z = s["step"], s["fixed_z"].cpu()
        common.set_rng_state(s["rng"])
    print(json.dumps(vars(args), indent=1), flush=True)
    print(f"device {device} | torch {torch.__version__} | params G {sum(p.numel() for p in G.parameters()):,}"
          f" | D {sum(p.numel() for p in D.parameters()):,}", flush=True)
    with open(os.path.join(args.out_dir, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=1)
    metrics_path = os.path.join(args.out_dir, "metrics.jsonl")
    if ckpt_path and os.path.exists(metrics_path):                     # drop lines logged after the ckpt
        with open(metrics_path) as f:
            kept = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= step]
        with open(metrics_path, "w") as f:
            f.writelines(kept)
    def amp():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")

    # n_dis real batches per iteration: resuming at `step` skips step * n_dis batches exactly
    loader = common.infinite_batches(ds, args.batch_size, args.seed, step * args.n_dis, args.num_workers)
    real_batches = ((x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in loader)
    os.makedirs(os.path.join(args.out_dir, "samples"), exist_ok=True)
    if not os.path.exists(os.path.join(args.out_dir, "reals.png")):
        reals = torch.stack([ds[i][0] for i in range(min(64, len(ds)))])
        torchvision.utils.save_image(reals, os.path.join(args.out_dir, "reals.png"), nrow=8,
                                     normalize=True, value_range=(-1, 1))
    rows = min(K, 10)                                                  # official: 10 classes spread over K
    grid_classes = [r * K // rows for r in range(rows)]

    def save(step):
        common.save_checkpoint(os.path.join(args.out_dir, "ckpt.pt"), {
            "step": step, "args": vars(args), "G": G.state_dict(), "D": D.state_dict(),
            "opt_G": opt_G.state_dict(), "opt_D": opt_D.state_dict(), "fixed_z": fixed_z,
            "rng": common.rng_state()})

    metrics, t_log, t_start, step0 = {"step": step}, time.time(), time.time(), step
    while step < args.steps:
        lr = linear_decay_lr(step, args.lr, args.decay_start, args.steps)
        for opt in (opt_G, opt_D):
            for group in opt.param_groups:
                group["lr"] = lr
        out = train_step(G, D, opt_G, opt_D, real_batches, args, K, amp)
        step += 1                                                      # iteration = generator updates
        if step % args.log_every == 0 or step == args.steps:
            it_s = (step - metrics["step"]) / max(time.time() - t_log, 1e-9)
            metrics = {"step": step, **{k: v.item() for k, v in out.items()}, "lr": lr, "it_s": it_s,
                       "eta_s": (args.steps - step) / max(it_s, 1e-9)}
            if args.fid_every and (step % args.fid_every == 0 or step == args.steps):
                metrics.update(evaluate_fid(G, args, K, device))
            print(f"step {step}/{args.steps} | " + " | ".join(
                f"{k} {v:.4g}" for k, v in metrics.items() if k not in ("step", "eta_s"))
                + f" | eta {metrics['eta_s'] / 60:.0f}m", flush=True)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
            t_log = time.time()
        if args.sample_every and (step % args.sample_every == 0 or step == args.steps):
            sample_grid(G, fixed_z, grid_classes, os.path.join(args.out_dir, "samples", f"{step:07d}.png"))
        if step % args.ckpt_every == 0 or step == args.steps:
            save(step)
    if args.export_samples:
        export_samples(G, args, K, os.path.join(args.out_dir, f"samples_{args.export_samples}.npz"))
    if args.morph:
        morph_grid(G, fixed_z, args.morph[0], args.morph[1], K, os.path.join(args.out_dir, "morph.png"))
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    rate = (step - step0) / max(time.time() - t_start, 1e-9)
    print(f"done: {step - step0} iterations at {rate:.3f} it/s (incl. logging/sampling) | peak memory "
          f"{peak:.0f} MiB ({'CUDA allocated' if device.type == 'cuda' else 'process max RSS'})", flush=True)
    return metrics


if __name__ == "__main__":
    main()
