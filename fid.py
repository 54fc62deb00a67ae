"""FID, IS, KID and P&R as the field computes them, plus the "Are GANs Created Equal?" tools.
Heusel et al., "GANs Trained by a Two Time-Scale Update Rule ...", NeurIPS 2017, arXiv:1706.08500.
Lucic, Kurach, Michalski, Gelly, Bousquet, "Are GANs Created Equal?" NeurIPS 2018, arXiv:1711.10337.
Official code: mseitzer/pytorch-fid (inception.py, fid_score.py; parity target), bioinf-jku/TTUR
fid.py, toshas/torch-fidelity (tf1 mode, IS, KID), GaParmar/clean-fid (clean), google/compare_gan.

Paper -> code
  FID (arXiv:1706.08500)    ||mu1-mu2||^2 + tr S1 + tr S2 - 2 tr (S1 S2)^1/2 .. frechet_distance()
  pytorch-fid inception.py  FID Inception, 4 TF patches, taps 64/192/768/2048 .. FIDInceptionV3
  pytorch-fid fid_score.py  sorted flat folder, ToTensor, N-1 covariance ...... statistics()
  torch-fidelity/clean-fid  tf1 (TF1 bilinear) and clean (PIL bicubic) resizing .. preprocess()
  Salimans et al. 2016 S.4  IS: unbiased logits, 10 splits, std ddof 0 ........... inception_score()
  Binkowski et al. 2018     KID: cubic kernel, 100 x 1000 subsets ................ kid()
  Kynkaanniemi et al. 2019  k-NN precision / recall, k = 3 ...................... precision_recall()
  Chong & Forsyth 2020      FID_inf: fit FID_N = a + b/N, report a ............... fid_infinity()
  Lucic et al. params.py    wide / narrow search spaces, author defaults ......... sample_hparams()
  Lucic et al. budget fig.  min FID vs number of settings tried ................. budget_curve()
  Lucic et al. colab        convex polygons (triangles), 60k/10k/10k .............. make_polygons()
  project contract          FID and IS while training, resolved at start-up ..... TrainingFID
Deviations (each one also tagged in the code; grep DEVIATION|PAPER-VS-CODE)
  1. DEVIATION      --prc uses Inception pool3 features, not VGG-16 fc2 (no second weight file).
  2. DEVIATION      clean mode feeds this file's FID Inception, not the TorchScript port clean-fid
                    loads (same TF weights; the resize is checked bit-identical, features are not).
  3. PAPER-VS-CODE  compare_gan v1 scores float generator output unquantised with TF1 resizing
                    against the 10k test split; we quantise like save_image (= scoring saved PNGs)
                    and default to the pytorch-fid pipeline. --mode tf1 gives compare_gan's resize.
  4. DEVIATION      TrainingFID's reference is the training split unless ref_split="test" (FID-50k
                    convention; Lucic et al. use test), and it falls back to the eig route, saying
                    so, when sqrtm fails the imaginary-part guard (tiny N). The CLI never does.
  5. UNSPECIFIED    budget-curve resampling (with replacement, 5000 times); the triangles seed.
  The Lucic et al. approximate precision/recall on triangles is not implemented: its threshold,
  norm, projection and inversion settings are unpublished, so any number would be ours.
Run
  python fid.py gen_folder ref_folder_or_stats.npz            # pytorch-fid compatible: FID:  x
  python fid.py runs/x/samples_50000.npz dataset:cifar10 --isc   # exported samples vs train split
  python fid.py data/cifar10_png cifar10_train.npz --save-stats  # mu, sigma + provenance keys
  python fid.py samples.npz ref.npz --float-range -1 1       # float arrays: state their range
  python fid.py --tool triangles data/triangles                # study tools: --tool NAME --help
  python fid.py --tool sample-hparams wgan_gp wide --n 100   # also budget-curve, seed-report CSV
Inputs: flat sorted image folders, statistics .npz (mu, sigma; ours add provenance, checked), images
.npz ('images' or OpenAI/ADM 'arr_0'; NHWC, NCHW or NHW; uint8, floats with --float-range).
Parity (one random state dict in every net, tests/test_fid.py): features bit-identical to
pytorch-fid 0.3.0 at every tap, FID equal to its calculate_fid_given_paths; tf1 features equal to
torch-fidelity 0.4.0; clean resize bit-identical to clean-fid 0.1.35. Anchors (not measured: no
weights offline): tf1 FID(CIFAR-10 train[:5000], test[:5000]) = 10.3233, tf1 IS(train) = 11.237.
Weights: pt_inception-2015-12-05-6726825d.pth (pytorch-fid 'fid_weights'); others not comparable.
"""
import argparse
import contextlib
import csv
import functools
import hashlib
import json
import os
import pathlib
import re
import sys

import numpy as np
import scipy.linalg
import scipy.special
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torchvision.datasets.folder import pil_loader
from torchvision.models import inception as tv_inception

import common

UserError, Progress = common.UserError, common.Progress   # one-line errors; the progress line
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   + FID_WEIGHTS_FILE)
FID_WEIGHTS_SHA256_PREFIX = "6726825d"     # torch.hub naming convention; pytorch-fid never checks
IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")  # pytorch-fid
MODES = ("pytorch-fid", "tf1", "clean")
DIMS = (64, 192, 768, 2048)                # pytorch-fid BLOCK_INDEX_BY_DIM taps
PROVENANCE = dict(n=int, mode=str, dims=int, resize=bool, weights=str, source=str)  # stats keys


def _int_at_least(lo):
    def parse(text):
        value = int(text) if re.fullmatch(r"\s*[+-]?\d+\s*", text) else None
        if value is None or value < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}")
        return value
    return parse


