"""DP-GAN: Privacy-preserving generative deep neural networks support clinical data sharing.
Beaulieu-Jones, Wu, Williams, (Lee, Bhavnani, Byrd,) Greene. bioRxiv 10.1101/159756 (2017); Circ
Cardiovasc Qual Outcomes 12(7):e005122 (2019). An AC-GAN whose discriminator is trained with DP-SGD
(Abadi et al. 2016, arXiv:1607.00133 Alg. 1), accounted with Renyi DP (Mironov 2017).
Official code: greenelab/SPRINT_gan (dp_gan.py, custom_keras/noisy_optimizers.py, Analysis.ipynb)

Paper -> code
  AC-GAN L_S + L_C per real/fake pair (Odena Sec. 3) ... pair_loss(), generator_loss()
  Alg. 1 l.3    Poisson lot, rate q ......................... poisson_lot()
  Alg. 1 l.4-5  per-example gradients, clip to norm C ....... per_example_grads(), privatize()
  Alg. 1 l.6    sum + N(0, sigma^2 C^2 I), then / qN ........ privatize(), dp_sgd_step()
  official loop D step, accountant event, G step ............ train_step(), generator_step()
  RDP of the sampled Gaussian (Mironov et al. 2019) ......... rdp_sgm(), _log_a_int(), _log_a_frac()
  eps(delta): Balle et al. 2020 Thm. 21 / Mironov Prop. 3 ... rdp_to_epsilon(), compute_epsilon()
  official dp_gan.py SPRINT G and D (3x12 records) .......... TableGenerator, TableDiscriminator
  Keras mnist_acgan.py G and D (public stand-in) ............ ImageGenerator, ImageDiscriminator
  PredictGroup/Analysis.ipynb: epoch scores, private epoch selection, TSTR, correlation structure
                                                              transfer_score(), report_noisy_max(), evaluate()
Deviations (each one also tagged in the code; grep DEVIATION|PAPER-VS-CODE)
  1. PAPER-VS-CODE  Poisson lots of expected size qN instead of the official uniform draws with
     replacement (batch 1), which the Poisson-subsampled accountant does not describe.
  2. PAPER-VS-CODE  noise std sigma*C as in the fixed code (SPRINT_gan issue #5), not sigma*C^2 of the
     bioRxiv runs; whether the journal figures used the fixed code is unverified (card 3).
  3. DEVIATION  SPRINT is not public: `sprint_synth` is the card's deterministic stand-in (4.3).
  4. DEVIATION  logistic regression and a small MLP/CNN in torch replace sklearn's RF/LR/SVM/kNN;
     TSTR pools the selected generators (no per-5000-block classifiers).
  5. DEVIATION  noisy-max Laplace scale 2/(N eps_pick) (report-noisy-max; an accuracy on N records
     has sensitivity 1/N) instead of the notebook's 1/(eps_pick * remaining epochs).
Covered by (eps, delta): the weights of D and G, samples, exported samples, the selected epochs.
NOT covered (computed on real records, for the data holder only): loss_D, clip_frac, fid (its reference
statistics are of the training images) and the epoch transfer scores in the logs and ckpt.pt, and the
real-data baseline. The noise comes from torch's seeded PRNG
(no CSPRNG, no floating-point hardening, Mironov 2012): use a secret --seed for a real release.
Run
  python dp_gan.py --dataset sprint_synth     # official: q=1/6000, sigma=1, C=1e-4, lr 2e-5, 500 epochs
  python dp_gan.py --dataset mnist            # sigma=1, C=1, q=64/60000, 20 epochs: eps 0.9415
  python dp_gan.py --dataset sprint_synth --noise-multiplier 0 --max-grad-norm 0 --sample-rate 0.0166667 --lr-d 2e-4 --lr-g 2e-4   # non-private ac_gan.py
  python dp_gan.py --dataset csv:my.csv --label-column arm --table-shape 3 12 --target-epsilon 1
  python dp_gan.py --dataset mnist --steps 300 --tstr-samples 0 --bench-d-steps 100   # benchmark
Paper reports (figures only): SPRINT TSTR accuracy, private ~0.875 vs real ~0.93 (Fig. 4); eps 1.597
(RDP, delta 1e-5) after 500 epochs, plus 0.5 for the epoch selection. Our numbers: README.
"""

import argparse
import copy
import csv
import functools
import json
import math
import os
import random
import resource
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from scipy import special, stats
from torch.func import functional_call, grad_and_value, vmap

import common

MONTHS = (0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27)   # SPRINT visits RZ..27M [card 4.1]
DEFAULT_ORDERS = tuple([1 + x / 10 for x in range(1, 100)] + list(range(12, 64)))   # Opacus' alphas


