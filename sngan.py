"""SN-GAN: Spectral Normalization for Generative Adversarial Networks.
Miyato, Kataoka, Koyama, Yoshida. ICLR 2018. arXiv:1802.05957 (v1)
Official code: pfnet-research/sngan_projection (ResNet), pfnet-research/chainer-gan-lib (CNN)

Paper -> code
  Eq. (8)        W_SN = W / sigma(W) on every D layer ......... spectral_norm()
  App. A, Alg. 1 one power iteration per forward, u recycled .. _SpectralNormHook
  Eq. (9)-(12)   gradient through sigma = u^T W v ............. _SpectralNormHook.normalized_weight
  App. E Eq. 32  optional learnable scale gamma * W_SN ........ spectral_norm(gamma=True)
  Eq. (15)       standard loss, non-saturating G loss ......... standard_loss_D(), standard_loss_G()
  Eq. (16)-(17)  hinge loss for D and G ....................... hinge_loss_D(), hinge_loss_G()
  Tab. 1         Adam settings A-F and the ResNet setting ..... SETTINGS
  Tab. 3         standard CNN G and D ......................... CNNGenerator, CNNDiscriminator
  Fig. 8         ResBlocks of G and D ......................... GBlock, DBlock, OptimizedDBlock
  Tab. 4 / 5     ResNet G and D, 32x32 / 48x48 ................ Generator, Discriminator
  official       updater.py: G step, then n_dis D steps ....... train_step()
  official       LinearShift lr decay to 0 .................... lr_factor()
  Fig. 9         sigma(W_SN) of every D layer by exact SVD .... d_spectral_norms()
  App. B.1       IS and FID (5K generated vs 10K real) ........ build_evaluator(), evaluate()
Deviations (each one also tagged in the code; grep DEVIATION|PAPER-VS-CODE)
  1. PAPER-VS-CODE  ResNet CIFAR-10: 50K iterations, lr linearly to 0 (official config); text: 100K.
  2. PAPER-VS-CODE  CNN D widths 64,128,128,256,256,512,512 of official net.py (the 7.42 row) vs
     Tab. 3's 64,64,128,128,256,256,512 (--table3-literal); slope 0.1 (Tab. 3) vs Chainer's 0.2.
  3. PAPER-VS-CODE  CNN G has BN + ReLU after the dense layer (official net.py, not in Tab. 3).
  4. PAPER-VS-CODE  z ~ N(0, I) (paper); chainer-gan-lib draws U[-1, 1] (--z-dist uniform).
  5. PAPER-VS-CODE  ResNet 32x32 reals x_uint8/128 - 1 + U(0, 1/128) (official datasets/cifar10.py)
  6. PAPER-VS-CODE  official SNLinear also advances u in eval mode; here only training forwards do.
  7. DEVIATION  IS and FID come from fid.py (its Inception port), not the official TF Inception.
  8. DEVIATION  scope: no Tab. 6 ImageNet nets, no concat SN-GAN (see projection.py), no WGAN-GP.
  9. DEVIATION  --amp bf16 (paper fp32). Under torchrun G's BN normalises each process's share (as
     the official ChainerMN runs did per GPU) unless --sync-bn; rank 0's BN statistics are saved.
  10. DEVIATION  Adam eps: torch adds it to sqrt(v_hat), Chainer to sqrt(v); 3.2x at t=1, ~1 at 50.
Datasets (--dataset, resized to --img-size, labels unused): cifar10, stl10 (the 100K unlabeled
  images, 48x48), cifar100, mnist, fashion-mnist, celeba, lsun-<cat>, folder:<path>, shapes.
Run
  python sngan.py --dataset cifar10 --fid-every 5000      # ResNet, hinge (IS 8.22, FID 21.7)
  python sngan.py --dataset cifar10 --arch cnn            # CNN, setting C, standard loss (7.42)
  python sngan.py --dataset cifar10 --arch cnn --loss hinge            # Tab. 2 "Eq.(17)" row (7.58)
  python sngan.py --dataset cifar10 --arch cnn --setting D             # Tab. 1 settings A-F
  python sngan.py --dataset stl10                         # ResNet 48x48, Tab. 5 (9.10 / 40.1)
  python sngan.py --dataset stl10 --arch cnn              # CNN M=48, setting B (8.28 / 53.1)
  python sngan.py --dataset stl10 --arch cnn --steps 200000            # "2x updates" (8.69 / 47.5)
  python sngan.py --dataset shapes --device cpu --steps 2              # smoke test, offline
  torchrun --nproc_per_node 4 sngan.py --dataset stl10     # 4 GPUs, --batch-size = global batch
Sample and score (--steps counts generator iterations; a finished run can be resumed to export)
  python sngan.py --dataset cifar10 --resume --export-samples 50000    # runs/.../samples_50000.npz
  python fid.py runs/sngan-cifar10-s0/samples_50000.npz dataset:cifar10 --isc
  G = sngan.load_generator("runs/sngan-cifar10-s0/ckpt.pt", "cuda")   # eval mode, as the paper
  x = G(sngan.sample_z(64, 128, "normal", "cuda"))                      # (64, 3, 32, 32) in [-1, 1]
Paper reports: CIFAR-10 IS 8.22 +- .05, FID 21.7 +- .21 (ResNet, hinge; Tab. 2; IS 10 x 5K samples,
FID of 5K generated vs 10K real, App. B.1). Our numbers: README.
"""

