"""WGAN-GP: Improved Training of Wasserstein GANs.
Gulrajani, Ahmed, Arjovsky, Dumoulin, Courville. NeurIPS 2017. arXiv:1704.00028 (v3)
Official code: igul222/improved_wgan_training (gan_toy, gan_cifar, gan_cifar_resnet, gan_64x64.py,
  gan_language.py, language_helpers.py)

Paper -> code
  Eq. (2)    WGAN value E[D(x)] - E[D(G(z))] .................... critic_loss(), generator_loss()
  Eq. (3)    critic loss with the gradient penalty ............. critic_loss(), gradient_penalty()
  App. C     one-sided penalty max(0, ||g|| - 1)^2 ............. gradient_penalty(one_sided=True)
  Alg. 1     n_critic critic steps, then one G step ............ train_step()
  Sec. 3     toy data: 8 Gaussians, 25 Gaussians, Swiss roll ... toy_batch(), ToyGrid25
  Sec. 3     toy MLP G and critic, critic surface (Fig. 1) ..... ToyMLP, draw_toy()
  Sec. 5.3   DCGAN-like CIFAR-10 nets (Fig. 3, gan_cifar.py) ... DCGANGenerator, DCGANCritic
  App. F     CIFAR-10 ResNet (Tab. 3) .......................... ResNetGenerator, ResNetCritic32
  Tab. 3     supervised (AC) variant: cond. BN in G, AC head ... ConditionalBatchNorm2d
  App. E     64x64 ResNet ("Good" nets), layer-norm critic ..... ResNetCritic64, LayerNormCHW
  Sec. 3/5.3 baselines: weight clipping (WGAN), standard GAN ... --mode wgan, --mode dcgan
  Sec. 5.5   character-level language model (gan_language.py):
             32-char lines, vocabulary, padding, one-hot ...... read_lines(), TextData
             1-D ResNet G (softmax per position), critic ...... LangGenerator, LangCritic
             JS of n-gram distributions, n = 1..4 .............. ngram_counts(), js_divergence()
  Tab. 3     Inception Score (and FID) during training ......... evaluate() via fid.py
  Sec. 5.5   text: js1..js4 logged, samples/<step>.txt ......... evaluate(), save_samples()
Deviations (each also tagged in the code; grep DEVIATION|PAPER-VS-CODE)
  1. PAPER-VS-CODE  ResNet lr 2e-4 decayed linearly to 0 (official) vs 1e-4 (Alg. 1): the code's.
  2. PAPER-VS-CODE  ResNet G batch 2x the critic batch (official) vs 64 (App. F): --g-batch-size.
  3. PAPER-VS-CODE  ResNet nearest upsampling at the first conv (code) vs the second (App. F).
  4. PAPER-VS-CODE  toys: lambda 0.1 in gan_toy.py vs 10 in the paper: default 10, --lam 0.1.
  5. PAPER-VS-CODE  64x64: Adam beta1 0 in gan_64x64.py vs 0.5 in App. E: default App. E.
  6. PAPER-VS-CODE  ResNet reals 2(pixel/256 - 1/2) + U(0, 1/128) (official), not 2 pixel/255 - 1.
  7. PAPER-VS-CODE  BN in G uses batch statistics, also when sampling (official; paper silent):
     no running averages; grids, IS/FID, exports run G on batches of 100 (official IS code).
  8. DEVIATION  Alg. 1 order (critic steps, then G) vs the official loop (G step first, skipped at
     iteration 0): the same sequence shifted by half an iteration.
  9. DEVIATION  LSUN bedrooms (App. E) from an exported image folder (no lmdb); the official 64x64
     script used downsampled ImageNet.
 10. DEVIATION  Text (Sec. 5.5): the same 640 z (own RNG) at every JS evaluation (official: fresh
     noise); the Billion Word shards present (official: all 99); bytes as latin-1 characters (the
     official Python 2 str). UNSPECIFIED: the untuned --mode dcgan text baseline takes the image
     baseline's Adam(2e-4, 0.5, 0.999) and 1 D step (the paper names no text baseline settings).
 11. DEVIATION  The official ResNet runs G on two halves of each batch (its 2-GPU split, also on
     1 GPU): its BN sees 32 (critic step) and 64 (G step) samples; we use one batch.
 12. DEVIATION  --mode wgan: torch RMSprop with TF1's constants (decay 0.9, eps 1e-10, mean square
     started at 1), but eps outside the square root (TF: inside); moot above ~1e-10.
 13. DEVIATION  Under torchrun (--batch-size, --g-batch-size global) BN in G (and in the baselines'
     critic) normalises each process's share, as dev. 11's split, unless --sync-bn (CUDA).
Datasets: 8gaussians, 25gaussians, swissroll (made here); images: a common.load_dataset name, e.g.
  cifar10 (the paper's), folder:<dir> (LSUN bedrooms exported as images), lsun-<category>, shapes;
  text (Sec. 5.5, --arch lang): billion-word (the released r13output layout under --data-root),
  text:<file> (one example a line), shapes-text (common.py's shapes captions, offline).
Run
  python wgan_gp.py --dataset cifar10                             # Tab. 3 unsupervised, 1 GPU
  python wgan_gp.py --dataset cifar10 --conditional               # Tab. 3 supervised (AC-WGAN-GP)
  python wgan_gp.py --dataset cifar10 --arch dcgan                # Fig. 3 (Adam curve)
  python wgan_gp.py --dataset cifar10 --arch dcgan --mode wgan    # Fig. 3 weight clipping
  python wgan_gp.py --dataset folder:/data/lsun_bedroom --arch resnet64   # App. E / Fig. 2
  python wgan_gp.py --dataset 8gaussians --device cpu --steps 2000 --lam 0.1 --dim-g 128 \\
      --dim-d 128                                        # Fig. 1 in about a minute on 2 CPU cores
  python wgan_gp.py --dataset swissroll --device cpu --fixed-generator --mode wgan  # Fig. 1a
  python wgan_gp.py --dataset cifar10 --fid-every 1000    # + IS and FID of 50K samples (official)
  python wgan_gp.py --dataset cifar10 --resume --export-samples 50000   # -> samples_50000.npz
  torchrun --nproc_per_node 2 wgan_gp.py --dataset cifar10   # 2 GPUs, --batch-size = global batch
  python wgan_gp.py --dataset billion-word --data-root /data/lm1b  # Sec. 5.5: js1..js4, samples/
  python wgan_gp.py --dataset billion-word --mode dcgan   # the standard GAN on the same nets
  for lr in 5e-5 1e-4 2e-4 4e-4; do python wgan_gp.py --dataset billion-word --mode dcgan \\
      --n-critic 10 --betas 0.5 0.9 --lr $lr; done   # tuned GAN (README): keep the best js4
  python wgan_gp.py --dataset shapes-text --device cpu --dim-g 64 --steps 1000  # offline, CPU
Sampling: G = wgan_gp.load_generator("runs/wgan_gp-cifar10-s0/ckpt.pt", "cuda")
  x = G(torch.randn(100, G.z_dim, device="cuda"))   # (100, 3, 32, 32) in [-1, 1]; AC: G(z, y)
  text: p = G(z) is (100, 32, V), rows on the simplex; "".join(G.vocab[i] for i in p[0].argmax(1))
Paper reports: Inception score 7.86 +- .07 unsupervised, 8.42 +- .10 supervised, CIFAR-10 (Tab. 3).
Our numbers: README.
"""

import argparse
import collections
import glob
import math
import os
import random

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import common

