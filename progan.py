"""ProGAN: Progressive Growing of GANs for Improved Quality, Stability, and Variation.
Karras, Aila, Laine, Lehtinen. ICLR 2018. arXiv:1710.10196 (v3)
Official code: tkarras/progressive_growing_of_gans (original-theano-version produced the paper's
numbers; master is the TensorFlow port: networks.py, loss.py, train.py, metrics/)

Paper -> code
  Sec. 2, Fig. 2  stabilize T, fade in F, per resolution ........ schedule()
  Sec. 2, Fig. 2  G: a toRGB(new) + (1-a) up2(toRGB_old) ........ Generator.forward
  Sec. 2, Fig. 2  D: a new(fromRGB) + (1-a) fromRGB_old(pool) ... Discriminator.forward
  Sec. 2, A.1     reals box-downsampled, faded with the same a .. process_reals()
  Sec. 3          minibatch stddev at D's 4x4 block ............. MinibatchStdDev
  Sec. 4.1        equalized lr: N(0,1) x He constant ............ EqualizedConv2d, EqualizedLinear
  Sec. 4.2        pixelwise feature vector normalization ........ PixelNorm
  Tab. 2          nf(s) = min(fmap_base / 2^s, fmap_max) ........ Generator, Discriminator
  App. A.1        L_D = E[D(G(z))] - E[D(x)] .................... wasserstein_loss_D()
  App. A.1        + lambda (||grad|| - gamma)^2 / gamma^2 ....... gradient_penalty()
  App. A.1        + eps_drift E[D(x)^2]; L_G = -E[D(G(z))] ...... drift_penalty(), generator_loss()
  App. A.1        n_critic 1: one D step, then one G step ....... train_step()
  App. A.1        Adam(1e-3, 0, 0.99, 1e-8), batch 16/14/6/3 .... main(), schedule()
  App. A.1        G_ema, decay 0.999, over the whole G .......... ema_update()
  official        Adam moments reset at every phase change ...... main()
  official        Theano lr ramp-up over the first 40 kimg ...... lr_rampup()
  Sec. 5          SWD of patches of Laplacian-pyramid levels .... sliced_wasserstein_distance()
  Sec. 5, Tab. 1  MS-SSIM between pairs of generated images ..... ms_ssim()
  Sec. 6.5        CIFAR-10 config, gamma = 750 (IS 8.80) ........ CONFIGS, --gamma
  App. C          CelebA-HQ (official dataset tool), a folder ... load_reals()
Deviations (each one also tagged in the code; grep DEVIATION|PAPER-VS-CODE)
  1. PAPER-VS-CODE  lr ramp-up over the first 40 kimg for celebahq and lsun (Theano base config;
     not in the paper or TF); off for cifar10 and celeba, as their Theano configs.
  2. PAPER-VS-CODE  celeba (Tab. 1): T = F = 800 kimg (Theano config); App. A.2 text: 600k.
  3. PAPER-VS-CODE  cifar10: fmap_base 4096, fmap_max 128, z 128, T = F = 400 kimg from the
     Theano config behind IS 8.80; Sec. 6.5 says "the same network as for CelebA".
  4. PAPER-VS-CODE  minibatch stddev over the whole minibatch (paper, Theano); TF's strided groups
     of 4: --mbstd-group-size 4. Under torchrun: each process's share (official TF multi-GPU).
  5. DEVIATION  cifar10 alternates D and G steps (TF); Theano's updated both from one forward pass.
  6. DEVIATION  lower resolutions of the reals are float box averages (dataset tool: uint8).
  7. DEVIATION  celeba reads the aligned JPEGs (official tool: the PNG release), official crop.
  8. DEVIATION  SWD draws the same patch positions and directions for reals and fakes (official:
     independent draws); same expectation, less variance, and SWD(X, X) = 0.
  9. DEVIATION  FID/IS come from fid.py (its protocol); during growth G_ema's output is scored
     nearest-upsampled to the final resolution, like TF's full-resolution G output.
  10. DEVIATION  --amp bf16 (off by default) runs forward passes in bf16; the paper used fp32.
  11. DEVIATION  scope: unconditional only (no AC-GAN term), no CelebA-HQ builder (27.6 GB of
     deltas), no LSUN 100k subsetting, no Tab. 1 ablations (a)-(f), no App. E MNIST-1k test.
Run (one GPU, or torchrun; --kimg = thousands of real images shown; --help lists every flag)
  python progan.py                                  # CelebA-HQ 1024, Tab. 2 (data/celebahq/*.png)
  python progan.py --dataset celeba                 # CelebA 128, Tab. 1 (g) (data/celeba/...)
  python progan.py --dataset lsun-bedroom           # LSUN 256, Sec. 6.4 (data/lsun/bedroom_train)
  python progan.py --dataset cifar10                # CIFAR-10 32, Sec. 6.5 (IS 8.80)
  python progan.py --dataset folder:DIR --resolution 256       # any folder, any power of two
  python progan.py --dataset cifar10 --resume --kimg 25000     # continue, also mid-fade-in
  python progan.py --dataset cifar10 --resume --export-samples 50000   # then python fid.py
  torchrun --nproc_per_node 8 progan.py --dataset lsun-bedroom  # --batch-size(s) stay global
  python progan.py --dataset shapes --device cpu --resolution 16 --fmap-base 32 --fmap-max 16 \
      --z-dim 16 --stabilize-kimg 0.2 --fade-kimg 0.2 --kimg 1 --num-workers 0   # smoke test
  G, level, alpha = progan.load_generator("runs/progan-cifar10-s0/ckpt.pt", "cuda")
  x = G(torch.randn(16, G.z_dim, device="cuda"), level, alpha)      # (16, 3, res, res), ~[-1, 1]
Paper reports: CIFAR-10 IS 8.80 (Sec. 6.5, Tab. 3); CelebA 128 SWD x1e3 avg 3.56, MS-SSIM 0.2845
(Tab. 1 (g)); CelebA-HQ 1024 FID 7.79 (NVIDIA's re-run, StyleGAN paper Tab. 1). Ours: README.
"""

import argparse
import collections
import contextlib
import copy
import math
import os
import random
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T

import common

SQRT2 = math.sqrt(2.0)
CELEBAHQ_BATCH = {256: 14, 512: 6, 1024: 3}   # App. A.1: 16 below 256^2

Config = collections.namedtuple("Config", "resolution fmap_base fmap_max z_dim phase_kimg kimg "
                                "gamma mirror rampup_kimg batch_at")