# ==== Args ====
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="study tools: python fid.py --tool {triangles,sample-hparams,budget-curve,"
               "seed-report} ... (--tool first; a folder named like a tool is still a folder)")
    a, pos, nonneg = p.add_argument, _int_at_least(1), _int_at_least(0)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    a("path", nargs="*", help="two sources: image folder, statistics .npz, images .npz or "
      "dataset:<name>; one with --isc only [official pytorch-fid fid_score.py]")
    a("--batch-size", type=pos, help="default 50 on CPU (pytorch-fid's), 250 on CUDA [official "
      "pytorch-fid fid_score.py; ours: CUDA]")
    a("--num-workers", type=nonneg, default=min(8, cpus or 0), help="min(8, CPUs) [official "
      "pytorch-fid fid_score.py]")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu",
      help="cuda if available else cpu [official pytorch-fid fid_score.py]")
    a("--dims", type=int, default=2048, choices=DIMS, help="feature tap; 2048 = pool3 [official "
      "pytorch-fid inception.py]")
    a("--save-stats", action="store_true", help="write mu, sigma and provenance of PATH1 to PATH2 "
      "(+ .npz); never overwrites [official pytorch-fid fid_score.py]")
    a("--weights", help=f"default {FID_WEIGHTS_FILE} from the torch hub cache or a download "
      "[official pytorch-fid inception.py]")
    a("--mode", default="pytorch-fid", choices=MODES, help="resize/normalisation pipeline; "
      "statistics of another mode are refused [ours: card Tab. 2.4]")
    a("--fd-method", default="sqrtm", choices=("sqrtm", "eig", "eigh"), help="sqrtm: pytorch-fid's "
      "numbers; eig/eigh: faster, ~1e-13 relative off, ~1e-6 if N < dims [ours: card 2.6]")
    a("--no-resize", action="store_true", help="feed images at their own size (>= 75 px); the "
      "protocol only for 299x299 inputs [ours: pytorch-fid resize_input=False]")
    a("--recursive", action="store_true", help="scan folders recursively [ours]")
    a("--ignore-case", action="store_true", help="match *.PNG etc. too [ours]")
    a("--skip-unreadable", action="store_true", help="skip (and count) image files PIL cannot "
      "read; default: stop, naming the file [ours]")
    a("--float-range", type=float, nargs=2, metavar=("LO", "HI"), help="range of a float images "
      ".npz (-1 1, 0 1, 0 255), quantised like save_image; floats are refused without it [ours]")
    a("--isc", action="store_true", help="Inception Score of PATH1 [Sec. 4, Salimans 2016]")
    a("--isc-splits", type=pos, default=10, help="IS splits [Sec. 4, Salimans 2016]")
    a("--no-shuffle", action="store_true", help="IS splits in file order, as the original "
      "[official improved-gan model.py; torch-fidelity shuffles]")
    a("--kid", action="store_true", help="Kernel Inception Distance [Binkowski et al. 2018]")
    a("--kid-subsets", type=pos, default=100, help="[official torch-fidelity defaults.py]")
    a("--kid-subset-size", type=_int_at_least(2), default=1000, help="[official torch-fidelity]")
    a("--prc", action="store_true", help="k-NN precision/recall/F1 on pool3 features (DEVIATION: "
      "the paper uses VGG-16), blocked on --device [Kynkaanniemi et al. 2019]")
    a("--prc-k", type=pos, default=3, help="k-th neighbour radius [Kynkaanniemi et al. 2019]")
    a("--fid-inf", action="store_true", help="FID_inf of PATH1 vs PATH2 [Chong & Forsyth 2020]")
    a("--fid-inf-min", type=_int_at_least(2), default=5000, help="smallest of the 15 subset "
      "sizes; PATH1 needs more images [official FID_IS_infinity score_infinity.py]")
    a("--seed", type=nonneg, default=2020, help="IS shuffle / KID subsets / FID_inf seed "
      "[official torch-fidelity defaults.py]")
    a("--allow-tf32", action="store_true", help="keep TF32 during extraction [ours: card 2.13]")
    a("--fp64-features", action="store_true", help="run the network in float64 [official "
      "torch-fidelity feature_extractor_internal_dtype]")
    a("--data-root", default="data", help="root of dataset: sources [run]")
    a("--img-size", type=pos, help="dataset: sources at this size; default native [run]")
    a("--ref-split", default="train", choices=("train", "test"), help="of dataset: sources [run]")
    a("--ref-size", type=_int_at_least(2), help="first N of dataset: sources; default all [run]")
    a("--cache-dir", help="statistics of dataset: sources; default <data-root>/fid_stats [run]")
    return p.parse_args(argv)


def parse_tool_args(argv):
    p = argparse.ArgumentParser(prog="fid.py --tool", allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub, pos, nonneg = p.add_subparsers(dest="tool", required=True), _int_at_least(1), \
        _int_at_least(0)
    t = sub.add_parser("triangles", help="convex-polygon data set as PNG folders [Lucic et al.]")
    t.add_argument("out_dir", help="writes out_dir/{train,test,holdout}/NNNNN.png [run]")
    t.add_argument("--n", type=_int_at_least(8), default=80_000,
                   help="images, split 60k/10k/10k [official compare_gan v1 gan_lib.py]")
    t.add_argument("--n-vertices", type=_int_at_least(3), default=3, help="[official colab]")
    t.add_argument("--seed", type=nonneg, default=0, help="[UNSPECIFIED: colab example seed 0]")
    s = sub.add_parser("sample-hparams", help="settings as JSON lines [official params.py]")
    s.add_argument("model", choices=sorted(AUTHOR_DEFAULTS), help="[Tab. 1]")
    s.add_argument("space", choices=("wide", "narrow"), help="phase 1/2 [official params.py]")
    s.add_argument("--n", type=pos, default=100, help="settings; the first is the author default "
                   "[official compare_gan params.py]")
    s.add_argument("--seed", type=nonneg, default=0, help="[run]")
    for name, h in (("budget-curve", "min FID vs settings tried, 95%% band [Lucic et al. fig.]"),
                    ("seed-report", "FID distribution over seeds per setting [Lucic et al.]")):
        c = sub.add_parser(name, help=h)
        c.add_argument("csv", help="columns model,setting_id,seed,fid; a run's fid is its minimum "
                       "over evaluations [official compare_gan v1]")
        if name == "budget-curve":
            c.add_argument("--resamples", type=pos, default=5000, help="[UNSPECIFIED: ours]")
            c.add_argument("--seed", type=nonneg, default=0, help="[run]")
    return p.parse_args(argv)


# ==== Data ====
def list_images(path, recursive=False, ignore_case=False):
    """Sorted image files of a folder, non-recursive and case-sensitive by default [pytorch-fid]."""
    files = pathlib.Path(path).glob("**/*" if recursive else "*")
    ext = (lambda f: f.suffix[1:].lower()) if ignore_case else (lambda f: f.suffix[1:])
    return sorted(f for f in files if ext(f) in IMAGE_EXTENSIONS and f.is_file())


def read_images(files):
    """collate_fn: uint8 (N, 3, H, W) by PIL convert('RGB') [pytorch-fid], 'path: error' list."""
    good, bad = [], []
    for f in files:
        try:
            good.append(TF.pil_to_tensor(pil_loader(f)))
        except Exception as e:                     # PIL raises many types; name the file instead
            bad.append(f"{f}: {e}")
    return (torch.stack(good) if len({x.shape for x in good}) == 1 else good), bad


def load_npz_images(path, float_range=None):
    """uint8 (N, C, H, W) of 'images' or 'arr_0' (OpenAI/ADM); floats only in a stated range."""
    with np.load(path) as f:
        key = next((k for k in ("images", "arr_0") if k in f.files), None)
        if key is None:
            raise UserError(f"{path} has neither statistics ('mu', 'sigma') nor images ('images', "
                            f"'arr_0'); its keys: {', '.join(f.files) or 'none'}")
        a = f[key]
    what, a = f"{path}: '{key}' {a.shape} {a.dtype}", a[..., None] if a.ndim == 3 else a
    if a.ndim != 4 or not ({a.shape[1], a.shape[3]} & {1, 3}):
        raise UserError(f"{what}: expected (N, H, W, C), (N, C, H, W) or (N, H, W), C = 1 or 3")
    if a.shape[3] not in (1, 3):
        print(f"{what}: read as NCHW", flush=True)
        a = a.transpose(0, 2, 3, 1)                                 # NCHW -> NHWC
    if a.dtype == np.uint8:
        return torch.from_numpy(a).permute(0, 3, 1, 2)              # (N, C, H, W)
    if a.dtype.kind != "f":
        raise UserError(f"{what}: fid.py reads uint8 images (0..255), or floats with --float-range")
    a_min, a_max = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if not np.isfinite([a_min, a_max]).all():
        raise UserError(f"{what} holds NaN or Inf")
    if float_range is None:
        raise UserError(f"{what} in [{a_min:.4g}, {a_max:.4g}], not uint8: pass --float-range LO "
                        "HI (e.g. -1 1, 0 1, 0 255) to quantise it like save_image")
    lo, hi = float_range
    if not lo < hi or a_min < lo - 1e-3 * (hi - lo) or a_max > hi + 1e-3 * (hi - lo):
        raise UserError(f"{what} in [{a_min:.4g}, {a_max:.4g}], outside --float-range {lo} {hi}")
    if a_max - a_min < 0.5 * (hi - lo):
        print(f"warning: {what} spans only [{a_min:.4g}, {a_max:.4g}] of --float-range", flush=True)
    x = torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)
    return torch.cat([quantize(c, lo, hi) for c in x.split(1000)])