import argparse
import math
import os
import random

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import common

# Tab. 1: setting -> (alpha, beta1, beta2, n_dis); "resnet" is App. B.2 (Gulrajani et al.)
SETTINGS = {"A": (1e-4, 0.5, 0.9, 5), "B": (1e-4, 0.5, 0.999, 1), "C": (2e-4, 0.5, 0.999, 1),
            "D": (1e-3, 0.5, 0.9, 5), "E": (1e-3, 0.5, 0.999, 5), "F": (1e-3, 0.9, 0.999, 5),
            "resnet": (2e-4, 0.0, 0.9, 5)}


# ==== Args ====
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                formatter_class=common.HelpFormatter)
    pos, nonneg = common.positive_int, common.nonnegative_int
    g = p.add_argument_group("paper")
    g.add_argument("--arch", choices=["resnet", "cnn"], default="resnet",
                   help="ResNet (Tab. 4/5) or CNN (Tab. 3); DEVIATION: no Tab. 6 nets [Sec. 4]")
    g.add_argument("--loss", choices=["hinge", "standard"],
                   help="default: hinge for resnet, standard for cnn [Eq. 15-17]")
    g.add_argument("--setting", choices=list(SETTINGS), help="Adam lr, betas and n_dis; default: "
                   "resnet for resnet, C for cnn, B for cnn at 48x48 (STL-10) [Tab. 1, App. B.2]")
    g.add_argument("--lr", type=common.positive_float,
                   help="Adam alpha of G and D; default: the --setting's [Tab. 1]")
    g.add_argument("--betas", type=common.unit_float, nargs=2, metavar=("B1", "B2"),
                   help="Adam beta1 beta2 of G and D; default: the --setting's [Tab. 1]")
    g.add_argument("--n-dis", "--d-steps", dest="n_dis", type=pos,
                   help="D updates per G update; default: the --setting's [Tab. 1]")
    g.add_argument("--steps", type=pos, help="generator iterations; default: 50000 for resnet "
                   "32x32 (text: 100K, PAPER-VS-CODE), else 100000 [Sec. 4.1, official configs]")
    g.add_argument("--lr-decay", action=argparse.BooleanOptionalAction, help="linear decay to 0; "
                   "default: on for resnet, off for cnn [official configs; STL: UNSPECIFIED]")
    g.add_argument("--batch-size", type=pos, default=64, help="D batch per D step [App. B]")
    g.add_argument("--g-batch-size", type=pos, help="G-step batch; default: 2x batch for resnet, "
                   "= batch for cnn [UNSPECIFIED: official n_gen_samples, chainer-gan-lib]")
    g.add_argument("--z-dim", type=pos, default=128, help="latent size d_z [Sec. 4]")
    g.add_argument("--z-dist", choices=["normal", "uniform"], default="normal",
                   help="N(0, I) (paper) or U[-1, 1] (chainer-gan-lib) [Sec. 4, official net.py]")
    g.add_argument("--gamma-reparam", action="store_true", help="learnable scalar gamma * W_SN in "
                   "every D layer; the paper pairs it with WGAN-GP only [App. E, Eq. 32]")
    g.add_argument("--img-size", type=pos, help="default: 48 for stl10, else 32 [Sec. 4]")
    g.add_argument("--g-ch", "--g-width", dest="g_ch", type=pos, help="widest G layer; default: "
                   "256 resnet 32x32, 512 resnet 48x48, 512 cnn [Tab. 3-5]")
    g.add_argument("--d-ch", "--d-width", dest="d_ch", type=pos, help="widest D layer; default: "
                   "128 resnet 32x32, 1024 resnet 48x48, 512 cnn [Tab. 3-5]")
    g.add_argument("--table3-literal", action="store_true",
                   help="CNN D widths of Tab. 3, not of the official code [Tab. 3: PAPER-VS-CODE]")
    g.add_argument("--lrelu-slope", type=common.nonnegative_float, default=0.1,
                   help="CNN D leaky ReLU slope [Tab. 3; official 0.2: PAPER-VS-CODE]")
    g.add_argument("--dequantize", action=argparse.BooleanOptionalAction, help="reals x/128 - 1 + "
                   "U(0, 1/128); default: on for resnet 32x32 [official datasets/cifar10.py]")
    e = p.add_argument_group("eval")
    e.add_argument("--fid-every", type=nonneg, default=0,
                   help="IS and FID via fid.py every K iterations and at the end, 0 = off [run]")
    e.add_argument("--fid-samples", type=pos, default=5000, help="generated images per IS/FID "
                   "(50000 = the 10 x 5K IS protocol and Mimicry's 50K FID) [App. B.1]")
    e.add_argument("--fid-ref-split", choices=["train", "test"], default="train",
                   help="split of the real reference images [UNSPECIFIED: App. B.1 names none]")
    e.add_argument("--fid-ref-size", type=nonneg, default=10_000,
                   help="real reference images, 0 = the whole split (Mimicry: 50K) [App. B.1]")
    e.add_argument("--fid-weights", type=str, help="Inception weights for fid.py [run]")
    e.add_argument("--sigma-every", type=nonneg, default=1000,
                   help="log exact sigma(W_SN) of every D layer every N its, 0 = off [Fig. 9]")
    e.add_argument("--export-samples", type=nonneg, default=0,
                   help="write samples_N.npz (uint8 NHWC) at the end, 0 = off [run]")
    r = p.add_argument_group("run")
    r.add_argument("--dataset", default="cifar10", help="a common.load_dataset name [run]")
    r.add_argument("--data-root", type=str, default="data", help="dataset folder [run]")
    r.add_argument("--out-dir", type=str, help="default: runs/sngan-<dataset>-s<seed>[-hash] [run]")
    r.add_argument("--seed", type=nonneg, default=0, help="random seed [run]")
    r.add_argument("--device", default="cuda", help="torch device [run]")
    r.add_argument("--num-workers", type=nonneg, default=4, help="data loader workers [run]")
    r.add_argument("--log-every", type=pos, default=100, help="log every N iterations [run]")
    r.add_argument("--sample-every", type=nonneg, default=1000, help="grid every N, 0 = off [run]")
    r.add_argument("--ckpt-every", type=pos, default=5000, help="checkpoint every N its [run]")
    r.add_argument("--resume", action="store_true", help="continue out_dir/ckpt.pt [run]")
    r.add_argument("--deterministic", action="store_true", help="deterministic kernels, no "
                   "cudnn.benchmark; on CUDA sets CUBLAS_WORKSPACE_CONFIG=:4096:8 [run]")
    r.add_argument("--amp", choices=["off", "bf16"], default="off",
                   help="bf16 autocast of the forwards; losses, sigma in fp32 [run; DEVIATION 9]")
    r.add_argument("--sync-bn", action="store_true", help="under torchrun (CUDA): SyncBatchNorm "
                   "in G, BN over the global batch [run; DEVIATION 9: official per-GPU BN]")
    args = p.parse_args(argv)
    if args.betas is not None and max(args.betas) >= 1:
        p.error(f"argument --betas: expected two numbers in [0, 1), got {args.betas}")
    if args.out_dir is None:
        args.out_dir = common.default_out_dir("sngan", args, vars(p.parse_args([])))

    # Values that depend on architecture and resolution (the card's defaults table), in one place
    if args.img_size is None:
        args.img_size = 48 if args.dataset == "stl10" else 32
    resnet, res32 = args.arch == "resnet", args.img_size == 32
    if (resnet and args.img_size not in (32, 48)) or args.img_size % 8:
        p.error("--img-size must be 32 (Tab. 4) or 48 (Tab. 5) for resnet, k*8 for cnn")
    if args.setting is None:
        args.setting = "resnet" if resnet else ("B" if args.img_size == 48 else "C")
    lr, beta1, beta2, n_dis = SETTINGS[args.setting]
    derived = dict(lr=lr, betas=[beta1, beta2], n_dis=n_dis,            # Tab. 1
                   loss="hinge" if resnet else "standard", lr_decay=resnet,   # Tab. 2, configs
                   steps=50_000 if resnet and res32 else 100_000,       # official cfg, Sec. 4.1
                   g_batch_size=(2 if resnet else 1) * args.batch_size,   # official n_gen_samples
                   g_ch=256 if resnet and res32 else 512,               # Tab. 3-5
                   d_ch=(128 if res32 else 1024) if resnet else 512,    # Tab. 3-5
                   dequantize=resnet and res32)                         # official cifar10.py
    for k, v in derived.items():
        if getattr(args, k) is None:                # a flag given explicitly wins, also 0 / False
            setattr(args, k, v)
    return args


