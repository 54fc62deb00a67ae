"""DP-GAN: Privacy-preserving generative deep neural networks support clinical data sharing.
Beaulieu-Jones, Wu, Williams, (Lee, Bhavnani, Byrd,) Greene. bioRxiv 10.1101/159756 (2017); Circ
Cardiovasc Qual Outcomes 12(7):e005122 (2019). An AC-GAN whose discriminator is trained with
DP-SGD (Abadi et al. 2016, arXiv:1607.00133 Alg. 1), accounted with Renyi DP (Mironov 2017).
Official code: greenelab/SPRINT_gan (dp_gan.py, custom_keras/noisy_optimizers.py, Analysis.ipynb)

Paper -> code
  AC-GAN L_S + L_C per real/fake pair (Odena Sec. 3) ...... pair_loss(), generator_loss()
  Alg. 1 l.3    Poisson lot, rate q ....................... poisson_lot(), lot_stream()
  Alg. 1 l.4-6  per-example grads, clip, noise, / qN ...... per_example_grads(), privatize()
  official loop D step, accountant event, G step .......... train_step(), generator_step()
  RDP of the sampled Gaussian (Mironov et al. 2019) ....... rdp_sgm(), _log_a_int(), _log_a_frac()
  eps(delta): Balle et al. 2020 Thm. 21 / Mironov Prop. 3 . rdp_to_epsilon(), RDPAccountant
  official dp_gan.py SPRINT G and D (3x12 records) ........ TableGenerator, TableDiscriminator
  Keras mnist_acgan.py G and D (public stand-in) .......... ImageGenerator, ImageDiscriminator
  PredictGroup.ipynb: per-epoch transfer scores ........... score_epoch()
  Analysis.ipynb: noisy epoch selection, TSTR, structure .. select_epochs(), evaluate()
Deviations (each one also tagged in the code; grep DEVIATION|PAPER-VS-CODE)
  1. PAPER-VS-CODE  Poisson lots of expected size L = qN, not the official draws with replacement
     (batch 1), which the Poisson-subsampled accountant does not describe.
  2. PAPER-VS-CODE  noise std sigma*C as in the fixed code (SPRINT_gan #5), not the bioRxiv runs'
     sigma*C^2; whether the journal figures used the fixed code is unverified (card 3).
  3. DEVIATION  SPRINT is not public: `sprint_synth` is the card's deterministic stand-in (4.3).
  4. DEVIATION  torch LR and MLP/CNN replace sklearn's RF/LR/SVM/kNN; TSTR pools the selected Gs.
  5. DEVIATION  noisy-max Laplace scale 2/(N eps_pick) (an accuracy on N records has sensitivity
     1/N), not the notebook's 1/(eps_pick * remaining epochs).
  6. PAPER-VS-CODE  D targets 1/0 as SPRINT's dp_gan.py; the Keras example the MNIST nets come
     from used 0.9/0.1 (card 2.5), later 0.95/0: --soft-labels.
Datasets: sprint_synth (default) | npz:<path> (x (N, H, W), y (N,); SPRINT's X_processed.pkl and
  y_processed.pkl as np.savez(path, x=X, y=y)) | mnist | shapes. A step (the logs' unit) = one D
  step on a Poisson lot + one G step; an epoch = round(1/q) steps (official: N / batch).
Covered by (eps, delta): generators/G_*.pt, samples/*.png, samples_N.npz, the selected epochs,
  privacy.json (no figure draws a real record). NOT covered (real records, no noise; for the data
  holder only): loss_D, clip_frac and the per-epoch transfer scores (real training set) in the log
  lines, metrics.jsonl and curves.png; the eval line and eval.json (held-out TSTR accuracies, the
  real-data baseline, real means and correlations). args.json, ckpt.pt (RNG states) and the
  printed flags hold the seed, which regenerates every lot and noise draw: never release them.
  The noise is torch's PRNG (no CSPRNG, no floating-point hardening, Mironov 2012).
Run
  python dp_gan.py --seed $SECRET                 # SPRINT: q=1/6000, sigma 1, C 1e-4, 500 epochs
  python dp_gan.py --dataset mnist --seed $SECRET # L=64, sigma 1, C 1, 20 epochs: eps 0.9415
  python dp_gan.py --noise-multiplier 0 --max-grad-norm 0 --batch-size 100 --lr 2e-4  # ac_gan.py
  python dp_gan.py --device cpu --epochs 3 --n-train 600 --tstr-samples 600 --batch-size 6  # demo
Sampling: G = dp_gan.load_generator("runs/<run>/generators/G_0500.pt") (eval mode, moot: G has no
  dropout or BN); x = G(torch.rand(n, 100) * 2 - 1, labels).
Paper reports (figures only): SPRINT TSTR accuracy, private ~0.875 vs real ~0.93 (Fig. 4); eps
1.597 (RDP, delta 1e-5) after 500 epochs, plus 0.5 for the epoch selection. Our numbers: README.
"""

import argparse
import contextlib
import functools
import hashlib
import itertools
import json
import math
import os
import random
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from scipy import special, stats
from torch.func import functional_call, grad_and_value, vmap

import common

MONTHS = (0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27)  # SPRINT visits RZ..27M [card 4.1]
DEFAULT_ORDERS = tuple([1 + x / 10 for x in range(1, 100)] + list(range(12, 64)))  # Opacus alphas
DEFAULT_SEED = 0