def quantize(x, lo=-1.0, hi=1.0):
    """Float in [lo, hi] -> uint8 exactly as save_image(normalize=True, value_range=(lo, hi))."""
    # PAPER-VS-CODE: compare_gan v1 scores unquantised floats; we score what save_image would write
    x = x.detach().float().clamp(lo, hi).sub(lo).div(hi - lo)       # torchvision make_grid norm_ip
    return x.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)      # save_image rounds, no floor


def _tf1_resize(x, size):
    """TF1 legacy bilinear: src = dst * in/out (no half-pixel), edge-clamped, W then H [card]."""
    def taps(n_in):
        src = torch.arange(size, dtype=torch.float32, device=x.device) * (n_in / size)
        i0 = src.floor().long().clamp(max=n_in - 1)
        return i0, (i0 + 1).clamp(max=n_in - 1), (src - i0).to(x.dtype)
    r0, r1, wr = taps(x.shape[2])
    c0, c1, wc = taps(x.shape[3])
    left, right = x[..., c0], x[..., c1]
    x = left + (right - left) * wc                                   # (N, C, H_in, size)
    top, bottom = x[:, :, r0], x[:, :, r1]
    return top + (bottom - top) * wr[:, None]                        # (N, C, size, size)


def _clean_resize(x, size):
    """clean-fid 'clean': PIL bicubic per channel on float32 ('F'), clip 0..255, no requantising."""
    out = torch.empty(*x.shape[:2], size, size, dtype=torch.float32)
    for i in range(x.shape[0]):
        for c in range(x.shape[1]):
            img = TF.to_pil_image(x[i, c:c + 1].float().cpu(), mode="F")
            img = TF.resize(img, [size, size], interpolation=TF.InterpolationMode.BICUBIC)
            out[i, c] = torch.from_numpy(np.array(img, dtype=np.float32))
    return out.clamp_(0, 255).to(x.device, x.dtype)


def preprocess(x, mode="pytorch-fid", resize=True, dtype=torch.float32):
    """uint8 or [0, 1] float (N, 3, H, W) -> normalised 299x299 network input [card Tab. 2.4]."""
    if mode == "pytorch-fid":                       # ToTensor: x/255; bilinear half-pixel; 2x - 1
        x = x.to(dtype).div(255) if x.dtype == torch.uint8 else x.to(dtype)
        if resize:
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return 2 * x - 1
    x = x.to(dtype) if x.dtype == torch.uint8 else x.to(dtype) * 255   # tf1/clean work on 0..255
    if resize and x.shape[-2:] != (299, 299):   # DEVIATION (clean): our net, not clean-fid's port
        x = _tf1_resize(x, 299) if mode == "tf1" else _clean_resize(x, 299)
    return (x - 128) / 128                          # TF graph's Sub/Mul: 255 -> 0.9921875


# ==== Models ====
def _pool_avg(x):        # Patch 1: TF 'SAME' average pooling does not count the zero padding
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(tv_inception.InceptionA):
    """Mixed_5b-d. Patch 1: the pool branch averages without the zero padding."""

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b1, b5, b3, self.branch_pool(_pool_avg(x))], 1)


class FIDInceptionC(tv_inception.InceptionC):
    """Mixed_6b-e. Patch 1 as in FIDInceptionA."""

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(bd))))
        return torch.cat([b1, b7, bd, self.branch_pool(_pool_avg(x))], 1)


class FIDInceptionE(tv_inception.InceptionE):
    """Mixed_7b (FIDInceptionE_1, patch 1); Mixed_7c (FIDInceptionE_2, patch 2: TF max-pools)."""

    def __init__(self, in_channels, max_pool):
        super().__init__(in_channels)
        self.max_pool = max_pool

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _pool_avg(x)
        return torch.cat([b1, b3, bd, self.branch_pool(pooled)], 1)


class FIDInceptionV3(tv_inception.Inception3):
    """pytorch-fid's fid_inception_v3: Inception3, TF patches, 1008-way fc (patch 3), no aux."""

    def __init__(self, dims=2048, mode="pytorch-fid", resize=True):
        super().__init__(num_classes=1008, aux_logits=False, transform_input=False,
                         init_weights=False)
        if dims not in DIMS or mode not in MODES:
            raise ValueError(f"dims must be one of {DIMS} and mode one of {MODES}")
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
        self.dims, self.mode, self.resize, self.weights_hash = dims, mode, resize, "random"

    def taps(self, x):
        """Feature maps of pytorch-fid's blocks 0-3, up to the one `dims` needs."""
        x = self.maxpool1(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))))
        yield x                                                          # (N, 64, 73, 73) block 0
        x = self.maxpool2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
        yield x                                                          # (N, 192, 35, 35) block 1
        for m in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,
                  self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e):
            x = m(x)
        yield x                                                          # (N, 768, 17, 17) block 2
        yield self.avgpool(self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x))))  # (N, 2048, 1, 1)

    def forward(self, x):
        for dims, f in zip(DIMS, self.taps(x)):
            if dims == self.dims:    # spatial taps are averaged as pytorch-fid does
                return F.adaptive_avg_pool2d(f, output_size=(1, 1)).flatten(1)   # (N, dims)