# ==== Data ====
def dequantize(x, noise):
    """PAPER-VS-CODE: x_uint8/128 - 1 + U(0, 1)/128 (official datasets/cifar10.py), not in paper."""
    return ((x + 1) * 127.5).round() / 128.0 - 1.0 + noise / 128.0


def sample_z(n, z_dim, dist, device, generator=None):
    """z ~ N(0, I) (Sec. 4); PAPER-VS-CODE: chainer-gan-lib make_hidden draws U[-1, 1]."""
    if dist == "normal":
        return torch.randn(n, z_dim, device=device, generator=generator)
    return torch.rand(n, z_dim, device=device, generator=generator) * 2 - 1


# ==== Models ====
def _l2normalize(x, eps):
    return x / (x.norm() + eps)                     # official max_sv.py: x / (||x|| + eps)


class _SpectralNormHook:
    """Forward pre-hook: sets module.weight = W / sigma(W) (Eq. 8) before every forward."""

    def __init__(self, n_power_iterations, eps):
        self.n_power_iterations, self.eps = n_power_iterations, eps

    def normalized_weight(self, module, update):
        w = module.weight_orig
        with torch.autocast(w.device.type, enabled=False):     # sigma in fp32, also under --amp
            w_mat = w.reshape(w.shape[0], -1)       # (d_out, d_in*kh*kw), Sec. 4 and footnote 3
            u, v = module.weight_u, module.weight_v
            if update:  # Alg. 1, u of the last step; PAPER-VS-CODE: never in eval (official: also)
                with torch.no_grad():
                    for _ in range(self.n_power_iterations):
                        v = _l2normalize(w_mat.t() @ u, self.eps)    # Eq. (20): v <- W^T u / ||.||
                        u = _l2normalize(w_mat @ v, self.eps)        # Eq. (21): u <- W v / ||.||
                    module.weight_u.copy_(u)
                    module.weight_v.copy_(v)
            u, v = u.clone(), v.clone()  # constants for autodiff; W is not (Eq. 12's -lambda u v^T)
            sigma = torch.dot(u, w_mat @ v)         # Eq. (22): sigma(W) ~ u^T W v
            w_sn = w / sigma                        # Eq. (8)
            if hasattr(module, "gamma"):
                w_sn = module.gamma * w_sn          # App. E, Eq. (32)
        return w_sn

    def __call__(self, module, inputs):
        module.weight = self.normalized_weight(module, update=module.training)


