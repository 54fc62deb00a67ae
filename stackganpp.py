"""StackGAN++: Realistic Image Synthesis with Stacked Generative Adversarial Networks.
Zhang, Xu, Li, Zhang, Wang, Huang, Metaxas. IEEE TPAMI 41(8), 2019. arXiv:1710.10916
Official code: hanzhanggit/StackGAN-v2 (code/model.py, code/trainer.py, code/datasets.py)

Paper -> code (StackGAN-v2; section numbers of the arXiv version, equation numbers not cited)
  Sec. 3.1  conditioning augmentation c = mu + sigma * eps ......... ConditioningAugmentation
  Sec. 3.1  KL(N(mu, sigma^2) || N(0, I)), element mean x 2.0 ...... kl_loss(), train_step()
  Sec. 4.1  tree G: h_0 = F_0(c, z), h_i = F_i(h_{i-1}, c) ......... Generator, InitStage, NextStage
  Sec. 4.1  s_i = G_i(h_i) at 64, 128, 256, smallest first ......... ImageHead, Generator.forward
  Sec. 4.1  one D per scale, real vs fake cross-entropy ............ Discriminator64/128/256
  Sec. 4.2  joint conditional + unconditional D and G losses ....... discriminator_loss(),
            (+ official matching-aware wrong pairs) .............. generator_loss()
  Sec. 4.3  colour consistency: pixel means and covariances ........ mean_covariance(),
            between consecutive scales, alpha = 50 ................ color_consistency_loss()
  official  D_i updated, then one G step on sum_i L_Gi, then EMA ... train_step(), ema_update()
  official  orthogonal init, BN gamma ~ N(1, 0.02) ................. init_weights()
  Sec. 5    CUB bbox crop, 304 resize, 256 crop, flip, 128/64 ...... MultiScaleData
Deviations (each one also tagged in the code; grep DEVIATION|PAPER-VS-CODE)
  1. PAPER-VS-CODE  L_D adds wrong (mismatched real) pairs, cond 0 / uncond 1 (official; Sec. 4.2:
     real and fake only).
  2. PAPER-VS-CODE  KL: element mean x 2.0 (official COEFF.KL); StackGAN-v1's paper: lambda 1 on
     the per-sample sum [card: unverified]; a factor ~64 apart at Nc = 128.
  3. PAPER-VS-CODE  colour loss: MSE over entries, lower scale detached (official); --color-form
     paper: squared L2 / Frobenius norms.
  4. PAPER-VS-CODE  D is conditioned on mu, not on the sampled c (official).
  5. PAPER-VS-CODE  official save_model sets live G = EMA every 2000 its: --snapshot-reset-every.
  6. DEVIATION  shapes: a fixed random projection of unigram + bigram counts of the caption into
     1024 dims, 10 noisy copies per image, stands in for the char-CNN-RNN embeddings.
  7. DEVIATION  randomness of the data (crop, flip, wrong image, caption pick) is a pure function of
     (seed, step, position) (official: Python/torch RNG in the workers), for exact resume.
  8. DEVIATION  FID/IS from fid.py (ImageNet Inception, its protocol; CUB/Oxford IS in the paper
     use fine-tuned Inceptions), one evaluator at the largest scale for every branch; reference
     images uncropped (CUB: the whole CUB_200_2011/images folder) unless --fid-ref says otherwise.
  9. DEVIATION  --amp bf16 (paper fp32); under torchrun BN statistics are per process (like the
     official nn.DataParallel) unless --sync-bn.
  Not here: MS-COCO (pickles only, no torchvision embedding path), StackGAN-v1, human rank.
Run (--epochs: official MAX_EPOCH; one GPU; torchrun --nproc_per_node N for N, same flags)
  python stackganpp.py --dataset cub             # data/birds: CUB_200_2011/ + train/ test/ pickles
  python stackganpp.py --dataset oxford102       # data/flowers: jpg/ + train/ test/ pickles
  python stackganpp.py --dataset lsun-church_outdoor   # --cond none, colour loss 50, 50 epochs
  python stackganpp.py --dataset lsun-bedroom    # 5 epochs
  python stackganpp.py --dataset folder:data/imagenet_dog --epochs 100   # ImageNet dog (118 ids)
  python stackganpp.py --dataset cub --resume --export-samples 30000     # then python fid.py
  python stackganpp.py --dataset cub --fid-every 10000 --fid-samples 5000
  python stackganpp.py --dataset shapes --device cpu --base-size 16 --gf-dim 8 --df-dim 8 \
      --batch-size 8 --epochs 1 --max-dataset-size 800 --num-workers 0     # offline, text mode
  G = load_generator("runs/stackganpp-cub-s0/ckpt.pt", "cuda")   # G_ema, eval mode
  (s64, s128, s256), mu, logvar = G(torch.randn(8, 100, device="cuda"), phi)  # phi (8, 1024)
Full-size parameters (card 2.3-2.4): G 21,239,696 (CA 524,800), D 5,723,906 / 18,834,178 /
71,269,122; unconditional G 16,472,208, D 2,765,569 / 15,875,841 / 68,310,785.
Paper reports (StackGAN-v2, 256x256): CUB IS 4.04 +- .05 (official README), Oxford-102 IS 3.26,
FID 48.68; LSUN bedroom FID 35.61 (PapersWithCode listing) [card 5: its table number, the CUB
FID 15.30, the COCO cells and the +- values other than CUB's are unverified]. Ours: README.
"""

import argparse
import contextlib
import copy
import math
import os
import pickle
import random
import textwrap
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.functional as TF
from torch.utils.data import DataLoader, Dataset

import common

DATASETS = ("cub", "oxford102", "shapes", "lsun-<category>", "folder:<path>")
TEXT_DIRS = {"cub": "birds", "oxford102": "flowers"}      # official DATA_DIR under data/
EPOCHS = {"cub": 600, "oxford102": 600, "lsun-bedroom": 5, "lsun-church_outdoor": 50,
          "shapes": 20}                                    # official cfg/*.yml MAX_EPOCH; ours
PICKLE_HINT = {   # README with the char-CNN-RNN embeddings, their Google Drive id, the images
    "cub": ("StackGAN-v2", "0B3y_msrWZaXLT1BZdVdycDY5TEE", "CUB_200_2011.tgz", "CUB_200_2011"),
    "oxford102": ("StackGAN", "0B3y_msrWZaXLaUc0UXpmcnhaVmM", "102flowers.tgz", "jpg")}
LOAD_RATIO = 76 / 64        # official main.py: shorter side to 76/64 of the crop (304 for 256)
SHAPES_WORDS = ("a", "above", "and", "below", "large", "left", "of", "right", "small", "the", "to",
                *common.COLORS, *common.SHAPE_KINDS)
SHAPES_TEXT_SEED, SHAPES_TEXT_NOISE, SHAPES_CAPTIONS = 1710_10916, 0.2, 10   # ours (DEVIATION 6)