def resolve_weights(weights=None):
    """--weights, else the torch hub cache, else a download; offline and absent -> UserError."""
    if weights:
        if not os.path.isfile(weights):
            raise UserError(f"--weights {weights!r} does not exist")
        return weights
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", FID_WEIGHTS_FILE)
    if not os.path.isfile(cached):
        try:
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            torch.hub.download_url_to_file(FID_WEIGHTS_URL, cached, progress=True)
        except Exception as e:
            raise UserError(f"FID Inception weights {FID_WEIGHTS_FILE} not found: no --weights, "
                            f"not in the torch hub cache ({cached}), and downloading "
                            f"{FID_WEIGHTS_URL} (pytorch-fid release 'fid_weights') failed: {e}. "
                            "Download it elsewhere and pass --weights PATH (Python: weights=PATH) "
                            "or copy it to that cache path") from None
    return cached


def sha256_prefix(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:8]


def build_inception(weights=None, dims=2048, mode="pytorch-fid", resize=True):
    """FID Inception in eval mode with the published weights loaded strictly (566 or 472 keys)."""
    path = resolve_weights(weights)
    with torch.device("meta"):                      # no random init: all tensors come from the file
        model = FIDInceptionV3(dims, mode, resize)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(sd, strict=True, assign=True)
    except Exception as e:                          # pickle, zip or key errors: one line, the file
        why = " ".join(str(e).split())                         # torch's multi-line key lists
        raise UserError(f"{path} is not an FID Inception state dict: {why[:300]}") from None
    model.weights_hash = sha256_prefix(path)
    if model.weights_hash != FID_WEIGHTS_SHA256_PREFIX:
        print(f"warning: {path} has SHA-256 prefix {model.weights_hash}, not the published "
              f"{FID_WEIGHTS_SHA256_PREFIX}; its scores are not comparable with published FIDs",
              flush=True)
    return model.eval().requires_grad_(False)


# ==== Metric ====
@contextlib.contextmanager
def exact_fp32(allow_tf32=False):
    """TF32 off and cuDNN deterministic during extraction; every flag restored [card 2.13]."""
    b = torch.backends             # legacy flags only without the new API: mixing them raises
    if hasattr(getattr(b.cudnn, "conv", None), "fp32_precision"):
        objs = [(b.cuda.matmul, "fp32_precision", "ieee"), (b.cudnn.conv, "fp32_precision", "ieee")]
    else:
        objs = [(b.cuda.matmul, "allow_tf32", False), (b.cudnn, "allow_tf32", False)]
    objs = ([] if allow_tf32 else objs) + [(b.cudnn, "benchmark", False),
                                           (b.cudnn, "deterministic", True)]
    saved = [getattr(o, a) for o, a, _ in objs]
    try:
        for o, a, v in objs:
            setattr(o, a, v)
        yield
    finally:
        for (o, a, _), v in zip(objs, saved):
            setattr(o, a, v)


def extract(batches, model, total, progress=None, allow_tf32=False):
    """uint8 / [0, 1] float batches (lists if sizes differ) -> (N, dims) float64 [get_activations];
    features go to a pinned host buffer without a per-batch sync."""
    p = next(model.parameters())
    out, done = torch.empty((total, model.dims), dtype=p.dtype, pin_memory=p.is_cuda), 0

    def prepare(x):                          # grey -> RGB; contiguous: an NHWC view would switch
        x = x.to(p.device, non_blocking=True)                   # the CPU convolution algorithm
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x   # (N, 3, H, W)
        return preprocess(x.contiguous(), model.mode, model.resize, p.dtype)
    with exact_fp32(allow_tf32), torch.no_grad():
        for x in batches:
            if isinstance(x, list) and not model.resize:   # mixed sizes: each image resized alone
                sizes = sorted({"x".join(map(str, im.shape[-2:])) for im in x})
                raise UserError(f"images of different sizes ({', '.join(sizes)}) need resizing: "
                                "drop --no-resize to resize each to 299x299")
            x = torch.cat([prepare(im[None]) for im in x]) if isinstance(x, list) else prepare(x)
            out[done:done + len(x)].copy_(model(x), non_blocking=True)
            done += len(x)
            if progress is not None:
                progress.update(len(x))
    if p.is_cuda:
        torch.cuda.synchronize(p.device)            # the one sync: the pinned copies have landed
    return out[:done].numpy().astype(np.float64)


def activations(images, model, batch_size=50, allow_tf32=False):
    """(N, 3, H, W) uint8 or [0, 1] float tensor -> (N, dims) float64 [pytorch-fid]."""
    return extract(images.split(batch_size), model, len(images), allow_tf32=allow_tf32)


def statistics(features, what="features"):
    """mu = column mean, sigma = np.cov(rowvar=False) with N - 1, float64 [pytorch-fid]."""
    features = np.asarray(features, dtype=np.float64)
    if len(features) < 2:
        raise UserError(f"{what}: {len(features)} image(s); FID statistics need at least 2 (and "
                        f"more than {features.shape[-1]}, the dims, for a non-singular covariance)")
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, method="sqrtm", eps=1e-6):
    """||mu1 - mu2||^2 + tr S1 + tr S2 - 2 tr (S1 S2)^1/2 [FID paragraph, arXiv:1706.08500]."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics differ in shape: mu {mu1.shape} vs {mu2.shape}, sigma "
                         f"{sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    if method == "sqrtm":                # pytorch-fid / TTUR: "stable version by Dougal Sutherland"
        covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))   # no `disp`; scipy>=1.13 (#100)
        if not np.isfinite(covmean).all():
            print(f"fid calculation produces singular product; adding {eps} to diagonal of cov "
                  "estimates")
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
        if np.iscomplexobj(covmean):                        # round-off gives a small imaginary part
            if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
                raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
            covmean = covmean.real
        tr_covmean = np.trace(covmean)
    elif method == "eig":     # S1 S2 ~ S1^1/2 S2 S1^1/2 (PSD): tr sqrt = sum sqrt(lambda), complex
        lam = np.linalg.eigvals(sigma1.dot(sigma2)).astype(np.complex128)
        tr_covmean = np.sqrt(lam).real.sum()
    elif method == "eigh":    # symmetric (TF-GAN trace_sqrt_product): A = S1^1/2, eigvalsh(A S2 A)
        w, v = np.linalg.eigh(sigma1)
        root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(root @ sigma2 @ root), 0, None)).sum()
    else:
        raise ValueError(f"unknown method {method!r}")
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def logits_unbiased(features, model):
    """pool3 . fc.weight^T without fc.bias, 1008 classes [Sec. 4, Salimans et al.; card 2.8]."""
    w = model.fc.weight.detach().float().cpu()
    return (torch.from_numpy(np.asarray(features, np.float32)) @ w.T).double().numpy()  # (N, 1008)


def inception_score(logits, splits=10, shuffle=True, seed=2020):
    """IS = exp E_x KL(p(y|x) || p(y)) per split; mean and std (ddof 0) [Sec. 4, Salimans 2016]."""
    logits = np.asarray(logits, dtype=np.float64)
    if len(logits) < splits:
        raise UserError(f"IS with {splits} splits needs at least {splits} images, got "
                        f"{len(logits)}")
    if shuffle:                                             # torch-fidelity: RandomState(2020)
        logits = logits[np.random.RandomState(seed).permutation(len(logits))]
    log_p = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)
    n, scores = len(log_p), []
    for i in range(splits):
        lp = log_p[i * n // splits:(i + 1) * n // splits]
        p = np.exp(lp)
        kl = (p * (lp - np.log(p.mean(axis=0, keepdims=True)))).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def mmd2_poly(x, y, degree=3, coef0=1.0):
    """Unbiased MMD^2, k(a, b) = (a.b/d + 1)^3, cross term keeps i = j [official MMD-GAN]."""
    gamma, m = 1.0 / x.shape[1], len(x)
    k_xx, k_yy, k_xy = ((a @ b.T * gamma + coef0) ** degree for a, b in ((x, x), (y, y), (x, y)))
    within = k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)
    return within / (m * (m - 1)) - 2 * k_xy.sum() / m ** 2


def kid(features1, features2, subsets=100, subset_size=1000, seed=2020):
    """KID: MMD^2 over random subsets without replacement; mean, std (ddof 0) [Binkowski 2018]."""
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if min(len(f1), len(f2)) < subset_size:
        raise UserError(f"KID needs >= {subset_size} images per set (--kid-subset-size), got "
                        f"{len(f1)} and {len(f2)}")
    rng = np.random.RandomState(seed)
    mmds = [mmd2_poly(f1[rng.choice(len(f1), subset_size, replace=False)],
                      f2[rng.choice(len(f2), subset_size, replace=False)]) for _ in range(subsets)]
    return float(np.mean(mmds)), float(np.std(mmds))


def distances(a, b):
    """Euclidean distances (len(a), len(b)) by |a|^2 + |b|^2 - 2 a.b, in the inputs' dtype."""
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T
    return d2.clamp_(min=0).sqrt_()