TOYS = ("8gaussians", "25gaussians", "swissroll")
TEXTS = ("billion-word", "text:<file>", "shapes-text")     # Sec. 5.5, --arch lang
BW_DIR = "training-monolingual.tokenized.shuffled"         # the released Billion Word layout
PAD, UNK = "`", "unk"                                      # [official language_helpers.py]


def is_text(name):
    return name in ("billion-word", "shapes-text") or name.startswith("text:")

# ==== Args ====
# Derived defaults: an unset flag takes its --arch row, then its --mode row; printed at start-up,
# saved in args.json, each rule in --help. n_critic 5 [Alg. 1]; lang: CRITIC_ITERS 10 ("5 should
# work") [gan_language.py]. UNSPECIFIED (dev. 10): text --mode dcgan takes the image baseline's row
KEYS = ("lr", "betas", "lr_decay", "steps", "batch_size", "z_dim", "dim_g", "img_size",
        "dequantize", "n_critic")
CONFIGS = {  # lr   betas       decay  steps    batch z_dim dim_g size  deq.  n_critic
    "mlp":      (1e-4, [0.5, 0.9], False, 100_000, 256,  2,  512, None, False, 5),   # gan_toy.py
    "resnet":   (2e-4, [0.0, 0.9], True,  100_000, 64,  128, 128, 32,   True,  5),   # App. F
    "dcgan":    (1e-4, [0.5, 0.9], False, 200_000, 64,  128, 128, 32,   False, 5),   # Sec. 5.3
    "resnet64": (1e-4, [0.5, 0.9], False, 200_000, 64,  128, 64,  64,   False, 5),   # App. E
    "dcgan64":  (1e-4, [0.5, 0.9], False, 200_000, 64,  128, 64,  64,   False, 5),   # App. E
    "lang":     (1e-4, [0.5, 0.9], False, 200_000, 64,  128, 512, None, False, 10),  # gan_language
}
MODES = {"wgan-gp": {},                                                # the rows above
         "wgan": dict(n_critic=5, lr=5e-5),                            # RMSProp [Sec. 3; WGAN]
         "dcgan": dict(n_critic=1, lr=2e-4, betas=[0.5, 0.999])}       # see below
# UNSPECIFIED: no DCGAN optimiser in the paper; gan_cifar.py: Adam(2e-4, 0.5, TF's 0.999), 1 D step


def rule(key):
    """The derived default of `key` for --help: its value per --arch, then per --mode."""
    fmt = lambda v: f"{v:g}" if isinstance(v, float) else str(v)
    by_value = {}
    for arch, row in CONFIGS.items():
        if key in KEYS and row[KEYS.index(key)] is not None:
            by_value.setdefault(fmt(row[KEYS.index(key)]), []).append(arch)
    parts = [f"{v} ({'/'.join(a)})" for v, a in by_value.items()]
    parts += [f"{fmt(m[key])} in --mode {name}" for name, m in MODES.items() if key in m]
    return "default: " + ", ".join(parts)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                formatter_class=common.HelpFormatter)
    pos, nonneg, nonneg_f = common.positive_int, common.nonnegative_int, common.nonnegative_float
    g = p.add_argument_group("paper").add_argument
    g("--dataset", default="cifar10", help=f"{', '.join(TOYS)}, a common.load_dataset name "
      f"(cifar10, folder:<dir>, shapes, ...), or text: {', '.join(TEXTS)} [Sec. 3, 5, 5.5]")
    g("--arch", choices=list(CONFIGS), help="default: mlp (toys), lang (text), resnet [Sec. 3, 5]")
    g("--mode", default="wgan-gp", choices=list(MODES), help="wgan-gp or a baseline [Sec. 3, 5.3]")
    g("--lam", type=nonneg_f, default=10.0, help="penalty weight lambda; 0.1 in the official toy "
      "script (PAPER-VS-CODE) [Alg. 1, Eq. 3]")
    g("--one-sided", action="store_true", help="penalty max(0, ||g||-1)^2 [App. C]")
    g("--n-critic", "--d-steps", dest="n_critic", type=pos,
      help=f"critic steps per G step; {rule('n_critic')} [Alg. 1; official gan_cifar.py]")
    g("--lr", type=common.positive_float, help=f"step size; {rule('lr')} [official "
      "gan_cifar_resnet.py (Alg. 1: 1e-4, PAPER-VS-CODE), Alg. 1, Sec. 5.3]")
    g("--betas", type=common.unit_float, nargs=2, help=f"Adam; {rule('betas')} [Alg. 1, App. E]")
    g("--lr-decay", action=argparse.BooleanOptionalAction,
      help=f"lr linearly to 0 over --steps; {rule('lr_decay')} [official gan_cifar_resnet.py]")
    g("--steps", type=pos, help=f"generator iterations; {rule('steps')} [App. E, F]")
    g("--batch-size", type=pos,
      help=f"critic batch, real and fake each; {rule('batch_size')} [App. F, official gan_toy.py]")
    g("--g-batch-size", type=pos, help="generator batch; default: 2x --batch-size for resnet, 1x "
      "otherwise [official GEN_BS_MULTIPLE: PAPER-VS-CODE]")
    g("--z-dim", type=pos, help=f"noise size; {rule('z_dim')} [App. F, gan_toy.py]")
    g("--dim-g", "--g-width", dest="dim_g", type=pos, help=f"DIM_G; {rule('dim_g')} [App. E, F]")
    g("--dim-d", "--d-width", dest="dim_d", type=pos, help="DIM_D; default: --dim-g [App. E, F]")
    g("--img-size", type=pos, help=f"{rule('img_size')} [App. E, F]")
    g("--conditional", action="store_true", help="AC-WGAN-GP: conditional BN in G, auxiliary "
      "classifier in D; the official script's default (off for 7.86: issue #58) [Tab. 3]")
    g("--ac-weight-d", type=nonneg_f, default=1.0, help="D CE weight, reals [official ACGAN_SCALE]")
    g("--ac-weight-g", type=nonneg_f, default=0.1, help="G CE weight [official ACGAN_SCALE_G]")
    g("--clip", type=common.positive_float, default=0.01, help="--mode wgan: bound c [Sec. 3]")
    g("--fixed-generator", action="store_true", help="fake = real + N(0, I), D only [Fig. 1a]")
    g("--dequantize", action=argparse.BooleanOptionalAction, help="reals 2(pixel/256 - 1/2) + "
      f"U(0, 1/128); {rule('dequantize')} [official gan_cifar_resnet.py]")
    g("--seq-len", type=pos, default=32, help="characters per example, longer lines cut, shorter "
      "padded with '`' [Sec. 5.5; official SEQ_LEN, language_helpers]")
    g("--max-examples", type=pos, default=10_000_000, help="lines read [official MAX_N_EXAMPLES]")
    g("--max-vocab", type=pos, default=2048, help="vocabulary: 'unk' + the most common characters "
      "(padding included) [official language_helpers.py]")
    g("--js-samples", type=pos, default=640, help="generated strings per JS evaluation (every "
      "--log-every) [official gan_language.py: 10 x BATCH_SIZE]")
    e = p.add_argument_group("eval").add_argument
    e("--fid-every", type=nonneg, default=0, help="Inception Score and FID (fid.py) every K G "
      "iterations, 0 = off [official INCEPTION_FREQUENCY 1000]")
    e("--fid-samples", type=pos, default=50_000, help="images per IS/FID [gan_cifar_resnet.py]")
    e("--fid-weights", type=str, help="Inception weight file for fid.py [run]")
    e("--fid-ref-split", default="train", choices=["train", "test"], help="FID reference [run]")
    e("--fid-ref-size", type=pos, help="reference images; default: the split [run]")
    e("--export-samples", type=nonneg, default=0, help="N to samples_N.npz, 0 = off [run]")
    r = p.add_argument_group("run").add_argument
    r("--data-root", type=str, default="data", help="dataset folder [run]")
    r("--out-dir", type=str, help="default: runs/wgan_gp-<dataset>-s<seed>[-<hash of the other "
      "non-default flags>] [run]")
    r("--seed", type=nonneg, default=0, help="seeds python, numpy, torch [run]")
    r("--device", default="cuda", help="cuda or cpu; no silent fallback [run]")
    r("--num-workers", type=nonneg, default=4, help="DataLoader workers [run]")
    r("--log-every", type=pos, default=100, help="G iterations per log line [run]")
    r("--sample-every", type=nonneg, default=1000, help="G its per grid, 0 = off [run]")
    r("--ckpt-every", type=pos, default=5000, help="G iterations per checkpoint [run]")
    r("--resume", action="store_true", help="continue out_dir/ckpt.pt [run]")
    r("--deterministic", action="store_true",
      help="deterministic kernels; CUDA: CUBLAS_WORKSPACE_CONFIG=:4096:8 [run]")
    r("--amp", default="off", choices=["off", "bf16"], help="autocast forwards [run]")
    r("--sync-bn", action="store_true", help="under torchrun (CUDA): SyncBatchNorm in G and the "
      "baselines' BN critic [run; DEVIATION: per-GPU BN, as the official 2-GPU split]")
    args = p.parse_args(argv)
    if args.out_dir is None:
        args.out_dir = common.default_out_dir("wgan_gp", args, vars(p.parse_args([])))

    toy = args.dataset in TOYS
    if args.arch is None:
        args.arch = "mlp" if toy else "lang" if is_text(args.dataset) else "resnet"
    for key, value in {**dict(zip(KEYS, CONFIGS[args.arch])), **MODES[args.mode]}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.g_batch_size is None:                      # PAPER-VS-CODE (dev. 2) [official]
        args.g_batch_size = (2 if args.arch == "resnet" else 1) * args.batch_size
    if args.dim_d is None:
        args.dim_d = args.dim_g

    size = CONFIGS[args.arch][KEYS.index("img_size")]
    if is_text(args.dataset) != (args.arch == "lang") or toy != (args.arch == "mlp"):
        raise common.UserError(f"--arch {args.arch} does not fit --dataset {args.dataset}: the "
                               f"toys use mlp, text ({', '.join(TEXTS)}) lang, images the CNNs")
    if args.img_size != size:
        raise common.UserError(f"--arch {args.arch} generates {size}x{size} images, not --img-size"
                               f" {args.img_size}" if size else "--img-size is for image datasets")
    if max(args.betas) >= 1:
        raise common.UserError(f"--betas {args.betas}: each must be in [0, 1)")
    if args.fixed_generator and not toy:
        raise common.UserError("--fixed-generator is the toy experiment of Fig. 1a")
    if args.conditional and (args.arch != "resnet" or args.mode != "wgan-gp"):
        raise common.UserError("--conditional is the AC-WGAN-GP ResNet (Tab. 3): --arch resnet")
    if args.arch in ("mlp", "lang") and (args.fid_every or args.export_samples):
        raise common.UserError("--fid-every / --export-samples are for images; toys log modes, hq;"
                               " text logs js1..js4 and writes samples/<step>.txt")
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
    """25 Gaussians: 100,000 points made once, shuffled once, served in order [gan_toy.py]."""

    def __init__(self, seed, device):
        g = torch.Generator().manual_seed(seed)
        c, _ = toy_centres("25gaussians")
        pts = c.repeat(4000, 1) * 2.828 + 0.05 * torch.randn(100_000, 2, generator=g)
        self.data = (pts[torch.randperm(100_000, generator=g)] / 2.828).to(device)

    def batch(self, k, b):                                       # k-th batch of the endless stream
        n = self.data.size(0) // b
        return self.data[(k % n) * b:(k % n + 1) * b]