# Card 2.8: T = F = phase_kimg; total kimg; gamma of the GP; mirror; lr ramp-up; batch overrides.
# PAPER-VS-CODE (deviations 2, 3): celeba's T = F, cifar10's net, z and T = F: Theano configs
CONFIGS = {
    "celebahq": Config(1024, 8192, 512, 512, 800, 19000, 1.0, True, 40, CELEBAHQ_BATCH),  # A.1
    "celeba": Config(128, 2048, 512, 512, 800, 10000, 1.0, True, 0, {}),    # Theano Sec. 6.1
    "lsun": Config(256, 8192, 512, 512, 800, 20000, 1.0, True, 40, {}),     # Theano Sec. 6.4
    "cifar10": Config(32, 4096, 128, 128, 400, 20000, 750.0, False, 0, {}),  # Theano Sec. 6.5
    "folder": Config(None, 8192, 512, 512, 800, 15000, 1.0, False, 0, {}),  # ours; TF total
    "shapes": Config(32, 4096, 128, 128, 400, 20000, 1.0, False, 0, {}),    # ours: CIFAR-10 net
}
LSUN_FULL_SETS = ("lsun-bedroom", "lsun-dog")   # official: no mirror (others: 100k, mirrored)


# ==== Args ====
def _config_name(dataset):
    if dataset.startswith("lsun-"):
        return "lsun"
    if dataset.startswith("folder:"):
        return "folder"
    return dataset if dataset in CONFIGS else None


def _res_batch(text):
    try:
        res, batch = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected RES:BATCH, e.g. 256:14, got {text!r}") from None
    if res < 4 or res & (res - 1) or batch < 1:
        raise argparse.ArgumentTypeError(f"expected a power of two RES >= 4, BATCH > 0: {text!r}")
    return f"{res}:{batch}"


def _epilog():
    lines = ["configurations (--dataset NAME resolves the other flags to):"]
    for name, c in CONFIGS.items():
        flag = {"lsun": "lsun-<category>", "folder": "folder:<dir>"}.get(name, name)
        batch_at = " ".join(f"{r}:{b}" for r, b in c.batch_at.items())
        lines.append(
            f"  python progan.py --dataset {flag} --resolution {c.resolution or 'R (required)'} "
            f"--fmap-base {c.fmap_base} --fmap-max {c.fmap_max} --z-dim {c.z_dim} "
            f"--stabilize-kimg {c.phase_kimg} --fade-kimg {c.phase_kimg} --kimg {c.kimg} "
            f"--gamma {c.gamma:g} --{'' if c.mirror else 'no-'}mirror --lr-rampup-kimg "
            f"{c.rampup_kimg} --batch-size 16" + (f" --batch-at {batch_at}" if batch_at else ""))
    lines.append("  (lsun-bedroom and lsun-dog: --no-mirror, as the official full-set runs)")
    return "\n".join(lines)


class _Help(common.HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help, and the configuration lines kept as written."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=_epilog(),
                                allow_abbrev=False, formatter_class=_Help)
    g = p.add_argument_group("paper", "None: resolved from --dataset, see the lines below")
    g.add_argument("--dataset", default="celebahq", help="celebahq (<data-root>/celebahq/*), "
                   "celeba, lsun-<category>, cifar10, folder:<dir>, shapes [Sec. 6, card 2.8]")
    g.add_argument("--resolution", type=common.positive_int,
                   help="final resolution R, a power of two [Tab. 2, Sec. 6]")
    g.add_argument("--kimg", type=common.positive_int, help="length: thousands of real images "
                   "shown to D [App. A.1; official config total_kimg]")
    g.add_argument("--stabilize-kimg", type=common.nonnegative_float, help="T: kimg at each "
                   "resolution before the next fades in [App. A.1; official lod_training_kimg]")
    g.add_argument("--fade-kimg", type=common.nonnegative_float, help="F: kimg over which alpha "
                   "goes 0 -> 1 [App. A.1; official lod_transition_kimg]")
    g.add_argument("--batch-size", type=common.positive_int, default=16,
                   help="minibatch below the --batch-at resolutions [App. A.1]")
    g.add_argument("--batch-at", type=_res_batch, nargs="*", metavar="RES:BATCH",
                   help="minibatch at high resolutions: celebahq 256:14 512:6 1024:3, else none "
                   "[App. A.1; official minibatch_overrides]")
    g.add_argument("--fmap-base", type=common.positive_int,
                   help="channel rule nf(s) = min(fmap_base / 2^s, fmap_max) [Tab. 2, App. A.2]")
    g.add_argument("--fmap-max", type=common.positive_int, help="widest layer [Tab. 2]")
    g.add_argument("--z-dim", type=common.positive_int, help="latent size [App. A.1; Theano "
                   "config: 128 for cifar10]")
    g.add_argument("--lr", type=common.positive_float, default=0.001, help="Adam alpha [App. A.1]")
    g.add_argument("--betas", type=common.unit_float, nargs=2, default=[0.0, 0.99],
                   help="Adam beta1 beta2 [App. A.1]")
    g.add_argument("--adam-eps", type=common.positive_float, default=1e-8,
                   help="Adam eps [App. A.1]")
    g.add_argument("--lr-rampup-kimg", type=common.nonnegative_float, help="lr ramp-up: 40 for "
                   "celebahq, lsun; 0 (off) otherwise [official Theano config: PAPER-VS-CODE]")
    g.add_argument("--lambda-gp", type=common.nonnegative_float, default=10.0,
                   help="WGAN-GP weight lambda [App. A.1]")
    g.add_argument("--gamma", type=common.positive_float, help="GP target norm: 750 for cifar10, "
                   "else 1 [Sec. 6.5; official iwass_target]")
    g.add_argument("--eps-drift", type=common.nonnegative_float, default=0.001,
                   help="weight of E[D(x)^2] on real scores [App. A.1]")
    g.add_argument("--mbstd-group-size", type=common.nonnegative_int, default=0, help="minibatch "
                   "stddev group, 0 = whole minibatch (paper); TF: 4 [Sec. 3: PAPER-VS-CODE]")
    g.add_argument("--ema-beta", type=common.unit_float, default=0.999,
                   help="decay of G_ema, per iteration [App. A.1]")
    g.add_argument("--mirror", action=argparse.BooleanOptionalAction, help="random horizontal "
                   "flips: on for celebahq, celeba, lsun 100k subsets [official configs]")
    e = p.add_argument_group("eval", "intervals in minibatch iterations")
    e.add_argument("--sample-every", type=common.nonnegative_int, default=1000, help="8x8 fixed-z "
                   "G_ema grid every N its, 0 = off; also at every phase end [run]")
    e.add_argument("--metrics-every", type=common.nonnegative_int, default=0, help="SWD and "
                   "MS-SSIM every N its and at the end, 0 = off; needs res >= 16 [Sec. 5]")
    e.add_argument("--swd-images", type=common.positive_int, default=16384,
                   help="images per set for SWD [Sec. 5]")
    e.add_argument("--ms-ssim-pairs", type=common.positive_int, default=10000,
                   help="generated pairs for MS-SSIM [Sec. 5]")
    e.add_argument("--export-samples", type=common.nonnegative_int, default=0,
                   help="write samples_N.npz (uint8 NHWC) from G_ema at the end, 0 = off [run]")
    e.add_argument("--fid-every", type=common.nonnegative_int, default=0,
                   help="FID and IS via fid.py every N its and at the end, 0 = off [run]")
    e.add_argument("--fid-samples", type=common.positive_int, default=50000,
                   help="generated images per FID/IS [Sec. 6.5: IS of 50k; StyleGAN Tab. 1]")
    e.add_argument("--fid-weights", type=str, help="Inception weights for fid.py [run]")
    e.add_argument("--fid-ref-split", default="train", help="reference split for fid.py [run]")
    e.add_argument("--fid-ref-size", type=common.positive_int,
                   help="reference images for fid.py, default all [run]")
    r = p.add_argument_group("run")
    r.add_argument("--data-root", type=str, default="data", help="dataset folder [run]")
    r.add_argument("--out-dir", type=str, help="default runs/progan-<dataset>-s<seed> [run]")
    r.add_argument("--seed", type=common.nonnegative_int, default=0, help="random seed [run]")
    r.add_argument("--device", default="cuda", help="torch device [run]")
    r.add_argument("--num-workers", type=common.nonnegative_int, default=4,
                   help="data loader workers [run]")
    r.add_argument("--log-every", type=common.positive_int, default=100,
                   help="log every N minibatch iterations [run]")
    r.add_argument("--ckpt-every", type=common.positive_int, default=5000,
                   help="checkpoint every N minibatch iterations [run]")
    r.add_argument("--resume", action="store_true", help="continue out_dir/ckpt.pt [run]")
    r.add_argument("--deterministic", action="store_true", help="deterministic kernels, no "
                   "cudnn.benchmark; on CUDA sets CUBLAS_WORKSPACE_CONFIG=:4096:8 [run]")
    r.add_argument("--amp", choices=["off", "bf16"], default="off",
                   help="bf16 autocast of forward passes; paper: fp32 [run: DEVIATION]")
    args = p.parse_args(argv)

    if args.out_dir is None:
        args.out_dir = common.default_out_dir("progan", args, vars(p.parse_args([])))
    name = _config_name(args.dataset)
    if name is None:
        p.error(f"unknown dataset {args.dataset!r}; valid: celebahq, celeba, lsun-<category>, "
                "cifar10, folder:<dir>, shapes")
    # Values that depend on the dataset (card 2.8), in one place
    c = CONFIGS[name]
    if args.resolution is None:
        if c.resolution is None:
            p.error("--dataset folder:<dir> needs --resolution (a power of two >= 4)")
        args.resolution = c.resolution
    for flag, value in (("fmap_base", c.fmap_base), ("fmap_max", c.fmap_max), ("z_dim", c.z_dim),
                        ("stabilize_kimg", float(c.phase_kimg)),
                        ("fade_kimg", float(c.phase_kimg)), ("kimg", c.kimg), ("gamma", c.gamma),
                        ("mirror", c.mirror and args.dataset not in LSUN_FULL_SETS),
                        ("lr_rampup_kimg", float(c.rampup_kimg)),
                        ("batch_at", [f"{r}:{b}" for r, b in c.batch_at.items()])):
        if getattr(args, flag) is None:             # a flag left unset takes the config's value
            setattr(args, flag, value)

    R = args.resolution
    if R < 4 or R & (R - 1):
        p.error(f"--resolution must be a power of two >= 4, got {R}")
    if args.fmap_base < 2 ** (int(math.log2(R)) - 1):
        p.error(f"--fmap-base {args.fmap_base} leaves no channels at {R}x{R}")
    for flag in ("stabilize_kimg", "fade_kimg"):
        n = getattr(args, flag) * 1000
        if abs(n - round(n)) > 1e-6:
            p.error(f"--{flag.replace('_', '-')} must be a whole number of images (kimg x 1000)")
    if any(res > R for res in _batch_dict(args.batch_at)):
        p.error(f"--batch-at names a resolution above --resolution {R}")
    if max(args.betas) >= 1:
        p.error("--betas must be < 1")
    if args.fid_every and name == "celeba":
        p.error("--fid-every: fid.py's CelebA reference is a 178x178 centre crop, not ProGAN's "
                "128x128 crop; use --metrics-every (SWD, MS-SSIM: Tab. 1) or --export-samples")
    return args