def spectral_norm(module, n_power_iterations=1, eps=1e-12, gamma=False):
    """W -> W / sigma(W) in place (Eq. 8), u and v in buffers; App. E gamma starts at sigma(W)."""
    w = module.weight
    del module._parameters["weight"]
    module.register_parameter("weight_orig", w)
    w_mat = w.detach().reshape(w.shape[0], -1)      # (d_out, d_in*kh*kw)
    u = _l2normalize(torch.randn(w.shape[0], device=w.device, dtype=w.dtype), eps)  # isotropic
    module.register_buffer("weight_u", u)
    module.register_buffer("weight_v", _l2normalize(w_mat.t() @ u, eps))
    if gamma:
        module.register_parameter("gamma", nn.Parameter(torch.linalg.matrix_norm(w_mat, ord=2)))
    hook = _SpectralNormHook(n_power_iterations, eps)
    with torch.no_grad():
        module.weight = hook.normalized_weight(module, update=False)
    module.register_forward_pre_hook(hook)
    return module


def d_spectral_norms(D):
    """Fig. 9: exact top singular value (SVD) of the normalized weight each D layer last used."""
    return {f"sigma/{name}": torch.linalg.matrix_norm(m.weight.detach().flatten(1).float(), ord=2)
            for name, m in D.named_modules() if hasattr(m, "weight_u")}


def glorot_(layer, gain):
    """Official ResNet init: GlorotUniform(gain), zero bias (resblocks.py)."""
    nn.init.xavier_uniform_(layer.weight, gain=gain)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def bn(c):
    return nn.BatchNorm2d(c, eps=2e-5, momentum=0.1)   # Chainer defaults: eps 2e-5, decay 0.9


def up(x):
    return F.interpolate(x, scale_factor=2, mode="nearest")  # official unpooling_2d = nearest