# ==== Args ====
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                formatter_class=common.HelpFormatter)
    g = p.add_argument_group("paper", "derived defaults: rule in the help, value in args.json")
    g.add_argument("--dataset", default="cub", help=f"{' | '.join(DATASETS)} [Sec. 5]")
    g.add_argument("--cond", choices=["text", "none"], help="text-to-image (default for cub, "
                   "oxford102, shapes) or unconditional (lsun, folder) [Sec. 4.2, 4.3]")
    g.add_argument("--base-size", type=common.positive_int, default=64, help="first branch "
                   "size; branches base * 2^i, i = 0, 1, 2 [Sec. 4.1; official TREE.BASE_SIZE]")
    g.add_argument("--z-dim", type=common.positive_int, default=100, help="[official Z_DIM]")
    g.add_argument("--cond-dim", type=common.positive_int, default=128,
                   help="Nc, size of c [Sec. 3.1; official EMBEDDING_DIM]")
    g.add_argument("--gf-dim", "--g-width", type=common.positive_int, default=64,
                   help="Ng: h_0, h_1, h_2 have Ng, Ng/2, Ng/4 channels [official GF_DIM]")
    g.add_argument("--df-dim", "--d-width", type=common.positive_int, default=64,
                   help="Nd: D encoders end at 8 Nd channels [official DF_DIM]")
    g.add_argument("--r-num", type=common.positive_int, default=2,
                   help="residual blocks per F_i [official R_NUM]")
    g.add_argument("--batch-size", type=common.positive_int, default=24,
                   help="global batch [Sec. 5; official BATCH_SIZE]")
    g.add_argument("--epochs", type=common.positive_int, help="cub, oxford102 600, lsun-bedroom 5, "
                   "lsun-church_outdoor 50, else 20 [official cfg MAX_EPOCH; ours: others]")
    g.add_argument("--max-dataset-size", type=common.positive_int,
                   help="use the first N training items [ours: small runs]")
    g.add_argument("--lr", type=common.positive_float, default=2e-4,
                   help="Adam lr of G and of each D [official DISCRIMINATOR_LR, GENERATOR_LR]")
    g.add_argument("--betas", type=common.unit_float, nargs=2, default=[0.5, 0.999],
                   help="Adam betas [official define_optimizers]")
    g.add_argument("--kl-coeff", type=common.nonnegative_float, default=2.0, help="weight of "
                   "the element-mean KL [official COEFF.KL; v1 paper: 1 x sum, PAPER-VS-CODE]")
    g.add_argument("--uncond-loss", type=common.nonnegative_float, default=1.0, help="weight of "
                   "the unconditional terms in text mode [Sec. 4.2; official birds UNCOND_LOSS]")
    g.add_argument("--color-coeff", type=common.nonnegative_float, help="alpha: 50 with --cond "
                   "none, 0 with text [Sec. 4.3; official COEFF.COLOR_LOSS]")
    g.add_argument("--color-lambdas", type=common.nonnegative_float, nargs=2, default=[1.0, 5.0],
                   help="lambda1 (means), lambda2 (covariances) [Sec. 4.3; official 1, 5]")
    g.add_argument("--color-form", choices=["code", "paper"], default="code", help="code: MSE "
                   "over entries; paper: squared norms [official trainer.py: PAPER-VS-CODE]")
    g.add_argument("--ema-decay", type=common.unit_float, default=0.999,
                   help="G_ema decay per iteration [official trainer.py]")
    g.add_argument("--snapshot-reset-every", type=common.nonnegative_int, default=0,
                   help="live G <- EMA every N its, 0 = off [official save_model: 2000, "
                   "PAPER-VS-CODE 5]")
    g.add_argument("--sync-bn", action="store_true", help="under torchrun (CUDA): SyncBatchNorm "
                   "[UNSPECIFIED; official nn.DataParallel keeps per-GPU statistics]")
    e = p.add_argument_group("eval")
    e.add_argument("--sample-every", type=common.nonnegative_int, default=2000, help="G_ema grids "
                   "per scale every N its and at the end, 0 = off [official SNAPSHOT_INTERVAL]")
    e.add_argument("--fid-every", type=common.nonnegative_int, default=0,
                   help="IS and FID per scale via fid.py every N its, 0 = off [run]")
    e.add_argument("--fid-samples", type=common.positive_int, default=30000,
                   help="generated images per scale [official TEST.SAMPLE_NUM; card 5]")
    e.add_argument("--fid-weights", type=str, help="Inception weights for fid.py [run]")
    e.add_argument("--fid-ref", type=str, help="fid.py reference: the CUB_200_2011/images or "
                   "flowers/jpg folder, else --dataset [ours: DEVIATION 8]")
    e.add_argument("--fid-ref-split", default="train", help="reference split for fid.py [run]")
    e.add_argument("--fid-ref-size", type=common.positive_int,
                   help="reference images for fid.py, default all [run]")
    e.add_argument("--export-samples", type=common.nonnegative_int, default=0, help="write "
                   "samples_N.npz (uint8 NHWC, every scale) from G_ema at the end, 0 = off [run]")
    r = p.add_argument_group("run")
    r.add_argument("--data-root", type=str, default="data", help="dataset folder [run]")
    r.add_argument("--out-dir", type=str, help="default runs/stackganpp-<dataset>-s<seed> [run]")
    r.add_argument("--seed", type=common.nonnegative_int, default=0, help="random seed [run]")
    r.add_argument("--device", default="cuda", help="torch device [run]")
    r.add_argument("--num-workers", type=common.nonnegative_int, default=4,
                   help="data loader workers [official WORKERS]")
    r.add_argument("--log-every", type=common.positive_int, default=100,
                   help="log every N iterations [official: summaries every 100]")
    r.add_argument("--ckpt-every", type=common.positive_int, default=2000,
                   help="checkpoint every N iterations [official SNAPSHOT_INTERVAL]")
    r.add_argument("--resume", action="store_true", help="continue out_dir/ckpt.pt [run]")
    r.add_argument("--deterministic", action="store_true", help="deterministic kernels, no "
                   "cudnn.benchmark; CUDA: CUBLAS_WORKSPACE_CONFIG=:4096:8, some ops raise [run]")
    r.add_argument("--amp", choices=["off", "bf16"], default="off",
                   help="bf16 autocast of the forwards [run; DEVIATION 9: paper fp32]")
    args = p.parse_args(argv)

    if args.out_dir is None:
        args.out_dir = common.default_out_dir("stackganpp", args, vars(p.parse_args([])))
    d = args.dataset
    text_ok = d in ("cub", "oxford102", "shapes")
    if not (text_ok or d.startswith(("lsun-", "folder:"))):
        p.error(f"unknown dataset {d!r}; valid: {', '.join(DATASETS)}")
    # Derived defaults (card 2.1, 2.7), in one place
    if args.cond is None:
        args.cond = "text" if text_ok else "none"
    if args.epochs is None:
        args.epochs = EPOCHS.get(d, 20)
    if args.color_coeff is None:
        args.color_coeff = 50.0 if args.cond == "none" else 0.0
    if args.fid_ref is None:
        ref = {"cub": ("birds", "CUB_200_2011", "images"), "oxford102": ("flowers", "jpg")}
        args.fid_ref = f"folder:{os.path.join(args.data_root, *ref[d])}" if d in ref else d
    if args.cond == "text" and not text_ok:
        p.error(f"--cond text needs caption embeddings (cub, oxford102, shapes), not {d!r}")
    b = args.base_size
    if b < 8 or b & (b - 1):
        p.error(f"--base-size must be a power of two >= 8, got {b}")
    if args.gf_dim % 4:
        p.error(f"--gf-dim must be divisible by 4 (Ng, Ng/2, Ng/4), got {args.gf_dim}")
    if max(args.betas) >= 1:
        p.error("--betas must be < 1")
    return args