def toy_batch(name, b, device, gen=None):
    """8-Gaussians / Swiss-roll batch, training RNG or `gen` on the CPU [Sec. 3; gan_toy.py]."""
    dev, kw = (device, {}) if gen is None else ("cpu", {"generator": gen})
    if name == "8gaussians":
        c, _ = toy_centres(name)
        idx = torch.randint(0, 8, (b,), device=dev, **kw)
        x = (c.to(dev)[idx] * 1.414 + 0.02 * torch.randn(b, 2, device=dev, **kw)) / 1.414
    else:
        t = 1.5 * math.pi * (1 + 2 * torch.rand(b, device=dev, **kw))   # sklearn make_swiss_roll
        x = torch.stack([t * torch.cos(t), t * torch.sin(t)], 1)       # its coordinates 0 and 2
        x = (x + 0.25 * torch.randn(b, 2, device=dev, **kw)) / 7.5
    return x.to(device)


def dequantize(x, noise):
    """PAPER-VS-CODE (dev. 6): 2(pixel/256 - 1/2) + noise/128, x = pixel/127.5 - 1 [official]."""
    pixel = torch.round((x + 1) * 127.5)
    return 2 * (pixel / 256 - 0.5) + noise / 128


def read_lines(args):
    """At most --max-examples lines of a text --dataset, bytes as latin-1 characters (dev. 10);
    Billion Word: its training shards in order [official language_helpers.py load_dataset]."""
    n = args.max_examples
    if args.dataset == "shapes-text":    # a caption depends on the item's RNG only, not its size
        ds = common.ShapesDataset(min(n, 50_000), img_size=4, seed=0)
        return [ds.caption(ds.sample(i)[1]) for i in range(len(ds))]
    if args.dataset == "billion-word":    # DEVIATION (dev. 10): the shards present, in order
        roots = [os.path.join(args.data_root, BW_DIR), os.path.join(
            args.data_root, "1-billion-word-language-modeling-benchmark-r13output", BW_DIR)]
        paths = next((sorted(glob.glob(os.path.join(r, "news.en-*-of-00100"))) for r in roots
                      if glob.glob(os.path.join(r, "news.en-*-of-00100"))), [])
        if not paths:
            raise common.UserError(f"Billion Word not found: no {roots[0]}/news.en-*-of-00100. "
                                   "Extract 1-billion-word-language-modeling-benchmark-r13output"
                                   ".tar.gz (http://www.statmt.org/lm-benchmark/) into --data-root")
    else:
        paths = [args.dataset[len("text:"):]]
        if not os.path.isfile(paths[0]):
            raise common.UserError(f"--dataset {args.dataset}: no such file {paths[0]!r} (text:"
                                   "<path> reads any plain text file, one example a line)")
    lines = []
    for path in paths:
        with open(path, encoding="latin-1", newline="\n") as f:
            for line in f:
                lines.append(line[:-1] if line.endswith("\n") else line)  # official line[:-1]
                if len(lines) == n:
                    return lines
    if not lines:
        raise common.UserError(f"--dataset {args.dataset}: {paths[0]!r} holds no lines")
    return lines


