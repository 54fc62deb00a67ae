"""cGANs with Projection Discriminator.
Miyato, Koyama. ICLR 2018. arXiv:1802.05637 (Eq. numbers of the OpenReview text ByS1VpgRZ; the
final version's numbering is unverified)
Official code: pfnet-research/sngan_projection (Chainer; shared with SN-GAN)

Paper -> code
  Eq. (3)    f(x, y) = y^T V phi(x) + psi(phi(x)) .............. ProjectionDiscriminator.forward()
  Sec. 5     SN on every D weight, the embedding V included ..... sn(), ProjectionDiscriminator
  Eq. (8)    hinge loss for D and G ............................ hinge_loss_D(), hinge_loss_G()
  Sec. 5.1   conditional batch norm in every G block ........... ConditionalBatchNorm2d, GBlock
  Sec. 5     Adam 2e-4 (0, 0.9), n_dis = 5, linear lr decay ..... train_step(), linear_decay_lr()
  official   32x32 nets (resnet_32.py, snresnet_32.py) ......... Generator, ProjectionDiscriminator
  Sec. 5.1   128x128 ImageNet nets (resnet.py, snresnet.py) .... --img-size 128
  Sec. 5.1   concat baseline (SNResNetConcatDiscriminator) .... --disc concat
  Sec. 5.1   category morphing through CBN (Fig. 8) ........... --morph C1 C2, morph_grid()
  Sec. 5.1   IS, FID, intra-FID = mean of per-class FIDs ....... build_evaluator(), evaluate()
Deviations (each also tagged in the code; grep DEVIATION|PAPER-VS-CODE)
  1. PAPER-VS-CODE  --disc concat joins y after D block 3 (official snresnet.py), not the text's
     "fourth ResBlock".
  2. PAPER-VS-CODE  CIFAR: 50K iterations, lr linearly to 0 from iteration 0 (official config only).
  3. PAPER-VS-CODE  psi: no bias in the official 32x32 D, a bias in the 128x128 D; we follow each.
  4. DEVIATION  one process: G's BN spans the whole batch; the ImageNet run's 4 GPUs x (16 real,
     32 G) each normalised a quarter, as torchrun --nproc_per_node 4 does (--sync-bn: global BN);
     rank 0's BN statistics are saved (as official).
  5. DEVIATION  ImageNet through common.load_dataset (antialiased resize to 128, centre crop), not
     official preprocess.sh (centre crop, bilinear resize, images under 256 px dropped).
  6. DEVIATION  torch's spectral_norm starts u with 15 power iterations (official: a random u).
  7. DEVIATION  IS, FID and intra-FID from fid.py (its Inception port), not the TF Inception (#34).
  8. DEVIATION  Adam eps: torch adds it to sqrt(v_hat), Chainer to sqrt(v); 3.2x at t=1, ~1 at 50.
  9. DEVIATION  each epoch's last partial batch is dropped; official Chainer fills it from the next.
  10. DEVIATION  BN running_var starts at 1 (torch), 0 (official CBN): eval samples differ ~50 its.
  11. DEVIATION  --amp bf16 (paper fp32): bf16 forwards, fp32 losses.
  Not implemented: AC-GAN baseline (weights not given, official #33), super-resolution (Eqs. 7, 9).
Datasets (--dataset, labels required): cifar10 (default), cifar100, folder:<dir, a subfolder per
  class> (ImageNet: 128x128), mnist, fashion-mnist (resized to 32), shapes (6 classes, offline).
Run
  python projection.py --dataset cifar10 --fid-every 5000     # CIFAR-10, official config, IS/FID
  python projection.py --dataset cifar100                     # CIFAR-100 32x32
  python projection.py --dataset folder:/data/imagenet/train  # ImageNet 128x128, 450K it (main)
  torchrun --nproc_per_node 4 projection.py --dataset folder:/data/imagenet/train  # 4 GPUs, dev. 4
  python projection.py --dataset folder:/data/imagenet/train --disc concat   # concat baseline
  python projection.py --dataset shapes --device cpu --steps 2 --g-ch 16 --d-ch 16 --batch-size 8
Sample and score (--steps counts generator iterations; a finished run can be resumed to export)
  python projection.py --dataset cifar10 --resume --export-samples 50000   # labels cycle 0..K-1
  python fid.py runs/projection-cifar10-s0/samples_50000.npz dataset:cifar10 --isc
  G = projection.load_generator("runs/projection-cifar10-s0/ckpt.pt", "cuda")   # eval mode
  x = G(torch.randn(10, 128, device="cuda"), torch.arange(10, device="cuda"))  # one per class
Paper reports: ImageNet 128 IS 29.7 / intra-FID 103.1 at 450K iterations (official README_paper;
the final Tab. 1: unverified); CIFAR-10 IS 8.62 / FID 17.5, CIFAR-100 FID 23.2 (final Tab. 3,
p. 14; FID protocol and CIFAR-100 values unverified). Our numbers: README.
"""