# ==== Args ====
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument_group("paper").add_argument
    a("--dataset", default="sprint_synth", help="sprint_synth | mnist | shapes | csv:<path> [card 4.3; ours]")
    a("--epochs", type=int, default=None, help="epochs of round(1/q) D steps; 500 tables, 20 images [README; ours]")
    a("--sample-rate", type=float, default=None, help="Poisson rate q; 1/N tables, 64/N images [README batch 1; ours]")
    a("--noise-multiplier", type=float, default=1.0, help="sigma; 0 = NON-PRIVATE baseline [README --noise 1]")
    a("--max-grad-norm", type=float, default=None, help="per-example clip C, 0 = none; 1e-4 tables, 1 images [README]")
    a("--delta", type=float, default=1e-5, help="target delta [Fig. 5 'Delta Max']")
    a("--target-epsilon", type=float, default=None, help="stop at the last step with training eps <= this [ours: issue 7]")
    a("--conversion", choices=["balle", "classic"], default="balle", help="RDP -> eps: Opacus>=0.14 | Prop. 3 [card 2.8]")
    a("--lr-d", type=float, default=None, help="Adam lr of D; 2e-5 tables, 2e-4 images [README; Keras example]")
    a("--lr-g", type=float, default=None, help="Adam lr of G; same defaults [official dp_gan.py]")
    a("--betas", type=float, nargs=2, default=(0.5, 0.999), help="Adam betas of D and G [official dp_gan.py]")
    a("--latent-dim", type=int, default=100, help="z ~ U(-1, 1)^d [official dp_gan.py]")
    a("--soft-labels", type=float, nargs=2, default=(1.0, 0.0), help="S targets real, fake; Keras example 0.95 0 [official]")
    a("--class-loss", choices=["all", "real"], default="all", help="'real': reals only, weight 2 [official; Keras example]")
    a("--width", type=float, default=1.0, help="multiplies every channel/unit count [ours: tiny runs]")
    a("--select-picks", type=int, default=10, help="epochs picked by noisy max, half by LR, half by NN; 0 = last G [Analysis]")
    a("--select-epsilon", type=float, default=0.05, help="eps per pick, charged on top of training [Analysis.ipynb]")
    a("--tstr-samples", type=int, default=5000, help="records per selected G; 0 = no evaluation at all [Analysis.ipynb]")
    a("--clf-steps", type=int, default=500, help="Adam steps (batch 256) per evaluation classifier [ours]")
    a = p.add_argument_group("data").add_argument
    a("--data-root", default="data", help="torchvision download folder [run]")
    a("--data-seed", type=int, default=0, help="sprint_synth generator seed [card 4.3]")
    a("--n-train", type=int, default=6000, help="sprint_synth training records [official training_size]")
    a("--n-test", type=int, default=None, help="held-out records: 502, or 502/6502 of a csv [official]")
    a("--label-column", default="label", help="csv: the class column [ours]")
    a("--table-shape", type=int, nargs=2, default=None, help="csv: H W with H*W features; default 1 F [ours]")
    a("--img-size", type=int, default=None, help="images: side, a multiple of 4 and >= 20; default native [run]")
    a = p.add_argument_group("run").add_argument
    a("--out-dir", default=None, help="default runs/dp_gan-<dataset>-s<seed> [run]")
    a("--seed", type=int, default=0, help="training seed; secret for a release [official: 123]")
    a("--device", default="cuda", help="cuda | cpu [run]")
    a("--steps", type=int, default=None, help="total D steps; default epochs * round(1/q) [run]")
    a("--log-every", type=int, default=500, help="D steps between log lines [run]")
    a("--sample-every", type=int, default=5000, help="D steps between sample files [run]")
    a("--ckpt-every", type=int, default=5000, help="D steps between checkpoints [run]")
    a("--resume", action="store_true", help="continue out_dir/ckpt.pt [run]")
    a("--deterministic", action="store_true", help="deterministic kernels; CUDA needs CUBLAS_WORKSPACE_CONFIG=:4096:8 [run]")
    a("--export-samples", type=int, default=0, help="images: N samples, labels cycling 0..K-1, to samples_N.npz [run]")
    a("--fid-every", type=int, default=0, help="images: FID (fid.py) every K D steps, 0 = off; its reference "
      "statistics are of the private training images, NOT covered by (eps, delta) [run]")
    a("--fid-samples", type=int, default=10_000, help="generated images per FID [run]")
    a("--fid-weights", default=None, help="FID Inception weight file (fid.py) [run]")
    a("--bench-d-steps", type=int, default=0, help="time N private vs plain D steps on random inputs [ours: issue 7]")
    args = p.parse_args(argv)
    table = args.dataset == "sprint_synth" or args.dataset.startswith("csv:")   # per-dataset defaults
    if not table and args.dataset not in ("mnist", "shapes"):
        p.error(f"unknown dataset {args.dataset!r}; valid: sprint_synth, mnist, shapes, csv:<path>")
    args.epochs = args.epochs or (500 if table else 20)
    args.max_grad_norm = (1e-4 if table else 1.0) if args.max_grad_norm is None else args.max_grad_norm
    args.lr_d, args.lr_g = args.lr_d or (2e-5 if table else 2e-4), args.lr_g or (2e-5 if table else 2e-4)
    if args.noise_multiplier > 0 and args.max_grad_norm == 0:
        p.error("--max-grad-norm 0 (no clipping) only goes with --noise-multiplier 0")
    if args.noise_multiplier == 0 and args.target_epsilon is not None:
        p.error("--target-epsilon needs --noise-multiplier > 0: a non-private run has eps = inf")
    return args


# ==== Data ====
def sprint_synth(n, seed):
    """DEVIATION 3, card 4.3: deterministic SPRINT stand-in; x (n, 3, 12) = SBP, DBP, med classes."""
    rng, m = np.random.default_rng(seed), np.array(MONTHS, dtype=np.float64)
    y = (rng.random(n) < 0.5).astype(np.int64)                          # 1 = intensive arm
    b, o = np.clip(rng.normal(139, 15, n), 90, 220), rng.normal(0, 8, n)   # baseline SBP, offset
    e_sbp, e_dbp = rng.normal(0, 10, (n, 12)), rng.normal(0, 6, (n, 12))
    m0, e_med = rng.poisson(1.8, n), rng.normal(0, 0.5, (n, 12))
    tau, d = np.where(y == 1, 119.0, 135.0)[:, None], np.exp(-m / 1.5)   # arm target, decay
    sbp = tau + (b[:, None] - tau) * d + o[:, None] * (1 - d) + e_sbp
    sbp[:, 0] = b
    dbp = 0.45 * sbp + 14 + e_dbp
    meds = np.clip(np.round(m0[:, None] + np.where(y == 1, 1.0, 0.2)[:, None] * (1 - np.exp(-m / 2)) + e_med), 0, 7)
    x = np.stack([np.round(sbp), np.round(dbp), meds], 1)              # (n, 3, 12), raw units
    return torch.from_numpy(x).float(), torch.from_numpy(y)


def _cell(text, where):
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"{where}: non-numeric cell {text!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{where}: {text!r} (NaN/inf) is not a value")
    return v


def load_csv_table(path, label_column, table_shape=None):
    """Numeric features plus one label column -> x (N, H, W), y (N,), sorted class names."""
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    head = [h.strip() for h in rows[0]] if rows else []
    if label_column not in head:
        raise ValueError(f"{path!r}: no label column {label_column!r} (columns: {head}); pass --label-column")
    li, feats, labels = head.index(label_column), [], []
    for ln, row in enumerate(rows[1:], start=2):
        if len(row) != len(head):
            raise ValueError(f"{path!r} line {ln}: {len(row)} cells, the header has {len(head)}")
        feats.append([_cell(c, f"{path!r} line {ln}, column {head[j]!r}") for j, c in enumerate(row) if j != li])
        labels.append(row[li].strip())
    if not feats:
        raise ValueError(f"{path!r}: no records")
    classes, x = sorted(set(labels)), torch.tensor(feats, dtype=torch.float32)
    h, w = table_shape or (1, x.shape[1])
    if h * w != x.shape[1]:
        raise ValueError(f"--table-shape {h} {w} does not hold {x.shape[1]} features")
    return x.view(-1, h, w), torch.tensor([classes.index(c) for c in labels]), classes


def poisson_lot(n, q, seed, step):
    """Alg. 1 l.3, Poisson sampling: each of n records joins lot `step` independently w.p. q. The
    draw depends on (seed, step) only, never on the data; a resumed run sees the same lots.
    PAPER-VS-CODE 1: official dp_gan.py draws randint(0, 6000), fixed size 1, with replacement."""
    g = torch.Generator().manual_seed((seed << 32) + step)
    return torch.nonzero(torch.rand(n, generator=g) < q).flatten()


# ==== Models ====
def ch(c, width):
    return max(1, round(c * width))