# ==== Data ====
class _SafeUnpickler(pickle.Unpickler):
    """Python-2 pickles of arrays, strings and ints only (like torch's weights_only)."""

    ALLOWED = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray")
               for n in ("_reconstruct", "scalar")} | {("numpy", "ndarray"), ("numpy", "dtype"),
                                                       ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def load_pickle(path, dataset, root):
    """A Python-2 pickle of the official data, read with encoding='latin1' (card pitfall 4)."""
    if not os.path.isfile(path):
        readme, drive_id, archive, images = PICKLE_HINT[dataset]
        d = os.path.join(root, TEXT_DIRS[dataset])
        raise common.UserError(f"{path} not found: the {readme} README's embeddings (Google Drive "
                               f"id {drive_id}) unzip to {d}/train and {d}/test; the images "
                               f"({archive}) to {d}/{images}")
    try:
        with open(path, "rb") as f:
            return _SafeUnpickler(f, encoding="latin1").load()
    except Exception as e:  # pickle raises many types; name the file instead
        raise common.UserError(f"cannot read {path}: {common._first_line(e)}") from None


class PickleTextSource:
    """CUB-200-2011 (bbox crop) or Oxford-102 in the official layout (datasets.TextDataset): pickles
    in <root>/{birds,flowers}/{train,test}/, captions for the figures from text/ or text_c10/."""

    def __init__(self, dataset, root, split, embeddings=True, max_items=None):
        d = os.path.join(root, TEXT_DIRS[dataset])
        self.keys = [str(k) for k in load_pickle(os.path.join(d, split, "filenames.pickle"),
                                                 dataset, root)][:max_items]
        self.n, self.emb = len(self.keys), None
        if embeddings:
            path = os.path.join(d, split, "char-CNN-RNN-embeddings.pickle")
            self.emb = np.asarray(load_pickle(path, dataset, root), dtype=np.float32)[: self.n]
            if self.emb.ndim != 3 or len(self.emb) != self.n:
                raise common.UserError(f"{path} holds an array of shape {self.emb.shape}, not "
                                       f"({self.n}, captions, dims) for the {self.n} filenames")
            self.n_captions = self.emb.shape[1]
        info = os.path.join(d, split, "class_info.pickle")    # official: arange(n) if missing
        self.labels = (np.asarray(load_pickle(info, dataset, root))[: self.n]
                       if os.path.isfile(info) else np.arange(self.n))
        self.bbox, self.img_dir = None, d
        if dataset == "cub":
            self.img_dir = os.path.join(d, "CUB_200_2011", "images")
            self.bbox = self._bboxes(os.path.join(d, "CUB_200_2011"))
        self.path(0)                                           # fails now, naming the file
        self.captions = {}
        for sub in ("text", "text_c10"):
            for top, _, files in os.walk(os.path.join(d, sub)):
                self.captions.update({f[:-4]: os.path.join(top, f) for f in files
                                      if f.endswith(".txt")})

    def _bboxes(self, cub):
        try:
            with open(os.path.join(cub, "images.txt")) as f:
                names = dict(line.split() for line in f if line.strip())
            with open(os.path.join(cub, "bounding_boxes.txt")) as f:
                boxes = {k: [int(float(v)) for v in rest] for k, *rest in
                         (line.split() for line in f if line.strip())}   # official astype(int)
        except OSError as e:
            raise common.UserError(f"CUB bounding boxes: {e} (CUB_200_2011.tgz holds images.txt "
                                   f"and bounding_boxes.txt; put them in {cub})") from None
        return {names[i][: -len(".jpg")]: boxes[i] for i in names}

    def path(self, i):
        p = os.path.join(self.img_dir, self.keys[i] + ".jpg")
        if not os.path.isfile(p):
            raise common.UserError(f"image {p} not found (key {self.keys[i]!r} of filenames)")
        return p

    def image(self, i):
        try:
            img = torchvision.datasets.folder.pil_loader(self.path(i))   # RGB
        except OSError as e:
            raise common.UserError(f"cannot read image {self.path(i)!r}: {e}") from None
        if self.bbox is None:
            return img
        # official datasets.get_imgs: a square of side 1.5 max(w, h) around the box centre,
        # clipped to the image (so not always square)
        x, y, w, h = self.bbox[self.keys[i]]
        r, cx, cy = int(max(w, h) * 0.75), int((2 * x + w) / 2), int((2 * y + h) / 2)
        return img.crop((max(0, cx - r), max(0, cy - r), min(img.width, cx + r),
                         min(img.height, cy + r)))

    def label(self, i):
        return int(self.labels[i])

    def embeddings(self, i):
        return self.emb[i]

    def caption(self, i, j):
        path = self.captions.get(os.path.basename(self.keys[i]))
        if path is None:
            return f"{self.keys[i]} (caption {j})"
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [s.strip() for s in f if s.strip()]
        return lines[j] if j < len(lines) else f"{self.keys[i]} (caption {j})"


def shapes_projection(dim=1024):
    """DEVIATION 6: a fixed Gaussian projection of unigram + bigram counts over SHAPES_WORDS."""
    v = len(SHAPES_WORDS)
    return np.random.default_rng(SHAPES_TEXT_SEED).standard_normal((dim, v + v * v)).astype(
        np.float32)


def encode_caption(text, W):
    """Unit-norm count vector of the caption's words and adjacent word pairs, times W."""
    idx, v = {w: k for k, w in enumerate(SHAPES_WORDS)}, len(SHAPES_WORDS)
    words = [idx[w] for w in text.split()]
    f = np.zeros(W.shape[1], np.float32)
    np.add.at(f, words, 1.0)
    np.add.at(f, [v + a * v + b for a, b in zip(words, words[1:])], 1.0)
    return W @ (f / np.linalg.norm(f))


class ShapesTextSource:
    """common.ShapesDataset with its captions; class = (kind, colour) of the main shape (for wrong
    images); SHAPES_CAPTIONS noisy embeddings of the one caption per image (CUB: 10 captions)."""

    def __init__(self, n, size, seed, text_dim=1024):
        self.n, self.seed, self.n_captions = n, seed, SHAPES_CAPTIONS
        self.render = common.ShapesDataset(n, size, seed)
        self.meta = common.ShapesDataset(n, 4, seed)      # the same draws, rendered at 4x4
        self.W = shapes_projection(text_dim)

    def image(self, i):
        return TF.to_pil_image(self.render.sample(i)[0])

    def label(self, i):
        info = self.meta.sample(i)[1]
        return int(info["kinds"][0]) * len(common.COLORS) + int(info["colors"][0])

    def caption(self, i, j=0):
        return self.meta.caption(self.meta.sample(i)[1])

    def embeddings(self, i):
        e = encode_caption(self.caption(i), self.W)
        noise = np.random.default_rng([SHAPES_TEXT_SEED, self.seed, i]).standard_normal(
            (SHAPES_CAPTIONS, len(e)), dtype=np.float32)
        return e + SHAPES_TEXT_NOISE * noise                     # (10, 1024)


class ImageSource:
    """Unconditional data: common's folder / LSUN-export loader, as PIL images."""

    def __init__(self, args):
        self.ds = common.load_dataset(args.dataset, args.data_root, None)
        self.ds.transform = _keep_pil
        n_max = args.max_dataset_size                    # None: all (0 is refused by the flag)
        self.n = len(self.ds) if n_max is None else min(len(self.ds), n_max)

    def image(self, i):
        return self.ds[i][0].convert("RGB")


def _keep_pil(img):
    return img


def load_source(args, split="train"):
    text = args.cond == "text"
    n_max = args.max_dataset_size if split == "train" else None
    if args.dataset in TEXT_DIRS:
        return PickleTextSource(args.dataset, args.data_root, split, text, n_max)
    if args.dataset == "shapes":   # train and test: disjoint streams (seeds 0 and 1) as in common
        n = 50_000 if split == "train" else 10_000
        return ShapesTextSource(min(n, n_max or n), int(args.base_size * 4 * LOAD_RATIO),
                                seed=0 if split == "train" else 1)
    return ImageSource(args)


def to_tensor(img):
    return TF.to_tensor(img).mul_(2).sub_(1)          # official Normalize(0.5, 0.5): [-1, 1]


class MultiScaleData(Dataset):
    """Official main.py, datasets.get_imgs: resize to 76/64, random crop, flip, lower scales resized
    from that crop; text: + a wrong image and one caption embedding. Key (index, step, position):
    DEVIATION 7, every draw from np.random.default_rng([seed, step, position])."""

    def __init__(self, source, sizes, seed, text):
        self.source, self.sizes, self.seed, self.text = source, sizes, seed, text
        self.load = int(sizes[-1] * LOAD_RATIO)

    def __len__(self):
        return self.source.n

    def views(self, i, rng=None):
        """[x_0, x_1, x_2] of item i; rng None: the centre crop, unflipped (figures)."""
        img = TF.resize(self.source.image(i), self.load)         # shorter side, bilinear
        top, (w, h) = self.sizes[-1], img.size
        if rng is None:
            x, y, flip = (w - top) // 2, (h - top) // 2, False
        else:
            y, x, flip = int(rng.integers(h - top + 1)), int(rng.integers(w - top + 1)), \
                rng.random() < 0.5
        img = img.crop((x, y, x + top, y + top))
        img = TF.hflip(img) if flip else img
        return [to_tensor(img if s == top else TF.resize(img, s)) for s in self.sizes]

    def __getitem__(self, key):
        i, step, j = key
        rng = np.random.default_rng([self.seed, step, j])
        real = self.views(i, rng)
        if not self.text:
            return tuple(real)
        w = int(rng.integers(len(self)))                          # official: one redraw only
        if self.source.label(w) == self.source.label(i):
            w = int(rng.integers(len(self)))
        wrong = self.views(w, rng)
        emb = self.source.embeddings(i)
        k = int(rng.integers(len(emb)))                          # one caption per sample
        return (*real, *wrong, torch.from_numpy(np.ascontiguousarray(emb[k])), k, i)


def keyed_batches(data, args, start_step, dist):
    """Batches forever from start_step: common.infinite_batches picks the items; keys per sample."""
    order = common.infinite_batches(range(len(data)), args.batch_size, args.seed, start_step,
                                    num_workers=0, rank=dist.rank, world_size=dist.world_size)
    first = dist.share(args.batch_size).start
    keys = ([(i, step, first + k) for k, i in enumerate(idx.tolist())]
            for step, idx in enumerate(order, start_step))
    return iter(DataLoader(data, batch_sampler=keys, num_workers=args.num_workers,
                           pin_memory=torch.cuda.is_available(),
                           generator=torch.Generator().manual_seed(args.seed)))


# ==== Models ====
class GLU(nn.Module):
    """GLU(x) = x[:, :C/2] * sigmoid(x[:, C/2:]) (Sec. 4.1; official model.py GLU)."""

    def forward(self, x):
        c = x.shape[1] // 2
        return x[:, :c] * torch.sigmoid(x[:, c:])


def conv3x3(c_in, c_out):
    return nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)      # every G/D conv is bias-free