def precision_recall(real, fake, k=3, batch=10_000, device="cpu"):
    """Share of fake in real k-NN balls, the converse, F1; blocks on `device` [Kynkaanniemi]."""
    real, fake = (torch.as_tensor(np.asarray(v, np.float64), device=device) for v in (real, fake))

    def radii(x):            # distance to the k-th neighbour, self excluded = (k+1)-th incl. 0
        out = []
        for i in range(0, len(x), batch):
            best = torch.cat([distances(x[i:i + batch], x[j:j + batch]).topk(
                min(k + 1, len(x[j:j + batch])), dim=1, largest=False).values
                for j in range(0, len(x), batch)], 1)                      # (B, <= blocks * (k+1))
            out.append(best.topk(k + 1, dim=1, largest=False).values[:, k])
        return torch.cat(out)

    def inside(q, ref, r):
        hit = torch.zeros(len(q), dtype=torch.bool, device=device)
        for i in range(0, len(q), batch):
            for j in range(0, len(ref), batch):
                d = distances(q[i:i + batch], ref[j:j + batch])
                hit[i:i + batch] |= (d <= r[None, j:j + batch]).any(1)
        return hit.double().mean().item()

    if min(len(real), len(fake)) <= k:
        raise UserError(f"--prc-k {k} needs more than {k} images per set")
    p, r = inside(fake, real, radii(real)), inside(real, fake, radii(fake))
    return float(p), float(r), float(2 * p * r / max(p + r, 1e-5))


def fid_infinity(features, mu_ref, sigma_ref, points=15, lo=5000, seed=2020, method="sqrtm"):
    """a of FID_N = a + b/N fit at `points` subset sizes in [lo, N] [Chong & Forsyth 2020]."""
    ns = np.linspace(lo, len(features), points).astype(int)
    if len(features) <= lo or len(set(ns)) < points:
        raise UserError(f"FID_inf fits FID_N at {points} distinct N in [{lo}, N] and needs more "
                        f"than {lo + points - 2} images (--fid-inf-min {lo}), got {len(features)}")
    rng = np.random.RandomState(seed)
    fids = [frechet_distance(*statistics(features[rng.permutation(len(features))[:n]]), mu_ref,
                             sigma_ref, method=method) for n in ns]
    return fit_fid_infinity(ns, fids)


def fit_fid_infinity(ns, fids):
    a_matrix = np.stack([np.ones(len(ns)), 1.0 / np.asarray(ns, np.float64)], axis=1)   # [1, 1/N]
    return float(np.linalg.lstsq(a_matrix, np.asarray(fids, np.float64), rcond=None)[0][0])


# ---- statistics files: pytorch-fid's mu and sigma, plus provenance (pytorch-fid ignores it) ----
def provenance(model, n, source):
    return dict(n=n, mode=model.mode, dims=model.dims, resize=model.resize,
                weights=model.weights_hash, source=str(source))