class GBlock(nn.Module):
    """Fig. 8 (a): BN-ReLU-up-conv3x3-BN-ReLU-conv3x3, shortcut up-conv1x1."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.b1, self.b2 = bn(c_in), bn(c_out)
        self.c1 = glorot_(nn.Conv2d(c_in, c_out, 3, padding=1), math.sqrt(2))
        self.c2 = glorot_(nn.Conv2d(c_out, c_out, 3, padding=1), math.sqrt(2))
        self.c_sc = glorot_(nn.Conv2d(c_in, c_out, 1), 1.0)   # always learnable: it upsamples

    def forward(self, x):
        h = self.c2(F.relu(self.b2(self.c1(up(F.relu(self.b1(x)))))))
        return h + self.c_sc(up(x))


class DBlock(nn.Module):
    """Fig. 8 (b): ReLU-conv(in->in)-ReLU-conv(in->out)-[pool] + [conv1x1-pool]; shortcut sees x."""

    def __init__(self, c_in, c_out, downsample, sn):
        super().__init__()
        self.downsample = downsample
        self.c1 = sn(glorot_(nn.Conv2d(c_in, c_in, 3, padding=1), math.sqrt(2)))  # hidden = in
        self.c2 = sn(glorot_(nn.Conv2d(c_in, c_out, 3, padding=1), math.sqrt(2)))
        learn_sc = c_in != c_out or downsample
        self.c_sc = sn(glorot_(nn.Conv2d(c_in, c_out, 1), 1.0)) if learn_sc else None

    def forward(self, x):
        h = self.c2(F.relu(self.c1(F.relu(x))))
        sc = self.c_sc(x) if self.c_sc is not None else x
        if self.downsample:
            h, sc = F.avg_pool2d(h, 2), F.avg_pool2d(sc, 2)
        return h + sc


class OptimizedDBlock(nn.Module):
    """First D block (official OptimizedBlock): conv-ReLU-conv-pool + pool-conv1x1, no ReLU."""

    def __init__(self, c_in, c_out, sn):
        super().__init__()
        self.c1 = sn(glorot_(nn.Conv2d(c_in, c_out, 3, padding=1), math.sqrt(2)))
        self.c2 = sn(glorot_(nn.Conv2d(c_out, c_out, 3, padding=1), math.sqrt(2)))
        self.c_sc = sn(glorot_(nn.Conv2d(c_in, c_out, 1), 1.0))

    def forward(self, x):
        return F.avg_pool2d(self.c2(F.relu(self.c1(x))), 2) + self.c_sc(F.avg_pool2d(x, 2))


class Generator(nn.Module):
    """ResNet G of Tab. 4 (32x32) / 5 (48x48), no SN (Sec. 4): Linear, up-blocks, BN-ReLU-conv."""

    def __init__(self, z_dim=128, ch=256, img_size=32, out_ch=3):
        super().__init__()
        widths = [ch] * 4 if img_size == 32 else [ch, ch // 2, ch // 4, ch // 8]
        self.bottom, self.ch = img_size // 8, ch
        self.l1 = glorot_(nn.Linear(z_dim, self.bottom ** 2 * ch), 1.0)   # no BN/ReLU (official)
        self.blocks = nn.Sequential(*[GBlock(a, b) for a, b in zip(widths[:-1], widths[1:])])
        self.b_out = bn(widths[-1])
        self.c_out = glorot_(nn.Conv2d(widths[-1], out_ch, 3, padding=1), 1.0)

    def forward(self, z):
        h = self.l1(z).view(-1, self.ch, self.bottom, self.bottom)   # (B, ch, M/8, M/8)
        h = self.blocks(h)                                            # (B, ch', M, M)
        return torch.tanh(self.c_out(F.relu(self.b_out(h))))         # (B, C, M, M)


class Discriminator(nn.Module):
    """ResNet D of Tab. 4 / 5, SN everywhere, no BN (Sec. 4); ReLU, global sum pool, SN-Linear."""

    def __init__(self, ch=128, img_size=32, in_ch=3, gamma=False):
        super().__init__()
        sn = lambda m: spectral_norm(m, gamma=gamma)   # one power iteration per forward (App. A)
        if img_size == 32:                          # Tab. 4: opt-block, a down block, 2 plain ones
            w, downs = [ch] * 4, [True, False, False]
        else:                                       # Tab. 5: widths ch/16 .. ch, 3 down blocks
            w, downs = [ch // 16, ch // 8, ch // 4, ch // 2, ch], [True, True, True, False]
        self.blocks = nn.Sequential(OptimizedDBlock(in_ch, w[0], sn), *[
            DBlock(a, b, down, sn) for a, b, down in zip(w[:-1], w[1:], downs)])
        self.fc = sn(glorot_(nn.Linear(ch, 1, bias=False), 1.0))

    def forward(self, x):
        h = F.relu(self.blocks(x))                  # (B, ch, 8, 8) at 32x32, (B, ch, 3, 3) at 48x48
        return self.fc(h.sum(dim=(2, 3)))           # sum pool (B, ch) -> (B, 1)


def normal_init_(m):
    """Official chainer-gan-lib net.py: weights N(0, 0.02^2), biases 0."""
    nn.init.normal_(m.weight, 0.0, 0.02)
    nn.init.zeros_(m.bias)
    return m


class CNNGenerator(nn.Module):
    """Tab. 3 (official DCGANGenerator): dense -> ch x M_g x M_g, three 4x4 s2 deconvs, conv3x3."""

    def __init__(self, z_dim=128, ch=512, img_size=32, out_ch=3):
        super().__init__()
        self.mg, self.ch = img_size // 8, ch                     # M_g = 4 (CIFAR) or 6 (STL)
        self.l0 = normal_init_(nn.Linear(z_dim, self.mg ** 2 * ch))
        self.bn0 = nn.BatchNorm1d(self.mg ** 2 * ch, eps=2e-5)   # PAPER-VS-CODE: BN+ReLU (code)
        layers = []
        for c in (ch, ch // 2, ch // 4):                         # 512 -> 256 -> 128 -> 64
            layers += [normal_init_(nn.ConvTranspose2d(c, c // 2, 4, stride=2, padding=1)),
                       bn(c // 2), nn.ReLU()]
        self.ups = nn.Sequential(*layers)
        self.out = normal_init_(nn.Conv2d(ch // 8, out_ch, 3, padding=1))

    def forward(self, z):
        h = F.relu(self.bn0(self.l0(z))).view(-1, self.ch, self.mg, self.mg)   # (B, ch, M_g, M_g)
        return torch.tanh(self.out(self.ups(h)))                               # (B, C, M, M)


class CNNDiscriminator(nn.Module):
    """Tab. 3 (official SNDCGANDiscriminator): SN convs, leaky ReLU after each, SN dense -> 1."""

    def __init__(self, ch=512, img_size=32, in_ch=3, slope=0.1, table3_literal=False, gamma=False):
        super().__init__()
        sn = lambda m: spectral_norm(m, gamma=gamma)   # one power iteration per forward (App. A)
        # PAPER-VS-CODE: widths 64,128,128,256,256,512,512 (code); 64,64,128,128,256,256,512 Tab. 3
        w = ([ch // 8, ch // 8, ch // 4, ch // 4, ch // 2, ch // 2, ch] if table3_literal
             else [ch // 8, ch // 4, ch // 4, ch // 2, ch // 2, ch, ch])
        kernels = [(3, 1), (4, 2), (3, 1), (4, 2), (3, 1), (4, 2), (3, 1)]   # (k, stride)
        layers = []
        for a, b, (k, s) in zip([in_ch] + w[:-1], w, kernels):
            conv = sn(normal_init_(nn.Conv2d(a, b, k, stride=s, padding=1)))
            layers += [conv, nn.LeakyReLU(slope)]
        self.convs = nn.Sequential(*layers)
        self.fc = sn(normal_init_(nn.Linear((img_size // 8) ** 2 * w[-1], 1)))

    def forward(self, x):
        return self.fc(self.convs(x).flatten(1))    # (B, 512, M/8, M/8) -> (B, (M/8)^2 * 512)


def build_models(args):
    """(G, D) of --arch at --img-size (Tab. 3-5), from values that the checkpoint's args hold."""
    if args.arch == "resnet":
        return (Generator(args.z_dim, args.g_ch, args.img_size, args.img_channels), Discriminator(
            args.d_ch, args.img_size, args.img_channels, gamma=args.gamma_reparam))
    return (CNNGenerator(args.z_dim, args.g_ch, args.img_size, args.img_channels),
            CNNDiscriminator(args.d_ch, args.img_size, args.img_channels, slope=args.lrelu_slope,
                             table3_literal=args.table3_literal, gamma=args.gamma_reparam))