def up_block(c_in, c_out):
    """official upBlock: nearest 2x, conv3x3 -> 2 c_out, BN, GLU."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), conv3x3(c_in, 2 * c_out),
                         nn.BatchNorm2d(2 * c_out), GLU())


def join_block(c_in, c_out):
    """official Block3x3_relu: conv3x3 -> 2 c_out, BN, GLU (joins c and h_{i-1})."""
    return nn.Sequential(conv3x3(c_in, 2 * c_out), nn.BatchNorm2d(2 * c_out), GLU())


class ResBlock(nn.Module):
    """official ResBlock: x + BN(conv(GLU(BN(conv(x))))), no activation after the sum."""

    def __init__(self, c):
        super().__init__()
        self.block = nn.Sequential(conv3x3(c, 2 * c), nn.BatchNorm2d(2 * c), GLU(), conv3x3(c, c),
                                   nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.block(x)


class ConditioningAugmentation(nn.Module):
    """Sec. 3.1: c = mu + sigma * eps; official CA_NET: GLU(Linear(1024 -> 4 Nc)) -> mu, logvar."""

    def __init__(self, text_dim=1024, cond_dim=128):
        super().__init__()
        self.cond_dim = cond_dim
        self.fc = nn.Linear(text_dim, 4 * cond_dim)               # with bias (official)
        self.glu = GLU()

    def forward(self, phi, eps=None):
        h = self.glu(self.fc(phi))                                      # (B, 2 Nc)
        mu, logvar = h[:, : self.cond_dim], h[:, self.cond_dim:]
        eps = torch.randn_like(mu) if eps is None else eps
        return mu + torch.exp(0.5 * logvar) * eps, mu, logvar


class InitStage(nn.Module):
    """F_0 (official INIT_STAGE_G): Linear, BN1d, GLU -> 16 Ng x 4 x 4, up-blocks to Ng x base^2."""

    def __init__(self, in_dim, c_top, n_up):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(in_dim, c_top * 4 * 4 * 2, bias=False),
                                nn.BatchNorm1d(c_top * 4 * 4 * 2), GLU())
        self.up = nn.Sequential(*[up_block(c_top >> k, c_top >> (k + 1)) for k in range(n_up)])

    def forward(self, code):
        return self.up(self.fc(code).view(code.shape[0], -1, 4, 4))   # (B, 16 Ng, 4, 4) -> h_0


class NextStage(nn.Module):
    """F_i, i >= 1 (official NEXT_STAGE_G): concat(c, h_{i-1}), join conv, R_NUM res blocks, up."""

    def __init__(self, c_h, c_cond, r_num):
        super().__init__()
        self.joint = join_block(c_h + c_cond, c_h)
        self.residual = nn.Sequential(*[ResBlock(c_h) for _ in range(r_num)])
        self.up = up_block(c_h, c_h // 2)

    def forward(self, h, c):
        s = h.shape[2]
        c = c[:, :, None, None].expand(-1, -1, s, s)                  # (B, Nc, s, s)
        return self.up(self.residual(self.joint(torch.cat([c, h], dim=1))))


class ImageHead(nn.Module):
    """G_i (official GET_IMAGE_G): conv3x3 -> 3 (no bias), tanh."""

    def __init__(self, c):
        super().__init__()
        self.conv = conv3x3(c, 3)

    def forward(self, h):
        return torch.tanh(self.conv(h))


class Generator(nn.Module):
    """Sec. 4.1 tree G (official G_NET): one c feeds every branch (unconditional: c = z, pitfall 7);
    forward -> ([s_0, s_1, s_2] smallest first, mu, logvar)."""

    def __init__(self, z_dim=100, gf_dim=64, base_size=64, cond_dim=128, text_dim=1024, r_num=2,
                 text=True):
        super().__init__()
        n_up = int(math.log2(base_size // 4))
        self.ca = ConditioningAugmentation(text_dim, cond_dim) if text else None
        c_dim = cond_dim if text else z_dim
        self.f0 = InitStage(z_dim + (cond_dim if text else 0), gf_dim << n_up, n_up)
        self.f1 = NextStage(gf_dim, c_dim, r_num)
        self.f2 = NextStage(gf_dim // 2, c_dim, r_num)
        self.heads = nn.ModuleList([ImageHead(gf_dim), ImageHead(gf_dim // 2),
                                    ImageHead(gf_dim // 4)])

    def forward(self, z, phi=None, eps=None):
        if self.ca is not None:
            c, mu, logvar = self.ca(phi, eps)
            h = self.f0(torch.cat([c, z], dim=1))                   # official order (c, z)
        else:
            c, mu, logvar = z, None, None
            h = self.f0(z)
        hs = [h]
        for f in (self.f1, self.f2):
            hs.append(f(hs[-1], c))
        return [head(h) for head, h in zip(self.heads, hs)], mu, logvar


def lrelu():
    return nn.LeakyReLU(0.2, inplace=True)                     # D's activation (official)


def down_block(c_in, c_out):
    """official downBlock: 4x4 stride-2 conv (no bias), BN, LReLU 0.2."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out),
                         lrelu())