def save_stats(path, mu, sigma, prov):
    """Atomic .npz of mu, sigma (pytorch-fid's keys) and the provenance keys that are known."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:                     # a file object: numpy appends no second .npz
        np.savez_compressed(f, mu=mu, sigma=sigma,
                            **{k: v for k, v in prov.items() if k in PROVENANCE and v is not None})
    os.replace(tmp, path)


def load_stats(path, mode, dims, resize):
    """mu, sigma, PROVENANCE (None where absent); refuses another pipeline, warns without one."""
    try:
        with np.load(path) as f:
            s = {k: f[k] for k in f.files}
    except Exception as e:                         # zip, pickle and format errors: name the file
        raise UserError(f"cannot read statistics {path}: {e}") from None
    mu, sigma = np.atleast_1d(s["mu"]), np.atleast_2d(s["sigma"])   # dtype kept, as pytorch-fid
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise UserError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not (d,) and (d, d)")
    s = dict({k: t(s[k][()]) if k in s else None for k, t in PROVENANCE.items()}, mu=mu,
             sigma=sigma)
    pipeline = lambda m, r: f"--mode {m}" + ("" if r else " --no-resize")   # noqa: E731
    if len(mu) != dims:
        raise UserError(f"{path} holds {len(mu)}-d statistics; this run uses --dims {dims}")
    if s["mode"] is None:
        print(f"warning: {path} has no provenance (mu and sigma only); assuming "
              f"{pipeline(mode, resize)} and the published weights", flush=True)
    elif (s["mode"], s["resize"]) != (mode, resize):
        raise UserError(f"{path} holds {pipeline(s['mode'], s['resize'])} statistics; this run "
                        f"uses {pipeline(mode, resize)}: different pipelines are not comparable")
    return s


def reference_stats(dataset, data_root, img_size, model, split="train", size=None, cache_dir=None,
                    class_labels=(None,), batch_size=50, num_workers=0):
    """{class label: statistics} of the first `size` images of a split, cached in cache_dir."""
    load = lambda: common.load_dataset(dataset, data_root, img_size, train=split == "train")  # noqa
    tag, ds = [re.sub(r"[^A-Za-z0-9.]+", "_", dataset).strip("_")[:40], hashlib.sha1(
        dataset.encode()).hexdigest()[:6], str(img_size or "native"), split], None
    if dataset.startswith("folder:"):              # a folder can change: its size keys the cache
        ds = load()
        tag.append(f"files{len(ds)}")
    tag += [f"n{size or 'all'}", model.mode, *([] if model.resize else ["noresize"]),
            f"d{model.dims}", f"w{model.weights_hash}"]
    out, todo = {}, {}
    for c in class_labels:
        path = os.path.join(data_root, "fid_stats") if cache_dir is None else cache_dir
        path = os.path.join(path, "-".join(tag + ["all" if c is None else f"class{c}"]) + ".npz")
        if os.path.isfile(path):
            out[c] = load_stats(path, model.mode, model.dims, model.resize)
        else:
            todo[c] = path
    if not todo:
        return out
    ds = load() if ds is None else ds
    n = len(ds) if size is None or any(c is not None for c in todo) else min(size, len(ds))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(n)),
                                         batch_size=batch_size, num_workers=num_workers)
    device, labels, desc = next(model.parameters()).device, [], f"dataset:{dataset} {split}"

    def batches():
        for x, y in loader:
            labels.append(torch.as_tensor(y))
            yield quantize(x.to(device, non_blocking=True))         # [-1, 1] -> uint8 on device
    feats = extract(batches(), model, n, Progress(f"reference {desc}", n, unit="img"))
    labels = torch.cat(labels).numpy()
    for c, path in todo.items():
        f, what = (feats, desc) if c is None else (feats[labels == c], f"{desc} class {c}")
        if size is not None and len(f) < size:
            raise UserError(f"ref_size {size}: {what} has only {len(f)} images")
        mu, sigma = statistics(f[:size], what)
        out[c] = dict(provenance(model, len(f[:size]), f"{what}, first {size or 'all'}"), mu=mu,
                      sigma=sigma)
        save_stats(path, mu, sigma, out[c])
    return out


class TrainingFID:
    """--fid-every: net, weights and reference statistics resolved at start-up (UserError); ev(
    sample_fn(n <= 50) -> (n, C, H, W) in [-1, 1]) -> {"fid", "is", "is_std"} of one pass."""

    def __init__(self, dataset, data_root, img_size, device, n_samples, weights=None,
                 ref_split="train", ref_size=None, cache_dir=None, class_labels=(None,)):
        if ref_split not in ("train", "test"):
            raise UserError(f"ref_split must be 'train' or 'test', got {ref_split!r}")
        if ref_size is not None and (not isinstance(ref_size, int) or ref_size < 2):
            raise UserError(f"ref_size must be None (all) or an integer >= 2, got {ref_size!r}")
        self._warned = set()
        self.n_samples = self._check_n(n_samples)
        self.model = build_inception(weights).to(device)
        self.ref = reference_stats(dataset, data_root, img_size, self.model, ref_split, ref_size,
                                   cache_dir, tuple(class_labels))

    def _check_n(self, n):
        if not isinstance(n, int) or n < 10:
            raise UserError(f"FID/IS samples must be an integer >= 10 (IS uses 10 splits), got "
                            f"{n!r}")
        if n < 2048 and n not in self._warned:
            self._warned.add(n)
            print(f"warning: FID of {n} < 2048 generated images: the covariance is singular and "
                  "FID biased upward; compare only at equal N", flush=True)
        return n

    def __call__(self, sample_fn, class_label=None, n_samples=None):
        n = self.n_samples if n_samples is None else self._check_n(n_samples)
        if class_label not in self.ref:
            raise ValueError(f"class_label {class_label!r} has no reference statistics; built "
                             f"for class_labels={tuple(self.ref)}")
        device, ref = next(self.model.parameters()).device, self.ref[class_label]

        def batches():
            for i in range(0, n, 50):
                with torch.no_grad():
                    x = sample_fn(min(50, n - i))
                if x.ndim != 4 or len(x) != min(50, n - i) or x.shape[1] not in (1, 3) \
                        or not x.is_floating_point():
                    raise ValueError(f"sample_fn({min(50, n - i)}) must return (n, C, H, W) "
                                     f"floats, C = 1 or 3; got {tuple(x.shape)} {x.dtype}")
                yield quantize(x.to(device))                        # like save_image, on device
        feats = extract(batches(), self.model, n, Progress("fid samples", n, unit="img"))
        mu, sigma, method = *statistics(feats), "sqrtm"
        try:
            value = frechet_distance(mu, sigma, ref["mu"], ref["sigma"])
        except ValueError as e:   # DEVIATION: monitoring keeps going on tiny N; the CLI raises
            method = f"eig (sqrtm failed: {e})"
            value = frechet_distance(mu, sigma, ref["mu"], ref["sigma"], method="eig")
        is_mean, is_std = inception_score(logits_unbiased(feats, self.model))  # 10 splits
        print(f"fid {value:.4f} | is {is_mean:.4g} +- {is_std:.2g} | mode pytorch-fid | N_gen {n} "
              f"vs N_ref {ref['n']} ({ref['source']}) | {method} | dims 2048 | weights "
              f"{self.model.weights_hash}", flush=True)
        return {"fid": value, "is": is_mean, "is_std": is_std}


# ---- "Are GANs Created Equal?" tools ----
def render_polygons(vertices, size=28, subpixel=8):
    """(B, k, 2) convex polygons (row, col) -> (B, size, size) dark on white [official colab]."""
    s = size * subpixel
    pr, pc = (g.reshape(-1) / subpixel for g in np.mgrid[0:s, 0:s])    # (P,) row, col of corners
    v = np.asarray(vertices, np.float64)
    e = np.roll(v, -1, axis=1) - v                                      # (B, k, 2) edges
    # cross(e, p - v): its sign says on which side of an edge p lies; inside = the same side of all
    cross = (e[..., 0, None] * pc - e[..., 1, None] * pr
             - (e[..., 0] * v[..., 1] - e[..., 1] * v[..., 0])[..., None])   # (B, k, P)
    inside = (cross >= 0).all(axis=1) | (cross <= 0).all(axis=1)        # (B, P) either orientation
    # the colab's ndimage.convolve (cval 1) sampled every 8th: sums over subpixel rows 8i-3..8i+4
    white = np.pad((~inside).reshape(-1, s, s), ((0, 0), (3, 0), (3, 0)), constant_values=True)
    white = white[:, :s, :s].reshape(-1, size, subpixel, size, subpixel)
    return white.mean(axis=(2, 4)).astype(np.float32)


def make_polygons(n=80_000, n_vertices=3, min_angle=20.0, scale=0.75, size=28, subpixel=8, seed=0):
    """Lucic et al.'s convex-polygon images (n, size, size) in [0, 1], shuffled [official colab]."""
    rs, seg = np.random.RandomState(seed), 360.0 / n_vertices
    verts = np.empty((n, n_vertices, 2))
    for i in range(n):
        u = rs.uniform(size=n_vertices)
        theta = np.radians(rs.uniform() * 2 * np.pi)      # colab quirk: radians of a value < 2 pi
        ang = np.radians(np.arange(n_vertices) * seg + min_angle / 2 + u * (seg - min_angle / 2))
        p = (np.stack([np.cos(ang), np.sin(ang)], 1) + 1) / 2                 # (k, 2) in [0, 1]^2
        rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        p = p @ rot * size * scale          # the colab's np.dot(x, rot): row vectors, i.e. -theta
        verts[i] = p + size / 2 - p.mean(axis=0)                              # shift_to_mean
    images = [render_polygons(verts[i:i + 50], size, subpixel) for i in range(0, n, 50)]
    return np.concatenate(images)[rs.permutation(n)]