def _batch_dict(batch_at):
    return {int(r): int(b) for r, b in (s.split(":") for s in batch_at)}


# ==== Data ====
def _celeba_crop(img):
    """Official dataset_tool.py create_celeba: the 128x128 window centred at (x 89, y 121)."""
    if img.size != (178, 218):
        raise common.UserError(f"aligned CelebA images are 178x218, not {img.size}")
    return img.crop((89 - 64, 121 - 64, 89 + 64, 121 + 64))     # PIL box (left, top, right, bottom)


def load_reals(args):
    """The training images at their stored resolution in [-1, 1] (process_reals() downsamples)."""
    if args.dataset == "celebahq":
        path = os.path.join(args.data_root, "celebahq")
        if not os.path.isdir(path):
            raise common.UserError(f"CelebA-HQ not found in {path!r}: export the 30,000 PNGs of "
                                   "the official dataset_tool.py create_celebahq (CelebA + 27.6 "
                                   "GB of deltas) there, or use --dataset folder:<dir>")
        return common.load_dataset(f"folder:{path}", img_size=args.resolution)
    if args.dataset == "celeba":
        path = os.path.join(args.data_root, "celeba", "img_align_celeba")
        if not os.path.isdir(path):
            raise common.UserError(f"CelebA not found in {path!r}: unzip img_align_celeba.zip "
                                   "(202,599 aligned 178x218 JPEGs) there")
        # DEVIATION: aligned JPEGs; the official tool reads img_align_celeba_png
        tf = T.Compose([T.Lambda(_celeba_crop), T.ToTensor(), T.Normalize(0.5, 0.5)])
        return common.ImageFolderDataset(path, tf)
    return common.load_dataset(args.dataset, args.data_root, img_size=args.resolution)


def upscale2d(x, factor=2):
    """Nearest-neighbour upsampling by element replication (Sec. 2; official upscale2d)."""
    if factor == 1:
        return x
    b, c, h, w = x.shape
    x = x[:, :, :, None, :, None].expand(b, c, h, factor, w, factor)     # (B, C, H, f, W, f)
    return x.reshape(b, c, h * factor, w * factor)


def downscale2d(x, factor=2):
    """Box filter: the mean of each factor x factor block (= repeated 2x2 averaging)."""
    return x if factor == 1 else F.avg_pool2d(x, factor)


def process_reals(x, res, alpha, flip=None):
    """Card 2.4, official process_reals: box-downsample, flip rows where `flip` (B, 1, 1, 1), fade:
    alpha * x + (1 - alpha) * up2(pool2(x))."""
    x = downscale2d(x, x.shape[-1] // res)   # DEVIATION: float box averages (tool: uint8 per level)
    if flip is not None:
        x = torch.where(flip, x.flip(3), x)
    if alpha < 1.0:
        x = alpha * x + (1 - alpha) * upscale2d(downscale2d(x))
    return x


# ==== Models ====
def lrelu(x):
    """Leaky ReLU, slope 0.2, after every layer but toRGB and D's last dense (App. A.1)."""
    return F.leaky_relu(x, 0.2)


class PixelNorm(nn.Module):
    """Sec. 4.2: b_xy = a_xy / sqrt(1/N sum_j (a^j_xy)^2 + 1e-8) over the N channels of a pixel."""

    def forward(self, x):
        return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + 1e-8)