def block3x3_lrelu(c_in, c_out):
    """official Block3x3_leakRelu: conv3x3 (no bias), BN, LReLU 0.2."""
    return nn.Sequential(conv3x3(c_in, c_out), nn.BatchNorm2d(c_out), lrelu())


def encode_image(df_dim, base_size):
    """official encode_image_by_16times: 4x4 stride-2 convs to 8 Nd x 4 x 4, no BN on the first."""
    n = int(math.log2(base_size // 4))
    widths = [8 * df_dim >> (n - 1 - k) for k in range(n)]
    layers = [nn.Conv2d(3, widths[0], 4, 2, 1, bias=False), lrelu()]
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Conv2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b), lrelu()]
    return nn.Sequential(*layers)


class JointHeads(nn.Module):
    """Sec. 4.2 heads on the 8 Nd x 4 x 4 code: unconditional 4x4 conv; conditional: concat(mu,
    code), conv3x3, BN, LReLU, 4x4 conv. Logits (official: sigmoid; the same BCE, but safe)."""

    def __init__(self, df_dim, cond_dim):
        super().__init__()
        self.uncond_logits = nn.Conv2d(8 * df_dim, 1, 4, stride=4)
        self.joint_conv = block3x3_lrelu(8 * df_dim + cond_dim, 8 * df_dim) if cond_dim else None
        self.cond_logits = nn.Conv2d(8 * df_dim, 1, 4, stride=4) if cond_dim else None

    def forward(self, x, c=None):
        """-> (conditional logits (B,) or None, unconditional logits (B,))."""
        code = self.encode(x)                       # the subclass's encoder: (B, 8 Nd, 4, 4)
        uncond = self.uncond_logits(code).view(-1)
        if self.cond_logits is None:
            return None, uncond
        c = c[:, :, None, None].expand(-1, -1, 4, 4)                     # (B, Nc, 4, 4)
        return self.cond_logits(self.joint_conv(torch.cat([c, code], 1))).view(-1), uncond


class Discriminator64(JointHeads):
    """D_0 (official D_NET64): the encoder straight to 8 Nd x 4 x 4."""

    def __init__(self, df_dim=64, cond_dim=128, base_size=64):
        super().__init__(df_dim, cond_dim)
        self.encode = encode_image(df_dim, base_size)


class Discriminator128(JointHeads):
    """D_1 (official D_NET128): encoder, down(8 Nd -> 16 Nd), conv3x3 back to 8 Nd."""

    def __init__(self, df_dim=64, cond_dim=128, base_size=64):
        super().__init__(df_dim, cond_dim)
        self.encode = nn.Sequential(encode_image(df_dim, base_size),
                                    down_block(8 * df_dim, 16 * df_dim),
                                    block3x3_lrelu(16 * df_dim, 8 * df_dim))


class Discriminator256(JointHeads):
    """D_2 (official D_NET256): encoder, down to 16 Nd and 32 Nd, conv3x3s back to 16 Nd, 8 Nd."""

    def __init__(self, df_dim=64, cond_dim=128, base_size=64):
        super().__init__(df_dim, cond_dim)
        self.encode = nn.Sequential(encode_image(df_dim, base_size),
                                    down_block(8 * df_dim, 16 * df_dim),
                                    down_block(16 * df_dim, 32 * df_dim),
                                    block3x3_lrelu(32 * df_dim, 16 * df_dim),
                                    block3x3_lrelu(16 * df_dim, 8 * df_dim))


def init_weights(net):
    """official weights_init: orthogonal weights, linear biases 0, BN gamma ~ N(1, 0.02), beta 0."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.orthogonal_(m.weight, 1.0)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
    return net


@torch.no_grad()
def ema_update(G_ema, G, decay):
    """official trainer.py: avg_p <- 0.999 avg_p + 0.001 p; BN statistics are the live G's."""
    for p_ema, p in zip(G_ema.parameters(), G.parameters()):
        p_ema.lerp_(p, 1 - decay)
    for b_ema, b in zip(G_ema.buffers(), G.buffers()):
        b_ema.copy_(b)


# ==== Losses ====
def bce(logits, target):
    """Batch-mean binary cross-entropy of sigmoid(logits) against a constant target."""
    logits = logits.float()
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def kl_loss(mu, logvar):
    """Sec. 3.1, official KL_loss: element mean of KL(N(mu, exp(logvar)) || N(0, I))."""
    return -0.5 * torch.mean(1 + logvar - mu.pow(2) - logvar.exp())