import argparse
import itertools
import math
import os
import random

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.utils.parametrizations import spectral_norm

import common


# ==== Args ====
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                formatter_class=common.HelpFormatter)
    pos, nonneg = common.positive_int, common.nonnegative_int
    g = p.add_argument_group("paper")
    g.add_argument("--img-size", type=pos, choices=[32, 128], help="32 (CIFAR nets) or 128 "
                   "(ImageNet nets); default: 128 for folder:, else 32 [Sec. 5.1]")
    g.add_argument("--disc", default="projection", choices=["projection", "concat"],
                   help="projection D or concat baseline [Eq. 3, Sec. 5.1; official snresnet.py]")
    g.add_argument("--steps", type=pos, help="generator iterations; default: 50K at 32 px, 450K "
                   "at 128 px [official sn_cifar10.yml, Sec. 5.1]")
    g.add_argument("--decay-start", type=nonneg, help="iteration where the linear lr decay to 0 "
                   "starts; default: 0 at 32 px, 400K at 128 px [Sec. 5.1, official configs]")
    g.add_argument("--lr", type=common.positive_float, default=2e-4, help="Adam lr [Sec. 5]")
    g.add_argument("--betas", type=common.unit_float, nargs=2, default=[0.0, 0.9],
                   metavar=("B1", "B2"), help="Adam beta1 beta2, both nets [Sec. 5]")
    g.add_argument("--n-dis", "--d-steps", dest="n_dis", type=pos, default=5,
                   help="D updates per G update [Sec. 5]")
    g.add_argument("--batch-size", type=pos, default=64, help="D batch: real images and fakes "
                   "each [official configs; 16 x 4 GPUs at 128 px]")
    g.add_argument("--g-batch-size", type=pos, default=128, help="G-update batch [UNSPECIFIED: "
                   "official n_gen_samples 128; 32 x 4 GPUs at 128 px]")
    g.add_argument("--z-dim", type=pos, default=128, help="z ~ N(0, I) size [Sec. 5]")
    g.add_argument("--g-ch", "--g-width", dest="g_ch", type=pos,
                   help="G width; default: 256 at 32 px, 64 at 128 px [official configs]")
    g.add_argument("--d-ch", "--d-width", dest="d_ch", type=pos,
                   help="D width; default: 128 at 32 px, 64 at 128 px [official configs]")
    g.add_argument("--concat-dim", type=pos, default=128,
                   help="label-embedding size of --disc concat [official snresnet.py dim_emb]")
    g.add_argument("--dequantize", action=argparse.BooleanOptionalAction, default=True, help="x = "
                   "pixel/128 - 1 + U(0, 1/128) [official datasets/cifar10.py, imagenet.py]")
    e = p.add_argument_group("eval")
    e.add_argument("--fid-every", type=nonneg, default=0, help="IS, FID and intra-FID through "
                   "fid.py every K iterations and at the end, 0 = off [run]")
    e.add_argument("--fid-samples", type=pos, default=5000, help="generated images for IS, FID "
                   "(50000: 10 x 5K IS) [UNSPECIFIED: card, CIFAR FID of 5K generated, unverified]")
    e.add_argument("--fid-ref-split", choices=["train", "test"], default="train",
                   help="split of the real reference images [official calc_ref_stats.py: train]")
    e.add_argument("--fid-ref-size", type=nonneg, default=0, help="first N real images per set and "
                   "class, 0 = all (SN-GAN's CIFAR FID: 10000) [official calc_ref_stats.py: all]")
    e.add_argument("--intra-fid-samples", type=nonneg, default=5000, help="generated images per "
                   "class for intra-FID, 0 = off [official calc_intra_FID.py]")
    e.add_argument("--fid-weights", type=str, help="Inception weight file for fid.py [run]")
    e.add_argument("--export-samples", type=nonneg, default=0, help="write N samples (labels "
                   "cycling 0..K-1) to samples_N.npz at the end, 0 = off [run]")
    e.add_argument("--morph", type=nonneg, nargs=2, metavar=("C1", "C2"), help="morph.png: CBN "
                   "parameters from class C1 to C2, z fixed per row [Sec. 5.1, Fig. 8]")
    r = p.add_argument_group("run")
    r.add_argument("--dataset", default="cifar10", help="cifar10, cifar100, folder:<ImageNet "
                   "train dir with class subfolders>, shapes (6 classes, offline) [Sec. 5]")
    r.add_argument("--data-root", type=str, default="data", help="dataset folder [run]")
    r.add_argument("--out-dir", type=str, help="default: runs/projection-<dataset>-s<seed>[-hash] "
                   "[run]")
    r.add_argument("--seed", type=nonneg, default=0, help="seeds python, numpy, torch [run]")
    r.add_argument("--device", default="cuda", help="cuda or cpu; no silent fallback [run]")
    r.add_argument("--num-workers", type=nonneg, default=4, help="DataLoader workers [run]")
    r.add_argument("--log-every", type=pos, default=100,
                   help="iterations between log lines [official display_interval]")
    r.add_argument("--sample-every", type=nonneg, default=1000, help="iterations between sample "
                   "grids, 0 = off [official evaluation_interval]")
    r.add_argument("--ckpt-every", type=pos, default=10_000,
                   help="iterations between checkpoints [official snapshot_interval]")
    r.add_argument("--resume", action="store_true", help="continue out_dir/ckpt.pt [run]")
    r.add_argument("--deterministic", action="store_true", help="deterministic kernels, "
                   "cudnn.benchmark off; on CUDA also sets CUBLAS_WORKSPACE_CONFIG=:4096:8 [run]")
    r.add_argument("--amp", default="off", choices=["off", "bf16"], help="bf16 autocast of the "
                   "forwards, SN's power iteration too [ours: DEVIATION 11, paper fp32]")
    r.add_argument("--sync-bn", action="store_true", help="under torchrun (CUDA): SyncBatchNorm in "
                   "G, BN over the global batch [ours: DEVIATION 4; official: BN per GPU]")
    args = p.parse_args(argv)
    if max(args.betas) >= 1:
        p.error(f"argument --betas: expected two numbers in [0, 1), got {args.betas}")
    if args.out_dir is None:
        args.out_dir = common.default_out_dir("projection", args, vars(p.parse_args([])))

    if args.img_size is None:
        args.img_size = 128 if args.dataset.startswith("folder:") else 32
    big = args.img_size == 128
    # Per-resolution official values; PAPER-VS-CODE: the CIFAR budget is in the configs only
    derived = dict(g_ch=64 if big else 256,            # resnet.py ch=64 / resnet_32.py ch=256
                   d_ch=64 if big else 128,            # snresnet.py ch=64 / snresnet_32.py 128
                   steps=450_000 if big else 50_000,   # sn_projection.yml / sn_cifar10.yml
                   decay_start=400_000 if big else 0)  # Sec. 5.1 / sn_cifar10.yml
    for k, v in derived.items():
        if getattr(args, k) is None:                   # a flag given explicitly wins, also 0
            setattr(args, k, v)
    return args