class TextData:
    """Lines cut/padded to --seq-len, shuffled once, vocabulary 'unk' + the most common characters
    [official language_helpers.py load_dataset]; n-gram counts, n = 1..4 [true_char_ngram_lms]."""

    def __init__(self, args):
        seq_len, lines = args.seq_len, read_lines(args)
        toks = [tuple(s[:seq_len]) + (PAD,) * (seq_len - len(s[:seq_len])) for s in lines]
        perm = np.random.default_rng(args.seed).permutation(len(toks))  # official np.random.shuffle
        toks = [toks[i] for i in perm]
        counts = collections.Counter(c for t in toks for c in t)
        self.vocab = [UNK] + [c for c, _ in counts.most_common(args.max_vocab - 1) if c != UNK]
        index = {c: i for i, c in enumerate(self.vocab)}
        self.codes = torch.tensor([[index.get(c, 0) for c in t] for t in toks], dtype=torch.int64)
        self.lines = [tuple(self.vocab[i] for i in row) for row in self.codes.tolist()]  # unk
        if len(self.lines) < args.batch_size:
            raise common.UserError(f"--dataset {args.dataset} has {len(self.lines)} lines, fewer "
                                   f"than one batch of {args.batch_size}")
        self.true = [ngram_counts(self.lines, n) for n in range(1, 5)]


def load_data(args, device):
    """(data, channels, classes): toy source, text (channels = vocabulary), or images in [-1, 1]."""
    if args.arch == "lang":
        data = TextData(args)
        return data, len(data.vocab), 1
    if args.dataset in TOYS:
        return (ToyGrid25(args.seed, device) if args.dataset == "25gaussians" else None), 2, 1
    # DEVIATION (dev. 9): LSUN (App. E) comes as an exported image folder (lsun-<cat> or folder:)
    ds = common.load_dataset(args.dataset, args.data_root, args.img_size)
    n_classes = len(ds.classes) if hasattr(ds, "classes") else getattr(ds, "num_classes", 1)
    if args.conditional and n_classes < 2:
        raise common.UserError(f"--conditional needs class labels; {args.dataset} has none")
    return ds, ds[0][0].shape[0], n_classes


def real_stream(args, data, start, dist):
    """Endless (x, y) real batches from batch `start`, one per critic step [Alg. 1 l.3]; each
    process gets its rows of the global batch."""
    device, share = dist.device, dict(rank=dist.rank, world_size=dist.world_size)
    if args.arch == "lang":         # one-hot (B, seq_len, V) reals [official gan_language.py]
        codes = torch.utils.data.TensorDataset(data.codes, torch.zeros(len(data.codes)))
        for x, _ in common.infinite_batches(codes, args.batch_size, args.seed, start, 0,
                                            on_device=False, **share):
            x = x.to(device, non_blocking=True)[..., None]            # scatter: no host sync
            one_hot = torch.zeros(*x.shape[:2], len(data.vocab), device=device)
            yield one_hot.scatter_(2, x, 1.0), None
    if args.dataset in TOYS:                  # 8gaussians, swissroll: the checkpointed torch RNG
        k = start
        while True:
            yield dist.shard(data.batch(k, args.batch_size) if args.dataset == "25gaussians"
                             else toy_batch(args.dataset, args.batch_size, device)), None
            k += 1
    for x, y in common.infinite_batches(data, args.batch_size, args.seed, start, args.num_workers,
                                        device=device, **share):
        x = x.to(device, non_blocking=True)
        if args.dequantize:                   # the global batch's U(0, 1), this process's rows
            x = dequantize(x, dist.shard(torch.rand(args.batch_size, *x.shape[1:], device=device)))
        yield x, y.to(device, non_blocking=True)


# ==== Models ====
def uniform_(m, std):
    """tflib's init: U(-std sqrt 3, std sqrt 3), of standard deviation std; zero bias."""
    nn.init.uniform_(m.weight, -std * math.sqrt(3), std * math.sqrt(3))
    if m.bias is not None:
        nn.init.zeros_(m.bias)
    return m


def tflib_init(m, he=True, stride=1):
    """U of std sqrt((4 he, 2 glorot) / (fan_in + fan_out)), strided fan / stride^2 [tflib/ops]."""
    w, up = m.weight, isinstance(m, nn.ConvTranspose2d)
    k2 = w[0, 0].numel()                                          # k * k (1 for Linear)
    fan_in = (w.size(0) if up else w.size(1)) * k2 / (stride ** 2 if up else 1)
    fan_out = (w.size(1) if up else w.size(0)) * k2 / (1 if up else stride ** 2)
    return uniform_(m, math.sqrt((4.0 if he else 2.0) / (fan_in + fan_out)))


def conv(cin, cout, k, he=True, bias=True):
    return tflib_init(nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias), he)


def bn(c, affine=True):
    """Batch statistics only, in training and sampling alike (dev. 7) [official tflib batchnorm]."""
    return nn.BatchNorm2d(c, affine=affine, track_running_stats=False)


class ToyMLP(nn.Sequential):
    """Toy G (R^2 -> R^2) or critic (R^2 -> R): Linear(dim)-ReLU x 3 -> Linear [Sec. 3; gan_toy]."""

    def __init__(self, d_in, d_out, dim=512):
        layers = [nn.Linear(d_in, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(),
                  nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, d_out)]
        for m in layers[:-1:2]:
            uniform_(m, math.sqrt(2 / m.in_features))              # He: std sqrt(2 / fan_in)
        uniform_(layers[-1], math.sqrt(2 / (dim + d_out)))         # Glorot
        super().__init__(*layers)
        self.z_dim, self.critic = d_in, d_out == 1

    def forward(self, x, y=None):
        out = super().forward(x)                                        # (B, 2) or (B, 1)
        return (out.squeeze(1), None) if self.critic else out           # critic: no AC logits


class ConditionalBatchNorm2d(nn.Module):
    """Batch statistics, then per-class scale and shift (init 1 and 0) [official cond_batchnorm]."""

    def __init__(self, c, n_classes):
        super().__init__()
        self.bn = bn(c, affine=False)
        self.gamma, self.beta = nn.Embedding(n_classes, c), nn.Embedding(n_classes, c)
        nn.init.ones_(self.gamma.weight)
        nn.init.zeros_(self.beta.weight)

    def forward(self, x, y):
        return self.bn(x) * self.gamma(y)[:, :, None, None] + self.beta(y)[:, :, None, None]


class LayerNormCHW(nn.Module):
    """tflib layer norm: statistics over (C, H, W) jointly, per-channel scale/shift [official]."""

    def __init__(self, c, eps=1e-5):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.eps = eps

    def forward(self, x):
        mu, var = x.mean((1, 2, 3), keepdim=True), x.var((1, 2, 3), unbiased=False, keepdim=True)
        y = (x - mu) / torch.sqrt(var + self.eps)
        return y * self.weight[:, None, None] + self.bias[:, None, None]


class GBlock(nn.Module):
    """Pre-activation up block: Norm-ReLU-up-conv3x3-Norm-ReLU-conv3x3, shortcut up-conv1x1
    [App. F; PAPER-VS-CODE (dev. 3): upsampling at the first conv as in gan_cifar_resnet.py]."""

    def __init__(self, cin, cout, n_classes=0, conv1_bias=True):
        super().__init__()
        self.cond = n_classes > 0
        self.n1 = ConditionalBatchNorm2d(cin, n_classes) if self.cond else bn(cin)
        self.n2 = ConditionalBatchNorm2d(cout, n_classes) if self.cond else bn(cout)
        self.c1, self.c2 = conv(cin, cout, 3, bias=conv1_bias), conv(cout, cout, 3)
        self.sc = conv(cin, cout, 1, he=False)

    def forward(self, x, y=None):
        norm = (lambda n, h: n(h, y)) if self.cond else (lambda n, h: n(h))
        up = lambda t: F.interpolate(t, scale_factor=2, mode="nearest")   # UpsampleConv
        h = self.c1(up(F.relu(norm(self.n1, x))))
        h = self.c2(F.relu(norm(self.n2, h)))
        return self.sc(up(x)) + h