def mean_covariance(x):
    """Sec. 4.3, official compute_mean_covariance: per-image mu (B, 3), Sigma (B, 3, 3) over N."""
    x = x.float().flatten(2)                                       # (B, 3, N)
    mu = x.mean(dim=2)
    d = x - mu[:, :, None]
    return mu, d @ d.transpose(1, 2) / x.shape[2]


def color_terms(x_low, x_high, form="code"):
    """(mean term, covariance term), the lower scale detached (official). PAPER-VS-CODE 3: code =
    MSE over the 3 / 9 entries; paper = squared L2 / Frobenius norms, batch mean."""
    mu_l, cov_l = mean_covariance(x_low.detach())
    mu_h, cov_h = mean_covariance(x_high)
    if form == "code":
        return F.mse_loss(mu_h, mu_l), F.mse_loss(cov_h, cov_l)
    return (mu_h - mu_l).square().sum(1).mean(), (cov_h - cov_l).square().sum((1, 2)).mean()


def color_consistency_loss(x_low, x_high, lambda1=1.0, lambda2=5.0, form="code"):
    """Sec. 4.3 L_Ci = lambda1 * mean term + lambda2 * covariance term (alpha-free)."""
    d_mu, d_cov = color_terms(x_low, x_high, form)
    return lambda1 * d_mu + lambda2 * d_cov


def discriminator_loss(real, wrong, fake, uncond_coeff=1.0):
    """L_Di of (cond, uncond) logits (Sec. 4.1, 4.2; PAPER-VS-CODE 1, official train_Dnet): cond
    targets real 1 / wrong 0 / fake 0, uncond 1 / 1 / 0; uncond_coeff 0: the official 0.5 form."""
    if real[0] is None:
        return bce(real[1], 1.0) + bce(fake[1], 0.0)
    if uncond_coeff > 0:
        return (bce(real[0], 1.0) + uncond_coeff * bce(real[1], 1.0)
                + bce(wrong[0], 0.0) + uncond_coeff * bce(wrong[1], 1.0)
                + bce(fake[0], 0.0) + uncond_coeff * bce(fake[1], 0.0))
    return bce(real[0], 1.0) + 0.5 * (bce(wrong[0], 0.0) + bce(fake[0], 0.0))


def generator_loss(fake, uncond_coeff=1.0):
    """L_Gi, non-saturating: -log D_i(s_i, c) - uncond_coeff log D_i(s_i) (Sec. 4.1, 4.2)."""
    if fake[0] is None:
        return bce(fake[1], 1.0)
    return bce(fake[0], 1.0) + uncond_coeff * bce(fake[1], 1.0)


# ==== Train step ====
def train_step(G, Ds, opt_G, opt_Ds, batch, args, dist, autocast=contextlib.nullcontext):
    """official trainer.py: one G forward; each D_i steps; a G step on sum_i L_Gi + KL + alpha L_C.
    UNSPECIFIED: D sees real, wrong and fake in separate forwards (official): BN per set."""
    device = next(G.parameters()).device
    text, sizes = args.cond == "text", [x.shape[-1] for x in batch[:3]]
    reals = [x.to(device, non_blocking=True) for x in batch[:3]]
    wrongs = [x.to(device, non_blocking=True) for x in batch[3:6]] if text else [None] * 3
    phi = batch[6].to(device, non_blocking=True) if text else None
    z = dist.shard(torch.randn(args.batch_size, args.z_dim, device=device))  # global z, my rows
    eps = dist.shard(torch.randn(args.batch_size, args.cond_dim, device=device)) if text else None
    with autocast():
        fakes, mu, logvar = G(z, phi, eps)
    c_d = mu.detach() if text else None                            # PAPER-VS-CODE 4: mu, not c
    out = {}
    for i, (D, opt) in enumerate(zip(Ds, opt_Ds)):
        with autocast():
            real = D(reals[i], c_d)
            wrong = D(wrongs[i], c_d) if text else None
            fake = D(fakes[i].detach(), c_d)
        loss_D = discriminator_loss(real, wrong, fake, args.uncond_loss)
        opt.zero_grad(set_to_none=True)
        loss_D.backward()
        dist.average_gradients(D)
        opt.step()
        out[f"loss_D{i}"] = loss_D.detach()

    for D in Ds:                                  # no D weight gradients in the G step
        D.requires_grad_(False)
    with autocast():
        outs = [D(s, mu) for D, s in zip(Ds, fakes)]               # mu not detached: trains CA
    for D in Ds:
        D.requires_grad_(True)
    loss_adv = sum(generator_loss(o, args.uncond_loss) for o in outs)
    loss_G = loss_adv
    if text:
        kl = kl_loss(mu.float(), logvar.float())
        loss_G = loss_G + args.kl_coeff * kl                       # PAPER-VS-CODE 2
        out["kl"] = kl.detach()
    lam1, lam2 = args.color_lambdas
    for i in (1, 2):                                               # Sec. 4.3, L'_Gi
        d_mu, d_cov = color_terms(fakes[i - 1], fakes[i], args.color_form)
        if args.color_coeff > 0:
            loss_G = loss_G + args.color_coeff * (lam1 * d_mu + lam2 * d_cov)
        out[f"color_mu_{sizes[i]}"], out[f"color_cov_{sizes[i]}"] = d_mu.detach(), d_cov.detach()
    opt_G.zero_grad(set_to_none=True)
    loss_G.backward()
    dist.average_gradients(G)
    opt_G.step()
    out.update(loss_G=loss_G.detach(), loss_G_adv=loss_adv.detach())
    return out


def build_nets(G_kwargs, args):
    """G and D_0, D_1, D_2, initialised as the official weights_init."""
    G = init_weights(Generator(**G_kwargs))
    c = args.cond_dim if args.cond == "text" else 0
    Ds = [init_weights(cls(args.df_dim, c, args.base_size))
          for cls in (Discriminator64, Discriminator128, Discriminator256)]
    return G, Ds


def setup(args):
    """Seeds, torchrun, deterministic kernels, bf16, BatchNorm's batch checks: (dist, autocast)."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    dist = common.Dist(args.device)
    if args.deterministic and dist.device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = not args.deterministic
    torch.use_deterministic_algorithms(args.deterministic)
    autocast = ((lambda: torch.autocast(dist.device.type, dtype=torch.bfloat16))
                if args.amp == "bf16" else contextlib.nullcontext)  # DEVIATION 9: paper fp32
    if args.batch_size // dist.world_size < 2:
        raise common.UserError(f"--batch-size {args.batch_size} over {dist.world_size} "
                               "process(es): BatchNorm needs at least 2 images per process")
    if args.sync_bn and dist.world_size > 1 and dist.device.type != "cuda":
        raise common.UserError("--sync-bn needs CUDA (torch's SyncBatchNorm has no CPU kernel)")
    return dist, autocast


def build_training(train, args, device, dist):
    """G (with CA), G_ema, D_0..D_2 (--sync-bn: SyncBatchNorm), the Adams, G's kwargs."""
    text = args.cond == "text"
    G_kwargs = dict(z_dim=args.z_dim, gf_dim=args.gf_dim, base_size=args.base_size,
                    cond_dim=args.cond_dim, r_num=args.r_num, text=text,
                    text_dim=int(train.embeddings(0).shape[-1]) if text else 1024)
    G, Ds = build_nets(G_kwargs, args)
    G, Ds = G.to(device), [D.to(device) for D in Ds]
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    if args.sync_bn and dist.world_size > 1:
        G = nn.SyncBatchNorm.convert_sync_batchnorm(G)
        Ds = [nn.SyncBatchNorm.convert_sync_batchnorm(D) for D in Ds]
    adam = dict(lr=args.lr, betas=tuple(args.betas), fused=device.type == "cuda")
    opt_G = torch.optim.Adam(G.parameters(), **adam)               # G includes CA
    opt_Ds = [torch.optim.Adam(D.parameters(), **adam) for D in Ds]
    return G, G_ema, Ds, opt_G, opt_Ds, G_kwargs