# ==== Losses ====
def hinge_loss_D(d_real, d_fake):
    """Eq. (16): D minimizes E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]."""
    return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()


def hinge_loss_G(d_fake):
    """Eq. (17): G minimizes -E[D(G(z))]."""
    return -d_fake.mean()


def standard_loss_D(d_real, d_fake):
    """Eq. (15) with D = sigmoid(f): -E[log D(x)] - E[log(1 - D(G(z)))], softplus form."""
    return F.softplus(-d_real).mean() + F.softplus(d_fake).mean()


def standard_loss_G(d_fake):
    """Sec. 4: the non-saturating G loss -E[log D(G(z))]."""
    return F.softplus(-d_fake).mean()


# ==== Train step ====
def lr_factor(step, args):
    """Official LinearShift from iteration 0: lr = lr_0 (1 - t / T) after t of T G iterations."""
    return max(0.0, 1.0 - step / args.steps) if args.lr_decay else 1.0


def train_step(G, D, opt_G, opt_D, batches, args, dist, autocast):
    """One G iteration of official updater.py: one G step, then n_dis D steps. UNSPECIFIED: D sees
    real and fake apart, and each training D forward advances the power iteration (official)."""
    device = dist.device
    D.requires_grad_(False)                         # G step: no D weight gradients needed
    z = dist.shard(sample_z(args.g_batch_size, args.z_dim, args.z_dist, device))  # 2x D batch
    with autocast():
        d_gen = D(G(z)).float()
        loss_G = standard_loss_G(d_gen) if args.loss == "standard" else hinge_loss_G(d_gen)
    opt_G.zero_grad(set_to_none=True)
    loss_G.backward()
    dist.average_gradients(G)                       # no-op in one process
    opt_G.step()
    D.requires_grad_(True)
    for _ in range(args.n_dis):                     # fresh reals and z per D step; G in train mode
        x_real = next(batches)[0].to(device, non_blocking=True)
        if args.dequantize:
            u = torch.rand(args.batch_size, *x_real.shape[1:], device=device)
            x_real = dequantize(x_real, dist.shard(u))
        z = dist.shard(sample_z(args.batch_size, args.z_dim, args.z_dist, device))
        with autocast():
            with torch.no_grad():
                x_fake = G(z)
            d_real, d_fake = D(x_real).float(), D(x_fake).float()
            loss_D = (hinge_loss_D if args.loss == "hinge" else standard_loss_D)(d_real, d_fake)
        opt_D.zero_grad(set_to_none=True)
        loss_D.backward()
        dist.average_gradients(D)
        opt_D.step()
    return {"loss_G": loss_G.detach(), "loss_D": loss_D.detach(), "D_real": d_real.detach().mean(),
            "D_fake": d_fake.detach().mean()}