class DBlock(nn.Module):
    """[Norm]-ReLU-conv3x3-[Norm]-ReLU-conv3x3-meanpool, shortcut conv1x1-meanpool [App. F]."""

    def __init__(self, cin, cout, down, layer_norm=False):
        super().__init__()
        mid = cin if down else cout
        self.n1 = LayerNormCHW(cin) if layer_norm else nn.Identity()    # never BN [Sec. 4]
        self.n2 = LayerNormCHW(mid) if layer_norm else nn.Identity()
        self.c1, self.c2 = conv(cin, mid, 3, bias=not layer_norm), conv(mid, cout, 3)
        self.down = down
        self.sc = conv(cin, cout, 1, he=False) if (down or cin != cout) else nn.Identity()

    def forward(self, x):
        pool = (lambda t: F.avg_pool2d(t, 2)) if self.down else (lambda t: t)  # ConvMeanPool
        h = self.c1(F.relu(self.n1(x)))                      # not in-place: x feeds the shortcut
        h = pool(self.c2(F.relu(self.n2(h))))
        return pool(self.sc(x)) + h


class ResNetGenerator(nn.Module):
    """Linear -> c0 x 4 x 4 -> up blocks -> BN-ReLU-conv3x3-tanh [App. F; App. E at 64x64]."""

    def __init__(self, z_dim=128, channels=(128, 128, 128, 128), out_ch=3, n_classes=0):
        super().__init__()
        self.z_dim, self.c0, big = z_dim, channels[0], len(channels) == 5
        self.fc = tflib_init(nn.Linear(z_dim, 16 * channels[0]), he=False)
        self.blocks = nn.ModuleList(GBlock(a, b, n_classes, conv1_bias=not big)  # 64x64: no bias
                                    for a, b in zip(channels, channels[1:]))     # before a norm
        self.bn = bn(channels[-1])                    # the output BN stays unconditional [official]
        self.out = conv(channels[-1], out_ch, 3, he=big)  # UNSPECIFIED: Glorot; He at 64 [official]

    def forward(self, z, y=None):
        h = self.fc(z).view(-1, self.c0, 4, 4)                          # (B, c0, 4, 4)
        for b in self.blocks:
            h = b(h, y)
        return torch.tanh(self.out(F.relu(self.bn(h))))                 # (B, C, H, W) in [-1, 1]


class ResNetCritic32(nn.Module):
    """Optimized block, down block, 2 plain blocks, ReLU, global mean pool, Linear [App. F]."""

    def __init__(self, dim=128, in_ch=3, n_classes=0):
        super().__init__()
        self.b1c1, self.b1c2 = conv(in_ch, dim, 3), conv(dim, dim, 3)   # OptimizedResBlockDisc1
        self.b1sc = conv(in_ch, dim, 1, he=False)
        self.blocks = nn.Sequential(*[DBlock(dim, dim, down) for down in (True, False, False)])
        self.fc = tflib_init(nn.Linear(dim, 1), he=False)
        self.ac = tflib_init(nn.Linear(dim, n_classes), he=False) if n_classes else None

    def forward(self, x):
        h = F.avg_pool2d(self.b1c2(F.relu(self.b1c1(x))), 2)           # ConvMeanPool
        h = h + self.b1sc(F.avg_pool2d(x, 2))                           # MeanPoolConv shortcut
        h = F.relu(self.blocks(h)).mean((2, 3))                         # (B, d) global mean pool
        return self.fc(h).squeeze(1), (self.ac(h) if self.ac is not None else None)


class ResNetCritic64(nn.Module):
    """conv3x3 3->d, down blocks d->2d->4d->8d->8d with layer norm, flatten, Linear [App. E]."""

    def __init__(self, dim=64, in_ch=3):
        super().__init__()
        ch = [dim, 2 * dim, 4 * dim, 8 * dim, 8 * dim]
        self.inp = conv(in_ch, dim, 3, he=False)
        self.blocks = nn.Sequential(*[DBlock(a, b, True, layer_norm=True)
                                      for a, b in zip(ch, ch[1:])])
        self.fc = tflib_init(nn.Linear(16 * ch[-1], 1), he=False)

    def forward(self, x):
        return self.fc(self.blocks(self.inp(x)).flatten(1)).squeeze(1), None  # (B, 8d*4*4) -> (B,)


class DCGANGenerator(nn.Module):
    """Linear -> BN -> ReLU -> (2^(n-1) d) x 4 x 4 -> n deconv 5x5 s2 (BN-ReLU between) -> tanh
    [Sec. 5.3, official gan_cifar.py (n = 3, d = 128); App. E, gan_64x64.py (n = 4, d = 64)]."""

    def __init__(self, z_dim=128, dim=128, n_up=3, out_ch=3):
        super().__init__()
        self.z_dim, self.c0, self.unit_bn = z_dim, dim * 2 ** (n_up - 1), n_up == 3
        self.fc = tflib_init(nn.Linear(z_dim, 16 * self.c0), he=False)  # UNSPECIFIED: tflib init
        # UNSPECIFIED: BN of each of the 16 c0 units (gan_cifar.py) or channels (gan_64x64.py)
        self.bn0 = (nn.BatchNorm1d(16 * self.c0, track_running_stats=False) if self.unit_bn
                    else bn(self.c0))
        layers = []
        for i in range(n_up):
            cin, cout = self.c0 // 2 ** i, (self.c0 // 2 ** (i + 1) if i < n_up - 1 else out_ch)
            layers.append(tflib_init(nn.ConvTranspose2d(cin, cout, 5, stride=2, padding=2,
                                                        output_padding=1), stride=2))  # "same", x2
            layers += [bn(cout), nn.ReLU()] if i < n_up - 1 else [nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z, y=None):
        h = self.fc(z)
        h = (self.bn0(h).view(-1, self.c0, 4, 4) if self.unit_bn       # (B, c0, 4, 4)
             else self.bn0(h.view(-1, self.c0, 4, 4)))
        return self.net(F.relu(h))                                      # (B, C, 4 2^n, 4 2^n)


class DCGANCritic(nn.Module):
    """n conv 5x5 s2 + LeakyReLU(0.2), Linear; norm after conv 2..n: none / LN at 64 / BN in the
    baselines [Sec. 4, 5.3, App. E; official gan_cifar.py, gan_64x64.py]."""

    def __init__(self, dim=128, n_down=3, in_ch=3, norm="none"):
        super().__init__()
        layers, c = [], in_ch
        for i in range(n_down):
            layers.append(tflib_init(nn.Conv2d(c, dim * 2 ** i, 5, stride=2, padding=2), stride=2))
            if i > 0 and norm != "none":
                layers.append(bn(dim * 2 ** i) if norm == "bn" else LayerNormCHW(dim * 2 ** i))
            layers.append(nn.LeakyReLU(0.2))                            # slope 0.2 [official]
            c = dim * 2 ** i
        self.net = nn.Sequential(*layers, nn.Flatten(), tflib_init(nn.Linear(16 * c, 1), he=False))

    def forward(self, x):
        return self.net(x).squeeze(1), None


class LangResBlock(nn.Module):
    """x + 0.3 conv5(ReLU(conv5(ReLU(x)))), 1-D "same" convs, He-uniform [gan_language.py]."""

    def __init__(self, dim):
        super().__init__()
        self.c1 = tflib_init(nn.Conv1d(dim, dim, 5, padding=2))
        self.c2 = tflib_init(nn.Conv1d(dim, dim, 5, padding=2))

    def forward(self, x):
        return x + 0.3 * self.c2(F.relu(self.c1(F.relu(x))))