def polygon_splits(n):
    """train / test / holdout 60k / 10k / 10k of 80k, in proportion [official v1 gan_lib.py]."""
    a, b = n * 3 // 4, n * 7 // 8
    return range(0, a), range(a, b), range(b, n)


AUTHOR_DEFAULTS = {   # first sample of each search: beta1, lr, disc_iters, D BN, extras [params.py]
    "mm_gan": dict(beta1=0.0, lr=5e-5, disc_iters=1, batch_norm=True),
    "ns_gan": dict(beta1=0.0, lr=5e-5, disc_iters=1, batch_norm=True),
    "lsgan": dict(beta1=0.5, lr=2e-4, disc_iters=1, batch_norm=True),
    "wgan": dict(beta1=0.5, lr=5e-5, disc_iters=5, batch_norm=True, clip=0.01),
    "wgan_gp": dict(beta1=0.5, lr=1e-4, disc_iters=5, batch_norm=False, lambda_=10.0),
    "dragan": dict(beta1=0.5, lr=1e-4, disc_iters=1, batch_norm=True, lambda_=10.0),
    "began": dict(beta1=0.5, lr=1e-4, disc_iters=5, batch_norm=False, began_lambda=1e-3,
                  gamma=0.75),
    "vae": dict(beta1=0.5, lr=5e-5, batch_norm=True),   # UNSPECIFIED: VAE batch-norm default
}


def sample_hparams(model, space="wide", n=100, seed=0):
    """Random-search settings; wide = phase 1, narrow = phase 2 [official compare_gan params.py]."""
    rs, wide, out = np.random.RandomState(seed), space == "wide", [dict(AUTHOR_DEFAULTS[model])]
    for _ in range(n - 1):
        h = {"beta1": float(rs.uniform(0, 1)) if wide else 0.5,
             "lr": float(10 ** rs.uniform(-5, -2) if wide else 10 ** rs.uniform(-4, -3))}
        if model != "vae":
            h["disc_iters"] = int(rs.choice([1, 5])) if wide else 1       # code samples {1, 5}
        no_bn = not wide and model in ("wgan_gp", "dragan")               # narrow GP: no D BN
        h["batch_norm"] = False if no_bn else bool(rs.randint(2))
        if model == "wgan":
            h["clip"] = float(10 ** rs.uniform(-3, 0) if wide else 10 ** rs.uniform(-2, 0))
        if model in ("wgan_gp", "dragan"):
            h["lambda_"] = float(10 ** rs.uniform(-1, 2) if wide else 10 ** rs.uniform(-1, 1))
        if model == "began":
            h["began_lambda"] = float(10 ** rs.uniform(-4, -2)) if wide else 1e-3
            h["gamma"] = float(rs.uniform(0, 1) if wide else rs.uniform(0.6, 0.9))
        out.append(h)
    return out[:n]


def budget_curve(fids, resamples=5000, seed=0):
    """Mean min FID of k = 1..K settings and a 95% band [budget fig.; UNSPECIFIED: bootstrap]."""
    fids = np.asarray(fids, np.float64)
    draws = fids[np.random.RandomState(seed).randint(len(fids), size=(resamples, len(fids)))]
    best = np.minimum.accumulate(draws, axis=1)                        # (B, K) min over first k
    return best.mean(0), np.percentile(best, 2.5, axis=0), np.percentile(best, 97.5, axis=0)


def seed_report(rows):
    """Per model and setting: the FID distribution over seeds (n, min, quartiles, max, mean, sd)."""
    groups = {}
    for r in rows:
        groups.setdefault((r["model"], r["setting_id"]), []).append(r["fid"])
    report = []
    for (model, setting), v in sorted(groups.items(), key=lambda kv: (kv[0][0], np.median(kv[1]))):
        q = np.percentile(v, [0, 25, 50, 75, 100])
        report.append(dict(model=model, setting_id=setting, n=len(v), min=q[0], q1=q[1],
                           median=q[2], q3=q[3], max=q[4], mean=float(np.mean(v)),
                           std=float(np.std(v, ddof=1) if len(v) > 1 else 0)))
    return report