# ==== Eval ====
@torch.no_grad()
def generate(G, z, batch=500):
    """UNSPECIFIED: G in eval mode (BN running averages, official evaluation.py); D untouched."""
    G.eval()
    x = torch.cat([G(z[i:i + batch]).float() for i in range(0, z.shape[0], batch)])
    G.train()
    return x


def to_uint8(x):
    """[-1, 1] -> uint8 as official evaluation.py: clip(127.5 x + 127.5) cast, i.e. truncated."""
    return (x * 127.5 + 127.5).clamp(0, 255).to(torch.uint8)


def load_generator(ckpt_path, device="cpu"):
    """G of a sngan.py checkpoint, rebuilt from it alone, in eval mode (as official evaluation)."""
    state = common.load_checkpoint(ckpt_path, device)
    if state.get("script") != "sngan":
        raise common.UserError(f"{ckpt_path!r} is not a checkpoint of sngan.py")
    G = build_models(argparse.Namespace(**state["args"]))[0].to(device)
    G.load_state_dict(state["G"])
    return G.eval()


def save_figure(x, path, lines, key):
    """An 8-column grid of x in [-1, 1] under a title strip (common.title_strip)."""
    grid = torchvision.utils.make_grid(x, nrow=8, padding=2, normalize=True, value_range=(-1, 1))
    common.save_png(common.title_strip(grid.cpu().mul(255).byte(), lines, key=key), path)


def save_reals(dataset, args):
    x = torch.stack([dataset[i][0] for i in range(min(64, len(dataset)))])
    save_figure(x, os.path.join(args.out_dir, "reals.png"),
                [f"{args.dataset}: training images", "x in [-1, 1]"], [("real", common.REAL_RGB)])


def sample_grid(G, fixed_z, step, args):
    z_text = "N(0, I)" if args.z_dist == "normal" else "U[-1, 1]"
    save_figure(generate(G, fixed_z), os.path.join(args.out_dir, "samples", f"{step:07d}.png"),
                [f"sngan | step {step}/{args.steps}", f"G(z), 64 fixed z ~ {z_text}",
                 "G in eval mode, x in [-1, 1]"], [("generated", common.FAKE_RGB)])


def export_samples(G, args, device):
    """out_dir/samples_N.npz: N samples, uint8 NHWC under key "images", for `python fid.py`."""
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)   # training RNG untouched
    x = generate(G, sample_z(args.export_samples, args.z_dim, args.z_dist, device, gen))
    path = os.path.join(args.out_dir, f"samples_{args.export_samples}.npz")
    np.savez(path, images=to_uint8(x).permute(0, 2, 3, 1).cpu().numpy())   # (N, H, W, C)


def build_evaluator(args, device, main=True):
    """fid.TrainingFID, built at start-up (weights, reference statistics resolved now), or None."""
    if args.fid_every == 0:
        return None
    try:
        import fid  # evaluation only: a copy of this script without fid.py still trains
    except ModuleNotFoundError as e:
        raise common.UserError("--fid-every needs fid.py beside sngan.py") if e.name == "fid" else e
    if main:                                    # under torchrun: rank 0
        print(f"eval: IS and FID of {args.fid_samples} generated vs {args.fid_ref_size or 'all'} "
              f"{args.fid_ref_split} images (App. B.1: FID 5K vs 10K, IS 10 x 5K)", flush=True)
    return fid.TrainingFID(args.dataset, args.data_root, args.img_size, device, args.fid_samples,
                           weights=args.fid_weights, ref_split=args.fid_ref_split,
                           ref_size=args.fid_ref_size or None)


def evaluate(ev, G, args, device):
    """{fid, is, is_std}: eval-mode G, z re-seeded per call (not the training stream), uint8."""
    gen = torch.Generator(device=device).manual_seed(args.seed + 2)
    sample_fn = lambda n: to_uint8(generate(G, sample_z(n, args.z_dim, args.z_dist, device, gen))  # noqa
                                   ).float() / 127.5 - 1
    return ev(sample_fn)