# ==== Args ====
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                formatter_class=common.HelpFormatter)
    g = p.add_argument_group("paper")
    a, pos, nonneg, pos_f = g.add_argument, common.positive_int, common.nonnegative_int, \
        common.positive_float
    a("--dataset", default="sprint_synth", help="sprint_synth | npz:<path> | mnist | shapes [card]")
    a("--epochs", type=pos, help="length, in epochs of round(1/q) steps: 500 for tables, 20 for "
      "images [README --epochs 500; ours]")
    lot = g.add_mutually_exclusive_group()
    lot.add_argument("--batch-size", type=pos, help="expected lot size L, q = L/N: 1 for tables, "
                     "64 for images [README --batch_size 1; ours]")
    lot.add_argument("--sample-rate", type=common.probability, help="Poisson rate q [Alg. 1]")
    a("--noise-multiplier", type=common.nonnegative_float, default=1.0,
      help="sigma; 0 = NON-PRIVATE baseline [README --noise 1]")
    a("--max-grad-norm", type=common.nonnegative_float, help="per-example clip C, 0 = none: "
      "1e-4 for tables, 1 for images [README --clip_value 0.0001; ours]")
    a("--delta", type=common.probability, default=1e-5, help="target delta [Fig. 5]")
    a("--target-epsilon", type=pos_f, help="stop at the last step with eps <= this [ours]")
    a("--conversion", choices=["balle", "classic"], default="balle",
      help="RDP -> eps: Opacus >= 0.14 | Mironov Prop. 3 [card 2.8]")
    a("--lr", type=pos_f, help="Adam lr of D and G: 2e-5 for tables, 2e-4 for images "
      "[README --lr 2e-05; Keras example]")
    a("--betas", type=common.unit_float, nargs=2, default=(0.5, 0.999),
      help="Adam betas [official dp_gan.py]")
    a("--z-dim", "--latent-dim", dest="z_dim", type=pos, default=100,
      help="z ~ U(-1, 1)^d [official dp_gan.py]")
    a("--soft-labels", type=common.unit_float, nargs=2, default=(1.0, 0.0), help="S targets "
      "real, fake; Keras example 0.95 0 [official dp_gan.py: PAPER-VS-CODE]")
    a("--class-loss", choices=["all", "real"], default="all",
      help="'real': reals only, weight 2 [official; Keras example]")
    a("--width", type=pos_f, default=1.0, help="scales every G and D width [ours: tiny runs]")
    a("--n-train", type=pos, help="training records: 6000 for sprint_synth; images: the first N "
      "(default all) [official training_size]")
    a("--n-test", type=nonneg, help="held-out records: 502 for sprint_synth, 502/6502 of an npz; "
      "images: the first N of the test split (default all) [official]")
    a("--data-seed", type=nonneg, default=0, help="sprint_synth seed [card 4.3]")
    a("--img-size", type=pos, help="images: side, k*4 >= 20; default native [run]")
    a = p.add_argument_group("eval").add_argument
    a("--select-picks", type=nonneg, default=10, help="epochs picked by noisy max, half by LR, "
      "half by NN score; 0 = the last G [Analysis.ipynb]")
    a("--select-epsilon", type=pos_f, default=0.05, help="eps per pick [Analysis.ipynb]")
    a("--tstr-samples", type=nonneg, default=5000,
      help="records per selected G; 0 = no evaluation [Analysis.ipynb]")
    a("--clf-steps", type=pos, default=500, help="Adam steps per classifier [ours]")
    a("--export-samples", type=nonneg, default=0, help="N samples to samples_N.npz [run]")
    a = p.add_argument_group("run").add_argument
    a("--data-root", default="data", help="torchvision download folder [run]")
    a("--out-dir", help="default runs/dp_gan-<dataset>-s<seed>[-<hash>]; a private run's "
      "non-default seed shows as 'secret' [run]")
    a("--seed", type=nonneg, default=DEFAULT_SEED, help="seeds every lot, noise draw and z; "
      "SECRET for a release [official: 123]")
    a("--device", default="cuda", help="torch device [run]")
    a("--num-workers", type=nonneg, default=4, help="images: workers reading lots [run]")
    a("--amp", choices=["off", "bf16"], default="off", help="bf16 autocast of G, D [run]")
    a("--log-every", type=pos, default=500, help="steps between log lines [run]")
    a("--sample-every", type=nonneg, default=5000, help="steps between figures [run]")
    a("--ckpt-every", type=pos, default=5000, help="steps between checkpoints [run]")
    a("--resume", action="store_true", help="continue out_dir/ckpt.pt [run]")
    a("--spend-more-epsilon", action="store_true", help="let --resume of a FINISHED private run "
      "train on and select again [ours]")
    a("--deterministic", action="store_true", help="deterministic kernels; on CUDA sets "
      "CUBLAS_WORKSPACE_CONFIG=:4096:8 [run]")
    args = p.parse_args(argv)
    table = args.dataset == "sprint_synth" or args.dataset.startswith("npz:")
    if not table and args.dataset not in ("mnist", "shapes"):
        p.error(f"unknown dataset {args.dataset!r}; valid: sprint_synth, npz:<path>, mnist, shapes")
    if args.noise_multiplier > 0 and args.max_grad_norm == 0:
        p.error("--max-grad-norm 0 (no clipping) only goes with --noise-multiplier 0")
    if args.noise_multiplier == 0 and args.target_epsilon is not None:
        p.error("--target-epsilon needs --noise-multiplier > 0: a non-private run has eps = inf")
    if args.delta >= 1:
        p.error("--delta must be < 1")
    if args.out_dir is None:                        # a secret seed stays out of the folder name
        secret = args.noise_multiplier > 0 and args.seed != DEFAULT_SEED
        shown = argparse.Namespace(**{**vars(args), "seed": "secret"}) if secret else args
        args.out_dir = common.default_out_dir("dp_gan", shown, vars(p.parse_args([])))
    # Derived defaults (card 2.6): tables follow the official SPRINT run, images the Keras example
    if args.epochs is None:
        args.epochs = 500 if table else 20
    if args.batch_size is None and args.sample_rate is None:
        args.batch_size = 1 if table else 64        # q = L / N once N is known (load_data)
    if args.max_grad_norm is None:
        args.max_grad_norm = 1e-4 if table else 1.0
    if args.lr is None:
        args.lr = 2e-5 if table else 2e-4
    if args.dataset == "sprint_synth":
        args.n_train = 6000 if args.n_train is None else args.n_train
        args.n_test = 502 if args.n_test is None else args.n_test   # npz: 502/6502 (load_data)
    return args


# ==== Data ====
def sprint_synth(n, seed):
    """DEVIATION 3, card 4.3: deterministic SPRINT stand-in; x (n, 3, 12) = SBP, DBP, meds."""
    rng, m = np.random.default_rng(seed), np.array(MONTHS, dtype=np.float64)
    y = (rng.random(n) < 0.5).astype(np.int64)                             # 1 = intensive arm
    b, o = np.clip(rng.normal(139, 15, n), 90, 220), rng.normal(0, 8, n)   # baseline SBP, offset
    e_sbp, e_dbp = rng.normal(0, 10, (n, 12)), rng.normal(0, 6, (n, 12))
    m0, e_med = rng.poisson(1.8, n), rng.normal(0, 0.5, (n, 12))
    tau, d = np.where(y == 1, 119.0, 135.0)[:, None], np.exp(-m / 1.5)     # arm target, decay
    sbp = tau + (b[:, None] - tau) * d + o[:, None] * (1 - d) + e_sbp
    sbp[:, 0] = b
    dbp = 0.45 * sbp + 14 + e_dbp
    add = np.where(y == 1, 1.0, 0.2)[:, None] * (1 - np.exp(-m / 2))      # medication classes
    meds = np.clip(np.round(m0[:, None] + add + e_med), 0, 7)
    x = np.stack([np.round(sbp), np.round(dbp), meds], 1)                 # (n, 3, 12), raw units
    return torch.from_numpy(x).float(), torch.from_numpy(y)


def load_npz_table(path):
    """npz:<path> -> x (N, H, W) float, y (N,) labels 0..K-1, K."""
    try:
        with np.load(path) as f:
            x, y = f["x"], f["y"]
    except (OSError, KeyError, ValueError) as e:
        raise common.UserError(f"cannot read {path!r} as an .npz with arrays x, y: {e}") from None
    if x.ndim != 3 or y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer) or \
            not np.isfinite(x).all() or len(x) == 0 or y.min() < 0:
        raise common.UserError(f"{path!r}: need finite x (N, H, W) and integer y (N,) >= 0; got "
                               f"x {x.shape} {x.dtype}, y {y.shape} {y.dtype}")
    return torch.from_numpy(x).float(), torch.from_numpy(y).long(), int(y.max()) + 1