# ==== Data ====
def dequantize(x, noise):
    """UNSPECIFIED (not in the paper): official loaders' pixel/128 - 1 + U(0, 1)/128."""
    return torch.round((x + 1) * 127.5) / 128 - 1 + noise / 128       # pixel: the 8-bit value


def load_data(args):
    """The labelled dataset; sets args.num_classes K (rows of V and CBN tables), img_channels."""
    name, labelled = args.dataset, ("shapes", "cifar10", "cifar100", "mnist", "fashion-mnist")
    # DEVIATION: ImageNet through common's folder loader, not the official preprocess.sh
    ds = common.load_dataset(name, args.data_root, args.img_size)   # an unknown name stops here
    if name not in labelled and not name.startswith("folder:"):
        raise common.UserError(f"projection.py needs class labels; {name!r} has none (use "
                               "cifar10, cifar100, folder:<dir with class subfolders> or shapes)")
    args.num_classes = common.ShapesDataset.num_classes if name == "shapes" else len(ds.classes)
    args.img_channels = int(ds[0][0].shape[0])
    if args.morph and max(args.morph) >= args.num_classes:
        raise common.UserError(f"--morph classes must be < {args.num_classes}, got {args.morph}")
    return ds


# ==== Models ====
def init_(layer, gain):
    """GlorotUniform(gain) weights, zero bias [official resblocks.py, snresnet_32.py]."""
    nn.init.xavier_uniform_(layer.weight, gain=gain)
    if getattr(layer, "bias", None) is not None:
        nn.init.zeros_(layer.bias)
    return layer