def keras_init(module, normal=()):
    """Keras defaults: Glorot-uniform weights, zero biases; `normal` modules Glorot-normal.
    UNSPECIFIED: Keras >= 2.2.3 truncates glorot_normal; we use the plain normal."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d, nn.Embedding)):
            (nn.init.xavier_normal_ if m in normal else nn.init.xavier_uniform_)(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


class SameConv2d(nn.Conv2d):
    """Keras 'same': pad max((ceil(n/s) - 1) s + k - n, 0) in total, the odd pixel after (card 2.4:
    3x3 stride 2 on 3x12 pads H (1, 1), W (0, 1); PyTorch padding=1 would shift W by one)."""

    def forward(self, x):
        (k, _), (s, _), pads = self.kernel_size, self.stride, []
        for n in (x.shape[-1], x.shape[-2]):                             # F.pad order: W, then H
            tot = max((math.ceil(n / s) - 1) * s + k - n, 0)
            pads += [tot // 2, tot - tot // 2]
        return super().forward(F.pad(x, pads))


class TableGenerator(nn.Module):
    """Official SPRINT G: h = z * E[c] -> 256 -> 384 = (32, 3, 4) -> up (2, 6) -> conv5 256 ->
    conv4 s2, linear -> (1, 3, 12). Other H x W start at (32, H, ceil(W/3)) and crop the end."""

    def __init__(self, n_classes, shape=(3, 12), latent=100, width=1.0):
        super().__init__()
        self.shape, self.c0, self.w0 = tuple(shape), ch(32, width), math.ceil(shape[1] / 3)
        self.embed = nn.Embedding(n_classes, latent)
        self.fc = nn.Sequential(nn.Linear(latent, ch(256, width)), nn.ReLU(),
                                nn.Linear(ch(256, width), self.c0 * shape[0] * self.w0), nn.ReLU())
        self.conv1 = nn.Conv2d(self.c0, ch(256, width), 5, padding=2)   # 'same', stride 1
        self.conv2 = nn.Conv2d(ch(256, width), 1, 4, stride=2, padding=1)   # 'same' = pad 1 on each side here
        keras_init(self, normal=(self.embed, self.conv1, self.conv2))

    def forward(self, z, c):
        h = self.fc(z * self.embed(c)).view(-1, self.c0, self.shape[0], self.w0)   # (B, 32, 3, 4)
        h = F.relu(self.conv1(F.interpolate(h, scale_factor=(2, 6), mode="nearest")))   # (B, 256, 6, 24)
        return self.conv2(h)[..., :self.shape[0], :self.shape[1]]       # (B, 1, 3, 12), no tanh


class TableDiscriminator(nn.Module):
    """Official SPRINT D: conv3 s2 32, conv3 64 (LeakyReLU 0.3 = Keras default, Dropout 0.3),
    dense 1024 ReLU Dropout, dense 1024 ReLU; heads S (1 logit), C (K logits). No normalisation."""

    def __init__(self, n_classes, shape=(3, 12), width=1.0, dropout=0.3):
        super().__init__()
        c1, c2, hid = ch(32, width), ch(64, width), ch(1024, width)
        self.trunk = nn.Sequential(
            SameConv2d(1, c1, 3, stride=2), nn.LeakyReLU(0.3), nn.Dropout(dropout),
            SameConv2d(c1, c2, 3), nn.LeakyReLU(0.3), nn.Dropout(dropout), nn.Flatten(),   # (B, 64*2*6 = 768)
            nn.Linear(c2 * math.ceil(shape[0] / 2) * math.ceil(shape[1] / 2), hid), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hid, hid), nn.ReLU())
        self.source, self.classes = nn.Linear(hid, 1), nn.Linear(hid, n_classes)
        keras_init(self)

    def forward(self, x):
        h = self.trunk(x)
        return self.source(h).squeeze(-1), self.classes(h)               # logits; Keras: sigmoid, softmax


class ImageGenerator(nn.Module):
    """Keras mnist_acgan.py G: h = z * E[c] -> ReLU dense 384 x s0 x s0 -> convT5 192 'valid' ->
    convT5 96 s2 -> convT5 C s2, tanh; s0 = size/4 - 4 (3 for MNIST). Stride-2 'same' transposed
    convs in the card's PyTorch form (padding 2, output_padding 1)."""

    def __init__(self, n_classes, channels=1, size=28, latent=100, width=1.0):
        super().__init__()
        self.c0, self.s0 = ch(384, width), size // 4 - 4
        self.embed = nn.Embedding(n_classes, latent)
        self.fc = nn.Linear(latent, self.c0 * self.s0 ** 2)
        self.up = nn.ModuleList([nn.ConvTranspose2d(self.c0, ch(192, width), 5),   # s0 -> size/4
                                 nn.ConvTranspose2d(ch(192, width), ch(96, width), 5, 2, 2, output_padding=1),
                                 nn.ConvTranspose2d(ch(96, width), channels, 5, 2, 2, output_padding=1)])
        keras_init(self, normal=(self.embed, *self.up))

    def forward(self, z, c):
        h = F.relu(self.fc(z * self.embed(c))).view(-1, self.c0, self.s0, self.s0)   # (B, 384, 3, 3)
        h = F.relu(self.up[1](F.relu(self.up[0](h))))                   # (B, 96, 14, 14)
        return torch.tanh(self.up[2](h))                                 # (B, C, 28, 28)