class LangGenerator(nn.Module):
    """z -> Linear -> 5 res blocks -> conv1x1 -> softmax per position, no sampling [Sec. 5.5]."""

    def __init__(self, z_dim=128, dim=512, seq_len=32, vocab=2048, blocks=5):
        super().__init__()
        self.z_dim, self.dim, self.seq_len = z_dim, dim, seq_len
        self.fc = tflib_init(nn.Linear(z_dim, seq_len * dim), he=False)   # tflib Linear: Glorot
        self.blocks = nn.Sequential(*[LangResBlock(dim) for _ in range(blocks)])
        self.out = tflib_init(nn.Conv1d(dim, vocab, 1))

    def forward(self, z, y=None):
        h = self.blocks(self.fc(z).view(-1, self.dim, self.seq_len))     # (B, dim, seq_len)
        return F.softmax(self.out(h).transpose(1, 2).float(), dim=2)     # (B, seq_len, V)


class LangCritic(nn.Module):
    """(B, seq_len, V) -> conv1x1 -> 5 res blocks -> flatten -> Linear [Sec. 5.5]."""

    def __init__(self, dim=512, seq_len=32, vocab=2048, blocks=5):
        super().__init__()
        self.inp = tflib_init(nn.Conv1d(vocab, dim, 1))
        self.blocks = nn.Sequential(*[LangResBlock(dim) for _ in range(blocks)])
        self.fc = tflib_init(nn.Linear(seq_len * dim, 1), he=False)

    def forward(self, x):
        h = self.blocks(self.inp(x.transpose(1, 2)))                     # (B, dim, seq_len)
        return self.fc(h.flatten(1)).squeeze(1), None


def build_models(args, channels, n_classes):
    a, k = args.arch, (n_classes if args.conditional else 0)
    if a == "lang":                                            # channels = vocabulary size
        return (LangGenerator(args.z_dim, args.dim_g, args.seq_len, channels),
                LangCritic(args.dim_d, args.seq_len, channels))
    if a == "mlp":
        return ToyMLP(args.z_dim, 2, args.dim_g), ToyMLP(2, 1, args.dim_d)
    if a == "resnet":
        return (ResNetGenerator(args.z_dim, (args.dim_g,) * 4, channels, k),
                ResNetCritic32(args.dim_d, channels, k))
    if a == "resnet64":
        d = args.dim_g
        return (ResNetGenerator(args.z_dim, (8 * d, 8 * d, 4 * d, 2 * d, d), channels),
                ResNetCritic64(args.dim_d, channels))
    n = 3 if a == "dcgan" else 4
    norm = "bn" if args.mode != "wgan-gp" else ("ln" if a == "dcgan64" else "none")
    G = DCGANGenerator(args.z_dim, args.dim_g, n, channels)
    D = DCGANCritic(args.dim_d, n, channels, norm)
    if a == "dcgan64":                 # UNSPECIFIED: U with std 0.02 [official set_weights_stdev]
        for m in list(G.modules()) + list(D.modules()):
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                uniform_(m, 0.02)
    return G, D


# ==== Losses ====
def gradient_penalty(critic, x_real, x_fake, one_sided=False, dist=None):
    """E[(||grad D(x_hat)||_2 - 1)^2] of Eq. (3) without lambda, x_hat between paired samples."""
    world = 1 if dist is None else dist.world_size                  # one eps per sample:
    eps = torch.rand(x_real.size(0) * world, *[1] * (x_real.dim() - 1), device=x_real.device)
    eps = eps if dist is None else dist.shard(eps)
    x_hat = (eps * x_real + (1 - eps) * x_fake).requires_grad_(True)                 # Alg. 1 l.6
    out = critic(x_hat)
    out = out[0] if isinstance(out, tuple) else out
    grad, = torch.autograd.grad(out.sum(), x_hat, create_graph=True)   # the penalty trains D
    norm = grad.flatten(1).norm(2, dim=1)                               # (B,): all non-batch dims
    return ((norm - 1).clamp(min=0) ** 2 if one_sided else (norm - 1) ** 2).mean()  # App. C / (3)


def critic_loss(d_real, d_fake, mode):
    """E[D(x~)] - E[D(x)] [Eq. 2, 3]; dcgan: -log D(x) - log(1 - D(x~)) on logits [Eq. 1]."""
    if mode == "dcgan":     # UNSPECIFIED: halved, as the official gan_cifar.py disc_cost /= 2
        return (F.softplus(-d_real).mean() + F.softplus(d_fake).mean()) / 2
    return d_fake.mean() - d_real.mean()


def generator_loss(d_fake, mode):
    """G minimises -E[D(G(z))] [Alg. 1 l.11]; dcgan: non-saturating -log D(G(z)) [gan_cifar.py]."""
    return F.softplus(-d_fake).mean() if mode == "dcgan" else -d_fake.mean()


# ==== Train step ====
def make_optimizers(G, D, args):
    """Adam for WGAN-GP and the standard GAN [Alg. 1]; RMSProp for weight clipping [Sec. 3]."""
    if args.mode != "wgan":
        fused = {"fused": True} if next(G.parameters()).is_cuda else {}   # same math, one kernel
        return [torch.optim.Adam(m.parameters(), lr=args.lr, betas=tuple(args.betas), **fused)
                for m in (G, D)]
    opts = [torch.optim.RMSprop(m.parameters(), lr=args.lr, alpha=0.9, eps=1e-10) for m in (G, D)]
    for opt in opts:      # DEVIATION (dev. 12): TF1's RMSProp starts its mean square at 1, not 0
        for p in opt.param_groups[0]["params"]:
            opt.state[p] = {"step": torch.tensor(0.0), "square_avg": torch.ones_like(p)}
    return opts


def lr_at(step, args):
    """PAPER-VS-CODE (dev. 1): lr (1 - t/T) after t of T G iterations [official DECAY]."""
    return args.lr * (max(0.0, 1.0 - step / args.steps) if args.lr_decay else 1.0)