def load_data(args, device):
    """Card 4: (train, test, info), tables on the device in raw units; resolves q = L / N."""
    if args.dataset in ("mnist", "shapes"):
        train, test = (common.load_dataset(args.dataset, args.data_root, args.img_size, train=t)
                       for t in (True, False))
        if args.n_train or args.n_test:                          # the first N of each split
            train, test = (torch.utils.data.Subset(d, range(min(n or len(d), len(d))))
                           for d, n in ((train, args.n_train), (test, args.n_test)))
        n, shape = len(train), tuple(train[0][0].shape)
        if shape[1] % 4 or shape[1] < 20:
            raise common.UserError(f"image side {shape[1]} must be a multiple of 4, >= 20")
        k = 10 if args.dataset == "mnist" else common.ShapesDataset.num_classes
    else:
        if args.dataset == "sprint_synth":
            x, y, k = *sprint_synth(args.n_train + args.n_test, args.data_seed), 2
        else:
            x, y, k = load_npz_table(args.dataset[4:])
            args.n_test = round(len(x) * 502 / 6502) if args.n_test is None else args.n_test
        x, y, n = x.unsqueeze(1).to(device), y.to(device), len(x) - args.n_test   # (N, 1, H, W)
        if n < 1:
            raise common.UserError(f"--n-test {args.n_test} leaves no training records")
        train, test, shape = (x[:n], y[:n]), (x[n:], y[n:]), tuple(x.shape[1:])
    if args.sample_rate is None:
        if args.batch_size > n:
            raise common.UserError(f"--batch-size {args.batch_size} exceeds the {n} records")
        args.sample_rate = args.batch_size / n                  # expected lot size L = qN
    return train, test, {"table": isinstance(train, tuple), "n_classes": k, "shape": shape,
                         "n_train": n}


def as_tensors(data, device):
    """A Dataset as (x, y) on the device: evaluation scores every record."""
    if isinstance(data, tuple):
        return data
    p, xs, ys = common.Progress("load records", len(data), unit="img"), [], []
    for x, y in torch.utils.data.DataLoader(data, batch_size=1000):
        xs, ys = xs + [x], ys + [y]
        p.update(len(x))
    return torch.cat(xs).to(device), torch.cat(ys).to(device)