def restore(state, G, G_ema, Ds, opt_G, opt_Ds, fixed):
    """--resume: nets, optimizers, RNG; (step, fixed sample inputs), a fresh run (0, fixed)."""
    if not state:
        return 0, fixed
    G.load_state_dict(state["G"])
    G_ema.load_state_dict(state["G_ema"])
    for D, opt, sd, so in zip(Ds, opt_Ds, state["D"], state["opt_D"]):
        D.load_state_dict(sd)
        opt.load_state_dict(so)
    opt_G.load_state_dict(state["opt_G"])
    fixed = {k: state["fixed"][k] for k in fixed}
    common.set_rng_state(state["rng"])
    return state["step"], fixed


def snapshot(G, G_ema, Ds, opt_G, opt_Ds, fixed, G_kwargs):
    """The ckpt.pt state: G, G_ema, the Ds, all Adams, the fixed sample inputs, RNG, G's kwargs."""
    return {"G": G.state_dict(), "G_ema": G_ema.state_dict(),
            "D": [D.state_dict() for D in Ds], "opt_G": opt_G.state_dict(),
            "opt_D": [o.state_dict() for o in opt_Ds], "fixed": fixed,
            "rng": common.rng_state(), "G_kwargs": G_kwargs}


# ==== Eval ====
def fixed_conditions(source, args, rows=8):
    """Fixed z per column and, in text mode, one fixed caption per row, from the seed alone."""
    gen = torch.Generator().manual_seed(args.seed)
    if args.cond != "text":
        return {"z": torch.randn(rows * rows, args.z_dim, generator=gen)}
    z = torch.randn(rows, args.z_dim, generator=gen)
    items = torch.randperm(source.n, generator=gen)[:rows].tolist()
    items = (items * rows)[:rows]                                  # fewer items than rows
    embs = [source.embeddings(i) for i in items]
    caps = [int(torch.randint(len(e), (), generator=gen)) for e in embs]
    return {"z": z, "phi": torch.stack([torch.from_numpy(np.asarray(e[k])) for e, k in
                                        zip(embs, caps)]),
            "items": items, "captions": [source.caption(i, k) for i, k in zip(items, caps)]}


def _tile(x, size):
    """(N, 3, s, s) in [-1, 1] -> (N, 3, S, S) uint8, nearest-upsampled to S >= `size`."""
    x = x.detach().float().clamp(-1, 1)
    if x.shape[-1] < size:
        x = F.interpolate(x, size=size, mode="nearest")
    return common.quantize(x).permute(0, 3, 1, 2)