class EqualizedConv2d(nn.Module):
    """Sec. 4.1: w ~ N(0, 1) times c = gain / sqrt(c_in k k) at run time; bias 0, never scaled."""

    def __init__(self, c_in, c_out, kernel_size, gain=SQRT2, padding=None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(c_out))
        self.scale = gain / math.sqrt(c_in * kernel_size * kernel_size)
        self.padding = kernel_size // 2 if padding is None else padding      # "SAME" by default

    def forward(self, x):
        return F.conv2d(x, self.weight * self.scale, self.bias, padding=self.padding)


class EqualizedLinear(nn.Module):
    """Sec. 4.1 for dense layers: w ~ N(0, 1) times gain / sqrt(in_features); bias 0, unscaled."""

    def __init__(self, in_features, out_features, gain=SQRT2, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.scale = gain / math.sqrt(in_features)

    def forward(self, x):
        return F.linear(x, self.weight * self.scale, self.bias)


class MinibatchStdDev(nn.Module):
    """Sec. 3: mean over features and positions of the minibatch std, appended as one feature map.
    group_size 0: the whole minibatch (paper); else TF's strided groups. PAPER-VS-CODE: under
    torchrun the minibatch is the process's share (deviation 4)."""

    def __init__(self, group_size=0):
        super().__init__()
        self.group_size = group_size

    def forward(self, x):
        n, c, h, w = x.shape
        g = n if self.group_size == 0 else min(self.group_size, n)
        if n % g:
            raise ValueError(f"minibatch {n} is not divisible by the stddev group {g}")
        y = x.float().reshape(g, n // g, c, h, w)          # (G, M, C, H, W): sample i = gM + m
        y = y - y.mean(dim=0, keepdim=True)
        y = (y.square().mean(dim=0) + 1e-8).sqrt()          # (M, C, H, W): std over each group
        y = y.mean(dim=(1, 2, 3)).reshape(-1, 1, 1, 1)      # (M, 1, 1, 1)
        y = y.repeat(g, 1, h, w).to(x.dtype)                # (N, 1, H, W): row i gets group i mod M
        return torch.cat([x, y], dim=1)                     # (N, C + 1, H, W)


class GFirstBlock(nn.Module):
    """Tab. 2 G 4x4 rows: PN(z), 'Conv 4x4' as a dense layer (gain sqrt(2)/4: fan_in 16 z_dim, card
    2.6; one bias per channel), LReLU, PN; conv 3x3, LReLU, PN."""

    def __init__(self, z_dim, c):
        super().__init__()
        self.norm = PixelNorm()
        self.dense = EqualizedLinear(z_dim, 16 * c, gain=SQRT2 / 4, bias=False)
        self.bias = nn.Parameter(torch.zeros(c))
        self.conv = EqualizedConv2d(c, c, 3)

    def forward(self, z):
        h = self.dense(self.norm(z)).view(z.shape[0], -1, 4, 4)         # (B, c, 4, 4)
        h = self.norm(lrelu(h + self.bias.view(1, -1, 1, 1)))
        return self.norm(lrelu(self.conv(h)))


class GBlock(nn.Module):
    """Tab. 2 G row at 8x8 and up: upsample (nearest), conv 3x3, LReLU, PN, conv 3x3, LReLU, PN."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.norm = PixelNorm()
        self.conv0, self.conv1 = EqualizedConv2d(c_in, c_out, 3), EqualizedConv2d(c_out, c_out, 3)

    def forward(self, h):
        h = self.norm(lrelu(self.conv0(upscale2d(h))))
        return self.norm(lrelu(self.conv1(h)))


class Generator(nn.Module):
    """Tab. 2 G, built whole from the start; level k: res 4 * 2^k, nf(k + 1) channels; toRGB_k:
    1x1 conv, gain 1, linear, no pixel norm after it (Sec. 4.2)."""

    def __init__(self, resolution=1024, fmap_base=8192, fmap_max=512, z_dim=512, channels=3):
        super().__init__()
        self.z_dim, self.max_level = z_dim, int(math.log2(resolution)) - 2
        nf = [min(fmap_base // 2**s, fmap_max) for s in range(self.max_level + 2)]
        self.blocks = nn.ModuleList([GFirstBlock(z_dim, nf[1])] + [
            GBlock(nf[k], nf[k + 1]) for k in range(1, self.max_level + 1)])
        self.to_rgb = nn.ModuleList([EqualizedConv2d(nf[k + 1], channels, 1, gain=1.0)
                                     for k in range(self.max_level + 1)])

    def forward(self, z, level, alpha=1.0):
        """z (B, z_dim) -> images (B, C, 4 * 2^level, same): Fig. 2, the new block faded in."""
        h = self.blocks[0](z)
        for k in range(1, level):
            h = self.blocks[k](h)
        if level == 0:
            return self.to_rgb[0](h)
        new = self.to_rgb[level](self.blocks[level](h))
        if alpha >= 1.0:
            return new                        # stabilizing: the old toRGB is not used (no gradient)
        old = upscale2d(self.to_rgb[level - 1](h))
        return alpha * new + (1 - alpha) * old           # Fig. 2 (b); alpha = 0 is exactly `old`


class DBlock(nn.Module):
    """Tab. 2 D row: conv 3x3 (c_in -> c_in), LReLU, conv 3x3 (-> c_out), LReLU, 2x2 avg pool."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv0, self.conv1 = EqualizedConv2d(c_in, c_in, 3), EqualizedConv2d(c_in, c_out, 3)

    def forward(self, h):
        return downscale2d(lrelu(self.conv1(lrelu(self.conv0(h)))))


class DHead(nn.Module):
    """Tab. 2 D 4x4 rows: mbstd (c + 1), conv 3x3, LReLU, conv 4x4 valid, LReLU, dense (gain 1)."""

    def __init__(self, c, c_out, group_size):
        super().__init__()
        self.mbstd = MinibatchStdDev(group_size)
        self.conv = EqualizedConv2d(c + 1, c, 3)
        self.conv4 = EqualizedConv2d(c, c_out, 4, padding=0)
        self.fc = EqualizedLinear(c_out, 1, gain=1.0)

    def forward(self, h):
        h = lrelu(self.conv(self.mbstd(h)))
        h = lrelu(self.conv4(h)).flatten(1)                     # (B, c_out, 1, 1) -> (B, c_out)
        return self.fc(h).view(-1)                              # (B,)


class Discriminator(nn.Module):
    """Tab. 2 D, mirroring G: fromRGB_k (1x1 conv, LReLU), blocks down to 4x4, DHead; no norms."""

    def __init__(self, resolution=1024, fmap_base=8192, fmap_max=512, channels=3,
                 mbstd_group_size=0):
        super().__init__()
        self.max_level = int(math.log2(resolution)) - 2
        nf = [min(fmap_base // 2**s, fmap_max) for s in range(self.max_level + 2)]
        self.from_rgb = nn.ModuleList([EqualizedConv2d(channels, nf[k + 1], 1)
                                       for k in range(self.max_level + 1)])
        self.blocks = nn.ModuleList([DHead(nf[1], nf[0], mbstd_group_size)] + [
            DBlock(nf[k + 1], nf[k]) for k in range(1, self.max_level + 1)])

    def forward(self, x, level, alpha=1.0):
        """x (B, C, 4 * 2^level, same) -> scores (B,): Fig. 2, the new block faded in with alpha."""
        h = lrelu(self.from_rgb[level](x))
        if level > 0:
            h = self.blocks[level](h)
            if alpha < 1.0:                                        # Fig. 2 (b), mirrored
                old = lrelu(self.from_rgb[level - 1](downscale2d(x)))
                h = alpha * h + (1 - alpha) * old               # alpha = 0 is exactly `old`
            for k in range(level - 1, 0, -1):
                h = self.blocks[k](h)
        return self.blocks[0](h)


# ==== Losses ====
def wasserstein_loss_D(d_real, d_fake):
    """App. A.1 (WGAN): D minimizes E[D(G(z))] - E[D(x)]."""
    return d_fake.mean() - d_real.mean()


def gradient_penalty(D, x_real, x_fake, level, alpha, gamma, dist=None):
    """App. A.1, Sec. 6.5: E[(||grad D(x_hat)||_2 - gamma)^2] / gamma^2, one u ~ U[0, 1] per
    sample (drawn for the global minibatch under torchrun), D at the same level and alpha."""
    n = len(x_real) * (dist.world_size if dist else 1)
    u = torch.rand(n, 1, 1, 1, device=x_real.device)
    u = dist.shard(u) if dist else u
    x_hat = (x_real + u * (x_fake - x_real)).requires_grad_(True)   # official lerp(reals, fakes, u)
    grad, = torch.autograd.grad(D(x_hat, level, alpha).float().sum(), x_hat, create_graph=True)
    norm = grad.flatten(1).norm(2, dim=1)                           # over all non-batch dims
    return ((norm - gamma) ** 2).mean() / gamma**2, norm.detach().mean()


def drift_penalty(d_real):
    """App. A.1: E[D(x)^2] on real scores, keeps them from drifting (weight eps_drift)."""
    return d_real.square().mean()


def generator_loss(d_fake):
    """App. A.1 (WGAN): G minimizes -E[D(G(z))]."""
    return -d_fake.mean()


# ==== Train step ====
def schedule(kimg, stabilize_kimg=800.0, fade_kimg=800.0, resolution=1024, batch_size=16,
             batch_at=CELEBAHQ_BATCH):
    """Sec. 2, official TrainingSchedule: (level, alpha, batch) after `kimg` thousand real images:
    stabilize 4x4 for T, fade 8x8 in over F, stabilize 8x8 for T, ...; batch per res (App. A.1)."""
    n = round(kimg * 1000)                                     # real images shown, exact integers
    t, f = round(stabilize_kimg * 1000), round(fade_kimg * 1000)
    top = int(math.log2(resolution)) - 2
    phase, p = divmod(n, t + f) if t + f else (top, 0)        # T = F = 0: no growing
    if phase >= top:
        level, alpha = top, 1.0                               # lod clipped at 0: fully grown
    elif p <= t:
        level, alpha = phase, 1.0                             # TF: lod is whole until p > T
    else:
        level, alpha = phase + 1, (p - t) / f                 # lod = top - phase - (p - T) / F
    return level, alpha, batch_at.get(4 * 2**level, batch_size)


def lr_rampup(kimg, rampup_kimg):
    """PAPER-VS-CODE: official Theano misc.rampup, lr x exp(-5 (1 - kimg / rampup_kimg)^2)."""
    if kimg >= rampup_kimg:
        return 1.0
    p = 1.0 - max(kimg, 0.0) / rampup_kimg
    return math.exp(-5.0 * p * p)


@torch.no_grad()
def ema_update(G_ema, G, beta):
    """App. A.1: theta_ema <- beta theta_ema + (1 - beta) theta, all of G, every iteration."""
    ema, params = list(G_ema.parameters()), list(G.parameters())
    torch._foreach_mul_(ema, beta)
    torch._foreach_add_(ema, params, alpha=1.0 - beta)


def train_step(G, D, opt_G, opt_D, x_full, level, alpha, args, dist,
               autocast=contextlib.nullcontext):
    """App. A.1, n_critic = 1: a D step on L_D, then a G step on L_G with fresh z. UNSPECIFIED: D
    sees reals, fakes and x_hat in separate passes (official), mbstd within each. DEVIATION 5:
    Theano's cifar10 updated both from one pass. Under torchrun x_full is this process's share."""
    res, n, dev = 4 * 2**level, len(x_full) * dist.world_size, x_full.device   # n: global
    flip = dist.shard(torch.rand(n, 1, 1, 1, device=dev)) < 0.5 if args.mirror else None
    x_real = process_reals(x_full, res, alpha, flip)
    z = dist.shard(torch.randn(n, args.z_dim, device=dev))
    with torch.no_grad(), autocast():
        x_fake = G(z, level, alpha).float()
    with autocast():
        d_real = D(x_real, level, alpha).float()
        d_fake = D(x_fake, level, alpha).float()
        gp, grad_norm = gradient_penalty(D, x_real, x_fake, level, alpha, args.gamma, dist)
    drift = drift_penalty(d_real)
    loss_D = wasserstein_loss_D(d_real, d_fake) + args.lambda_gp * gp + args.eps_drift * drift
    opt_D.zero_grad(set_to_none=True)
    loss_D.backward()
    dist.average_gradients(D)
    opt_D.step()

    D.requires_grad_(False)                       # G step: gradients flow through D, not into it
    z = dist.shard(torch.randn(n, args.z_dim, device=dev))
    with autocast():
        loss_G = generator_loss(D(G(z, level, alpha), level, alpha).float())
    opt_G.zero_grad(set_to_none=True)
    loss_G.backward()
    dist.average_gradients(G)
    opt_G.step()
    D.requires_grad_(True)
    return {"loss_D": loss_D.detach(), "loss_G": loss_G.detach(), "gp": gp.detach(),
            "grad_norm": grad_norm, "drift": drift.detach(), "d_real": d_real.detach().mean(),
            "d_fake": d_fake.detach().mean()}


def setup(args):
    """Seeds, torchrun, deterministic kernels, the bf16 autocast context: (dist, autocast)."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    dist = common.Dist(args.device)
    if args.deterministic and dist.device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = not args.deterministic
    torch.use_deterministic_algorithms(args.deterministic)
    autocast = ((lambda: torch.autocast(dist.device.type, dtype=torch.bfloat16))
                if args.amp == "bf16" else contextlib.nullcontext)
    return dist, autocast   # DEVIATION: --amp bf16; the paper trains in fp32


def check_reals(dataset, args):
    """(data_res, channels) of one image, read now: a broken dataset fails at start-up."""
    x0 = dataset[0][0]
    data_res, R = x0.shape[-1], args.resolution
    if x0.shape[-2] != data_res or data_res % R or (data_res // R) & (data_res // R - 1):
        raise common.UserError(f"images of {args.dataset} are {tuple(x0.shape[1:])}, not a "
                               f"power-of-two multiple of --resolution {R}")
    if args.metrics_every and len(dataset) < args.swd_images:
        raise common.UserError(f"--swd-images {args.swd_images} > {len(dataset)} images")
    return data_res, x0.shape[0]


def build_training(args, channels, device):
    """G, D, G_ema (a copy of all of G from step 0), the Adams, G's kwargs (for the ckpt)."""
    G_kwargs = dict(resolution=args.resolution, fmap_base=args.fmap_base,
                    fmap_max=args.fmap_max, z_dim=args.z_dim, channels=channels)
    G = Generator(**G_kwargs).to(device)
    D = Discriminator(args.resolution, args.fmap_base, args.fmap_max, channels=channels,
                      mbstd_group_size=args.mbstd_group_size).to(device)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    adam = dict(lr=args.lr, betas=tuple(args.betas), eps=args.adam_eps, fused=device.type == "cuda")
    opt_G = torch.optim.Adam(G.parameters(), **adam)
    opt_D = torch.optim.Adam(D.parameters(), **adam)
    return G, D, G_ema, opt_G, opt_D, G_kwargs


def check_batch_shares(batch_at, args, dist):
    """Each minibatch splits evenly over the processes, each share into mbstd groups."""
    levels = range(int(math.log2(args.resolution)) - 1)
    for b in {batch_at.get(4 * 2**k, args.batch_size) for k in levels}:
        b = dist.share(b).stop - dist.share(b).start   # UserError unless it splits evenly
        if args.mbstd_group_size and b % min(args.mbstd_group_size, b):
            raise common.UserError(f"a minibatch share of {b} is not divisible by "
                                   f"--mbstd-group-size {args.mbstd_group_size}")


def restore(state, G, D, G_ema, opt_G, opt_D, fixed_z):
    """--resume: nets, optimizers, RNG; (fixed_z, nimg, it, phase, last, streams)."""
    nimg, it, phase, last, streams = 0, 0, None, [0, 1.0], {}
    if state:
        for name, obj in (("G", G), ("D", D), ("G_ema", G_ema), ("opt_G", opt_G), ("opt_D", opt_D)):
            obj.load_state_dict(state[name])
        fixed_z, nimg, it = state["fixed_z"], state["nimg"], state["it"]
        phase, last, streams = state["phase"], state["last"], state["streams"]
        common.set_rng_state(state["rng"])
    return fixed_z, nimg, it, phase, last, streams


def real_stream(dataset, batch, streams, args, device, dist):
    """One exactly resumable stream of reals per minibatch size, seeded by the size."""
    return common.infinite_batches(dataset, batch, args.seed + 1_000_000 * batch,
                                   start_step=streams.get(str(batch), 0),
                                   num_workers=args.num_workers, device=device,
                                   rank=dist.rank, world_size=dist.world_size)


def kimg_step(nimg):
    """The `step` of metrics.jsonl and ckpt.pt: kimg shown, an int when whole (1, not 1.0)."""
    return nimg // 1000 if nimg % 1000 == 0 else nimg / 1000


def snapshot(G, D, G_ema, opt_G, opt_D, fixed_z, nimg, it, phase, last, streams, G_kwargs):
    """The ckpt.pt state: nets, Adams, fixed z, RNG, schedule position and data streams."""
    return {"G": G.state_dict(), "D": D.state_dict(), "G_ema": G_ema.state_dict(),
            "opt_G": opt_G.state_dict(), "opt_D": opt_D.state_dict(),
            "fixed_z": fixed_z.cpu(), "rng": common.rng_state(), "nimg": nimg,
            "it": it, "phase": phase, "last": last, "streams": streams, "G_kwargs": G_kwargs}


# ==== Eval ====
def _to_255(x):
    """[-1, 1] -> [0, 255] floats rounded as common.quantize (the official metrics read uint8)."""
    return ((x.float() + 1) / 2 * 255 + 0.5).clamp(0, 255).floor()


def _binomial_blur(x, gain=1.0):
    """5x5 [1, 4, 6, 4, 1]^2 / 256 filter with mirror borders (official pyr_down / cv2.pyrDown)."""
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], device=x.device)
    w = (torch.outer(k, k) * (gain / 256)).expand(x.shape[1], 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), w, groups=x.shape[1])


def laplacian_pyramid(x, n_levels):
    """Sec. 5 (official generate_laplacian_pyramid): band-pass levels, the last one low-pass."""
    levels = [x]
    for _ in range(n_levels - 1):
        down = _binomial_blur(levels[-1])[:, :, ::2, ::2]
        up = torch.zeros_like(levels[-1])
        up[:, :, ::2, ::2] = down
        levels[-1] = levels[-1] - _binomial_blur(up, gain=4.0)
        levels.append(down)
    return levels


def _patches(level, gen, per_image=128, size=7):
    """Sec. 5: `per_image` random 7x7 neighbourhoods of every image -> (N * per_image, C, 7, 7)."""
    n, c, s, _ = level.shape
    top = torch.randint(0, s - size + 1, (n * per_image, 2), generator=gen).to(level.device)
    img = torch.arange(n, device=level.device).repeat_interleave(per_image)
    off = torch.arange(size, device=level.device)
    rows, cols = top[:, :1] + off, top[:, 1:] + off                       # (N, 7) each
    ch = torch.arange(c, device=level.device)
    return level[img[:, None, None, None], ch[None, :, None, None], rows[:, None, :, None],
                 cols[:, None, None, :]]


def _normalize(desc):
    """Official finalize_descriptors: zero mean, unit std per colour channel over the set."""
    desc = desc - desc.mean(dim=(0, 2, 3), keepdim=True)
    desc = desc / desc.std(dim=(0, 2, 3), correction=0, keepdim=True).clamp_min(1e-8)
    return desc.flatten(1)                                  # (N, C * 49)


def sliced_wasserstein(a, b, gen, repeats=4, dirs_per_repeat=128):
    """Sec. 5: mean over 4 x 128 random unit directions of |sorted proj(a) - sorted proj(b)|."""
    out = []
    for _ in range(repeats):
        d = torch.randn(a.shape[1], dirs_per_repeat, generator=gen).to(a.device)
        d = d / d.norm(dim=0, keepdim=True)
        pa, pb = (a @ d).sort(dim=0).values, (b @ d).sort(dim=0).values
        out.append((pa - pb).abs().mean())
    return torch.stack(out).mean()


@torch.no_grad()
def sliced_wasserstein_distance(reals, fakes, seed=0):
    """Sec. 5: SWD x 1e3 per Laplacian level down to 16x16, and the mean, of two iterables of
    (B, C, H, W) batches. DEVIATION 8: the same patch positions and directions for both sets."""
    sets = []
    for batches in (reals, fakes):
        gen, per_level = torch.Generator().manual_seed(seed), None
        for x in batches:
            bands = laplacian_pyramid(_to_255(x), int(math.log2(x.shape[-1])) - 3)
            per_level = per_level or [[] for _ in bands]
            for store, band in zip(per_level, bands):
                store.append(_patches(band, gen))
        sets.append([_normalize(torch.cat(d)) for d in per_level])   # reals, fakes: separately
    gen, res, out = torch.Generator().manual_seed(seed + 1), x.shape[-1], {}
    for a, b in zip(*sets):
        out[f"swd{res}"] = 1e3 * sliced_wasserstein(a, b, gen).item()
        res //= 2
    out["swd_avg"] = sum(out.values()) / len(out)
    return out


def _ssim(x, y, max_val=255.0, size=11, sigma=1.5, k1=0.01, k2=0.03):
    """One scale of official metrics/ms_ssim.py: per-image mean SSIM and contrast-structure term."""
    c = x.shape[1]
    s = min(size, x.shape[2], x.shape[3])
    r = torch.arange(s, dtype=torch.float64) - (s - 1) / 2            # fspecial('gaussian') grid
    g = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * (s * sigma / size) ** 2))
    w = (g / g.sum()).to(x).expand(c, 1, s, s)
    blur = lambda t: F.conv2d(t, w, groups=c)  # noqa: E731
    mu_x, mu_y = blur(x), blur(y)
    s_xx, s_yy, s_xy = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2, blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * max_val) ** 2, (k2 * max_val) ** 2
    v1, v2 = 2 * s_xy + c2, s_xx + s_yy + c2
    ssim = ((2 * mu_x * mu_y + c1) * v1 / ((mu_x**2 + mu_y**2 + c1) * v2)).mean(dim=(1, 2, 3))
    return ssim, (v1 / v2).mean(dim=(1, 2, 3))