def conv(c_in, c_out, k, gain):
    return init_(nn.Conv2d(c_in, c_out, kernel_size=k, padding=k // 2), gain)


def sn(layer):
    """SN-GAN's SN, torch's built-in (STYLE 2.1); dim 0, so V's u has length K (SNEmbedID)."""
    return spectral_norm(layer, n_power_iterations=1, eps=1e-12, dim=0)  # DEVIATION 6: u's start


class ConditionalBatchNorm2d(nn.Module):
    """CBN(x, y) = gamma_y * BN0(x) + beta_y, y labels (N,) or class weights (N, K) [Sec. 5.1]."""

    def __init__(self, num_features, num_classes, eps=2e-5, momentum=0.1):
        super().__init__()
        # Chainer eps 2e-5, decay 0.9; DEVIATION: running_var starts at 1 (torch), official 0
        self.bn = nn.BatchNorm2d(num_features, eps=eps, momentum=momentum, affine=False)
        self.gamma = nn.Embedding(num_classes, num_features)
        self.beta = nn.Embedding(num_classes, num_features)
        nn.init.ones_(self.gamma.weight)                   # official: gamma = 1, beta = 0
        nn.init.zeros_(self.beta.weight)

    def forward(self, x, y):
        h = self.bn(x)
        if y.dim() == 1:
            gamma, beta = self.gamma(y), self.beta(y)      # (N, C) rows of the class tables
        else:                                              # mixed classes: morphing [Fig. 8]
            gamma, beta = y @ self.gamma.weight, y @ self.beta.weight   # (N, K) @ (K, C)
        return gamma[:, :, None, None] * h + beta[:, :, None, None]    # (N, C, 1, 1) broadcast


def up(x):
    return F.interpolate(x, scale_factor=2, mode="nearest")   # official unpooling_2d = nearest


class GBlock(nn.Module):
    """CBN-ReLU-up-conv3x3-CBN-ReLU-conv3x3, shortcut up-conv1x1 [official resblocks.py]."""

    def __init__(self, c_in, c_out, num_classes):
        super().__init__()
        self.b1 = ConditionalBatchNorm2d(c_in, num_classes)
        self.c1 = conv(c_in, c_out, 3, math.sqrt(2))
        self.b2 = ConditionalBatchNorm2d(c_out, num_classes)
        self.c2 = conv(c_out, c_out, 3, math.sqrt(2))
        self.c_sc = conv(c_in, c_out, 1, 1.0)              # learnable: every G block upsamples

    def forward(self, x, y):
        h = self.c1(up(F.relu(self.b1(x, y))))            # nearest x2 before the first conv
        h = self.c2(F.relu(self.b2(h, y)))
        return h + self.c_sc(up(x))


class Generator(nn.Module):
    """z (N, z_dim), y (N,) -> x (N, C, H, W) in [-1, 1]; y enters only through CBN [Sec. 5.1]."""

    def __init__(self, num_classes, z_dim=128, ch=256, img_size=32, img_channels=3):
        super().__init__()
        # official resnet_32.py: 3 up-blocks at ch; resnet.py: 16ch, 16ch, 8ch, 4ch, 2ch, ch
        chans = [ch] * 4 if img_size == 32 else [16 * ch, 16 * ch, 8 * ch, 4 * ch, 2 * ch, ch]
        self.linear = init_(nn.Linear(z_dim, chans[0] * 4 * 4), 1.0)   # no norm or activation
        self.blocks = nn.ModuleList(GBlock(a, b, num_classes) for a, b in itertools.pairwise(chans))
        self.bn = nn.BatchNorm2d(chans[-1], eps=2e-5, momentum=0.1)    # plain BN before the output
        self.conv_out = conv(chans[-1], img_channels, 3, 1.0)

    def forward(self, z, y):
        h = self.linear(z).view(z.size(0), -1, 4, 4)       # (N, C, 4, 4)
        for block in self.blocks:
            h = block(h, y)                                # (N, C', 2H, 2W)
        return torch.tanh(self.conv_out(F.relu(self.bn(h))))


class DBlock(nn.Module):
    """ReLU-conv3-ReLU-conv3(-pool) + conv1(-pool) [official resblocks.py]; shortcut sees x."""

    def __init__(self, c_in, c_out, down):
        super().__init__()
        self.c1 = sn(conv(c_in, c_in, 3, math.sqrt(2)))    # hidden width = c_in (official)
        self.c2 = sn(conv(c_in, c_out, 3, math.sqrt(2)))
        self.c_sc = sn(conv(c_in, c_out, 1, 1.0)) if (c_in != c_out or down) else None
        self.down = down

    def forward(self, x):
        h = self.c2(F.relu(self.c1(F.relu(x))))
        s = self.c_sc(x) if self.c_sc is not None else x
        if self.down:                                      # 2x2 mean pool after the 2nd conv
            h, s = F.avg_pool2d(h, 2), F.avg_pool2d(s, 2)
        return h + s


class OptimizedBlock(nn.Module):
    """First D block: SNconv-ReLU-SNconv-avgpool, shortcut avgpool-SNconv1x1 [resblocks.py]."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.c1 = sn(conv(c_in, c_out, 3, math.sqrt(2)))
        self.c2 = sn(conv(c_out, c_out, 3, math.sqrt(2)))
        self.c_sc = sn(conv(c_in, c_out, 1, 1.0))

    def forward(self, x):
        h = F.avg_pool2d(self.c2(F.relu(self.c1(x))), 2)
        return h + self.c_sc(F.avg_pool2d(x, 2))           # pool before the 1x1 shortcut


class ProjectionDiscriminator(nn.Module):
    """f(x, y) = psi(phi(x)) + <V[y], phi(x)> (N, 1) [Eq. 3]; concat: V[y] tiled after block 3."""

    def __init__(self, num_classes, ch=128, img_size=32, img_channels=3, disc="projection",
                 concat_dim=128):
        super().__init__()
        if img_size == 32:                                 # official snresnet_32.py
            chans, downs = [ch] * 4, [True, False, False]
        else:                                              # official snresnet.py (128 px)
            chans = [ch, 2 * ch, 4 * ch, 8 * ch, 16 * ch, 16 * ch]
            downs = [True, True, True, True, False]
        self.disc = disc
        blocks = [OptimizedBlock(img_channels, chans[0])]
        for i in range(1, len(chans)):
            # PAPER-VS-CODE: concat after the third block (official snresnet.py); the text says
            # "fourth ResBlock". UNSPECIFIED: no official 32-px concat D; we use the same place.
            extra = concat_dim if (disc == "concat" and i == 3) else 0
            blocks.append(DBlock(chans[i - 1] + extra, chans[i], downs[i - 1]))
        self.blocks = nn.ModuleList(blocks)
        # PAPER-VS-CODE: psi has no bias at 32 px (snresnet_32.py nobias=True), a bias at 128 px
        self.psi = sn(init_(nn.Linear(chans[-1], 1, bias=img_size != 32), 1.0))
        emb_dim = chans[-1] if disc == "projection" else concat_dim   # V has SN too (Sec. 5)
        self.embed = sn(init_(nn.Embedding(num_classes, emb_dim), 1.0))

    def phi(self, x, y):
        h = x
        for i, block in enumerate(self.blocks):
            if self.disc == "concat" and i == 3:
                e = self.embed(y)[:, :, None, None].expand(-1, -1, h.size(2), h.size(3))
                h = torch.cat([h, e], dim=1)               # (N, C + E, H, W)
            h = block(h)
        # phi(x) = sum over H, W of ReLU(last block) [official snresnet_32.py; a sum, not a mean]
        return F.relu(h).sum(dim=(2, 3))                   # (N, C, H, W) -> (N, C)

    def forward(self, x, y):
        phi = self.phi(x, y)
        out = self.psi(phi)                                # psi(phi(x)): unconditional term
        if self.disc == "projection":                      # y^T V phi(x) for one-hot y [Eq. 3]
            out = out + (self.embed(y) * phi).sum(dim=1, keepdim=True)
        return out                                         # (N, 1)


def build_models(args):
    """G and D from values that args.json and the checkpoint hold (load_generator rebuilds G)."""
    return (Generator(args.num_classes, args.z_dim, args.g_ch, args.img_size, args.img_channels),
            ProjectionDiscriminator(args.num_classes, args.d_ch, args.img_size, args.img_channels,
                                    args.disc, args.concat_dim))


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
    """z ~ N(0, I); y ~ q(y), uniform over classes [official random_samples.py]."""
    return torch.randn(n, z_dim, device=device), torch.randint(0, num_classes, (n,), device=device)


def train_step(G, D, opt_G, opt_D, real_batches, args, dist, amp):
    """One iteration = one G update, then n_dis D updates [official updater.py, conditional]."""
    # DEVIATION 4: G's BN normalises this process's rows only (per GPU, as the ImageNet run)
    device, K = dist.device, args.num_classes
    D.requires_grad_(False)                                # G update: no D weight gradients
    z, y = (dist.shard(t) for t in sample_zy(args.g_batch_size, args.z_dim, K, device))
    with amp():
        loss_G = hinge_loss_G(D(G(z, y), y).float())       # the same y to G and D (pitfall 2)
    opt_G.zero_grad(set_to_none=True)
    loss_G.backward()
    dist.average_gradients(G)                              # no-op in one process
    opt_G.step()
    D.requires_grad_(True)
    for _ in range(args.n_dis):
        x_real, y_real = (t.to(device, non_blocking=True) for t in next(real_batches))  # (x, y) ~ q
        if args.dequantize:
            u = torch.rand(args.batch_size, *x_real.shape[1:], device=device)
            x_real = dequantize(x_real, dist.shard(u))
        z, y_fake = (dist.shard(t) for t in sample_zy(args.batch_size, args.z_dim, K, device))
        with torch.no_grad(), amp():
            x_fake = G(z, y_fake)                          # G in train mode, as official
        with amp():
            # UNSPECIFIED: real, fake pass D apart (official updater.py); no BN in D: 2 SN steps
            d_real = D(x_real, y_real).float()
            d_fake = D(x_fake, y_fake).float()             # scored with its own labels
        loss_D = hinge_loss_D(d_real, d_fake)
        opt_D.zero_grad(set_to_none=True)
        loss_D.backward()
        dist.average_gradients(D)
        opt_D.step()
    return {"loss_D": loss_D.detach(), "loss_G": loss_G.detach(),
            "d_real": d_real.detach().mean(), "d_fake": d_fake.detach().mean()}


# ==== Eval ====
@torch.no_grad()
def generate(G, y, z):
    """UNSPECIFIED: G(z, y) in eval mode (official evaluation.py); y (N,) or (N, K), z on CPU."""
    was_training, device = G.training, next(G.parameters()).device
    G.eval()
    out = [G(z[i:i + 250].to(device), y[i:i + 250].to(device)).float()
           for i in range(0, y.size(0), 250)]
    G.train(was_training)
    return torch.cat(out)


def to_uint8(x):
    """[-1, 1] -> uint8 as official evaluation.py: clip(127.5 x + 127.5) cast, i.e. truncated."""
    return (x * 127.5 + 127.5).clamp(0, 255).to(torch.uint8)


def load_generator(ckpt_path, device="cpu"):
    """G(z, y) of a checkpoint, rebuilt from it alone, in eval mode (as official evaluation.py)."""
    state = common.load_checkpoint(ckpt_path, device)
    if state.get("script") != "projection":
        raise common.UserError(f"{ckpt_path!r} is not a checkpoint of projection.py")
    G = build_models(argparse.Namespace(**state["args"]))[0].to(device)
    G.load_state_dict(state["G"])
    return G.eval()


def save_figure(x, path, lines, key, nrow=8):
    """A grid of x in [-1, 1] under a title strip (common.title_strip)."""
    grid = torchvision.utils.make_grid(x, nrow=nrow, padding=2, normalize=True, value_range=(-1, 1))
    common.save_png(common.title_strip(grid.cpu().mul(255).byte(), lines, key=key), path)


def save_reals(ds, args):
    x = torch.stack([ds[i][0] for i in range(min(64, len(ds)))])
    save_figure(x, os.path.join(args.out_dir, "reals.png"),
                [f"{args.dataset}: training images", "x in [-1, 1]"], [("real", common.REAL_RGB)])


def sample_grid(G, fixed_z, names, step, args):
    """One class per row (10 spread over K, official sample_generate_conditional), fixed z."""
    K, rows = args.num_classes, min(args.num_classes, 10)
    classes = [r * K // rows for r in range(rows)]
    y = torch.tensor(classes).repeat_interleave(fixed_z.size(0))           # (rows * 8,)
    x = generate(G, y, fixed_z.repeat(len(classes), 1))
    rows = [f"{c} {names[c]}" for c in classes]
    lines = [f"projection | step {step}/{args.steps}", "row = class y, column = fixed z",
             "G(z, y) in eval mode, x in [-1, 1]"]
    lines += ["rows: " + ", ".join(rows[i:i + 4]) for i in range(0, len(rows), 4)]
    save_figure(x, os.path.join(args.out_dir, "samples", f"{step:07d}.png"), lines,
                [("generated", common.FAKE_RGB)], nrow=fixed_z.size(0))


def morph_grid(G, fixed_z, args):
    """Category morphing: CBN parameters (1 - t) class c1 + t class c2, z fixed per row [Fig. 8]."""
    (c1, c2), cols = args.morph, 8
    t = torch.linspace(0, 1, cols).repeat(fixed_z.size(0))[:, None]         # (rows * cols, 1)
    one_hot = torch.eye(args.num_classes)
    y = (1 - t) * one_hot[c1] + t * one_hot[c2]                             # (rows * cols, K)
    x = generate(G, y, fixed_z.repeat_interleave(cols, dim=0))
    save_figure(x, os.path.join(args.out_dir, "morph.png"), [
        f"projection | morph class {c1} -> {c2}", "columns: CBN weight t = 0 .. 1, z per row"],
        [("generated", common.FAKE_RGB)], nrow=cols)


def export_samples(G, args):
    """samples_N.npz: uint8 NHWC images (official truncation) and their labels, cycling 0..K-1."""
    y = torch.arange(args.export_samples) % args.num_classes
    gen = torch.Generator().manual_seed(args.seed + 2)                     # training RNG untouched
    x = generate(G, y, torch.randn(y.size(0), args.z_dim, generator=gen))
    path = os.path.join(args.out_dir, f"samples_{args.export_samples}.npz")
    np.savez_compressed(path, images=to_uint8(x).permute(0, 2, 3, 1).cpu().numpy(),
                        labels=y.numpy())                                   # (N, H, W, C)


def build_evaluator(args, device, main=True):
    """fid.TrainingFID with the reference statistics of all and of each class, or None."""
    if args.fid_every == 0:
        return None
    try:
        import fid  # evaluation only: a copy of this script without fid.py still trains
    except ModuleNotFoundError as e:
        msg = "--fid-every needs fid.py (the project's metric file) next to projection.py"
        raise common.UserError(msg) if e.name == "fid" else e
    per_class = tuple(range(args.num_classes)) if args.intra_fid_samples else ()
    ref = f"{args.fid_ref_size or 'all'} {args.fid_ref_split} images"
    if main:                                    # under torchrun: rank 0
        print(f"eval: IS, FID of {args.fid_samples} generated (uniform y) vs {ref}; intra-FID: "
              f"{len(per_class)} classes, {args.intra_fid_samples} each vs {ref} of it", flush=True)
    # DEVIATION: fid.py's Inception and reference statistics, not the paper's TF Inception (#34)
    return fid.TrainingFID(args.dataset, args.data_root, args.img_size, device, args.fid_samples,
                           weights=args.fid_weights, ref_split=args.fid_ref_split,
                           ref_size=args.fid_ref_size or None, class_labels=(None, *per_class))


def evaluate(ev, G, args):
    """IS and FID with uniform y; intra-FID = mean of per-class FIDs [official issue #34]; uint8."""
    gen = torch.Generator().manual_seed(args.seed + 3)     # re-seeded per call: not training's

    def sampler(c):
        def sample_fn(n):
            y = (torch.randint(0, args.num_classes, (n,), generator=gen) if c is None
                 else torch.full((n,), c))
            x = generate(G, y, torch.randn(n, args.z_dim, generator=gen))
            return to_uint8(x).float() / 127.5 - 1
        return sample_fn

    out = ev(sampler(None))
    if args.intra_fid_samples:
        per_class = [ev(sampler(c), class_label=c, n_samples=args.intra_fid_samples)["fid"]
                     for c in range(args.num_classes)]
        out["intra_fid"] = float(np.mean(per_class))
    return out


def report(run, step, lr, out, G, ev, fixed_z, names, args, dist):
    """This step's log row (losses, lr, IS/FID/intra-FID; G: rank 0's BN) and sample grid."""
    last = step == args.steps
    fid_now = ev is not None and (step % args.fid_every == 0 or last)
    if fid_now:
        dist.broadcast_buffers(G)
    if step % args.log_every == 0 or last or fid_now:
        run.log(step, {**out, "lr": lr, **(evaluate(ev, G, args) if fid_now else {})})
    if dist.main and args.sample_every and (step % args.sample_every == 0 or last):
        sample_grid(G, fixed_z, names, step, args)


# ==== Main ====
def setup(args):
    """This process's device, seeds and kernel choices; returns common.Dist."""
    dist = common.Dist(args.device)                        # torchrun: one process per device
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)                           # the same nets in every process
    if args.deterministic and dist.device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = not args.deterministic
    torch.use_deterministic_algorithms(args.deterministic)
    if args.sync_bn and dist.world_size > 1 and dist.device.type != "cuda":
        raise common.UserError("--sync-bn needs CUDA (torch's SyncBatchNorm has no CPU kernel)")
    dist.share(args.batch_size)                            # global batches split evenly
    dist.share(args.g_batch_size)
    return dist


def main(argv=None):
    args = parse_args(argv)
    dist = setup(args)
    device = dist.device
    run = common.Run(args, "projection", args.steps, mutable=("steps", "lr", "intra_fid_samples"),
                     dist=dist)

    ds = load_data(args)
    names = common.SHAPE_KINDS if args.dataset == "shapes" else ds.classes
    G, D = (net.to(device) for net in build_models(args))
    if args.sync_bn and dist.world_size > 1:               # DEVIATION 4: else BN per process
        G = nn.SyncBatchNorm.convert_sync_batchnorm(G)     # CBN's BN0 and the final BN
    adam = dict(lr=args.lr, betas=tuple(args.betas), fused=device.type == "cuda")  # DEVIATION 8
    opt_G = torch.optim.Adam(G.parameters(), **adam)
    opt_D = torch.optim.Adam(D.parameters(), **adam)
    fixed_z = torch.randn(8, args.z_dim, generator=torch.Generator().manual_seed(args.seed))
    ev = build_evaluator(args, device, dist.main)      # every rank scores
    state, step = run.load(device), 0
    if state:
        for obj, k in ((G, "G"), (D, "D"), (opt_G, "opt_G"), (opt_D, "opt_D")):
            obj.load_state_dict(state[k])
        step, fixed_z = state["step"], state["fixed_z"].cpu()
        common.set_rng_state(state["rng"])

    run.start(step, device, G=G, D=D)
    if dist.main:
        os.makedirs(os.path.join(args.out_dir, "samples"), exist_ok=True)
    if dist.main and step == 0:
        save_reals(ds, args)
    amp = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")
    # n_dis batches per iteration; DEVIATION: each epoch's last partial batch is dropped
    real_batches = common.infinite_batches(
        ds, args.batch_size, args.seed, device=device, start_step=step * args.n_dis,
        num_workers=args.num_workers, rank=dist.rank, world_size=dist.world_size)
    while step < args.steps and not run.stopping:
        lr = linear_decay_lr(step, args.lr, args.decay_start, args.steps)
        for opt in (opt_G, opt_D):
            for group in opt.param_groups:
                group["lr"] = lr
        out = train_step(G, D, opt_G, opt_D, real_batches, args, dist, amp)
        step += 1                                          # iteration = generator updates
        report(run, step, lr, out, G, ev, fixed_z, names, args, dist)
        if step % args.ckpt_every == 0 or step == args.steps or run.stopping:
            dist.broadcast_buffers(G)                      # rank 0's BN statistics everywhere
            run.save(step, {"G": G.state_dict(), "D": D.state_dict(), "opt_G": opt_G.state_dict(),
                            "opt_D": opt_D.state_dict(), "fixed_z": fixed_z,
                            "rng": common.rng_state()})
    finished = not run.stopping                            # a collective: on every rank
    if dist.main and args.export_samples and finished:
        export_samples(G, args)
    if dist.main and args.morph and finished:
        morph_grid(G, fixed_z, args)
    return run.finish(step, device)


if __name__ == "__main__":
    common.cli(main)