def train_step(G, D, opt_G, opt_D, real_batches, args, n_classes, amp, dist):
    """Alg. 1: n_critic critic updates, then one G update; DEVIATION (dev. 8): official G first."""
    dev = next(D.parameters()).device
    for _ in range(args.n_critic):                                      # Alg. 1 l.2
        x_real, y_real = next(real_batches)                             # a fresh real batch
        with torch.no_grad(), amp():                                    # G is a constant here
            if args.fixed_generator:                                    # Fig. 1a
                noise = torch.randn(args.batch_size, *x_real.shape[1:], device=dev)
                x_fake = x_real + dist.shard(noise)
            else:
                z = dist.shard(torch.randn(args.batch_size, args.z_dim, device=dev))  # fresh z
                x_fake = G(z, y_real)                                   # AC: the reals' labels
        with amp():
            d_real, logits = D(x_real)
            d_fake, _ = D(x_fake.float())
            w_loss = critic_loss(d_real, d_fake, args.mode)
        gp = (gradient_penalty(D, x_real, x_fake.float(), args.one_sided, dist)
              if args.mode == "wgan-gp" else torch.zeros((), device=dev))
        loss_D = w_loss + args.lam * gp                                 # Eq. (3)
        if logits is not None:                                          # AC on real samples only
            loss_D = loss_D + args.ac_weight_d * F.cross_entropy(logits.float(), y_real)
        opt_D.zero_grad(set_to_none=True)
        loss_D.backward()
        dist.average_gradients(D)                                       # no-op in one process
        opt_D.step()
        if args.mode == "wgan":                                         # weight clipping [Sec. 3]
            with torch.no_grad():
                for p in D.parameters():
                    p.clamp_(-args.clip, args.clip)
    out = {"loss_D": loss_D.detach(), "gp": gp.detach(), "w_dist": -w_loss.detach()}
    if logits is not None:
        out["ac_acc_real"] = (logits.argmax(1) == y_real).float().mean()
    if args.fixed_generator:                                            # Fig. 1a: critic alone
        return out
    y = torch.randint(0, n_classes, (args.g_batch_size,), device=dev) if args.conditional else None
    y = y if y is None else dist.shard(y)                               # this process's rows
    D.requires_grad_(False)                                             # no critic grads in G step
    with amp():
        z = torch.randn(args.g_batch_size, args.z_dim, device=dev)
        d_gen, logits = D(G(dist.shard(z), y))
        loss_G = generator_loss(d_gen.float(), args.mode)
        if logits is not None:
            loss_G = loss_G + args.ac_weight_g * F.cross_entropy(logits.float(), y)
    opt_G.zero_grad(set_to_none=True)
    loss_G.backward()
    dist.average_gradients(G)
    opt_G.step()
    D.requires_grad_(True)
    out["loss_G"] = loss_G.detach()
    return out


# ==== Eval ====
@torch.no_grad()
def mode_coverage(x_fake, dataset):
    """(modes, hq): hq within 3 std of a mode (Swiss roll: 25 pieces), a mode covered by >= 1%.
    UNSPECIFIED: the paper judges Fig. 1 by eye; Metz et al. / VEEGAN's measure."""
    if dataset == "swissroll":
        t = 1.5 * math.pi * (1 + 2 * torch.linspace(0, 1, 2000))
        refs, std = torch.stack([t * torch.cos(t), t * torch.sin(t)], 1) / 7.5, 0.25 / 7.5
        mode = torch.arange(2000) * 25 // 2000
    else:
        refs, std = toy_centres(dataset)
        mode = torch.arange(len(refs))
    dist, idx = torch.cdist(x_fake.float().cpu(), refs).min(1)
    hq = dist <= 3 * std
    counts = torch.bincount(mode[idx[hq]], minlength=int(mode.max()) + 1)
    return int((counts >= 0.01 * len(x_fake)).sum()), hq.float().mean().item()


@torch.no_grad()
def draw_toy(D, x_real, x_fake, path, title_lines, lim=3.0, res=384, levels=8):
    """Fig. 1: the critic's value over [-lim, lim]^2, labelled contours, real and fake points."""
    t = torch.linspace(-lim, lim, res, device=next(D.parameters()).device)
    v = D(torch.stack(torch.meshgrid(t, -t, indexing="xy"), -1).view(-1, 2))[0]  # row 0: y = lim
    v = v.view(res, res).float().cpu()
    lo, gap = v.min().item(), max(v.max().item() - v.min().item(), 1e-12) / levels
    band = ((v - lo) / gap).floor().clamp(max=levels - 1)
    edge = torch.zeros(res, res, dtype=torch.bool)
    edge[:, 1:] |= band[:, 1:] != band[:, :-1]
    edge[1:] |= band[1:] != band[:-1]
    img = (70 + 150 * (v - lo) / (gap * levels)).to(torch.uint8)[..., None].repeat(1, 1, 3)
    img[edge] = torch.tensor([40, 70, 160], dtype=torch.uint8)          # contour lines
    img = img.permute(2, 0, 1).contiguous()                             # (3, H, W)
    for pts, rgb in ((x_fake, common.FAKE_RGB), (x_real, common.REAL_RGB)):  # reals on top
        for px, py in ((pts.float().cpu() + lim) / (2 * lim) * (res - 1)).round().int().tolist():
            common.fill_rect(img, px - 1, res - 2 - py, px + 1, res - py, rgb)
    labels = []
    for k in range(1, levels):                        # each contour's value at its middle pixel
        rows, cols = torch.nonzero(edge & (band == k), as_tuple=True)
        if len(rows):
            i = len(rows) // 2
            labels.append((cols[i].item() + 2, rows[i].item() - 5, f"{lo + k * gap:.3g}"))
    img = common.draw_text(img, labels, rgb=(20, 40, 120))
    lines = title_lines + [f"x, y in [-{lim:g}, {lim:g}] | grey: critic D(x), light = high",
             f"labelled contours of D every {gap:.3g}, from {lo:.3g} to {lo + levels * gap:.3g}"]
    key = [("real", common.REAL_RGB), ("generated", common.FAKE_RGB)]
    common.save_png(common.title_strip(img, lines, key=key), path)


def ngram_counts(lines, n):
    """Counter of the character n-grams of tokenised lines [official NgramLanguageModel]."""
    return collections.Counter(t[i:i + n] for t in lines for i in range(len(t) - n + 1))


def js_divergence(p, q):
    """JS of two count tables in bits, 0.5 (KL(P||M) + KL(Q||M)) / log 2 [official js_with]."""
    tp, tq = sum(p.values()), sum(q.values())
    kl = 0.0
    for a, b, ta, tb in ((p, q, tp, tq), (q, p, tq, tp)):
        for g, c in a.items():
            pa, pb = c / ta, b.get(g, 0) / tb
            kl += pa * (math.log(pa) - math.log((pa + pb) / 2))
    return 0.5 * kl / math.log(2)


@torch.no_grad()
def text_samples(G, args, device, vocab, n):
    """n strings, argmax per position, z from its own RNG [official generate_samples]."""
    gen, out = torch.Generator().manual_seed(args.seed + 3), []   # DEVIATION (dev. 10): same z
    for i in range(0, n, args.batch_size):
        p = sample(G, args.batch_size, args, device, gen)[: n - i]
        out += [tuple(vocab[c] for c in row) for row in p.argmax(2).tolist()]
    return out


@torch.no_grad()
def sample(G, n, args, device, gen, y=None):
    """G(z) for z ~ N(0, I) drawn from `gen` on the CPU, never from the training RNG."""
    return G(torch.randn(n, args.z_dim, generator=gen).to(device), y)


@torch.no_grad()
def save_samples(G, D, args, step, device, data, fixed_z, fixed_y):
    """A 10x10 grid of G(fixed z), one class per column (official), or the toys' Fig. 1 panel."""
    path = os.path.join(args.out_dir, "samples", f"{step:07d}.png")
    if args.arch == "lang":         # the JS evaluation's strings [official samples_{it}.txt]
        text = "".join("".join(t) + "\n" for t in text_samples(G, args, device, data.vocab,
                                                                args.js_samples))
        for f in (path[:-4] + ".txt", os.path.join(args.out_dir, "samples.txt")):
            with open(f, "w", encoding="latin-1") as fh:
                fh.write(text)
        return
    if args.dataset not in TOYS:    # PAPER-VS-CODE (dev. 7): BN with batch statistics (official)
        x = G(fixed_z.to(device), fixed_y)
        torchvision.utils.save_image(x, path, nrow=10, normalize=True, value_range=(-1, 1))
        return
    gen = torch.Generator().manual_seed(args.seed + 4)      # the same points in every figure
    real = (data.data[:512] if args.dataset == "25gaussians"
            else toy_batch(args.dataset, 512, device, gen))
    fake = (real + torch.randn(real.shape, generator=gen).to(device) if args.fixed_generator
            else sample(G, 512, args, device, gen))
    what = "real + N(0, I); the critic trains alone" if args.fixed_generator else "G(z)"
    draw_toy(D, real, fake, path, [f"wgan_gp.py | {args.dataset} | {args.mode} | step {step} | "
                                   f"lambda {args.lam:g}", f"generated = {what}"])