def ms_ssim(x, y, weights=(0.0448, 0.2856, 0.3001, 0.2363, 0.1333)):
    """Sec. 5 (Wang et al. 2003, official metrics/ms_ssim.py): per-pair MS-SSIM in [0, 255]."""
    ssim, cs = [], []
    for k in range(len(weights)):
        x, y = (x, y) if k == 0 else (downscale2d(x), downscale2d(y))
        s, c = _ssim(x, y)
        ssim.append(s)
        cs.append(c)
    ssim, cs = torch.stack(ssim).clamp_min(0), torch.stack(cs).clamp_min(0)   # (scales, N)
    w = torch.tensor(weights, device=ssim.device, dtype=ssim.dtype)[:, None]
    return (cs[:-1] ** w[:-1]).prod(dim=0) * ssim[-1] ** w[-1]


def _chunks(n, size):
    return [min(size, n - i) for i in range(0, n, size)]


@torch.no_grad()
def paper_metrics(G_ema, dataset, level, alpha, args, device, chunk=64):
    """Sec. 5 at the current res: SWD vs a fixed subset of reals, MS-SSIM of generated pairs."""
    res = 4 * 2**level
    if res < 16:
        return {}
    gen = torch.Generator().manual_seed(args.seed + 3)
    idx = torch.randperm(len(dataset), generator=gen)[: args.swd_images].tolist()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, idx), batch_size=chunk,
                                         num_workers=args.num_workers)
    reals = (process_reals(x.to(device), res, alpha) for x, _ in loader)
    z_gen = torch.Generator(device=device).manual_seed(args.seed + 4)
    sample = lambda n: G_ema(torch.randn(n, args.z_dim, device=device, generator=z_gen),  # noqa
                             level, alpha).float()
    out = sliced_wasserstein_distance(reals, (sample(n) for n in _chunks(args.swd_images, chunk)),
                                      seed=args.seed)
    pairs = [ms_ssim(*_to_255(sample(2 * n)).view(2, n, -1, res, res))
             for n in _chunks(args.ms_ssim_pairs, chunk)]            # (2n, C, H, W) -> 2 x n
    out["ms_ssim"] = torch.cat(pairs).mean().item()
    return out