def derive_seed(seed, *purpose):
    """A 63-bit seed per purpose from the WHOLE --seed (SHA-256): no seed overflows a generator."""
    digest = hashlib.sha256(repr((int(seed), *purpose)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def poisson_lot(n, q, seed, step):
    """Alg. 1 l.3: each of n records joins lot `step` w.p. q, a function of (seed, step) only.
    PAPER-VS-CODE 1: official dp_gan.py draws randint(0, 6000), fixed size 1, with replacement."""
    g = torch.Generator().manual_seed(derive_seed(seed, "lot", step))
    return torch.nonzero(torch.rand(n, generator=g) < q).flatten()


def _collate(shape, items):                        # an empty Poisson lot is a (0, C, H, W) batch
    x = torch.stack([t for t, _ in items]) if items else torch.empty(0, *shape)
    return x, torch.tensor([t for _, t in items], dtype=torch.long)


def lot_stream(train, info, args, start, device):
    """The lots of steps start, start + 1, ...: tables index device tensors, images use workers."""
    lots = (poisson_lot(info["n_train"], args.sample_rate, args.seed, k)
            for k in itertools.count(start))
    if info["table"]:
        yield from ((train[0][i.to(device)], train[1][i.to(device)]) for i in lots)
    else:
        loader = torch.utils.data.DataLoader(
            train, batch_sampler=(i.tolist() for i in lots), num_workers=args.num_workers,
            collate_fn=functools.partial(_collate, info["shape"]))
        yield from ((x.to(device), y.to(device)) for x, y in loader)


# ==== Models ====
def ch(c, width):
    return max(1, round(c * width))


def keras_init(module, normal=()):
    """Keras defaults: Glorot-uniform weights (`normal` modules: Glorot-normal), zero biases.
    UNSPECIFIED: Keras >= 2.2.3 truncates glorot_normal; we use the plain normal."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d, nn.Embedding)):
            (nn.init.xavier_normal_ if m in normal else nn.init.xavier_uniform_)(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


class SameConv2d(nn.Conv2d):
    """Keras 'same', the odd pixel after (card 2.4: 3x3 s2 on 3x12 pads H (1, 1), W (0, 1))."""

    def forward(self, x):
        (k, _), (s, _), pads = self.kernel_size, self.stride, []
        for n in (x.shape[-1], x.shape[-2]):                             # F.pad order: W, then H
            tot = max((math.ceil(n / s) - 1) * s + k - n, 0)
            pads += [tot // 2, tot - tot // 2]
        return super().forward(F.pad(x, pads))


class TableGenerator(nn.Module):
    """Official SPRINT G (card 2.4); other H x W start at (32, H, ceil(W/3)) and crop the end."""

    def __init__(self, n_classes, shape=(3, 12), latent=100, width=1.0):
        super().__init__()
        self.shape, self.c0, self.w0 = tuple(shape), ch(32, width), math.ceil(shape[1] / 3)
        self.embed = nn.Embedding(n_classes, latent)
        self.fc = nn.Sequential(nn.Linear(latent, ch(256, width)), nn.ReLU(),
                                nn.Linear(ch(256, width), self.c0 * shape[0] * self.w0), nn.ReLU())
        self.conv1 = nn.Conv2d(self.c0, ch(256, width), 5, padding=2)        # 'same', stride 1
        self.conv2 = nn.Conv2d(ch(256, width), 1, 4, stride=2, padding=1)    # 'same' here: 1, 1
        keras_init(self, normal=(self.embed, self.conv1, self.conv2))

    def forward(self, z, c):
        h = self.fc(z * self.embed(c)).view(-1, self.c0, self.shape[0], self.w0)   # (B, 32, 3, 4)
        h = F.interpolate(h, scale_factor=(2, 6), mode="nearest")                  # (B, 32, 6, 24)
        h = F.relu(self.conv1(h))                                                  # (B, 256, 6, 24)
        return self.conv2(h)[..., :self.shape[0], :self.shape[1]]      # (B, 1, 3, 12), no tanh


class TableDiscriminator(nn.Module):
    """Official SPRINT D (card 2.4): LeakyReLU 0.3 (Keras default), Dropout 0.3, no norm layer."""

    def __init__(self, n_classes, shape=(3, 12), width=1.0, dropout=0.3):
        super().__init__()
        c1, c2, hid = ch(32, width), ch(64, width), ch(1024, width)
        flat = c2 * math.ceil(shape[0] / 2) * math.ceil(shape[1] / 2)        # 64 * 2 * 6 = 768
        self.trunk = nn.Sequential(
            SameConv2d(1, c1, 3, stride=2), nn.LeakyReLU(0.3), nn.Dropout(dropout),
            SameConv2d(c1, c2, 3), nn.LeakyReLU(0.3), nn.Dropout(dropout), nn.Flatten(),
            nn.Linear(flat, hid), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hid, hid), nn.ReLU())
        self.source, self.classes = nn.Linear(hid, 1), nn.Linear(hid, n_classes)
        keras_init(self)

    def forward(self, x):
        h = self.trunk(x)
        return self.source(h).squeeze(-1), self.classes(h)         # logits; Keras: sigmoid, softmax


class ImageGenerator(nn.Module):
    """Keras mnist_acgan.py G (card 2.5); s0 = size/4 - 4 (3 for MNIST)."""

    def __init__(self, n_classes, channels=1, size=28, latent=100, width=1.0):
        super().__init__()
        self.c0, self.s0, c1, c2 = ch(384, width), size // 4 - 4, ch(192, width), ch(96, width)
        self.embed = nn.Embedding(n_classes, latent)
        self.fc = nn.Linear(latent, self.c0 * self.s0 ** 2)
        self.up = nn.ModuleList([                                 # stride-2 'same': pad 2, out 1
            nn.ConvTranspose2d(self.c0, c1, 5),                                   # s0 -> size/4
            nn.ConvTranspose2d(c1, c2, 5, stride=2, padding=2, output_padding=1),
            nn.ConvTranspose2d(c2, channels, 5, stride=2, padding=2, output_padding=1)])
        keras_init(self, normal=(self.embed, *self.up))

    def forward(self, z, c):
        h = F.relu(self.fc(z * self.embed(c))).view(-1, self.c0, self.s0, self.s0)  # (B, 384, 3, 3)
        h = F.relu(self.up[1](F.relu(self.up[0](h))))                           # (B, 96, 14, 14)
        return torch.tanh(self.up[2](h))                                        # (B, C, 28, 28)


class ImageDiscriminator(nn.Module):
    """Keras mnist_acgan.py D: conv3 32 s2, 64, 128 s2, 256, each LeakyReLU(0.2), Dropout(0.3)."""

    def __init__(self, n_classes, channels=1, size=28, width=1.0, dropout=0.3):
        super().__init__()
        layers, c_in = [], channels
        for c_out, s in ((32, 2), (64, 1), (128, 2), (256, 1)):
            layers += [SameConv2d(c_in, ch(c_out, width), 3, stride=s), nn.LeakyReLU(0.2),
                       nn.Dropout(dropout)]
            c_in = ch(c_out, width)
        self.trunk = nn.Sequential(*layers, nn.Flatten())                       # (B, 256 * 7 * 7)
        self.source, self.classes = (nn.Linear(c_in * (size // 4) ** 2, k) for k in (1, n_classes))
        keras_init(self)

    def forward(self, x):
        h = self.trunk(x)
        return self.source(h).squeeze(-1), self.classes(h)


def check_no_batch_coupling(D):
    """Card 6.2: refuse layers that couple the examples of a lot (BatchNorm, tracked norms)."""
    for name, m in D.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) or (
                isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats):
            raise ValueError(f"DP-SGD refuses {type(m).__name__} at D.{name}: it couples the "
                             "examples of a lot and its running statistics see raw records")


def make_generator(table, n_classes, shape, latent, width):
    if table:
        return TableGenerator(n_classes, shape[1:], latent, width)
    return ImageGenerator(n_classes, shape[0], shape[1], latent, width)


def build_models(args, info, device):
    """(G, D, G_config): the SPRINT nets for tables, the Keras MNIST nets for images."""
    k, shape = info["n_classes"], info["shape"]
    g_config = {"table": info["table"], "n_classes": k, "shape": list(shape),
                "latent": args.z_dim, "width": args.width}
    G = make_generator(**g_config)                           # G first: the init order is fixed
    D = TableDiscriminator(k, shape[1:], args.width) if info["table"] else \
        ImageDiscriminator(k, shape[0], shape[1], args.width)
    check_no_batch_coupling(D)
    return G.to(device), D.to(device), g_config


def load_generator(ckpt_path, device="cpu"):
    """G from a ckpt.pt or generators/G_*.pt alone, in eval mode (moot: G has no dropout, no BN)."""
    state = common.load_checkpoint(ckpt_path, device)
    G = make_generator(**state["G_config"])
    G.load_state_dict(state["G"])
    return G.to(device).eval()


# ==== Losses ====
def pair_loss(s_real, c_real, y_real, s_fake, c_fake, y_fake, soft=(1.0, 0.0), class_loss="all"):
    """(B,) [BCE(S(x_i), t_r) + BCE(S(x~_i), t_f) + w_r CE(C(x_i), y_i) + w_f CE(C(x~_i), c_i)] / 2.
    UNSPECIFIED: / 2, Keras averages the (real, fake) batch. PAPER-VS-CODE 6: t = --soft-labels."""
    w_r, w_f = (1.0, 1.0) if class_loss == "all" else (2.0, 0.0)        # Keras example: 2 / 0
    bce = F.binary_cross_entropy_with_logits
    adv = bce(s_real, torch.full_like(s_real, soft[0]), reduction="none") + \
        bce(s_fake, torch.full_like(s_fake, soft[1]), reduction="none")
    cls = w_r * F.cross_entropy(c_real, y_real, reduction="none") + \
        w_f * F.cross_entropy(c_fake, y_fake, reduction="none")
    return 0.5 * (adv + cls)


def generator_loss(s_fake, c_fake, y_fake, soft_real=1.0):
    """Non-saturating AC-GAN G loss BCE(S(G(z,c)), t_r) + CE(C(G(z,c)), c) [official]."""
    return F.binary_cross_entropy_with_logits(s_fake, torch.full_like(s_fake, soft_real)) + \
        F.cross_entropy(c_fake, y_fake)


# ==== Privacy ====
def _log_add(a, b):
    hi, lo = max(a, b), min(a, b)
    return hi if lo == -math.inf else hi + math.log1p(math.exp(lo - hi))


def _log_sub(a, b):                                                   # log(e^a - e^b), a >= b
    return a if b == -math.inf else (-math.inf if a <= b else a + math.log(-math.expm1(b - a)))


def _log_erfc(x):
    return math.log(2.0) + special.log_ndtr(-math.sqrt(2.0) * x)     # accurate for large x


def _log_a_int(q, sigma, alpha):
    """log A_a, integer a: log sum_k C(a,k) (1-q)^(a-k) q^k exp((k^2 - k) / (2 sigma^2))."""
    log_a = -math.inf
    for k in range(alpha + 1):
        log_binom = special.gammaln(alpha + 1) - special.gammaln(k + 1) - \
            special.gammaln(alpha - k + 1)
        log_a = _log_add(log_a, log_binom + k * math.log(q) + (alpha - k) * math.log1p(-q)
                         + (k * k - k) / (2 * sigma ** 2))
    return log_a


def _log_a_frac(q, sigma, alpha):
    """log A_a, fractional a: two erfc-weighted series split at z0, summed to terms < e^-30."""
    log_a0 = log_a1 = -math.inf
    z0, i = sigma ** 2 * math.log(1 / q - 1) + 0.5, 0
    while True:
        coef, j = special.binom(alpha, i), alpha - i
        base = math.log(abs(coef)) + math.log(0.5)
        s0 = base + i * math.log(q) + j * math.log1p(-q) + (i * i - i) / (2 * sigma ** 2) + \
            _log_erfc((i - z0) / (math.sqrt(2) * sigma))
        s1 = base + j * math.log(q) + i * math.log1p(-q) + (j * j - j) / (2 * sigma ** 2) + \
            _log_erfc((z0 - j) / (math.sqrt(2) * sigma))
        op = _log_add if coef > 0 else _log_sub               # binomials alternate in sign past a
        log_a0, log_a1, i = op(log_a0, s0), op(log_a1, s1), i + 1
        if max(s0, s1) < -30:
            return _log_add(log_a0, log_a1)


@functools.lru_cache(maxsize=256)
def rdp_sgm(sample_rate, noise_multiplier, orders=DEFAULT_ORDERS):
    """RDP eps_1(a) = log(A_a) / (a - 1) of ONE sampled-Gaussian step, at each order a."""
    q, s, out = sample_rate, noise_multiplier, []
    for a in orders:
        if q == 0 or s == 0 or q == 1:                         # nothing sampled / no noise / all
            out.append(0.0 if q == 0 else math.inf if s == 0 else a / (2 * s ** 2))
        else:
            log_a = _log_a_int(q, s, int(a)) if float(a).is_integer() else _log_a_frac(q, s, a)
            out.append(log_a / (a - 1))
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
        warnings.warn(f"optimal RDP order {a[i]:g} is at the end of the order list; extend it")
    return float(eps[i]), float(a[i])


def compute_epsilon(noise_multiplier, sample_rate, steps, delta, conversion="balle"):
    """(epsilon, best_order) after `steps` sampled-Gaussian steps (card 2.8); numpy/scipy only."""
    rdp = steps * rdp_sgm(sample_rate, noise_multiplier)
    return rdp_to_epsilon(DEFAULT_ORDERS, rdp, delta, conversion)


class RDPAccountant:
    """Ledger of [sigma, q, steps] segments (Opacus' RDPAccountant.history); RDP adds per order."""

    def __init__(self):
        self.history = []

    def step(self, noise_multiplier, sample_rate):
        if self.history and self.history[-1][:2] == [noise_multiplier, sample_rate]:
            self.history[-1][2] += 1
        else:
            self.history.append([noise_multiplier, sample_rate, 1])

    def get_epsilon(self, delta, conversion="balle"):
        rdp = sum((t * rdp_sgm(q, s) for s, q, t in self.history), np.zeros(len(DEFAULT_ORDERS)))
        return rdp_to_epsilon(DEFAULT_ORDERS, rdp, delta, conversion)


def training_epsilon(args, steps):
    return compute_epsilon(args.noise_multiplier, args.sample_rate, steps, args.delta,
                           conversion=args.conversion)[0]


def planned_steps(args, per_epoch):
    """--epochs of round(1/q) steps, cut to the largest T with eps(T) <= --target-epsilon."""
    lo, hi = 0, args.epochs * per_epoch
    if args.target_epsilon is None:
        return hi
    while lo < hi:                                                   # bisection: eps grows with T
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if training_epsilon(args, mid) <= args.target_epsilon else (lo, mid - 1)
    if lo == 0:
        raise common.UserError(f"--target-epsilon {args.target_epsilon} allows no step")
    return lo


def check_resume_budget(state, args, total, accountant):
    """Refuse to let --resume of a FINISHED private run spend more unless --spend-more-epsilon."""
    if state["finished"] and args.noise_multiplier > 0 and total > state["step"]:
        now = accountant.get_epsilon(args.delta, args.conversion)[0]
        then = training_epsilon(args, total)
        select = args.select_picks * args.select_epsilon if args.tstr_samples else 0.0
        line = (f"training eps {now:.4f} -> {then:.4f} over {total - state['step']} more D steps, "
                f"plus {select:.4g} for a new epoch selection (total "
                f"{then + select + state['eps_select']:.4f} at delta {args.delta:g})")
        if not args.spend_more_epsilon:
            raise common.UserError(
                f"this private run is finished and spent eps {now + state['eps_select']:.4f} "
                f"(training + selection); --epochs {args.epochs} would spend more: {line}. "
                "Pass --spend-more-epsilon to spend it")
        print(f"resume: spending more budget (--spend-more-epsilon): {line}", flush=True)


def announce_privacy(args, total, n):
    """The plan (q, sigma, C, training and selection eps), or that the run is NOT private."""
    if args.noise_multiplier == 0:
        print("!!! NON-PRIVATE BASELINE (--noise-multiplier 0): NO differential privacy, eps = "
              "inf !!!", flush=True)
        return
    select = args.select_picks * args.select_epsilon if args.tstr_samples else 0.0
    print(f"privacy plan: q {args.sample_rate:.6g} (expected lot qN = {args.sample_rate * n:.4g} "
          f"of N {n}), sigma {args.noise_multiplier:g}, C {args.max_grad_norm:g}, {total} D steps: "
          f"training eps {training_epsilon(args, total):.4f} at delta {args.delta:g} "
          f"({args.conversion}), epoch selection eps {select:.4g}", flush=True)
    if args.seed == DEFAULT_SEED:
        print(f"warning: a private run with the default --seed {DEFAULT_SEED}: anyone can "
              "regenerate its lots and noise; for a release pass a secret --seed, e.g. "
              "$(python -c 'import secrets; print(secrets.randbits(128))')", flush=True)


def write_privacy_report(accountant, args, st):
    """privacy.json (releasable: no record, no seed), eval.json (NOT releasable), the last line."""
    eps, order = accountant.get_epsilon(args.delta, args.conversion)
    private = args.noise_multiplier > 0
    report = {"epsilon": eps if private else None, "delta": args.delta, "best_order": order,
              "conversion": args.conversion, "steps": sum(h[2] for h in accountant.history),
              "history": accountant.history, "epsilon_selection": st["eps_select"],
              "epsilon_total": eps + st["eps_select"] if private else None,
              "non_private": not private}
    for name, obj in (("privacy", report), ("eval", st["eval"])):
        with open(os.path.join(args.out_dir, f"{name}.json"), "w") as f:
            json.dump(obj, f, indent=1)
    print(f"privacy: eps {eps:.4f} (training; alpha {order:g}, {args.conversion}) + "
          f"{st['eps_select']:.4g} (epoch selection) at delta {args.delta:g}"
          + ("" if private else "  -- NON-PRIVATE RUN"), flush=True)


# ==== Train step ====
def per_example_grads(D, x_real, y_real, x_fake, y_fake, loss_kw, autocast=contextlib.nullcontext):
    """Card 2.7(a): ({name: g_i (L, *shape)} over every trainable D parameter, l_i (L,))."""
    check_no_batch_coupling(D)
    params = {k: v.detach() for k, v in D.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in D.named_buffers()}
    if len(x_real) == 0:                                                 # empty Poisson lot
        return {k: v.new_zeros((0, *v.shape)) for k, v in params.items()}, x_real.new_zeros(0)

    def loss_one(p, b, xr, yr, xf, yf):
        with autocast():
            s, c = functional_call(D, (p, b), (torch.stack([xr, xf]),))  # the pair: (2, ...)
        return pair_loss(s[:1], c[:1], yr[None], s[1:], c[1:], yf[None], **loss_kw)[0]

    return vmap(grad_and_value(loss_one), in_dims=(None, None, 0, 0, 0, 0),   # own dropout masks
                randomness="different")(params, buffers, x_real, y_real, x_fake, y_fake)


def privatize(grads, max_grad_norm, noise_multiplier, expected_lot_size, generator=None):
    """Alg. 1 l.5-6: (sum_i g_i min(1, C / (||g_i|| + 1e-6)) + N(0, sigma^2 C^2 I)) / (qN)."""
    norms = sum(g.flatten(1).pow(2).sum(1) for g in grads.values()).sqrt()   # ONE norm (L,)
    factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0) if max_grad_norm > 0 else \
        torch.ones_like(norms)                                               # C = 0: no clipping
    std, out = noise_multiplier * max_grad_norm if noise_multiplier > 0 else 0.0, {}   # C = inf
    for k, g in grads.items():                          # PAPER-VS-CODE 2: std sigma*C on the SUM
        total = torch.einsum("i,i...->...", factor, g)                       # sum of clipped g_i
        noise = torch.randn(total.shape, generator=generator, device=g.device, dtype=g.dtype)
        out[k] = (total + noise * std) / expected_lot_size      # EXPECTED lot size, not realized
    return out, norms


def dp_sgd_step(D, opt_D, x_real, y_real, x_fake, y_fake, cfg):
    """One D update; sigma = C = 0: autograd of sum_i l_i / qN. -> (sum_i l_i, clipped count)."""
    opt_D.zero_grad(set_to_none=True)
    n, zero = len(x_real), torch.zeros((), device=x_real.device)
    if cfg["sigma"] == 0 and cfg["C"] == 0:
        losses, n_clipped = x_real.new_zeros(0), zero
        if n:
            with cfg["autocast"]():
                s, c = D(torch.cat([x_real, x_fake]))                    # (2L,): reals, fakes
            losses = pair_loss(s[:n], c[:n], y_real, s[n:], c[n:], y_fake, **cfg["loss_kw"])
            (losses.sum() / cfg["expected_lot"]).backward()
    else:
        grads, losses = per_example_grads(D, x_real, y_real, x_fake, y_fake, cfg["loss_kw"],
                                          cfg["autocast"])
        noisy, norms = privatize(grads, cfg["C"], cfg["sigma"], cfg["expected_lot"],
                                 cfg["noise_gen"])
        for k, p in D.named_parameters():
            p.grad = noisy[k] if p.requires_grad else None
        n_clipped = (norms > cfg["C"]).sum() if cfg["C"] > 0 else zero
    opt_D.step()                        # Adam post-processes the noisy gradient (SPRINT_gan #5)
    return losses.detach().sum(), n_clipped


def sample_zc(n, latent, n_classes, device, generator=None):
    z = torch.rand(n, latent, device=device, generator=generator) * 2 - 1   # U(-1, 1) [official]
    return z, torch.randint(0, n_classes, (n,), device=device, generator=generator)   # uniform c


def generator_step(G, D, opt_G, cfg):
    """G step on 2L fresh fakes, D frozen, no accountant event: G never sees a record."""
    D.requires_grad_(False)
    opt_G.zero_grad(set_to_none=True)
    z, c = sample_zc(cfg["n_g"], cfg["latent"], cfg["n_classes"], cfg["device"])
    with cfg["autocast"]():
        s, logits = D(G(z, c))                                  # D in train mode: Keras dropout on
    loss_G = generator_loss(s, logits, c, cfg["loss_kw"]["soft"][0])
    loss_G.backward()
    opt_G.step()
    D.requires_grad_(True)
    return loss_G.detach()


def train_step(G, D, opt_G, opt_D, x_real, y_real, cfg, accountant):
    """Card 2.3 -> float64 (sum_i l_i, clipped, loss_G, lot size, 1) for the log window."""
    with torch.no_grad(), cfg["autocast"]():
        z, c = sample_zc(len(x_real), cfg["latent"], cfg["n_classes"], cfg["device"])
        x_fake = G(z, c).float()                                         # one fake per record
    loss_sum, n_clipped = dp_sgd_step(D, opt_D, x_real, y_real, x_fake, c, cfg)
    accountant.step(cfg["sigma"], cfg["q"])                           # every D update is charged
    loss_G = generator_step(G, D, opt_G, cfg)
    n = torch.tensor([len(x_real), 1.0], dtype=torch.float64, device=loss_G.device)
    return torch.cat([torch.stack([loss_sum.double(), n_clipped.double(), loss_G.double()]), n])


def window_means(window):
    """Log-window sums -> per-pair loss_D and clip_frac, per-step loss_G and lot size."""
    loss_d, clipped, loss_g, pairs, steps = window.tolist()
    return {"loss_D": loss_d / max(pairs, 1), "loss_G": loss_g / steps, "lot": pairs / steps,
            "clip_frac": clipped / max(pairs, 1)}


# ==== Eval ====
def sample_synthetic(G, n, cfg, generator, post):
    """n records with uniform labels; post = the official SPRINT post-processing (int, clip 0)."""
    xs, ys = [], []
    with torch.no_grad():
        for i in range(0, n, 4096):
            z, c = (t.to(cfg["device"]) for t in sample_zc(min(4096, n - i), cfg["latent"],
                                                            cfg["n_classes"], "cpu", generator))
            x = G(z, c).float()
            xs, ys = xs + [x.clamp(min=0).trunc() if post else x], ys + [c]
    return torch.cat(xs), torch.cat(ys)


def fit_classifier(kind, x, y, n_classes, steps, seed, image, what=None):
    """DEVIATION 4: 'lr' L2 logistic regression, 'nn' MLP or CNN (images). -> (predict, model)"""
    mu, sd = (0.0, 1.0) if image else (x.mean(0), x.std(0).clamp_min(1e-6))
    f, c, h, w = x[0].numel(), *x.shape[1:]
    with torch.random.fork_rng(devices=[]):                        # the training RNG is untouched
        torch.manual_seed(seed)
        if kind == "lr":
            model = nn.Sequential(nn.Flatten(), nn.Linear(f, n_classes))
        elif not image:
            model = nn.Sequential(nn.Flatten(), nn.Linear(f, 128), nn.ReLU(),
                                  nn.Linear(128, n_classes))
        else:
            model = nn.Sequential(nn.Conv2d(c, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Flatten(), nn.Linear(64 * (h // 4) * (w // 4), n_classes))
    model, g = model.to(x.device), torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)   # decay = L2 penalty
    progress = common.Progress(what, steps, unit="step") if what else None
    for _ in range(steps):
        idx = torch.randint(0, len(x), (min(256, len(x)),), generator=g).to(x.device)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model((x[idx] - mu) / sd), y[idx]).backward()
        opt.step()
        if progress:
            progress.update()

    @torch.no_grad()
    def predict(x_new):                                            # labels, 4096 records a chunk
        return torch.cat([model((x_new[i:i + 4096] - mu) / sd).argmax(1)
                          for i in range(0, len(x_new), 4096)])
    return predict, model


def accuracy(predict, data):
    return (predict(data[0]) == data[1]).float().mean().item()


def score_epoch(G, g_config, epoch, scores, real_tr, cfg, args, snap_dir, post):
    """Card 2.9 step 1: snapshot G; LR, NN on N synthetic records scored on the REAL train set."""
    common.save_checkpoint(f"{snap_dir}/G_{epoch:04d}.pt", {"G": G.state_dict(),
                                                           "G_config": g_config})
    for kind in ("lr", "nn"):
        seed = derive_seed(args.seed, "transfer", epoch)
        x, y = sample_synthetic(G, len(real_tr[0]), cfg, torch.Generator().manual_seed(seed), post)
        predict = fit_classifier(kind, x, y, cfg["n_classes"], cfg["clf_steps"], seed,
                                 cfg["image"])[0]
        scores[kind].append(accuracy(predict, real_tr))
    return {"transfer_lr": scores["lr"][-1], "transfer_nn": scores["nn"][-1]}


def report_noisy_max(scores, n_picks, scale, generator):
    """Card 2.9 step 2, picks by noisy max; Laplace scale 2 Delta / eps: eps-DP [Dwork-Roth 3.3]."""
    remaining, picks = list(range(len(scores))), []
    for _ in range(min(n_picks, len(scores))):
        u = torch.rand(len(remaining), generator=generator, dtype=torch.float64) - 0.5
        noise = -scale * torch.sign(u) * torch.log1p(-2 * u.abs())       # Laplace(0, scale)
        noisy = torch.tensor([scores[i] for i in remaining], dtype=torch.float64) + noise
        picks.append(remaining.pop(int(torch.argmax(noisy))))
    return picks


def select_epochs(scores, n_records, args):
    """Half the picks by LR, half by NN score; scale 2/(N eps_pick) (DEVIATION 5). -> picks, eps"""
    private = args.noise_multiplier > 0
    gen = torch.Generator().manual_seed(derive_seed(args.seed, "select"))   # a secret stream
    scale = 2 / (n_records * args.select_epsilon) if private else 0.0
    n_lr = (args.select_picks + 1) // 2
    picks = report_noisy_max(scores["lr"], n_lr, scale, gen) + \
        report_noisy_max(scores["nn"], args.select_picks - n_lr, scale, gen)
    return picks, len(picks) * args.select_epsilon if private else 0.0   # basic composition


def evaluate(G, args, cfg, real_tr, real_te, scores, snap_dir, post):
    """Card 2.9 steps 2-4: noisy epoch selection, TSTR beside the real benchmark, structure."""
    picks, eps_select = [], 0.0
    if args.select_picks and scores["lr"]:                          # no selection: the last G
        picks, eps_select = select_epochs(scores, len(real_tr[0]), args)
    xs, ys = [], []
    for i, p in enumerate(picks or [None]):
        G_p = G if p is None else load_generator(f"{snap_dir}/G_{p + 1:04d}.pt", cfg["device"])
        gen = torch.Generator().manual_seed(derive_seed(args.seed, "tstr", i))
        x, y = sample_synthetic(G_p, args.tstr_samples, cfg, gen, post)
        xs, ys = xs + [x], ys + [y]
    x_syn, y_syn, models, out = torch.cat(xs), torch.cat(ys), {}, {}
    for kind in ("lr", "nn"):                                       # TSTR, and the real benchmark
        for src, (x, y) in (("tstr", (x_syn, y_syn)), ("real", real_tr)):
            predict, models[src, kind] = fit_classifier(
                kind, x, y, cfg["n_classes"], args.clf_steps, derive_seed(args.seed, "clf"),
                cfg["image"], what=f"{src}-{kind} classifier")
            out[f"{src}_{kind}"] = accuracy(predict, real_te)          # held-out REAL records
    if not cfg["image"]:                                              # card 2.9 step 4 (tables)
        a, b = (t.flatten(1).double().cpu().numpy() for t in (real_tr[0], x_syn))
        tri = np.tril_indices(a.shape[1], k=-1)                      # 630 pairs for 3 x 12
        with np.errstate(invalid="ignore", divide="ignore"):
            ca, cb = np.corrcoef(a.T)[tri], np.corrcoef(b.T)[tri]
        ok = np.isfinite(ca) & np.isfinite(cb)                       # a constant feature: no corr
        out["corr_spearman"] = float(stats.spearmanr(ca[ok], cb[ok])[0]) if ok.sum() > 2 else None
        w = [models[s, "lr"][1].weight.detach().flatten().cpu().numpy() for s in ("real", "tstr")]
        out["coef_spearman"] = float(stats.spearmanr(*w)[0])
        for r in range(real_tr[0].shape[-2]):                        # per table row: SBP, DBP, meds
            out[f"mean_real_{r}"], out[f"mean_syn_{r}"] = (t[..., r, :].mean().item()
                                                           for t in (real_tr[0], x_syn))
    print(f"selected epochs (report-noisy-max): {[p + 1 for p in picks]} | eval, NOT covered by "
          "(eps, delta): " + " | ".join(f"{k} {v:.4g}" for k, v in out.items() if v is not None),
          flush=True)
    return out, eps_select


def figure(x, y, path, title, info):
    """An 8x8 grid, a class per row; tables: row 0 (SBP) per visit, a panel per class (<= 4)."""
    rgb = common.FAKE_RGB
    if not info["table"]:
        grid = torchvision.utils.make_grid(x.float().cpu(), nrow=8, normalize=True,
                                           value_range=(-1, 1))          # quantised as save_image
        img = grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)          # (3, H, W)
        s = math.ceil(256 / img.shape[2])                                    # nearest upscale
        img, axes = img.repeat_interleave(s, 1).repeat_interleave(s, 2), "pixels [-1, 1]"
    else:
        v, y = x[:, 0, 0].float().cpu().nan_to_num(0.0).clamp(-1e6, 1e6), y.cpu()   # (B, W)
        lo, hi = math.floor(v.min()), math.ceil(v.max())
        t = MONTHS if v.shape[1] == len(MONTHS) else range(v.shape[1])   # x: month or column
        k, pw, ph = min(info["n_classes"], 4), 320, 240
        img, labels = common.canvas(ph, k * pw), []
        for c in range(k):
            def xy(row):                                           # panel c's pixel coordinates
                return [(c * pw + 12 + (pw - 24) * t[j] / max(t[-1], 1),
                         ph - 12 - (ph - 36) * (float(r) - lo) / max(hi - lo, 1e-9))
                        for j, r in enumerate(row)]
            for row in v[y == c]:
                common.draw_polyline(img, xy(row), tuple((3 * 255 + u) // 4 for u in rgb), 1)
            if (y == c).any():
                common.draw_polyline(img, xy(v[y == c].median(0).values), rgb, 3)
            labels.append((c * pw + 12, 4, f"class {c}: {int((y == c).sum())} records"))
        img = common.draw_text(img, labels)
        axes = f"x: {'visit month' if t is MONTHS else 'column'} 0..{t[-1]} | y: row 0 (SBP) " \
            f"in [{lo}, {hi}] | thick: the class median"
    common.save_png(common.title_strip(img, [title, axes], key=[("generated", rgb)]), path)


def export_samples(G, n, cfg, args, post):
    """samples_N.npz, labels cycling: images uint8 NHWC (common.quantize), records (N, H, W)."""
    gen = torch.Generator().manual_seed(derive_seed(args.seed, "export"))
    c, path = torch.arange(n) % cfg["n_classes"], f"{args.out_dir}/samples_{n}.npz"
    with torch.no_grad():
        x = torch.cat([G((torch.rand(len(ci), cfg["latent"], generator=gen) * 2 - 1).to(
            cfg["device"]), ci.to(cfg["device"])).float().cpu() for ci in c.split(4096)])
    if cfg["image"]:
        return np.savez(path, images=common.quantize(x).numpy(), labels=c.numpy())
    np.savez(path, records=(x.clamp(min=0).trunc() if post else x)[:, 0].numpy(), labels=c.numpy())


# ==== Main ====
def setup(args):
    device = common.get_device(args.device)
    random.seed(args.seed)
    np.random.seed(derive_seed(args.seed, "numpy") % 2**32)
    torch.manual_seed(derive_seed(args.seed, "torch"))           # z, dropout masks (not the noise)
    if args.deterministic and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = not args.deterministic
    torch.use_deterministic_algorithms(args.deterministic)
    return device


def step_config(args, info, device):
    """What a train step needs: sigma, C, q, qN, the 2L fakes of the G step, the noise stream."""
    n, q = info["n_train"], args.sample_rate
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16) if \
        args.amp == "bf16" else contextlib.nullcontext
    return {"latent": args.z_dim, "n_classes": info["n_classes"], "device": device,
            "sigma": args.noise_multiplier, "C": args.max_grad_norm, "q": q, "expected_lot": q * n,
            "n_g": max(1, round(2 * q * n)), "clf_steps": args.clf_steps, "autocast": autocast,
            "loss_kw": {"soft": tuple(args.soft_labels), "class_loss": args.class_loss},
            "noise_gen": torch.Generator(device).manual_seed(derive_seed(args.seed, "noise")),
            "image": not info["table"]}


def fixed_grid(args, info, device):
    """The sample figures' z (dedicated generator: the training RNG is untouched), 8 per class."""
    gen = torch.Generator().manual_seed(derive_seed(args.seed, "grid"))
    z = torch.rand(64, args.z_dim, generator=gen) * 2 - 1
    return z.to(device), torch.arange(64, device=device) // 8 % info["n_classes"]


def restore(state, args, G, D, opt_G, opt_D, accountant, cfg):
    """Nets, Adam moments (a new --lr takes effect), privacy ledger, noise stream, RNGs. -> step"""
    for m, k in ((G, "G"), (D, "D"), (opt_G, "opt_G"), (opt_D, "opt_D")):
        m.load_state_dict(state[k])
    for group in opt_G.param_groups + opt_D.param_groups:
        group["lr"] = args.lr
    accountant.history = [list(h) for h in state["accountant"]]
    cfg["noise_gen"].set_state(state["noise_rng"].cpu())
    common.set_rng_state(state["rng"])
    return state["step"]


def main(argv=None):
    common.single_process("dp_gan")
    args = parse_args(argv)
    device = setup(args)
    train, test, info = load_data(args, device)                     # resolves q = L / N
    per_epoch = max(1, round(1 / args.sample_rate))                 # official: N / batch steps
    total = planned_steps(args, per_epoch)                          # --epochs, --target-epsilon
    run = common.Run(args, "dp_gan", total=total, mutable=("epochs", "lr", "spend_more_epsilon"),
                     nonfinite_ok=("eps",))
    G, D, g_config = build_models(args, info, device)
    opt_G, opt_D = (torch.optim.Adam(m.parameters(), lr=args.lr, betas=tuple(args.betas))
                    for m in (G, D))                                # NoisyAdam = privatize + Adam
    cfg, accountant, step = step_config(args, info, device), RDPAccountant(), 0
    real_tr, real_te = (as_tensors(d, device) if args.tstr_samples else None for d in (train, test))
    fixed_z, fixed_c = fixed_grid(args, info, device)
    st = {"scores": {"lr": [], "nn": []}, "window": torch.zeros(5, dtype=torch.float64,
          device=device), "eps_select": 0.0, "finished": False, "eval": {}}
    state = run.load(device)
    if state:
        step = restore(state, args, G, D, opt_G, opt_D, accountant, cfg)
        st = {k: state[k] for k in st}                              # scores, log window, budget
        check_resume_budget(state, args, total, accountant)
        st["finished"] &= total == step                             # a longer run selects again
    run.start(step, device, G=G, D=D)
    announce_privacy(args, total, info["n_train"])
    snap_dir, post = os.path.join(args.out_dir, "generators"), args.dataset == "sprint_synth"
    os.makedirs(os.path.join(args.out_dir, "samples"), exist_ok=True)

    def save():
        run.save(step, {"G": G.state_dict(), "D": D.state_dict(), "opt_G": opt_G.state_dict(),
                        "opt_D": opt_D.state_dict(), "G_config": g_config, "fixed_z": fixed_z,
                        "accountant": accountant.history, "noise_rng": cfg["noise_gen"].get_state(),
                        "rng": common.rng_state(), **st})

    lots = lot_stream(train, info, args, step, device)
    while step < total and not run.stopping:
        x_real, y_real = next(lots)                                  # Alg. 1 l.3: a Poisson lot
        st["window"] += train_step(G, D, opt_G, opt_D, x_real, y_real, cfg, accountant)
        step += 1
        epoch_end, values = step % per_epoch == 0, {}
        if epoch_end and args.tstr_samples and args.select_picks:  # card 2.9 step 1
            values = score_epoch(G, g_config, step // per_epoch, st["scores"], real_tr, cfg,
                                 args, snap_dir, post)
        if epoch_end or step % args.log_every == 0 or step == total:  # card 2.3: eps every epoch
            eps = accountant.get_epsilon(args.delta, args.conversion)[0]
            run.log(step, {"epoch": step / per_epoch, **window_means(st["window"]), "eps": eps,
                           **values})
            st["window"].zero_()
        if args.sample_every and (step % args.sample_every == 0 or step == total):
            with torch.no_grad():
                figure(G(fixed_z, fixed_c), fixed_c, f"{args.out_dir}/samples/{step:07d}.png",
                       f"dp_gan | step {step} | generated from the fixed z", info)
        if step % args.ckpt_every == 0 or step == total or run.stopping:
            save()
    if step == total and not run.stopping and not st["finished"]:
        if args.tstr_samples:                                       # card 2.9 steps 2-4
            st["eval"], spent = evaluate(G, args, cfg, real_tr, real_te, st["scores"], snap_dir,
                                         post)
            st["eps_select"] += spent                               # every selection counts
        st["finished"] = True
        save()
    write_privacy_report(accountant, args, st)
    if args.export_samples and not run.stopping:
        export_samples(G, args.export_samples, cfg, args, post)
    return {**run.finish(step, device), **st["eval"], "eps_select": st["eps_select"]}


if __name__ == "__main__":
    common.cli(main)