def export_samples(G, args, device, n_classes, path):
    """samples_N.npz, uint8 NHWC, int((x + 1) 255.99 / 2) (gan_cifar.py: 255 / 2), batches of 100
    [official get_inception_score]."""
    gen, out = torch.Generator().manual_seed(args.seed + 2), []
    scale = 255 / 2 if args.arch == "dcgan" else 255.99 / 2
    for i in range(0, args.export_samples, 100):
        y = torch.arange(i, i + 100, device=device) % n_classes if args.conditional else None
        x = sample(G, 100, args, device, gen, y)[: args.export_samples - i].float()
        out.append(((x + 1) * scale).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu())
    np.savez_compressed(path, images=torch.cat(out).numpy())


def build_fid(args, device):
    """fid.TrainingFID at start-up: Inception weights and reference statistics resolved now."""
    try:
        import fid  # evaluation only: a copy of this script without fid.py still trains
    except ImportError:
        raise common.UserError("--fid-every needs fid.py (the project's metric file) next to "
                               "wgan_gp.py") from None
    return fid.TrainingFID(args.dataset, args.data_root, args.img_size, device, args.fid_samples,
                           weights=args.fid_weights, ref_split=args.fid_ref_split,
                           ref_size=args.fid_ref_size)


def evaluate(G, args, device, n_classes, fid_ev, mode_gen, data=None):
    """Toys: modes, hq; images: IS (Tab. 3) and FID; text: js1..js4 [official gan_language.py]."""
    if args.arch == "lang":
        fake = text_samples(G, args, device, data.vocab, args.js_samples)
        return {f"js{n}": js_divergence(ngram_counts(fake, n), data.true[n - 1])
                for n in range(1, 5)}
    if args.dataset in TOYS:
        if args.fixed_generator:
            return {}
        modes, hq = mode_coverage(sample(G, 2500, args, device, mode_gen), args.dataset)
        return {"modes": modes, "hq": hq}
    gen = torch.Generator().manual_seed(args.seed + 3)             # the same z at every eval

    def sample_fn(n):   # n <= 50; G sees batches of 100 as in the official IS code (dev. 7)
        y = torch.randint(0, n_classes, (100,), generator=gen) if args.conditional else None
        return sample(G, 100, args, device, gen, None if y is None else y.to(device))[:n]
    return fid_ev(sample_fn)


def save_reals(args, data, step):
    """Text: print the js floor (every start), write reals.txt; images: reals.png (fresh runs)."""
    if args.arch == "lang":         # the floor of js_n [official gan_language.py validation JSD]
        k = min(640, len(data.lines) // 2)
        held, rest = data.lines[:k], data.lines[k:]
        print(f"js floor ({k} held-out real lines vs the other {len(rest)}): " + " ".join(
            f"js{n} {js_divergence(ngram_counts(held, n), ngram_counts(rest, n)):.4g}"
            for n in range(1, 5)), flush=True)
        if step == 0:
            with open(os.path.join(args.out_dir, "reals.txt"), "w", encoding="latin-1") as f:
                f.write("".join("".join(t) + "\n" for t in data.lines[:640]))
    elif step == 0 and args.dataset not in TOYS:
        reals = torch.stack([data[i][0] for i in range(min(64, len(data)))])
        torchvision.utils.save_image(reals, os.path.join(args.out_dir, "reals.png"), nrow=8,
                                     normalize=True, value_range=(-1, 1))


def load_generator(ckpt_path, device="cpu"):
    """G from a checkpoint alone; BN uses batch statistics (dev. 7): sample in batches of 100."""
    state = common.load_checkpoint(ckpt_path, device)
    G, _ = build_models(argparse.Namespace(**state["args"]), state["channels"], state["n_classes"])
    G.load_state_dict(state["G"])
    G.vocab = state.get("vocab")                      # text: index -> character (None: images)
    return G.to(device).eval()


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
    run = common.Run(args, "wgan_gp", total=args.steps, mutable=("steps", "lr"), dist=dist)
    amp = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")

    data, channels, n_classes = load_data(args, device)
    G, D = (m.to(device) for m in build_models(args, channels, n_classes))
    if args.sync_bn and dist.world_size > 1:        # DEVIATION (dev. 13): else BN per process
        G, D = (nn.SyncBatchNorm.convert_sync_batchnorm(m) for m in (G, D))
    opt_G, opt_D = make_optimizers(G, D, args)
    fid_ev = build_fid(args, device) if args.fid_every else None
    fixed_z = torch.randn(100, args.z_dim, generator=torch.Generator().manual_seed(args.seed))
    fixed_y = torch.arange(100, device=device) % n_classes if args.conditional else None
    mode_gen = torch.Generator().manual_seed(args.seed + 1)        # toy metric: own RNG stream
    step, state = 0, run.load(device)
    if state:
        for obj, key in ((G, "G"), (D, "D"), (opt_G, "opt_G"), (opt_D, "opt_D")):
            obj.load_state_dict(state[key])
        step, fixed_z = state["step"], state["fixed_z"].cpu()
        mode_gen.set_state(state["mode_gen"])
        common.set_rng_state(state["rng"])

    run.start(step, device, G=G, D=D)
    if dist.main:                                   # under torchrun rank 0 alone prints, writes
        os.makedirs(os.path.join(args.out_dir, "samples"), exist_ok=True)
        save_reals(args, data, step)
    real_batches = real_stream(args, data, step * args.n_critic, dist)
    while step < args.steps and not run.stopping:
        for group in opt_G.param_groups + opt_D.param_groups:
            group["lr"] = lr_at(step, args)          # G iterations done; a new --lr takes effect
        out = train_step(G, D, opt_G, opt_D, real_batches, args, n_classes, amp, dist)
        step += 1
        fid_now = args.fid_every > 0 and (step % args.fid_every == 0 or step == args.steps)
        if fid_now:
            dist.broadcast_buffers(G)               # one G scored on every rank (sngan's rule)
        if step % args.log_every == 0 or step == args.steps or fid_now:
            evals = evaluate(G, args, device, n_classes, fid_ev, mode_gen, data) if (
                fid_now or args.dataset in TOYS or args.arch == "lang") else {}
            run.log(step, {**out, "lr": lr_at(step, args), **evals})
        if dist.main and args.sample_every and (step % args.sample_every == 0
                                                or step == args.steps):
            save_samples(G, D, args, step, device, data, fixed_z, fixed_y)
        if step % args.ckpt_every == 0 or step == args.steps or run.stopping:
            dist.broadcast_buffers(G)               # rank 0's buffers on every rank (none: dev. 7)
            run.save(step, {"G": G.state_dict(), "D": D.state_dict(), "opt_G": opt_G.state_dict(),
                            "opt_D": opt_D.state_dict(), "fixed_z": fixed_z,
                            "mode_gen": mode_gen.get_state(), "rng": common.rng_state(),
                            "channels": channels, "n_classes": n_classes,
                            **({"vocab": data.vocab} if args.arch == "lang" else {})})
    if not run.stopping and dist.main and args.export_samples:   # stopping: on every rank
        path = os.path.join(args.out_dir, f"samples_{args.export_samples}.npz")
        export_samples(G, args, device, n_classes, path)
    return run.finish(step, device)


if __name__ == "__main__":
    common.cli(main)