# ==== Main ====
def _source(path, args, get_model):
    """Features (None for statistics), mu, sigma, provenance and a description of one source."""
    if path.startswith("dataset:"):
        s = reference_stats(path[len("dataset:"):], args.data_root, args.img_size, get_model(),
                            args.ref_split, args.ref_size, args.cache_dir,
                            batch_size=args.batch_size, num_workers=args.num_workers)[None]
        return dict(s, feats=None, desc=s["source"])
    if not os.path.exists(path):
        raise UserError(f"Invalid path: {path}")
    skipped, batch_size = [], args.batch_size
    if path.endswith(".npz"):
        try:
            with np.load(path) as f:
                is_stats = "mu" in f.files
        except Exception as e:
            raise UserError(f"cannot read {path}: {e}") from None
        if is_stats:
            s = load_stats(path, args.mode, args.dims, not args.no_resize)
            return dict(s, feats=None, desc=f"stats {path}")
        images = load_npz_images(path, args.float_range)
        batches, total = images.split(batch_size), len(images)
    elif os.path.isdir(path):
        files = list_images(path, args.recursive, args.ignore_case)
        if not files:
            raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {path} (see "
                            "--recursive, --ignore-case)")
        if batch_size > len(files):
            print("Warning: batch size is bigger than the data size. Setting batch size to data "
                  "size")
            batch_size = len(files)
        loader = torch.utils.data.DataLoader(
            files, batch_size=batch_size, shuffle=False, drop_last=False, collate_fn=read_images,
            num_workers=args.num_workers, pin_memory=next(get_model().parameters()).is_cuda)

        def batches():
            for x, bad in loader:
                if bad and not args.skip_unreadable:
                    raise UserError(f"cannot read image {bad[0]} (--skip-unreadable skips them)")
                skipped.extend(bad)
                progress.update(len(bad))
                if len(x):
                    yield x
        batches, total = batches(), len(files)
    else:
        raise UserError(f"{path} is neither a folder nor an .npz file")
    progress = Progress(f"features {path}", total, unit="img")
    feats = extract(batches, get_model(), total, progress, args.allow_tf32)
    if skipped:
        print(f"warning: skipped {len(skipped)} unreadable of {total} files in {path}, e.g. "
              f"{skipped[0]}", flush=True)
    mu, sigma = statistics(feats, path)
    return dict(provenance(get_model(), len(feats), path), feats=feats, mu=mu, sigma=sigma,
                desc=path)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if argv[:1] == ["--tool"]:                     # explicit: a folder named like a tool is a path
        return run_tool(parse_tool_args(argv[1:]))
    args = parse_args(argv)
    device = common.get_device(args.device)
    if args.batch_size is None:                    # pytorch-fid's 50 on CPU; a GPU wants more
        args.batch_size = 250 if device.type == "cuda" else 50
    if not (len(args.path) == 2 or (len(args.path) == 1 and args.isc and not args.save_stats)):
        raise UserError(f"give two sources (one with --isc only), got {len(args.path)}")

    @functools.cache
    def get_model():         # built on first use: two .npz statistics need no weights
        m = build_inception(args.weights, args.dims, args.mode, resize=not args.no_resize)
        return m.to(device, torch.float64 if args.fp64_features else torch.float32)

    if args.save_stats:
        out = args.path[1] if args.path[1].endswith(".npz") else args.path[1] + ".npz"
        if os.path.exists(out):                    # the path numpy writes, not the one given
            raise UserError(f"Existing output file: {out} (--save-stats never overwrites)")
        s = _source(args.path[0], args, get_model)
        print(f"Saving statistics of {args.path[0]} ({s['n']} images) to {out}", flush=True)
        save_stats(out, s["mu"], s["sigma"], s)
        return {"n": s["n"], "path": out}
    src = [_source(p, args, get_model) for p in args.path]
    for p, s in zip(args.path, src):
        if s["n"] is not None and s["n"] < args.dims:
            print(f"warning: {p}: N = {s['n']} < {args.dims} dims: the covariance is singular and "
                  "FID biased upward; compare only at equal N (TTUR: >= 10000)", flush=True)
    hashes = sorted({s["weights"] for s in src if s["weights"]})
    if len(hashes) > 1:
        print(f"warning: statistics from different Inception weights ({', '.join(hashes)}) are not "
              "comparable", flush=True)
    tag = (f"mode {args.mode} | N {' vs '.join(str(s['n'] or '?') for s in src)} | ref "
           f"{src[-1]['desc']} | dims {args.dims} | weights {'/'.join(hashes) or 'unrecorded'}")
    res, feats = {}, [s["feats"] for s in src]
    if len(src) == 2:
        try:
            res["fid"] = frechet_distance(src[0]["mu"], src[0]["sigma"], src[1]["mu"],
                                          src[1]["sigma"], args.fd_method)
        except ValueError as e:
            raise UserError(f"{e}: sqrtm of the covariance product failed (too few images?); "
                            "--fd-method eig gives a finite value") from None
        print(f"FID:  {res['fid']}  | {args.fd_method} | {tag}", flush=True)
    if args.isc:
        if args.dims != 2048 or feats[0] is None:
            raise UserError("--isc needs --dims 2048 and images (not statistics) as PATH1")
        res["is_mean"], res["is_std"] = inception_score(
            logits_unbiased(feats[0], get_model()), args.isc_splits, not args.no_shuffle, args.seed)
        print(f"IS:  {res['is_mean']} +- {res['is_std']}  | {args.isc_splits} splits | {tag}")
    needs = [f for f in ("kid", "prc", "fid_inf") if getattr(args, f)]
    if needs and (len(src) != 2 or feats[0] is None or (feats[1] is None and needs != ["fid_inf"])):
        raise UserError(f"--{', --'.join(needs).replace('_', '-')} need images (not statistics) "
                        "for both sources (--fid-inf: for PATH1)")
    if args.kid:
        res["kid_mean"], res["kid_std"] = kid(*feats, args.kid_subsets, args.kid_subset_size,
                                              args.seed)
        print(f"KID:  {res['kid_mean']} +- {res['kid_std']}  | {args.kid_subsets} x "
              f"{args.kid_subset_size} | {tag}")
    if args.prc:                        # DEVIATION: pool3 features, not VGG-16 fc2 (no 2nd weights)
        res["precision"], res["recall"], res["f1"] = precision_recall(feats[1], feats[0],
                                                                      args.prc_k, device=device)
        print(f"PRC:  precision {res['precision']} recall {res['recall']} f1 {res['f1']}  | k "
              f"{args.prc_k} | {tag}")
    if args.fid_inf:
        res["fid_inf"] = fid_infinity(feats[0], src[1]["mu"], src[1]["sigma"],
                                      lo=args.fid_inf_min, seed=args.seed, method=args.fd_method)
        print(f"FID_inf:  {res['fid_inf']}  | 15 N in [{args.fid_inf_min}, {src[0]['n']}] | "
              f"{args.fd_method} | {tag}", flush=True)
    return res


def run_tool(args):
    if args.tool == "triangles":
        if os.path.isdir(args.out_dir) and os.listdir(args.out_dir):
            raise UserError(f"{args.out_dir} is not empty; give a new folder")
        images = np.round(make_polygons(args.n, args.n_vertices, seed=args.seed) * 255)
        for split, idx in zip(("train", "test", "holdout"), polygon_splits(args.n)):
            os.makedirs(os.path.join(args.out_dir, split))
            for i in idx:
                TF.to_pil_image(images[i].astype(np.uint8)).save(
                    os.path.join(args.out_dir, split, f"{i:05d}.png"))
        print(f"wrote {args.n} images to {args.out_dir}/{{train,test,holdout}}")
        return {"n": args.n}
    if args.tool == "sample-hparams":
        settings = sample_hparams(args.model, args.space, args.n, args.seed)
        for i, h in enumerate(settings):
            print(json.dumps(dict(setting_id=i, model=args.model, space=args.space, **h)))
        return settings
    try:
        with open(args.csv, newline="") as f:
            rows, why = [dict(r, fid=float(r["fid"])) for r in csv.DictReader(f)], "no rows"
    except (OSError, KeyError, ValueError, TypeError) as e:
        rows, why = [], repr(e)
    if not rows or not {"model", "setting_id", "seed"} <= set(rows[0]):
        raise UserError(f"cannot read {args.csv} as model,setting_id,seed,fid rows ({why})")
    if args.tool == "budget-curve":
        out = {}
        print("model,k,mean_min_fid,lo95,hi95")
        for m in sorted({r["model"] for r in rows}):
            mean, lo, hi = budget_curve([r["fid"] for r in rows if r["model"] == m],
                                        args.resamples, args.seed)
            out[m] = mean
            print("\n".join(f"{m},{k + 1},{mean[k]:.4f},{lo[k]:.4f},{hi[k]:.4f}"
                            for k in range(len(mean))))
        return out
    report = seed_report(rows)
    print("model      setting   n      min       q1   median       q3      max     mean      std")
    for r in report:
        print(f"{r['model']:<10} {r['setting_id']:<8} {r['n']:>2} " + " ".join(
            f"{r[k]:8.3f}" for k in ("min", "q1", "median", "q3", "max", "mean", "std")))
    return report


if __name__ == "__main__":
    common.cli(main)