def caption_grid(rows, path, lines, captions=None, reals=None, are_real=False, text_w=240):
    """PNG, one row per caption (text on the left, then the row's real image if given), images
    framed green (generated) or orange (real), under a title strip with the colour key."""
    t = max(64, rows[0].shape[-1])
    cols, text_w = rows[0].shape[0] + (reals is not None), text_w if captions else 0
    key = [("real", common.REAL_RGB)] * (are_real or reals is not None) + [
        ("generated", common.FAKE_RGB)] * (not are_real)
    canvas = common.canvas(len(rows) * (t + 6) + 4, text_w + cols * (t + 6) + 4)
    text = []
    for r, x in enumerate(rows):
        y = 4 + r * (t + 6)
        for k, line in enumerate(textwrap.wrap(captions[r], text_w // 6 - 2)[: t // 11]
                                 if captions else []):
            text.append((4, y + 11 * k, line))
        tiles = [(im, key[-1][1]) for im in _tile(x, t)]
        if reals is not None:
            tiles.insert(0, (_tile(reals[r][None], t)[0], common.REAL_RGB))
        for c, (im, rgb) in enumerate(tiles):
            x0 = text_w + 4 + c * (t + 6)
            common.fill_rect(canvas, x0 - 2, y - 2, x0 + t + 1, y + t + 1, rgb)   # a 2-px frame
            canvas[:, y:y + im.shape[1], x0:x0 + im.shape[2]] = im
    common.save_png(common.title_strip(common.draw_text(canvas, text), lines, key=key), path)


@torch.no_grad()
def sample_grids(G_ema, fixed, data, step, args, device):
    """samples/<step>_<size>.png per scale from G_ema in eval mode (official evaluate; training
    snapshots: batch statistics, UNSPECIFIED); rows = fixed captions, columns = fixed z."""
    gen = torch.Generator().manual_seed(args.seed + 1)             # the same CA eps every time
    z = fixed["z"].to(device)
    if args.cond == "text":
        n = len(fixed["items"])
        zz, phi = z.repeat(n, 1), fixed["phi"].to(device).repeat_interleave(len(z), dim=0)
        eps = torch.randn(len(zz), args.cond_dim, generator=gen).to(device)
        imgs = G_ema(zz, phi, eps)[0]
        reals = [data.views(i) for i in fixed["items"]]
    else:
        imgs = G_ema(z)[0]
    for s, x in enumerate(imgs):
        size, rows = x.shape[-1], x.view(8, -1, *x.shape[1:])       # (rows, cols, 3, s, s)
        lines = [f"stackganpp | step {step} | {args.dataset} | branch {s}: {size}x{size}",
                 "G_ema, eval-mode BN, fixed z per column" + (
                     ", one fixed caption per row, its real image first" if args.cond == "text"
                     else "")]
        caption_grid(list(rows), os.path.join(args.out_dir, "samples", f"{step:07d}_{size}.png"),
                     lines, fixed.get("captions"),
                     [r[s] for r in reals] if args.cond == "text" else None)


def save_reals(fixed, data, args):
    """reals.png: the fixed rows' reals at every scale from one centre crop, nearest-upsampled."""
    items = fixed["items"] if args.cond == "text" else list(range(min(8, len(data))))
    top = args.base_size * 4
    rows = [torch.stack([F.interpolate(v[None], size=top, mode="nearest")[0]
                         for v in data.views(i)]) for i in items]      # (3 scales, 3, top, top)
    sizes = " / ".join(str(args.base_size * 2**b) for b in range(3))
    caption_grid(rows, os.path.join(args.out_dir, "reals.png"),
                 [f"stackganpp | {args.dataset} reals | {sizes} from one crop (centre, unflipped),"
                  " nearest-upsampled"], fixed.get("captions"), are_real=True)


def eval_sampler(G_ema, test, args, device, branch=None, seed=5):
    """sample_fn(n) of G_ema (eval mode) for fid.py; text: the test captions in order, one z per
    item (official evaluate). Its own generator, seeded per call; branch None: all three."""
    gen = torch.Generator().manual_seed(args.seed + seed)
    k, z_item = [0], [None]

    @torch.no_grad()
    def sample_fn(n):
        if args.cond != "text":
            imgs = G_ema(torch.randn(n, args.z_dim, generator=gen).to(device))[0]
            return imgs if branch is None else imgs[branch]
        z, phi = [], []
        for _ in range(n):
            item, j = divmod(k[0], test.n_captions)
            if j == 0 or z_item[0] is None:
                z_item[0] = torch.randn(args.z_dim, generator=gen)
            z.append(z_item[0])
            phi.append(torch.from_numpy(np.asarray(test.embeddings(item % test.n)[j])))
            k[0] += 1
        eps = torch.randn(n, args.cond_dim, generator=gen)
        imgs = G_ema(torch.stack(z).to(device), torch.stack(phi).to(device), eps.to(device))[0]
        return imgs if branch is None else imgs[branch]
    return sample_fn


def build_fid(args, device):
    """One fid.TrainingFID at the largest scale, for every branch (Inception resizes to 299:
    DEVIATION 8, the 64 and 128 branches against the full-size reference)."""
    try:
        import fid  # evaluation only: a copy of this script without fid.py still trains
    except ImportError:
        raise common.UserError("--fid-every needs fid.py (the project's metric file) next to "
                               "stackganpp.py") from None
    return fid.TrainingFID(args.fid_ref, args.data_root, args.base_size * 4, device,
                           args.fid_samples, weights=args.fid_weights,
                           ref_split=args.fid_ref_split, ref_size=args.fid_ref_size)


def export_samples(G_ema, test, args, device, chunk=24):
    """samples_N.npz: uint8 NHWC 'images' of the largest branch (fid.py), images_<size> others."""
    fn, n = eval_sampler(G_ema, test, args, device, seed=6), args.export_samples
    parts = [[common.quantize(x) for x in fn(min(chunk, n - i))] for i in range(0, n, chunk)]
    arrays = {f"images_{args.base_size * 2**b}": torch.cat([p[b] for p in parts]).numpy()
              for b in range(2)}
    np.savez(os.path.join(args.out_dir, f"samples_{n}.npz"),
             images=torch.cat([p[2] for p in parts]).numpy(), **arrays)


def load_generator(ckpt_path, device="cpu"):
    """G_ema rebuilt from a stackganpp checkpoint alone, in eval mode: G(z, phi) -> (s, mu, lv)."""
    state = common.load_checkpoint(ckpt_path, device)
    if state.get("script") != "stackganpp":
        raise common.UserError(f"{ckpt_path!r} is not a stackganpp checkpoint")
    G = Generator(**state["G_kwargs"]).to(device)
    G.load_state_dict(state["G_ema"])
    return G.eval().requires_grad_(False)


# ==== Main ====
def main(argv=None):
    args = parse_args(argv)
    dist, autocast = setup(args)
    device = dist.device
    text, sizes = args.cond == "text", [args.base_size * 2**i for i in range(3)]
    train = load_source(args, "train")
    data = MultiScaleData(train, sizes, args.seed, text)
    _ = data[(0, 0, 0)]                   # reads one item now: a broken dataset fails at start-up
    per_epoch = len(data) // args.batch_size                       # official drop_last
    if per_epoch == 0:
        raise common.UserError(f"{len(data)} training items, fewer than --batch-size "
                               f"{args.batch_size}")
    total = args.epochs * per_epoch
    run = common.Run(args, "stackganpp", total=total, mutable=("epochs", "fid_ref"), dist=dist)
    test = load_source(args, "test") if text and (args.fid_every or args.export_samples) else None
    G, G_ema, Ds, opt_G, opt_Ds, G_kwargs = build_training(train, args, device, dist)
    ev = build_fid(args, device) if args.fid_every else None
    state = run.load(device)
    step, fixed = restore(state, G, G_ema, Ds, opt_G, opt_Ds, fixed_conditions(train, args))

    run.start(step, device, G=G, **{f"D_{s}": D for s, D in zip(sizes, Ds)})
    if dist.main:
        os.makedirs(os.path.join(args.out_dir, "samples"), exist_ok=True)
        if step == 0:
            save_reals(fixed, data, args)
    batches = keyed_batches(data, args, step, dist)
    t0, step0, saved = time.time(), step, step
    while step < total and not run.stopping:
        out = train_step(G, Ds, opt_G, opt_Ds, next(batches), args, dist, autocast)
        ema_update(G_ema, G, args.ema_decay)
        step += 1
        if args.snapshot_reset_every and step % args.snapshot_reset_every == 0:
            with torch.no_grad():   # PAPER-VS-CODE 5: official save_model leaves G at the EMA
                for p, p_ema in zip(G.parameters(), G_ema.parameters()):
                    p.copy_(p_ema)
        stop = run.stopping
        fid_now = args.fid_every and (step % args.fid_every == 0 or step == total)
        if step % args.log_every == 0 or step == total or stop or fid_now:
            values = {**out, "epoch": step / per_epoch}
            if fid_now:      # every process scores rank 0's model (its BN statistics) on the
                dist.broadcast_buffers(G, G_ema)  # same samples: identical values to average
                for b, size in enumerate(sizes):   # fid, is, is_std; + _<size> below the top
                    res = ev(eval_sampler(G_ema, test, args, device, branch=b))
                    values.update({k if b == 2 else f"{k}_{size}": v for k, v in res.items()})
            run.log(step, values)
        if dist.main and args.sample_every and (step % args.sample_every == 0 or step == total):
            sample_grids(G_ema, fixed, data, step, args, device)
        if step % args.ckpt_every == 0 or step == total or stop:
            dist.broadcast_buffers(G, G_ema)   # every rank resumes as rank 0's checkpoint
            run.save(step, snapshot(G, G_ema, Ds, opt_G, opt_Ds, fixed, G_kwargs))
            saved = step
    if run.stopping and saved != step:                 # the signal came after this step's save
        dist.broadcast_buffers(G, G_ema)
        run.save(step, snapshot(G, G_ema, Ds, opt_G, opt_Ds, fixed, G_kwargs))
    if dist.main and step > step0:
        dt = max(time.time() - t0, 1e-9)
        print(f"throughput: {(step - step0) * args.batch_size / dt:.1f} images/s (global batch "
              f"{args.batch_size}, incl. logging and sampling)", flush=True)
    if step == total and not run.stopping and dist.main and args.export_samples:  # collective
        export_samples(G_ema, test if text else None, args, device)
    return run.finish(step, device)


if __name__ == "__main__":
    common.cli(main)