class ImageDiscriminator(nn.Module):
    """Keras mnist_acgan.py D: conv3 32 s2, 64, 128 s2, 256, each LeakyReLU(0.2), Dropout(0.3)."""

    def __init__(self, n_classes, channels=1, size=28, width=1.0, dropout=0.3):
        super().__init__()
        layers, c_in = [], channels
        for c_out, s in ((32, 2), (64, 1), (128, 2), (256, 1)):
            layers += [SameConv2d(c_in, ch(c_out, width), 3, stride=s), nn.LeakyReLU(0.2), nn.Dropout(dropout)]
            c_in = ch(c_out, width)
        self.trunk = nn.Sequential(*layers, nn.Flatten())               # (B, 256 * 7 * 7)
        self.source, self.classes = (nn.Linear(c_in * (size // 4) ** 2, k) for k in (1, n_classes))
        keras_init(self)

    def forward(self, x):
        h = self.trunk(x)
        return self.source(h).squeeze(-1), self.classes(h)


def check_no_batch_coupling(D):
    """Card 6.2: refuse layers that couple the examples of a lot (BatchNorm, tracked InstanceNorm)."""
    for name, m in D.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) or (
                isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats):
            raise ValueError(f"DP-SGD refuses {type(m).__name__} at D.{name}: it couples the examples of a "
                             "lot (per-example clipping then bounds nothing) and its running statistics see raw "
                             "records without noise. Use GroupNorm, LayerNorm or no normalisation in D.")


# ==== Losses ====
def pair_loss(s_real, c_real, y_real, s_fake, c_fake, y_fake, soft=(1.0, 0.0), class_loss="all"):
    """Per-pair D loss (B,): 1/2 [BCE(S(x_i), 1) + BCE(S(x~_i), 0) + w_r CE(C(x_i), y_i) + w_f CE(C(x~_i), c_i)].
    UNSPECIFIED: the card's l_i has no 1/2; Keras' train_on_batch averages the concatenated
    (real, fake) batch, so the official per-pair loss (batch 1) is l_i / 2. We follow the code."""
    w_r, w_f = (1.0, 1.0) if class_loss == "all" else (2.0, 0.0)        # Keras example weights 2 / 0
    bce = F.binary_cross_entropy_with_logits
    adv = bce(s_real, torch.full_like(s_real, soft[0]), reduction="none") + \
        bce(s_fake, torch.full_like(s_fake, soft[1]), reduction="none")
    cls = w_r * F.cross_entropy(c_real, y_real, reduction="none") + \
        w_f * F.cross_entropy(c_fake, y_fake, reduction="none")
    return 0.5 * (adv + cls)


def generator_loss(s_fake, c_fake, y_fake, soft_real=1.0):
    """Non-saturating AC-GAN G loss: BCE(S(G(z,c)), 1) + CE(C(G(z,c)), c) [official combined model]."""
    return F.binary_cross_entropy_with_logits(s_fake, torch.full_like(s_fake, soft_real)) + \
        F.cross_entropy(c_fake, y_fake)


# ==== Privacy ====
def _log_add(a, b):
    hi, lo = max(a, b), min(a, b)
    return hi if lo == -math.inf else hi + math.log1p(math.exp(lo - hi))


def _log_sub(a, b):                                                     # log(e^a - e^b), a >= b
    return a if b == -math.inf else (-math.inf if a <= b else a + math.log(-math.expm1(b - a)))


def _log_erfc(x):
    return math.log(2.0) + special.log_ndtr(-math.sqrt(2.0) * x)       # accurate for large x


def _log_a_int(q, sigma, alpha):
    """log A_a, integer a: log sum_k C(a,k) (1-q)^(a-k) q^k exp((k^2 - k) / (2 sigma^2))."""
    log_a = -math.inf
    for k in range(alpha + 1):
        log_binom = special.gammaln(alpha + 1) - special.gammaln(k + 1) - special.gammaln(alpha - k + 1)
        log_a = _log_add(log_a, log_binom + k * math.log(q) + (alpha - k) * math.log1p(-q)
                         + (k * k - k) / (2 * sigma ** 2))
    return log_a


def _log_a_frac(q, sigma, alpha):
    """log A_a, fractional a: two erfc-weighted binomial series split at z0, summed until both new
    terms are below e^-30; generalized binomials alternate in sign past a (signed log-sums)."""
    log_a0 = log_a1 = -math.inf
    z0, i = sigma ** 2 * math.log(1 / q - 1) + 0.5, 0
    while True:
        coef, j = special.binom(alpha, i), alpha - i
        base = math.log(abs(coef)) + math.log(0.5)
        s0 = base + i * math.log(q) + j * math.log1p(-q) + (i * i - i) / (2 * sigma ** 2) + \
            _log_erfc((i - z0) / (math.sqrt(2) * sigma))
        s1 = base + j * math.log(q) + i * math.log1p(-q) + (j * j - j) / (2 * sigma ** 2) + \
            _log_erfc((z0 - j) / (math.sqrt(2) * sigma))
        op = _log_add if coef > 0 else _log_sub
        log_a0, log_a1, i = op(log_a0, s0), op(log_a1, s1), i + 1
        if max(s0, s1) < -30:
            return _log_add(log_a0, log_a1)


@functools.lru_cache(maxsize=256)
def rdp_sgm(sample_rate, noise_multiplier, orders=DEFAULT_ORDERS):
    """RDP eps_1(a) = log(A_a) / (a - 1) of ONE sampled-Gaussian step, at each order a."""
    q, s, out = sample_rate, noise_multiplier, []
    for a in orders:
        if q == 0 or s == 0 or q == 1:                                   # nothing sampled / no noise / all
            out.append(0.0 if q == 0 else math.inf if s == 0 else a / (2 * s ** 2))
        else:
            out.append((_log_a_int(q, s, int(a)) if float(a).is_integer() else _log_a_frac(q, s, a)) / (a - 1))
    return np.array(out)


def rdp_to_epsilon(orders, rdp, delta, conversion="balle"):
    """(eps, best order): Balle et al. 2020 Thm. 21 (Opacus >= 0.14) or Mironov 2017 Prop. 3."""
    a, rdp = np.asarray(orders, dtype=np.float64), np.asarray(rdp, dtype=np.float64)
    if conversion == "balle":
        eps = rdp + np.log((a - 1) / a) - (np.log(delta) + np.log(a)) / (a - 1)
    else:
        eps = rdp + np.log(1 / delta) / (a - 1)
    if np.isnan(eps).all() or np.nanmin(eps) == math.inf:
        return math.inf, math.nan
    i = int(np.nanargmin(eps))
    if i in (0, len(a) - 1):
        warnings.warn(f"optimal RDP order {a[i]:g} is at the end of the order list; extend the orders")
    return float(eps[i]), float(a[i])


def compute_epsilon(noise_multiplier, sample_rate, steps, delta, orders=None, conversion="balle"):
    """(epsilon, best_order) after `steps` sampled-Gaussian steps (card 2.8); numpy/scipy only."""
    orders = tuple(orders or DEFAULT_ORDERS)
    return rdp_to_epsilon(orders, steps * rdp_sgm(sample_rate, noise_multiplier, orders), delta, conversion)


class RDPAccountant:
    """Ledger of [sigma, q, steps] segments (Opacus' RDPAccountant.history); RDP adds per order."""

    def __init__(self, history=()):
        self.history = [list(h) for h in history]

    def step(self, noise_multiplier, sample_rate):
        if self.history and self.history[-1][:2] == [noise_multiplier, sample_rate]:
            self.history[-1][2] += 1
        else:
            self.history.append([noise_multiplier, sample_rate, 1])

    def get_epsilon(self, delta, conversion="balle"):
        rdp = sum((t * rdp_sgm(q, s) for s, q, t in self.history), np.zeros(len(DEFAULT_ORDERS)))
        return rdp_to_epsilon(DEFAULT_ORDERS, rdp, delta, conversion)


def max_steps_within(target, sigma, q, delta, conversion, upper):
    """Largest T <= upper with eps(T) <= target, by bisection (eps grows with T)."""
    lo, hi = 0, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if compute_epsilon(sigma, q, mid, delta, conversion=conversion)[0] <= target else (lo, mid - 1)
    return lo


# ==== Train step ====
def per_example_grads(D, x_real, y_real, x_fake, y_fake, loss_kw):
    """Card 2.7(a): g_i = grad of l_i w.r.t. every trainable D parameter, one pair per vmap lane;
    randomness='different' draws each pair's own dropout masks. ({name: (L, *shape)}, losses (L,))."""
    check_no_batch_coupling(D)
    params = {k: v.detach() for k, v in D.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in D.named_buffers()}
    if len(x_real) == 0:                                                 # empty Poisson lot
        return {k: v.new_zeros((0, *v.shape)) for k, v in params.items()}, x_real.new_zeros(0)

    def loss_one(p, b, xr, yr, xf, yf):
        s, c = functional_call(D, (p, b), (torch.stack([xr, xf]),))      # the pair as one (2, ...) batch
        return pair_loss(s[:1], c[:1], yr[None], s[1:], c[1:], yf[None], **loss_kw)[0]

    return vmap(grad_and_value(loss_one), in_dims=(None, None, 0, 0, 0, 0),
                randomness="different")(params, buffers, x_real, y_real, x_fake, y_fake)


def privatize(grads, max_grad_norm, noise_multiplier, expected_lot_size):
    """Alg. 1 l.5-6: (sum_i g_i min(1, C / (||g_i|| + 1e-6)) + N(0, sigma^2 C^2 I)) / (qN).
    ||g_i|| is ONE L2 norm over all D tensors; the noise goes on the SUM, std sigma*C (PAPER-VS-CODE 2);
    the divisor is the EXPECTED lot size qN, never the realized one. C = 0: no clipping."""
    norms = sum(g.flatten(1).pow(2).sum(1) for g in grads.values()).sqrt()   # (L,)
    factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0) if max_grad_norm > 0 else torch.ones_like(norms)
    std = noise_multiplier * max_grad_norm if noise_multiplier > 0 else 0.0   # sigma = 0, C = inf: none
    out = {}
    for k, g in grads.items():
        total = torch.einsum("i,i...->...", factor, g)                  # sum of clipped g_i
        out[k] = (total + torch.randn_like(total) * std) / expected_lot_size   # fresh noise per coordinate
    return out, norms


def dp_sgd_step(D, opt_D, x_real, y_real, x_fake, y_fake, noise_multiplier, max_grad_norm, expected_lot_size, loss_kw):
    """One D update: per-example grads -> clip -> noise -> / qN -> Adam, which only post-processes
    the noisy gradient (SPRINT_gan #5). Plain mode (sigma = C = 0): autograd of sum_i l_i / qN."""
    opt_D.zero_grad(set_to_none=True)
    n, zero = len(x_real), torch.zeros((), device=x_real.device)
    if noise_multiplier == 0 and max_grad_norm == 0:
        losses, n_clipped = x_real.new_zeros(0), zero
        if n:
            s, c = D(torch.cat([x_real, x_fake]))                       # (2L,): reals, then fakes
            losses = pair_loss(s[:n], c[:n], y_real, s[n:], c[n:], y_fake, **loss_kw)
            (losses.sum() / expected_lot_size).backward()
    else:
        grads, losses = per_example_grads(D, x_real, y_real, x_fake, y_fake, loss_kw)
        noisy, norms = privatize(grads, max_grad_norm, noise_multiplier, expected_lot_size)
        for k, p in D.named_parameters():
            p.grad = noisy[k] if p.requires_grad else None
        n_clipped = (norms > max_grad_norm).sum() if max_grad_norm > 0 else zero
    opt_D.step()
    return losses.detach().sum(), n_clipped


def sample_zc(n, latent, n_classes, device, generator=None):
    z = torch.rand(n, latent, device=device, generator=generator) * 2 - 1   # z ~ U(-1, 1) [official]
    return z, torch.randint(0, n_classes, (n,), device=device, generator=generator)   # uniform labels


def generator_step(G, D, opt_G, n, cfg):
    """G step on n = 2L fresh fakes with D frozen: no D update, no gradient into D, no accountant
    event. G never sees a real record, so it inherits D's guarantee by post-processing."""
    D.requires_grad_(False)
    opt_G.zero_grad(set_to_none=True)
    z, c = sample_zc(n, cfg["latent"], cfg["n_classes"], cfg["device"])
    s, logits = D(G(z, c))                                               # D in train mode: Keras dropout on
    loss_G = generator_loss(s, logits, c, cfg["loss_kw"]["soft"][0])
    loss_G.backward()
    opt_G.step()
    D.requires_grad_(True)
    return loss_G.detach()


def train_step(G, D, opt_G, opt_D, x_real, y_real, cfg, accountant):
    """Card 2.3: private D step on the lot and one fresh fake per record, one accountant event, G step."""
    with torch.no_grad():
        z, c = sample_zc(len(x_real), cfg["latent"], cfg["n_classes"], cfg["device"])
        x_fake = G(z, c)
    loss_sum, n_clipped = dp_sgd_step(D, opt_D, x_real, y_real, x_fake, c, cfg["sigma"], cfg["C"],
                                      cfg["expected_lot"], cfg["loss_kw"])
    accountant.step(cfg["sigma"], cfg["q"])                              # every D update is charged
    return {"loss_D_sum": loss_sum, "n_clipped": n_clipped, "loss_G": generator_step(G, D, opt_G, cfg["n_g"], cfg)}


# ==== Eval ====
def sample_synthetic(G, n, cfg, generator, post):
    """n records with uniform labels; post = the official SPRINT post-processing (int cast, clip 0)."""
    xs, ys = [], []
    with torch.no_grad():
        for i in range(0, n, 4096):
            z, c = (t.to(cfg["device"]) for t in sample_zc(min(4096, n - i), cfg["latent"], cfg["n_classes"], "cpu", generator))
            xs, ys = xs + [G(z, c).clamp(min=0).trunc() if post else G(z, c)], ys + [c]
    return torch.cat(xs), torch.cat(ys)


def fit_classifier(kind, x, y, n_classes, steps, seed, image):
    """'lr': L2 logistic regression; 'nn': MLP (tables) or small CNN (images) (DEVIATION 4). Table
    features are standardized with the training set's statistics. Returns (predict, model)."""
    mu, sd = (0.0, 1.0) if image else (x.mean(0), x.std(0).clamp_min(1e-6))
    f, shape = x[0].numel(), x.shape[1:]
    with torch.random.fork_rng(devices=[]):                             # the training RNG is untouched
        torch.manual_seed(seed)
        if kind == "lr":
            model = nn.Sequential(nn.Flatten(), nn.Linear(f, n_classes))
        elif not image:
            model = nn.Sequential(nn.Flatten(), nn.Linear(f, 128), nn.ReLU(), nn.Linear(128, n_classes))
        else:
            model = nn.Sequential(nn.Conv2d(shape[0], 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                  nn.Linear(64 * (shape[1] // 4) * (shape[2] // 4), n_classes))
    model, g = model.to(x.device), torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)   # weight decay = L2 penalty
    for _ in range(steps):
        idx = torch.randint(0, len(x), (min(256, len(x)),), generator=g).to(x.device)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model((x[idx] - mu) / sd), y[idx]).backward()
        opt.step()

    def predict(x_new):
        with torch.no_grad():
            return torch.cat([model((x_new[i:i + 4096] - mu) / sd).argmax(1) for i in range(0, len(x_new), 4096)])
    return predict, model


def transfer_score(G, kind, real_x, real_y, cfg, seed, post):
    """Card 2.9 step 1: train on N synthetic records, accuracy on the REAL training set (not private)."""
    x, y = sample_synthetic(G, len(real_x), cfg, torch.Generator().manual_seed(seed), post)
    predict, _ = fit_classifier(kind, x, y, cfg["n_classes"], cfg["clf_steps"], seed, cfg["image"])
    return (predict(real_x) == real_y).float().mean().item()


def report_noisy_max(scores, n_picks, scale, generator):
    """Card 2.9 step 2: picks without replacement of argmax(score + Laplace(scale)); scale 2 Delta /
    eps_pick makes each pick eps_pick-DP (Dwork & Roth Sec. 3.3); scale 0 = plain argmax."""
    remaining, picks = list(range(len(scores))), []
    for _ in range(min(n_picks, len(scores))):
        u = torch.rand(len(remaining), generator=generator, dtype=torch.float64) - 0.5
        noise = -scale * torch.sign(u) * torch.log1p(-2 * u.abs())      # Laplace(0, scale)
        picks.append(remaining.pop(int(torch.argmax(torch.tensor([scores[i] for i in remaining]) + noise))))
    return picks


def evaluate(G, args, cfg, real_tr, real_te, scores, snap_dir, post):
    """Card 2.9 steps 2-4: private epoch selection, TSTR next to the real benchmark, structure."""
    private, picks, out = args.noise_multiplier > 0, [], {}
    if args.select_picks > 0 and scores["lr"]:
        gen, n_lr = torch.Generator().manual_seed(args.seed + 7), (args.select_picks + 1) // 2
        scale = 2 / (len(real_tr[0]) * args.select_epsilon) if private else 0.0   # DEVIATION 5
        picks = report_noisy_max(scores["lr"], n_lr, scale, gen) + \
            report_noisy_max(scores["nn"], args.select_picks - n_lr, scale, gen)
        out["eps_select"] = len(picks) * args.select_epsilon if private else 0.0   # basic composition
        print(f"selected epochs (report-noisy-max): {[p + 1 for p in picks]}", flush=True)
    xs, ys = [], []
    for p in picks or [None]:                                            # no selection: the last G
        G_p = G if p is None else copy.deepcopy(G)
        if p is not None:
            G_p.load_state_dict(torch.load(os.path.join(snap_dir, f"G_{p + 1:04d}.pt"), cfg["device"], weights_only=True))
        x, y = sample_synthetic(G_p, args.tstr_samples, cfg, torch.Generator().manual_seed(args.seed + 11 + len(xs)), post)
        xs, ys = xs + [x], ys + [y]
    x_syn, y_syn, models = torch.cat(xs), torch.cat(ys), {}
    for kind in ("lr", "nn"):                                            # TSTR, and the real benchmark
        for src, (x, y) in (("tstr", (x_syn, y_syn)), ("real", real_tr)):
            predict, models[src, kind] = fit_classifier(kind, x, y, cfg["n_classes"], cfg["clf_steps"], args.seed, cfg["image"])
            out[f"{src}_{kind}"] = (predict(real_te[0]) == real_te[1]).float().mean().item()
    if not cfg["image"]:                                                 # card 2.9 step 4 (tables)
        a, b = real_tr[0].flatten(1).double().cpu().numpy(), x_syn.flatten(1).double().cpu().numpy()
        tri = np.tril_indices(a.shape[1], k=-1)                          # 630 pairs for 3 x 12
        with np.errstate(invalid="ignore", divide="ignore"):
            ca, cb = np.corrcoef(a.T)[tri], np.corrcoef(b.T)[tri]
        ok = np.isfinite(ca) & np.isfinite(cb)                           # a constant feature has no corr
        out["corr_spearman"] = float(stats.spearmanr(ca[ok], cb[ok])[0]) if ok.sum() > 2 else float("nan")
        w = [models[s, "lr"][1].weight.detach().flatten().cpu().numpy() for s in ("real", "tstr")]
        out["coef_spearman"] = float(stats.spearmanr(*w)[0])
        for r in range(real_tr[0].shape[-2]):                            # per table row: SBP, DBP, meds
            out[f"mean_real_{r}"], out[f"mean_syn_{r}"] = (t[..., r, :].mean().item() for t in (real_tr[0], x_syn))
    print("eval | " + " | ".join(f"{k} {v:.4g}" for k, v in out.items()), flush=True)
    return out


def bench_d_steps(D, lot, shape, cfg, n):
    """D steps/s with per-example gradients (sigma = C = 1) vs plain autograd at the same lot size,
    on random inputs: no real record is touched, so the benchmark costs no privacy."""
    x, rates = torch.randn(2 * lot, *shape, device=cfg["device"]), {}
    y = torch.randint(0, cfg["n_classes"], (2 * lot,), device=cfg["device"])
    sync = torch.cuda.synchronize if cfg["device"].type == "cuda" else (lambda: None)
    for name, sig_c in (("private", 1.0), ("plain", 0.0)):
        d = copy.deepcopy(D)
        opt = torch.optim.Adam(d.parameters())
        for i in range(n + 3):                                           # 3 warm-up steps
            if i == 3:
                sync()
                t = time.perf_counter()
            dp_sgd_step(d, opt, x[:lot], y[:lot], x[lot:], y[lot:], sig_c, sig_c, float(lot), cfg["loss_kw"])
        sync()
        rates[f"bench_d_it_s_{name}"] = n / (time.perf_counter() - t)
    rates["bench_ratio"] = rates["bench_d_it_s_plain"] / rates["bench_d_it_s_private"]
    print(f"bench (lot {lot}): D step with per-example grads {rates['bench_d_it_s_private']:.1f} it/s | plain "
          f"{rates['bench_d_it_s_plain']:.1f} it/s | private takes {rates['bench_ratio']:.2f}x", flush=True)
    return rates


def export_samples(G, n, cfg, path, seed):
    """uint8 NHWC, quantised as save_image: (x + 1) / 2 * 255 + 0.5, clamped; labels cycle 0..K-1."""
    gen, c = torch.Generator().manual_seed(seed), torch.arange(n) % cfg["n_classes"]   # training RNG untouched
    with torch.no_grad():
        x = torch.cat([G((torch.rand(len(ci), cfg["latent"], generator=gen) * 2 - 1).to(cfg["device"]),
                         ci.to(cfg["device"])).cpu() for ci in c.split(4096)])
    images = ((x + 1) / 2 * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    np.savez(path, images=images.numpy(), labels=c.numpy())


def evaluate_fid(G, args, cfg):
    """FID of uniform-label samples. The samples post-process the private G (DP is closed under
    post-processing), but the reference statistics are of the private training images: NOT covered."""
    import fid  # evaluation only: a copy of this script without fid.py still trains
    gen = torch.Generator().manual_seed(args.seed + 3)                  # the training RNG is untouched
    return fid.fid_for_training(lambda n: sample_synthetic(G, n, cfg, gen, False)[0], args.dataset, args.data_root,
                                args.img_size, args.fid_samples, cfg["device"], weights=args.fid_weights)


def write_samples(G, z, c, path, image):
    """Images: 8x8 grid, one class per row. Records: a CSV of label and flattened features."""
    with torch.no_grad():
        x = G(z, c)
    if image:
        return torchvision.utils.save_image(x, path + ".png", nrow=8, normalize=True, value_range=(-1, 1))
    with open(path + ".csv", "w", newline="") as f:
        csv.writer(f).writerows([["label"] + [f"f{i}" for i in range(x[0].numel())]] + [
            [ci] + [f"{v:.3f}" for v in xi] for ci, xi in zip(c.tolist(), x.flatten(1).tolist())])


# ==== Main ====
def main(argv=None):
    args = parse_args(argv)
    table = args.dataset not in ("mnist", "shapes")
    if table and (args.export_samples or args.fid_every):
        raise ValueError("--export-samples / --fid-every are for the image datasets (mnist, shapes)")
    args.out_dir = args.out_dir or os.path.join("runs", "dp_gan-" + args.dataset.replace(":", "_").replace(
        "/", "_") + f"-s{args.seed}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("CUDA not available; pass --device cpu")
    device = torch.device(args.device)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.benchmark = not args.deterministic
    torch.use_deterministic_algorithms(args.deterministic)
    ckpt_path = common.prepare_run(args.out_dir, args.resume)

    if table:                                                           # records stay in raw units (card 4.1)
        if args.dataset == "sprint_synth":
            n_test, n_classes = 502 if args.n_test is None else args.n_test, 2
            x, y = sprint_synth(args.n_train + n_test, args.data_seed)
        else:
            x, y, classes = load_csv_table(args.dataset[len("csv:"):], args.label_column, args.table_shape)
            n_test, n_classes = round(len(x) * 502 / 6502) if args.n_test is None else args.n_test, len(classes)
        x, y, n_tr = x.unsqueeze(1).to(device), y.to(device), len(x) - n_test   # (N, 1, H, W)
        if n_tr < 1:
            raise ValueError(f"{n_test} held-out records leave no training records (--n-test)")
        real_tr, real_te, shape = (x[:n_tr], y[:n_tr]), (x[n_tr:], y[n_tr:]), tuple(x.shape[1:])
        G = TableGenerator(n_classes, shape[1:], args.latent_dim, args.width)
        D = TableDiscriminator(n_classes, shape[1:], args.width)
    else:
        ds = common.load_dataset(args.dataset, args.data_root, args.img_size)
        n_classes, n_tr, shape = (10 if args.dataset == "mnist" else common.ShapesDataset.num_classes), len(ds), tuple(ds[0][0].shape)
        if shape[1] % 4 or shape[1] < 20:
            raise ValueError(f"image side {shape[1]} must be a multiple of 4 and >= 20 (--img-size)")
        G = ImageGenerator(n_classes, shape[0], shape[1], args.latent_dim, args.width)
        D = ImageDiscriminator(n_classes, shape[0], shape[1], args.width)
        if args.tstr_samples:                                           # scoring needs all real images
            real_tr, real_te = ((torch.stack(xs).to(device), torch.tensor(ys, device=device)) for xs, ys in (
                zip(*(d[i] for i in range(len(d)))) for d in (ds, common.load_dataset(
                    args.dataset, args.data_root, args.img_size, train=False))))
    q = args.sample_rate = args.sample_rate or (1 / n_tr if table else 64 / n_tr)
    steps_per_epoch, private = max(1, round(1 / q)), args.noise_multiplier > 0   # official: N / batch
    total = args.total_steps = args.steps or args.epochs * steps_per_epoch
    if args.target_epsilon is not None and private:                     # stop before exceeding the target
        total = args.total_steps = max_steps_within(args.target_epsilon, args.noise_multiplier, q, args.delta,
                                                    args.conversion, total)
        if total == 0:
            raise ValueError(f"--target-epsilon {args.target_epsilon} does not allow a single step")
    check_no_batch_coupling(D)
    G, D = G.to(device), D.to(device)
    opt_G = torch.optim.Adam(G.parameters(), lr=args.lr_g, betas=tuple(args.betas))
    opt_D = torch.optim.Adam(D.parameters(), lr=args.lr_d, betas=tuple(args.betas))   # NoisyAdam = privatize + Adam
    fixed_z = torch.rand(64, args.latent_dim, generator=torch.Generator().manual_seed(args.seed)) * 2 - 1
    accountant, step, scores, eps_select_spent = RDPAccountant(), 0, {"lr": [], "nn": []}, 0.0
    if ckpt_path:
        s = common.load_checkpoint(ckpt_path, device, args, shape_flags=(
            "dataset", "latent_dim", "width", "table_shape", "img_size", "label_column"))
        for obj, k in ((G, "G"), (D, "D"), (opt_G, "opt_G"), (opt_D, "opt_D")):
            obj.load_state_dict(s[k])
        step, fixed_z, scores, eps_select_spent = s["step"], s["fixed_z"].cpu(), s["scores"], s["eps_select_spent"]
        accountant = RDPAccountant(s["accountant"])                     # the privacy ledger resumes too
        common.set_rng_state(s["rng"])
        mpath = os.path.join(args.out_dir, "metrics.jsonl")
        if os.path.exists(mpath):                                       # log each step once
            with open(mpath) as f:
                keep = [ln for ln in f if json.loads(ln)["step"] <= step]
            with open(mpath, "w") as f:
                f.writelines(keep)
    print(json.dumps(vars(args), indent=1), flush=True)
    print(f"device {device} | torch {torch.__version__} | params G {sum(p.numel() for p in G.parameters()):,} | D "
          f"{sum(p.numel() for p in D.parameters()):,} | N {n_tr} | q {q:.6g} (lot ~{q * n_tr:.2f}) | {total} D steps "
          f"({steps_per_epoch}/epoch)", flush=True)
    if private:
        e_end = compute_epsilon(args.noise_multiplier, q, total, args.delta, conversion=args.conversion)[0]
        print(f"privacy plan: sigma {args.noise_multiplier:g}, C {args.max_grad_norm:g}, {total} steps at q {q:.6g} -> "
              f"eps {e_end:.4f} at delta {args.delta:g} ({args.conversion})", flush=True)
    else:
        print("!" * 80 + "\n!! NON-PRIVATE BASELINE (--noise-multiplier 0): NO differential privacy, eps = inf !!\n"
              + "!" * 80, flush=True)
    with open(os.path.join(args.out_dir, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=1)

    def real_lot(k):                                                    # the Poisson lot of D step k
        idx = poisson_lot(n_tr, q, args.seed, k)
        if table:
            return real_tr[0][idx.to(device)], real_tr[1][idx.to(device)]
        items = [ds[i] for i in idx.tolist()]                           # images are read per lot
        x = torch.stack([t for t, _ in items]) if items else torch.empty(0, *shape)
        return x.to(device), torch.tensor([t for _, t in items], dtype=torch.long, device=device)

    if not table and not ckpt_path:                                     # public image sets only, never records
        torchvision.utils.save_image(torch.stack([ds[i][0] for i in range(64)]), os.path.join(
            args.out_dir, "reals.png"), nrow=8, normalize=True, value_range=(-1, 1))
    os.makedirs(os.path.join(args.out_dir, "samples"), exist_ok=True)
    snap_dir, fixed_c = os.path.join(args.out_dir, "generators"), torch.arange(64, device=device) // 8 % n_classes
    cfg = {"latent": args.latent_dim, "n_classes": n_classes, "device": device, "sigma": args.noise_multiplier,
           "C": args.max_grad_norm, "q": q, "expected_lot": q * n_tr, "n_g": max(1, round(2 * q * n_tr)),
           "loss_kw": {"soft": tuple(args.soft_labels), "class_loss": args.class_loss},
           "clf_steps": args.clf_steps, "image": not table}
    post = args.dataset == "sprint_synth"                               # official Analysis: int cast, clip 0

    def save():
        common.save_checkpoint(os.path.join(args.out_dir, "ckpt.pt"), {
            "step": step, "args": vars(args), "G": G.state_dict(), "D": D.state_dict(), "opt_G": opt_G.state_dict(),
            "opt_D": opt_D.state_dict(), "fixed_z": fixed_z, "accountant": accountant.history, "scores": scores,
            "eps_select_spent": eps_select_spent, "rng": common.rng_state()})

    hist, metrics, t0, t_start, step0 = [], {"step": step}, time.time(), time.time(), step
    while step < total:
        x_real, y_real = real_lot(step)
        out = train_step(G, D, opt_G, opt_D, x_real, y_real, cfg, accountant)
        hist.append((out["loss_D_sum"], out["n_clipped"], out["loss_G"], len(x_real)))
        step += 1
        if step % steps_per_epoch == 0:                                 # card 2.3: eps(delta) every epoch
            epoch = step // steps_per_epoch
            line = f"epoch {epoch} | eps {accountant.get_epsilon(args.delta, args.conversion)[0]:.4f}"
            if args.tstr_samples and args.select_picks:                 # card 2.9 step 1
                common.save_checkpoint(os.path.join(snap_dir, f"G_{epoch:04d}.pt"), G.state_dict())
                for kind in ("lr", "nn"):
                    scores[kind].append(transfer_score(G, kind, *real_tr, cfg, args.seed + epoch, post))
                line += f" | transfer (real train, not private) lr {scores['lr'][-1]:.4f} nn {scores['nn'][-1]:.4f}"
            print(line, flush=True)
        fid_now = args.fid_every and (step % args.fid_every == 0 or step == total)
        if step % args.log_every == 0 or step == total or fid_now:
            it_s = (step - metrics["step"]) / max(time.time() - t0, 1e-9)
            loss_d, clipped, loss_g = (torch.stack([h[i] for h in hist]).sum().item() for i in range(3))
            pairs = max(sum(h[3] for h in hist), 1)
            metrics = {"step": step, "epoch": step / steps_per_epoch, "loss_D": loss_d / pairs,
                       "loss_G": loss_g / len(hist), "lot": sum(h[3] for h in hist) / len(hist),
                       "clip_frac": clipped / pairs, "eps": accountant.get_epsilon(args.delta, args.conversion)[0],
                       "it_s": it_s, "eta_s": (total - step) / max(it_s, 1e-9)}
            if fid_now:
                metrics["fid"] = evaluate_fid(G, args, cfg)
            print(f"step {step}/{total} | " + " | ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "step"),
                  flush=True)
            with open(os.path.join(args.out_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(metrics) + "\n")
            hist, t0 = [], time.time()
        if args.sample_every and (step % args.sample_every == 0 or step == total):
            write_samples(G, fixed_z.to(device), fixed_c, os.path.join(args.out_dir, "samples", f"{step:07d}"), not table)
        if step % args.ckpt_every == 0 and step < total:
            save()
    rate = (step - step0) / max(time.time() - t_start, 1e-9)
    if args.tstr_samples:
        metrics.update(evaluate(G, args, cfg, real_tr, real_te, scores, snap_dir, post))
        eps_select_spent += metrics.pop("eps_select", 0.0)              # every selection is charged
    save()
    eps, order = accountant.get_epsilon(args.delta, args.conversion)
    with open(os.path.join(args.out_dir, "privacy.json"), "w") as f:    # beside the checkpoint
        json.dump({"epsilon": eps if private else None, "delta": args.delta, "best_order": order,
                   "conversion": args.conversion, "steps": sum(h[2] for h in accountant.history),
                   "history": accountant.history, "epsilon_selection": eps_select_spent,
                   "epsilon_total": eps + eps_select_spent if private else None, "non_private": not private}, f, indent=1)
    print(f"privacy: eps {eps:.4f} (training; alpha {order:g}, {args.conversion}) + {eps_select_spent:.4g} (epoch "
          f"selection) at delta {args.delta:g}" + ("" if private else "  -- NON-PRIVATE RUN"), flush=True)
    metrics["eps_select"] = eps_select_spent
    if args.export_samples:
        export_samples(G, args.export_samples, cfg, os.path.join(args.out_dir, f"samples_{args.export_samples}.npz"),
                       args.seed + 13)
    if args.bench_d_steps:
        metrics.update(bench_d_steps(D, max(1, round(q * n_tr)), shape, cfg, args.bench_d_steps))
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(f"done: {step - step0} D+G steps at {rate:.2f} it/s (incl. logging/eval) | peak memory {peak:.0f} MiB "
          f"({'CUDA allocated' if device.type == 'cuda' else 'process RSS'})", flush=True)
    return metrics


if __name__ == "__main__":
    main()