def report(run, step, out, G, D, ev, fixed_z, args, dist):
    """This step's log row (losses, lr, Fig. 9's sigma(W_SN), IS/FID; G: rank 0's BN) and grid."""
    last = step == args.steps
    sigma_now = args.sigma_every > 0 and step % args.sigma_every == 0
    fid_now = ev is not None and (step % args.fid_every == 0 or last)
    if fid_now:
        dist.broadcast_buffers(G)
    if step % args.log_every == 0 or last or sigma_now or fid_now:
        run.log(step, {**out, "lr": args.lr * lr_factor(step, args),
                       **(d_spectral_norms(D) if sigma_now else {}),
                       **(evaluate(ev, G, args, dist.device) if fid_now else {})})
    if dist.main and args.sample_every and (step % args.sample_every == 0 or last):
        sample_grid(G, fixed_z, step, args)


# ==== Main ====
def setup(args):
    """This process's device, seeds and kernel choices; returns common.Dist."""
    dist = common.Dist(args.device)                 # torchrun: one process per device
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)                    # the same seed, so the same nets, everywhere
    if args.deterministic and dist.device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = not args.deterministic
    torch.use_deterministic_algorithms(args.deterministic)
    if args.sync_bn and dist.world_size > 1 and dist.device.type != "cuda":
        raise common.UserError("--sync-bn needs CUDA (torch's SyncBatchNorm has no CPU kernel)")
    dist.share(args.batch_size)                     # global batches split evenly
    dist.share(args.g_batch_size)
    return dist


def main(argv=None):
    args = parse_args(argv)
    dist = setup(args)
    device = dist.device
    run = common.Run(args, "sngan", args.steps, mutable=("steps", "lr", "sigma_every"), dist=dist)
    # DEVIATION 9: bf16 forwards; losses, D outputs and sigma(W) stay fp32
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")

    dataset = common.load_dataset(args.dataset, args.data_root, img_size=args.img_size)
    args.img_channels = dataset[0][0].shape[0]      # 3, or 1 for MNIST-like sets
    G, D = (net.to(device) for net in build_models(args))
    if args.sync_bn and dist.world_size > 1:        # DEVIATION 9: else BN per process
        G = nn.SyncBatchNorm.convert_sync_batchnorm(G)
    adam = dict(lr=args.lr, betas=tuple(args.betas), fused=device.type == "cuda")  # DEVIATION 10
    opt_G = torch.optim.Adam(G.parameters(), **adam)
    opt_D = torch.optim.Adam(D.parameters(), **adam)
    fixed_z = sample_z(64, args.z_dim, args.z_dist, "cpu", torch.Generator().manual_seed(args.seed)
                       ).to(device)
    ev = build_evaluator(args, device, dist.main)      # every rank scores
    state, step = run.load(device), 0
    if state:
        for net, key in ((G, "G"), (D, "D"), (opt_G, "opt_G"), (opt_D, "opt_D")):
            net.load_state_dict(state[key])         # D: weight_orig, weight_u, weight_v (+ gamma)
        fixed_z, step = state["fixed_z"], state["step"]
        common.set_rng_state(state["rng"])

    run.start(step, device, G=G, D=D)
    if dist.main:
        os.makedirs(os.path.join(args.out_dir, "samples"), exist_ok=True)
    if dist.main and step == 0:
        save_reals(dataset, args)
    # every D step draws one batch, so a resumed stream starts at batch step * n_dis
    batches = common.infinite_batches(dataset, args.batch_size, args.seed, device=device,
                                      start_step=step * args.n_dis, num_workers=args.num_workers,
                                      rank=dist.rank, world_size=dist.world_size)
    while step < args.steps and not run.stopping:
        for opt in (opt_G, opt_D):
            for group in opt.param_groups:
                group["lr"] = args.lr * lr_factor(step, args)   # by G iterations done (official)
        out = train_step(G, D, opt_G, opt_D, batches, args, dist, autocast)
        step += 1
        report(run, step, out, G, D, ev, fixed_z, args, dist)
        if step % args.ckpt_every == 0 or step == args.steps or run.stopping:
            dist.broadcast_buffers(G)               # rank 0's BN statistics on every rank
            run.save(step, {"G": G.state_dict(), "D": D.state_dict(), "opt_G": opt_G.state_dict(),
                            "opt_D": opt_D.state_dict(), "fixed_z": fixed_z.cpu(),
                            "rng": common.rng_state()})
    if not run.stopping and dist.main and args.export_samples > 0:   # stopping: on every rank
        export_samples(G, args, device)
    return run.finish(step, device)


if __name__ == "__main__":
    common.cli(main)