def _save_grid(x, path, lines, key):
    """An 8-wide grid, each image at least 32 px (nearest), under a title strip."""
    x = upscale2d(x.float().clamp(-1, 1), max(1, 32 // x.shape[-1]))
    grid = torchvision.utils.make_grid(x, nrow=8, padding=2, normalize=True, value_range=(-1, 1))
    common.save_png(common.title_strip(grid.cpu().mul(255).byte(), lines, key=key), path)


@torch.no_grad()
def sample_grid(G_ema, fixed_z, level, alpha, nimg, path):
    res = 4 * 2**level
    phase = f"fade-in alpha {alpha:.3f}" if alpha < 1 else "stabilize"
    _save_grid(G_ema(fixed_z, level, alpha), path, [f"progan | kimg {nimg / 1000:g} | {res}x{res} "
               f"{phase}", "G_ema, fixed z (64), nearest-upsampled for display"],
               [("generated", common.FAKE_RGB)])


def print_schedule(batch_at, max_level, args):
    period = args.stabilize_kimg + args.fade_kimg
    print("schedule: " + " | ".join(
        f"{4 * 2**k}px from kimg {max(k * period - args.fade_kimg, 0):g} (batch "
        f"{batch_at.get(4 * 2**k, args.batch_size)})" for k in range(max_level + 1))
        + f" | end {args.kimg}", flush=True)


def save_reals(dataset, data_res, args):
    """reals.png: the first 64 training images at the final resolution."""
    reals = torch.stack([dataset[i][0] for i in range(min(64, len(dataset)))])
    R = args.resolution
    _save_grid(downscale2d(reals, data_res // R), os.path.join(args.out_dir, "reals.png"),
               [f"{args.dataset} | {R}x{R} reals (box-downsampled from {data_res})"],
               [("real", common.REAL_RGB)])


def end_phase(G_ema, fixed_z, last, phase, nimg, t_phase, n_phase, args, device, dist,
              final=False):
    """Grid, speed and memory of the phase that just ended (since t_phase, n_phase)."""
    if not dist.main:
        return
    lv, a = last
    name = f"kimg{nimg / 1000:010.3f}-{'final' if final else 'phase'}.png"
    sample_grid(G_ema, fixed_z, lv, a, nimg, os.path.join(args.out_dir, "samples", name))
    dt, n = max(time.time() - t_phase, 1e-9), nimg - n_phase
    print(f"phase {4 * 2**lv}x{4 * 2**lv} {'fade-in' if phase[1] else 'stabilize'} ended at "
          f"kimg {nimg / 1000:g}: {n} images in {dt:.1f} s ({n / dt:.1f} img/s) | peak "
          f"memory {common.peak_memory_mib(device):,.0f} MiB ("
          f"{'CUDA, this phase' if device.type == 'cuda' else 'process RSS'})", flush=True)


def build_fid(args, device):
    """fid.TrainingFID built at start-up: weights and reference statistics resolved now."""
    try:
        import fid  # evaluation only: a copy of this script without fid.py still trains
    except ImportError:
        raise common.UserError("--fid-every needs fid.py (the project's metric file) next to "
                               "progan.py") from None
    name = (f"folder:{os.path.join(args.data_root, 'celebahq')}" if args.dataset == "celebahq"
            else args.dataset)
    return fid.TrainingFID(name, args.data_root, args.resolution, device, args.fid_samples,
                           weights=args.fid_weights, ref_split=args.fid_ref_split,
                           ref_size=args.fid_ref_size)


@torch.no_grad()
def _final_res_sampler(G_ema, level, alpha, args, device, seed):
    """sample_fn(n): G_ema images at the final resolution. DEVIATION: during growth they are
    nearest-upsampled (like TF's full-resolution G output) and scored by fid.py's protocol."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def sample_fn(n):
        x = G_ema(torch.randn(n, args.z_dim, device=device, generator=gen), level, alpha).float()
        return upscale2d(x, args.resolution // x.shape[-1]).clamp(-1, 1)
    return sample_fn


def export_samples(G_ema, level, alpha, args, device, chunk=16):
    """out_dir/samples_N.npz: N G_ema samples, uint8 NHWC under "images", for `python fid.py`."""
    sample_fn = _final_res_sampler(G_ema, level, alpha, args, device, args.seed + 6)
    x = torch.cat([common.quantize(sample_fn(n)) for n in _chunks(args.export_samples, chunk)])
    np.savez(os.path.join(args.out_dir, f"samples_{args.export_samples}.npz"), images=x.numpy())


def load_generator(ckpt_path, device="cpu"):
    """(G_ema, level, alpha) from a progan checkpoint alone: sample with G(z, level, alpha)."""
    state = common.load_checkpoint(ckpt_path, device)
    if state.get("script") != "progan":
        raise common.UserError(f"{ckpt_path!r} is not a progan checkpoint")
    G = Generator(**state["G_kwargs"]).to(device)
    G.load_state_dict(state["G_ema"])
    level, alpha = state["last"]
    return G.eval().requires_grad_(False), level, alpha


# ==== Main ====
def main(argv=None):
    args = parse_args(argv)
    dist, autocast = setup(args)
    device = dist.device
    batch_at, total = _batch_dict(args.batch_at), args.kimg * 1000
    check_batch_shares(batch_at, args, dist)
    run = common.Run(args, "progan", total=args.kimg, unit="kimg",
                     mutable=("kimg", "metrics_every", "swd_images", "ms_ssim_pairs"), dist=dist)
    dataset = load_reals(args)
    data_res, channels = check_reals(dataset, args)
    G, D, G_ema, opt_G, opt_D, G_kwargs = build_training(args, channels, device)
    fid_ev = build_fid(args, device) if args.fid_every else None
    fixed_z = torch.randn(64, args.z_dim, generator=torch.Generator().manual_seed(args.seed))
    # nimg: real images shown; it: minibatch iterations; phase: [level, fading] of the last
    # iteration; last: its (level, alpha); streams: batches drawn per minibatch size
    fixed_z, nimg, it, phase, last, streams = restore(run.load(device), G, D, G_ema, opt_G,
                                                      opt_D, fixed_z)
    fixed_z = fixed_z.to(device)

    run.start(kimg_step(nimg), device, G=G, D=D)
    if dist.main:
        print_schedule(batch_at, G.max_level, args)
        os.makedirs(os.path.join(args.out_dir, "samples"), exist_ok=True)
        if nimg == 0:
            save_reals(dataset, data_res, args)
    stream_batch, t_phase, n_phase = None, time.time(), nimg
    while nimg < total and not run.stopping:
        level, alpha, batch = schedule(nimg / 1000, args.stabilize_kimg, args.fade_kimg,
                                       args.resolution, args.batch_size, batch_at)
        if [level, alpha < 1.0] != phase:
            if phase is not None:
                end_phase(G_ema, fixed_z, last, phase, nimg, t_phase, n_phase, args, device, dist)
                for opt in (opt_G, opt_D):   # official reset_opt_for_new_lod: fresh Adam moments
                    opt.state.clear()
            phase, t_phase, n_phase = [level, alpha < 1.0], time.time(), nimg
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
        if batch != stream_batch:
            batches, stream_batch = real_stream(dataset, batch, streams, args, device, dist), batch
        x_full = next(batches)[0].to(device, non_blocking=True)
        streams[str(batch)] = streams.get(str(batch), 0) + 1
        lr = args.lr * lr_rampup(nimg / 1000, args.lr_rampup_kimg)
        for group in opt_G.param_groups + opt_D.param_groups:
            group["lr"] = lr
        out = train_step(G, D, opt_G, opt_D, x_full, level, alpha, args, dist, autocast)
        ema_update(G_ema, G, args.ema_beta)
        nimg, it, last = nimg + batch, it + 1, [level, alpha]  # UNSPECIFIED: schedule each batch
        step, done = kimg_step(nimg), nimg >= total             # (Theano; TF: every 4 batches)

        metrics_now = args.metrics_every > 0 and (it % args.metrics_every == 0 or done)
        fid_now = args.fid_every > 0 and (it % args.fid_every == 0 or done)
        if it % args.log_every == 0 or done or metrics_now or fid_now:
            values = {**out, "res": 4 * 2**level, "alpha": alpha, "lr": lr}
            if metrics_now:             # every process scores the same seeded samples: one value
                values.update(paper_metrics(G_ema, dataset, level, alpha, args, device))
            if fid_now:
                values.update(fid_ev(_final_res_sampler(G_ema, level, alpha, args, device,
                                                        args.seed + 5)))
            run.log(step, values)
        if dist.main and args.sample_every and it % args.sample_every == 0:
            sample_grid(G_ema, fixed_z, level, alpha, nimg,
                        os.path.join(args.out_dir, "samples", f"kimg{step:010.3f}.png"))
        if done:
            end_phase(G_ema, fixed_z, last, phase, nimg, t_phase, n_phase, args, device, dist,
                      final=True)
        if it % args.ckpt_every == 0 or done or run.stopping:
            run.save(step, snapshot(G, D, G_ema, opt_G, opt_D, fixed_z, nimg, it, phase, last,
                                    streams, G_kwargs))

    if args.export_samples > 0 and not run.stopping and dist.main:   # stopping: on every rank
        export_samples(G_ema, *last, args, device)
    return run.finish(kimg_step(nimg), device)


if __name__ == "__main__":
    common.cli(main)
