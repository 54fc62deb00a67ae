"""FID, IS, KID and P&R as the field computes them, plus the "Are GANs Created Equal?" study tools.
Heusel et al., "GANs Trained by a Two Time-Scale Update Rule ...", NeurIPS 2017, arXiv:1706.08500 (FID).
Lucic, Kurach, Michalski, Gelly, Bousquet, "Are GANs Created Equal?", NeurIPS 2018, arXiv:1711.10337.
Official code: mseitzer/pytorch-fid (inception.py, fid_score.py; parity target), bioinf-jku/TTUR fid.py,
toshas/torch-fidelity (tf1 mode, IS, KID), GaParmar/clean-fid (clean mode), google/compare_gan v1.

Paper -> code
  FID def. (arXiv:1706.08500)  ||mu1-mu2||^2 + tr S1 + tr S2 - 2 tr (S1 S2)^1/2 .. frechet_distance()
  pytorch-fid inception.py     FID Inception, 4 TF patches, taps 64/192/768/2048 .. FIDInceptionV3
  pytorch-fid fid_score.py     sorted flat folder, ToTensor, N-1 covariance .. list_images(), statistics()
  torch-fidelity / clean-fid   tf1 (TF1 bilinear) and clean (PIL bicubic) resizing . preprocess()
  Salimans et al. 2016 Sec. 4  IS: unbiased logits, 10 splits, std ddof 0 ............ inception_score()
  Binkowski et al. 2018        KID: cubic kernel, 100 x 1000 subsets ................. kid()
  Kynkaanniemi et al. 2019     k-NN precision / recall, k = 3 ........................ precision_recall()
  Chong & Forsyth 2020         FID_inf: fit FID_N = a + b/N, report a ................ fid_infinity()
  Lucic et al., params.py      wide / narrow search spaces, author defaults .......... sample_hparams()
  Lucic et al. budget figure   min FID vs number of settings tried .................. budget_curve()
  Lucic et al. P&R, colab      triangles; approximate precision, recall, F1 .. make_polygons(), approx_prf()
  project contract             FID during training with cached reference stats ..... fid_for_training()
Deviations (each one also tagged in the code; grep DEVIATION|PAPER-VS-CODE)
  1. DEVIATION      --prc uses Inception pool3 features, not VGG-16 fc2 (no second weight file).
  2. DEVIATION      clean mode feeds this file's FID Inception, not NVIDIA's TorchScript port that clean-fid
                    loads (same TF weights; the resize is checked bit-identical, the features are not).
  3. PAPER-VS-CODE  compare_gan v1 scores float generator output unquantised with TF1 resizing against the
                    10k test split; we quantise like save_image (= scoring saved PNGs) and default to the
                    pytorch-fid pipeline. --mode tf1 gives compare_gan's resizing.
  4. DEVIATION      fid_for_training uses the training split as reference (project contract; Lucic et al. use
                    the test split) and falls back to the eig route, saying so, if sqrtm fails the
                    imaginary-part guard (tiny N while monitoring). The CLI never falls back.
  5. UNSPECIFIED    approximate P/R: delta, norm, projection and inversion settings; budget-curve
                    resampling (with replacement, 5000 times); triangles seed. All flags.
Run
  python fid.py gen_folder ref_folder_or_stats.npz               # pytorch-fid compatible: prints FID:  x
  python fid.py runs/x/samples_50000.npz dataset:cifar10 --isc   # exported samples vs CIFAR-10 train
  python fid.py data/cifar10_png cifar10_train.npz --save-stats
  python fid.py bench --device cpu                                # extraction img/s, Frechet timings
  python fid.py triangles data/triangles ; python fid.py sample-hparams wgan_gp wide --n 100
  python fid.py collect runs/* > runs.csv ; python fid.py budget-curve runs.csv
  python fid.py seed-report runs.csv
Parity checked with one random state dict in both nets: features bit-identical to pytorch-fid 0.3.0
(every tap) and, in tf1 mode, to torch-fidelity 0.4.0 (resize, pool3, unbiased logits); clean resize
bit-identical to clean-fid 0.1.35; FID equal to pytorch-fid's calculate_fid_given_paths (tests/test_fid.py).
Anchors (not measured here: no weight file offline): tf1 FID(CIFAR-10 train[:5000], test[:5000]) = 10.3233
and tf1 IS(CIFAR-10 train, 50k) = 11.237 (torch-fidelity tests; Salimans et al. report 11.24 +- .12).
Weights: pt_inception-2015-12-05-6726825d.pth (pytorch-fid release 'fid_weights'); --weights PATH, else
the torch hub cache, else a download. Scores with other Inception weights are not comparable.
"""
import argparse
import contextlib
import csv
import hashlib
import itertools
import json
import os
import pathlib
import re
import sys
import time

import numpy as np
import scipy
import scipy.linalg
import scipy.spatial
import scipy.special
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torchvision.datasets.folder import pil_loader
from torchvision.models import inception as tv_inception

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_FILE
FID_WEIGHTS_SHA256_PREFIX = "6726825d"       # torch.hub naming convention; pytorch-fid does not check it
IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")  # pytorch-fid
MODES = ("pytorch-fid", "tf1", "clean")
DIMS = (64, 192, 768, 2048)                  # pytorch-fid BLOCK_INDEX_BY_DIM taps
TOOLS = ("bench", "triangles", "sample-hparams", "budget-curve", "seed-report", "collect")


def _default_workers():
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count()
    return min(8, n) if n else 0


# ==== Args ====
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="study tools: python fid.py {" + ",".join(TOOLS) + "} --help")
    p.add_argument("path", nargs="+", help="two sources (image folder, stats .npz with mu/sigma, samples "
                   ".npz with 'images' uint8 NHWC, or dataset:<name> = common.load_dataset train split); "
                   "one source with --isc only [official pytorch-fid fid_score.py]")
    p.add_argument("--batch-size", type=int, default=50,
                   help="images per forward [official pytorch-fid fid_score.py]")
    p.add_argument("--num-workers", type=int, default=_default_workers(),
                   help="data loader processes, min(8, CPUs) [official pytorch-fid fid_score.py]")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda if available else cpu [official pytorch-fid fid_score.py]")
    p.add_argument("--dims", type=int, default=2048, choices=DIMS,
                   help="feature tap; 2048 = pool3 [official pytorch-fid inception.py]")
    p.add_argument("--save-stats", action="store_true", help="write mu/sigma of PATH1 to the .npz PATH2; "
                   "refuses to overwrite [official pytorch-fid fid_score.py]")
    p.add_argument("--weights", default=None, help=f"Inception weights, default {FID_WEIGHTS_FILE} from the "
                   "torch hub cache or a download [official pytorch-fid inception.py]")
    p.add_argument("--mode", default="pytorch-fid", choices=MODES, help="resize/normalisation pipeline; "
                   "never mix statistics of different modes [ours: card Tab. 2.4]")
    p.add_argument("--fd-method", default="sqrtm", choices=("sqrtm", "eig", "eigh"), help="sqrtm = "
                   "pytorch-fid bit-parity; eig/eigh = eigenvalue routes, 3.7x/5.5x faster at d=2048 "
                   "on 2 CPU cores, equal to 1e-14 relative [ours: card 2.6]")
    p.add_argument("--no-resize", action="store_true", help="feed images at their own size (>= 75 px); equal "
                   "to the protocol only for 299x299 inputs [ours: pytorch-fid resize_input=False]")
    p.add_argument("--recursive", action="store_true", help="scan folders recursively [ours: opt-in]")
    p.add_argument("--ignore-case", action="store_true", help="match *.PNG etc. too [ours: opt-in]")
    p.add_argument("--isc", action="store_true", help="Inception Score of PATH1 [Sec. 4, Salimans 2016]")
    p.add_argument("--isc-splits", type=int, default=10, help="IS splits [Sec. 4, Salimans 2016]")
    p.add_argument("--no-shuffle", action="store_true", help="IS splits in file order, as the original "
                   "[official improved-gan model.py; torch-fidelity shuffles]")
    p.add_argument("--kid", action="store_true", help="Kernel Inception Distance [Binkowski et al. 2018]")
    p.add_argument("--kid-subsets", type=int, default=100, help="[official torch-fidelity defaults.py]")
    p.add_argument("--kid-subset-size", type=int, default=1000, help="[official torch-fidelity defaults.py]")
    p.add_argument("--prc", action="store_true", help="k-NN precision/recall/F1 on pool3 features "
                   "(DEVIATION: paper uses VGG-16) [Kynkaanniemi et al. 2019]")
    p.add_argument("--prc-k", type=int, default=3, help="k-th neighbour radius [Kynkaanniemi et al. 2019]")
    p.add_argument("--fid-inf", action="store_true", help="FID_inf of PATH1 vs PATH2 [Chong & Forsyth 2020]")
    p.add_argument("--seed", type=int, default=2020, help="IS shuffle / KID subsets / FID_inf seed "
                   "[official torch-fidelity defaults.py]")
    p.add_argument("--allow-tf32", action="store_true", help="keep TF32 during extraction [ours: card 2.13]")
    p.add_argument("--fp64-features", action="store_true", help="run the network in float64 "
                   "[official torch-fidelity feature_extractor_internal_dtype]")
    p.add_argument("--data-root", default="data", help="root for dataset: sources [run]")
    p.add_argument("--img-size", type=int, default=None, help="dataset: sources at this size [run]")
    p.add_argument("--cache-dir", default=None, help="stats cache for dataset: sources, default "
                   "<data-root>/fid_stats [run]")
    return p.parse_args(argv)


def parse_tool_args(argv):
    p = argparse.ArgumentParser(prog="fid.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="tool", required=True)
    b = sub.add_parser("bench", help="extraction img/s and Frechet timings [ours]")
    b.add_argument("--weights", default=None, help="Inception weights [official pytorch-fid inception.py]")
    b.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="[run]")
    b.add_argument("--n-images", type=int, default=64, help="random uint8 images to extract [run]")
    b.add_argument("--img-size", type=int, default=32, help="their size; resized to 299 [run]")
    b.add_argument("--batch-size", type=int, default=50, help="[official pytorch-fid fid_score.py]")
    b.add_argument("--d", type=int, default=2048, help="feature dimension for the Frechet timings [run]")
    b.add_argument("--n-features", type=int, default=10_000, help="samples per Gaussian feature set [run]")
    t = sub.add_parser("triangles", help="convex-polygon data set as PNG folders [Lucic et al. P&R]")
    t.add_argument("out_dir", help="writes out_dir/{train,test,holdout}/NNNNN.png [run]")
    t.add_argument("--n", type=int, default=80_000,
                   help="images, split 60k/10k/10k [official compare_gan v1 gan_lib.py]")
    t.add_argument("--n-vertices", type=int, default=3, help="3 = triangles [Lucic et al. P&R]")
    t.add_argument("--seed", type=int, default=0, help="[UNSPECIFIED: colab seed unknown; ours 0]")
    s = sub.add_parser("sample-hparams", help="settings as JSON lines [official compare_gan params.py]")
    s.add_argument("model", choices=sorted(AUTHOR_DEFAULTS), help="[Tab. 1]")
    s.add_argument("space", choices=("wide", "narrow"), help="phase 1 / 2 [official compare_gan params.py]")
    s.add_argument("--n", type=int, default=100,
                   help="settings; the first is the author default [official compare_gan params.py]")
    s.add_argument("--seed", type=int, default=0, help="[run]")
    for name, h in (("budget-curve", "min FID vs settings tried, 95%% band [Lucic et al. budget figure]"),
                    ("seed-report", "FID distribution over seeds per setting [Lucic et al. protocol]")):
        c = sub.add_parser(name, help=h)
        c.add_argument("csv", help="columns model,setting_id,seed,fid (see the collect tool) [run]")
        if name == "budget-curve":
            c.add_argument("--resamples", type=int, default=5000, help="[UNSPECIFIED: paper's B; ours]")
            c.add_argument("--seed", type=int, default=0, help="[run]")
    c = sub.add_parser("collect", help="runs.csv rows from training run folders [ours]")
    c.add_argument("runs", nargs="+", help="run folders holding args.json and metrics.jsonl [run]")
    c.add_argument("--model", default=None, help="default: the folder name up to its first '-' [run]")
    c.add_argument("--key", default="fid",
                   help="metrics.jsonl key; a run's score is its minimum [official compare_gan v1]")
    return p.parse_args(argv)


# ==== Data ====
def list_images(path, recursive=False, ignore_case=False):
    """Sorted image files of a folder, non-recursive and case-sensitive by default [pytorch-fid]."""
    files = pathlib.Path(path).glob("**/*" if recursive else "*")
    ext = (lambda f: f.suffix[1:].lower()) if ignore_case else (lambda f: f.suffix[1:])
    return sorted(f for f in files if ext(f) in IMAGE_EXTENSIONS and f.is_file())


class ImageFiles(torch.utils.data.Dataset):
    """uint8 (3, H, W) tensors via PIL convert('RGB'), as pytorch-fid's ImagePathDataset."""

    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return TF.pil_to_tensor(pil_loader(self.files[i]))


def quantize(x):
    """[-1, 1] float -> uint8 exactly as save_image(normalize=True, value_range=(-1, 1)) [card 2.4]."""
    # PAPER-VS-CODE: compare_gan v1 scores unquantised floats; we score what save_image would write
    x = x.detach().float().clamp(-1, 1).sub(-1).div(2)             # torchvision make_grid norm_ip
    return x.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)      # save_image: rounds, never truncates


def _tf1_resize(x, size):
    """TF1 legacy bilinear: src = dst * in/out (no half-pixel), edge-clamped, W then H [card 2.4]."""
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
    """clean-fid 'clean': PIL bicubic per channel on float32 ('F'), clip 0..255, no re-quantisation."""
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
    if resize and x.shape[-2:] != (299, 299):   # DEVIATION (clean): our net, not clean-fid's TorchScript
        x = _tf1_resize(x, 299) if mode == "tf1" else _clean_resize(x, 299)
    return (x - 128) / 128                          # TF graph's Sub/Mul: 255 -> 0.9921875


# ==== Models ====
class FIDInceptionA(tv_inception.InceptionA):
    """Mixed_5b-d. Patch 1: pool branch averages without the zero padding (TF 'SAME' avg pool)."""

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
        return torch.cat([b1, b5, b3, bp], 1)


class FIDInceptionC(tv_inception.InceptionC):
    """Mixed_6b-e. Patch 1 as in FIDInceptionA."""

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(bd))))
        bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
        return torch.cat([b1, b7, bd, bp], 1)


class FIDInceptionE(tv_inception.InceptionE):
    """Mixed_7b (pytorch-fid FIDInceptionE_1, patch 1) and Mixed_7c (FIDInceptionE_2, patch 2: the
    2015-12-05 TF graph max-pools here instead of average pooling)."""

    def __init__(self, in_channels, max_pool):
        super().__init__(in_channels)
        self.max_pool = max_pool

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        if self.max_pool:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        return torch.cat([b1, b3, bd, self.branch_pool(pooled)], 1)


class FIDInceptionV3(tv_inception.Inception3):
    """pytorch-fid's fid_inception_v3: torchvision Inception3 with the TF 2015-12-05 patches; 1008-way fc
    (patch 3), no aux head, transform_input False. forward: normalised input -> (N, dims) features."""

    def __init__(self, dims=2048, mode="pytorch-fid", resize=True):
        super().__init__(num_classes=1008, aux_logits=False, transform_input=False, init_weights=False)
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
        yield self.avgpool(self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x))))  # (N, 2048, 1, 1) pool3

    def forward(self, x):
        for dims, f in zip(DIMS, self.taps(x)):
            if dims == self.dims:    # spatial taps are averaged as pytorch-fid does (adaptive_avg_pool2d)
                return F.adaptive_avg_pool2d(f, output_size=(1, 1)).flatten(1)   # (N, dims)


def resolve_weights(weights=None):
    """--weights, else the torch hub cache, else a download; offline and absent -> one clear error."""
    if weights:
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"--weights {weights!r} does not exist")
        return weights
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", FID_WEIGHTS_FILE)
    if not os.path.isfile(cached):
        try:
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            torch.hub.download_url_to_file(FID_WEIGHTS_URL, cached, progress=True)
        except Exception as e:
            raise FileNotFoundError(
                f"FID Inception weights {FID_WEIGHTS_FILE} not found: no --weights given, not in the torch "
                f"hub cache ({cached}), and downloading {FID_WEIGHTS_URL} (pytorch-fid GitHub release "
                f"'fid_weights') failed: {e}. Download it on a machine with internet and pass --weights "
                f"PATH (Python: weights=PATH), or copy it to {cached}.") from None
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
    with torch.device("meta"):                      # no random init: every tensor comes from the file
        model = FIDInceptionV3(dims, mode, resize)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True, assign=True)
    model.weights_hash = sha256_prefix(path)
    if model.weights_hash != FID_WEIGHTS_SHA256_PREFIX:
        print(f"warning: {path} has SHA-256 prefix {model.weights_hash}, not the published "
              f"{FID_WEIGHTS_SHA256_PREFIX}; its scores are not comparable with published FIDs", flush=True)
    return model.eval().requires_grad_(False)


# ==== Metric ====
@contextlib.contextmanager
def exact_fp32(allow_tf32=False):
    """TF32 off and cuDNN deterministic during extraction; every flag restored afterwards [card 2.13]."""
    b = torch.backends
    # torch >= 2.9 has the fp32_precision API; writing legacy flags as well makes it raise on mixed
    # settings, so the legacy flags are used only where the new API does not exist.
    new_api = hasattr(getattr(b.cudnn, "conv", None), "fp32_precision")
    objs = [(b.cuda.matmul, "fp32_precision", "ieee"), (b.cudnn.conv, "fp32_precision", "ieee")] if new_api \
        else [(b.cuda.matmul, "allow_tf32", False), (b.cudnn, "allow_tf32", False)]
    objs = ([] if allow_tf32 else objs) + [(b.cudnn, "benchmark", False), (b.cudnn, "deterministic", True)]
    saved = [getattr(o, a) for o, a, _ in objs]
    try:
        for o, a, v in objs:
            setattr(o, a, v)
        yield
    finally:
        for (o, a, _), v in zip(objs, saved):
            setattr(o, a, v)


def _extract(batches, model, device=None, total=None, allow_tf32=False, progress=False):
    """Features of uint8 / [0, 1] float batches -> float64 (N, dims) [pytorch-fid get_activations]."""
    if device is not None:
        model.to(device)
    p = next(model.parameters())
    device, feats = p.device, []
    t0 = last = time.perf_counter()
    done = 0
    with exact_fp32(allow_tf32), torch.no_grad():
        for x in batches:
            if x.size(1) == 1:
                x = x.expand(-1, 3, -1, -1)                              # grayscale -> RGB (N, 3, H, W)
            x = x.contiguous()             # an NHWC view would switch the CPU convolutions' algorithm
            x = x if model.mode == "clean" else x.to(device)             # clean resizes with PIL on the CPU
            f = model(preprocess(x, model.mode, model.resize, p.dtype).to(device))
            feats.append(f.cpu().numpy().astype(np.float64))
            done += len(x)
            if progress and time.perf_counter() - last > 10:
                last = time.perf_counter()
                rate = done / (last - t0)
                eta = f" | eta {(total - done) / rate / 60:.1f} min" if total else ""
                print(f"features {done}/{total or '?'} | {rate:.1f} img/s{eta}", flush=True)
    if not feats:
        raise ValueError("no images to extract features from")
    if progress:
        print(f"features {done} images in {time.perf_counter() - t0:.1f} s", flush=True)
    return np.concatenate(feats)


def activations(images, model, batch_size=50, device=None, allow_tf32=False, progress=False):
    """(N, 3, H, W) uint8 or [0, 1] float tensor -> (N, dims) float64 array [pytorch-fid get_activations]."""
    return _extract(images.split(batch_size), model, device, len(images), allow_tf32, progress)


def statistics(features):
    """mu = column mean, sigma = np.cov(rowvar=False) with N - 1, float64 [pytorch-fid fid_score.py]."""
    features = np.asarray(features, dtype=np.float64)
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, method="sqrtm", eps=1e-6):
    """||mu1 - mu2||^2 + tr S1 + tr S2 - 2 tr (S1 S2)^1/2 [FID paragraph, arXiv:1706.08500]."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics differ in shape: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} "
                         f"vs {sigma2.shape}")
    diff = mu1 - mu2
    if method == "sqrtm":                     # pytorch-fid / TTUR: "stable version by Dougal J. Sutherland"
        if (1, 11, 2) <= tuple(int(v) for v in re.findall(r"\d+", scipy.__version__)[:3]) < (1, 13, 0):
            raise RuntimeError(f"SciPy {scipy.__version__} has a broken sqrtm (pytorch-fid #100); install "
                               "scipy>=1.13 or use --fd-method eig")
        covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))   # no `disp`: deprecated 1.16, removed 1.18
        if not np.isfinite(covmean).all():
            print(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
        if np.iscomplexobj(covmean):                        # round-off gives a small imaginary part
            if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
                raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
            covmean = covmean.real
        tr_covmean = np.trace(covmean)
    elif method == "eig":     # S1 S2 ~ S1^1/2 S2 S1^1/2 (PSD): tr sqrt = sum sqrt(lambda); complex first
        lam = np.linalg.eigvals(sigma1.dot(sigma2)).astype(np.complex128)
        tr_covmean = np.sqrt(lam).real.sum()
    elif method == "eigh":    # symmetric route (TF-GAN trace_sqrt_product): A = S1^1/2, eigvalsh(A S2 A)
        w, v = np.linalg.eigh(sigma1)
        root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(root @ sigma2 @ root), 0, None)).sum()
    else:
        raise ValueError(f"unknown method {method!r}")
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def logits_unbiased(features, model):
    """pool3 . fc.weight^T without fc.bias, all 1008 classes [Sec. 4, Salimans et al. 2016; card 2.8]."""
    w = model.fc.weight.detach().float().cpu()
    return (torch.from_numpy(np.asarray(features, np.float32)) @ w.T).double().numpy()   # (N, 1008)


def inception_score(logits, splits=10, shuffle=True, seed=2020):
    """IS = exp E_x KL(p(y|x) || p(y)) per split; mean and std (ddof 0) [Sec. 4, Salimans et al. 2016]."""
    logits = np.asarray(logits, dtype=np.float64)
    if shuffle:                                             # torch-fidelity: RandomState(2020).permutation
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
    """Unbiased MMD^2, k(a, b) = (a.b/d + 1)^3, cross term keeps i = j [official MMD-GAN compute_scores]."""
    gamma, m = 1.0 / x.shape[1], len(x)
    k_xx, k_yy, k_xy = ((a @ b.T * gamma + coef0) ** degree for a, b in ((x, x), (y, y), (x, y)))
    within = k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)
    return within / (m * (m - 1)) - 2 * k_xy.sum() / m ** 2


def kid(features1, features2, subsets=100, subset_size=1000, seed=2020):
    """KID: MMD^2 over random subsets without replacement; mean, std (ddof 0) [Binkowski et al. 2018]."""
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if min(len(f1), len(f2)) < subset_size:
        raise ValueError(f"KID needs >= {subset_size} samples per set (--kid-subset-size), got {len(f1)} and "
                         f"{len(f2)}")
    rng = np.random.RandomState(seed)
    mmds = [mmd2_poly(f1[rng.choice(len(f1), subset_size, replace=False)],
                      f2[rng.choice(len(f2), subset_size, replace=False)]) for _ in range(subsets)]
    return float(np.mean(mmds)), float(np.std(mmds))


def precision_recall(real, fake, k=3, batch=1000):
    """k-NN manifolds: precision = share of fake inside the real balls, recall the converse; and F1
    [Kynkaanniemi et al. 2019]."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)

    def radii(x):            # distance to the k-th neighbour, self excluded = (k+1)-th smallest incl. 0
        return np.concatenate([np.partition(scipy.spatial.distance.cdist(x[i:i + batch], x), k, axis=1)[:, k]
                               for i in range(0, len(x), batch)])

    def inside(q, ref, r):
        return np.concatenate([(scipy.spatial.distance.cdist(q[i:i + batch], ref) <= r).any(axis=1)
                               for i in range(0, len(q), batch)]).mean()

    p, r = inside(fake, real, radii(real)), inside(real, fake, radii(fake))
    return float(p), float(r), float(2 * p * r / max(p + r, 1e-5))


def fid_infinity(features, mu_ref, sigma_ref, points=15, lo=5000, seed=2020, method="sqrtm"):
    """FID_inf: FID_N on random subsets at `points` N in [lo, N], least-squares FID_N = a + b/N, returns a
    [Chong & Forsyth 2020; official FID_IS_infinity score_infinity.py]."""
    rng = np.random.RandomState(seed)
    ns = np.linspace(min(lo, len(features)), len(features), points).astype(int)
    fids = [frechet_distance(*statistics(features[rng.permutation(len(features))[:n]]), mu_ref, sigma_ref,
                             method=method) for n in ns]
    return fit_fid_infinity(ns, fids)


def fit_fid_infinity(ns, fids):
    a_matrix = np.stack([np.ones(len(ns)), 1.0 / np.asarray(ns, np.float64)], axis=1)   # (P, 2) [1, 1/N]
    return float(np.linalg.lstsq(a_matrix, np.asarray(fids, np.float64), rcond=None)[0][0])


# ---- FID during training (project contract) ----
def reference_stats(dataset, data_root, img_size, model, cache_dir=None, class_label=None, batch_size=50,
                    num_workers=0, progress=True):
    """mu, sigma, N and cache path of common.load_dataset(train=True) (one class if class_label), cached."""
    import common
    cache_dir = cache_dir or os.path.join(data_root, "fid_stats")
    name = "-".join([re.sub(r"[^A-Za-z0-9.]+", "_", dataset).strip("_"), str(img_size or "native"),
                     "all" if class_label is None else f"class{class_label}", model.mode,
                     *([] if model.resize else ["noresize"]), f"d{model.dims}", f"w{model.weights_hash}"])
    path = os.path.join(cache_dir, name + ".npz")
    if os.path.isfile(path):
        with np.load(path) as f:
            return f["mu"], f["sigma"], int(f["n"]), path
    ds = common.load_dataset(dataset, data_root, img_size, train=True)   # DEVIATION: Lucic et al. use test
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers)
    batches = (quantize(x if class_label is None else x[torch.as_tensor(y) == class_label])
               for x, y in loader)
    feats = _extract((x for x in batches if len(x)), model, total=len(ds), progress=progress)
    mu, sigma = statistics(feats)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "wb") as f:                              # extra key n; pytorch-fid reads mu/sigma only
        np.savez_compressed(f, mu=mu, sigma=sigma, n=len(feats))
    os.replace(tmp, path)
    return mu, sigma, len(feats), path


def fid_for_training(sample_fn, dataset, data_root, img_size, n_samples, device, weights=None, cache_dir=None,
                     class_label=None):
    """FID of n_samples from sample_fn(n) -> (n, C, H, W) in [-1, 1] (quantised like save_image) against the
    cached statistics of the dataset's training split; the --fid-every hook of the training scripts."""
    model = build_inception(weights).to(device)
    mu_r, sigma_r, n_r, ref = reference_stats(dataset, data_root, img_size, model, cache_dir, class_label)

    def batches():
        for i in range(0, n_samples, 50):
            with torch.no_grad():
                x = sample_fn(min(50, n_samples - i))
            yield quantize(x)

    mu, sigma = statistics(_extract(batches(), model, total=n_samples, progress=True))
    method = "sqrtm"
    try:
        value = frechet_distance(mu, sigma, mu_r, sigma_r)
    except ValueError as e:   # DEVIATION: monitoring keeps going on tiny N; the CLI raises instead
        method = f"eig (sqrtm failed: {e})"
        value = frechet_distance(mu, sigma, mu_r, sigma_r, method="eig")
    print(f"fid {value:.4f} | mode {model.mode} | N_gen {n_samples} vs N_ref {n_r} ({ref}) | {method} "
          f"| dims {model.dims} | weights {model.weights_hash}", flush=True)
    return value


# ---- "Are GANs Created Equal?" tools ----
def render_polygons(vertices, size=28, subpixel=8):
    """Convex polygons (B, k, 2) in pixel units (row, col) -> (B, size, size) dark-on-white in [0, 1]:
    half-plane test at subpixel corners, 8x8 windows over subpixel rows 8i-3..8i+4 [official Lucic colab]."""
    s = size * subpixel
    pr, pc = (g.reshape(-1).astype(np.float32) / subpixel for g in np.meshgrid(np.arange(s), np.arange(s),
                                                                                indexing="ij"))   # (P,) each
    v = np.asarray(vertices, np.float32)
    e = np.roll(v, -1, axis=1) - v                                           # (B, k, 2) edges
    # cross(e, p - v) = e_r p_c - e_c p_r - (e_r v_c - e_c v_r): the sign says which side of the edge p is on
    cross = (e[..., 0, None] * pc - e[..., 1, None] * pr
             - (e[..., 0] * v[..., 1] - e[..., 1] * v[..., 0])[..., None])   # (B, k, P)
    inside = (cross >= 0).all(axis=1) | (cross <= 0).all(axis=1)             # (B, P) either orientation
    white = np.pad((~inside).reshape(-1, s, s), ((0, 0), (3, 0), (3, 0)), constant_values=True)[:, :s, :s]
    return white.reshape(-1, size, subpixel, size, subpixel).mean(axis=(2, 4)).astype(np.float32)


def make_polygons(n=80_000, n_vertices=3, min_angle=20.0, scale=0.75, size=28, subpixel=8, seed=0):
    """Lucic et al.'s convex-polygon images (n, size, size) in [0, 1], shuffled [official Lucic colab]."""
    rs, seg = np.random.RandomState(seed), 360.0 / n_vertices
    verts = np.empty((n, n_vertices, 2))
    for i in range(n):
        u = rs.uniform(size=n_vertices)
        theta = np.radians(rs.uniform() * 2 * np.pi)         # colab quirk: radians of a value < 2 pi, kept
        ang = np.radians(np.arange(n_vertices) * seg + min_angle / 2 + u * (seg - min_angle / 2))
        p = (np.stack([np.cos(ang), np.sin(ang)], 1) + 1) / 2                 # (k, 2) in [0, 1]^2
        rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        p = p @ rot.T * size * scale
        verts[i] = p + size / 2 - p.mean(axis=0)                              # shift_to_mean
    images = np.concatenate([render_polygons(verts[i:i + 50], size, subpixel) for i in range(0, n, 50)])
    return images[rs.permutation(n)]


def polygon_splits(n):
    """Index ranges train / test / holdout: 60k / 10k / 10k of 80k, proportionally for other n
    [official compare_gan v1 gan_lib.py]."""
    a, b = n * 3 // 4, n * 7 // 8
    return range(0, a), range(a, b), range(b, n)


def polygon_distance(images, n_vertices=3, size=28, subpixel=8):
    """L2 distance of [0, 1] images to the polygon manifold: threshold at 0.5, convex hull of the dark pixel
    centres, its largest-area n_vertices-gon, re-rendered [UNSPECIFIED: the paper gives no projection]."""
    out = np.full(len(images), np.inf)
    for i, img in enumerate(np.asarray(images, np.float64).reshape(len(images), size, size)):
        pts = np.argwhere(img < 0.5) + 0.5 / subpixel                       # pixel i covers i-3/8..i+5/8
        try:
            hull = pts[scipy.spatial.ConvexHull(pts).vertices]                # (h, 2) counter-clockwise
        except (scipy.spatial.QhullError, ValueError):                        # < 3 points or collinear
            continue
        if len(hull) > n_vertices:         # ours: project onto n-gons, so a square is not a "triangle"
            poly = hull[np.array(list(itertools.combinations(range(len(hull)), n_vertices)))]   # (C, k, 2)
            x, y = poly[..., 0], poly[..., 1]
            area = np.abs((x * np.roll(y, -1, 1) - np.roll(x, -1, 1) * y).sum(1))       # shoelace
            hull = poly[area.argmax()]
        out[i] = np.linalg.norm(img - render_polygons(hull[None], size, subpixel)[0])
    return out


def invert_distance(G, x, z_dim, steps=500, lr=0.01, restarts=5, seed=0):
    """min_z ||G(z) - x||_2 by Adam from `restarts` z ~ U(-1, 1) starts; G maps (n, z_dim) to [-1, 1]
    images, x is in [0, 1] [Lucic et al. P&R; UNSPECIFIED: optimiser settings]."""
    gen = torch.Generator().manual_seed(seed)
    device = next(G.parameters()).device
    x = torch.as_tensor(x, dtype=torch.float32, device=device).reshape(len(x), -1)
    best = torch.full((len(x),), float("inf"), device=device)
    for _ in range(restarts):
        z = (torch.rand(len(x), z_dim, generator=gen) * 2 - 1).to(device).requires_grad_(True)
        opt = torch.optim.Adam([z], lr=lr)
        for _ in range(steps):
            loss = ((G(z).reshape(len(x), -1) + 1) / 2 - x).square().sum(1)
            opt.zero_grad()
            loss.sum().backward()
            opt.step()
        with torch.no_grad():
            best = torch.minimum(best, ((G(z).reshape(len(x), -1) + 1) / 2 - x).norm(dim=1))
    return best.cpu().numpy()


def approx_prf(G, z_dim, test_images, n_gen=1000, delta=5.0, seed=0, **invert_kw):
    """Approximate precision (generated near the manifold), recall (test images G can reach within delta)
    and F1 [Lucic et al. P&R; UNSPECIFIED: L2 norm on [0, 1] pixels; delta 5 separates real triangles
    (max 4.6) from the generator's 4-gons (min 5.2) in a 100-image check]."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z = (torch.rand(n_gen, z_dim, generator=gen) * 2 - 1).to(next(G.parameters()).device)
        fake = ((G(z) + 1) / 2).cpu().numpy()
    p = float((polygon_distance(fake) < delta).mean())
    r = float((invert_distance(G, test_images, z_dim, seed=seed, **invert_kw) < delta).mean())
    return p, r, 2 * p * r / max(p + r, 1e-12)


AUTHOR_DEFAULTS = {   # first sample of every search: beta1, lr, disc_iters, D batch norm, extras [params.py]
    "mm_gan": dict(beta1=0.0, lr=5e-5, disc_iters=1, batch_norm=True),
    "ns_gan": dict(beta1=0.0, lr=5e-5, disc_iters=1, batch_norm=True),
    "lsgan": dict(beta1=0.5, lr=2e-4, disc_iters=1, batch_norm=True),
    "wgan": dict(beta1=0.5, lr=5e-5, disc_iters=5, batch_norm=True, clip=0.01),
    "wgan_gp": dict(beta1=0.5, lr=1e-4, disc_iters=5, batch_norm=False, lambda_=10.0),
    "dragan": dict(beta1=0.5, lr=1e-4, disc_iters=1, batch_norm=True, lambda_=10.0),
    "began": dict(beta1=0.5, lr=1e-4, disc_iters=5, batch_norm=False, began_lambda=1e-3, gamma=0.75),
    "vae": dict(beta1=0.5, lr=5e-5, batch_norm=True),   # UNSPECIFIED: VAE batch-norm default
}


def sample_hparams(model, space="wide", n=100, seed=0):
    """Random-search settings; wide = phase 1, narrow = phase 2 ranges [official compare_gan params.py]."""
    rs, wide, out = np.random.RandomState(seed), space == "wide", [dict(AUTHOR_DEFAULTS[model])]
    for _ in range(n - 1):
        h = {"beta1": float(rs.uniform(0, 1)) if wide else 0.5,
             "lr": float(10 ** rs.uniform(-5, -2) if wide else 10 ** rs.uniform(-4, -3))}
        if model != "vae":
            h["disc_iters"] = int(rs.choice([1, 5])) if wide else 1       # code samples {1, 5} only
        no_bn = not wide and model in ("wgan_gp", "dragan")               # narrow: gradient penalties, no BN
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
    """Expected min FID over k trained models, k = 1..K, with a 95% band; bootstrap with replacement,
    prefix minima so the curve is monotone [Lucic et al. budget figure; UNSPECIFIED: resampling]."""
    fids = np.asarray(fids, np.float64)
    draws = fids[np.random.RandomState(seed).randint(len(fids), size=(resamples, len(fids)))]
    best = np.minimum.accumulate(draws, axis=1)                               # (B, K) min over first k
    return best.mean(0), np.percentile(best, 2.5, axis=0), np.percentile(best, 97.5, axis=0)


def seed_report(rows):
    """Per model and setting: the FID distribution over seeds (n, min, quartiles, max, mean, std)."""
    groups = {}
    for r in rows:
        groups.setdefault((r["model"], r["setting_id"]), []).append(r["fid"])
    report = []
    for (model, setting), v in sorted(groups.items(), key=lambda kv: (kv[0][0], np.median(kv[1]))):
        q = np.percentile(v, [0, 25, 50, 75, 100])
        report.append(dict(model=model, setting_id=setting, n=len(v), min=q[0], q1=q[1], median=q[2], q3=q[3],
                           max=q[4], mean=float(np.mean(v)),
                           std=float(np.std(v, ddof=1) if len(v) > 1 else 0)))
    return report


def collect_runs(run_dirs, model=None, key="fid"):
    """runs.csv rows: a run's score is its minimum FID over evaluations (Lucic: optimistic, min over
    checkpoints); setting_id hashes args.json without seed and run plumbing."""
    plumbing = {"seed", "out_dir", "resume", "device", "num_workers", "data_root", "log_every",
                "sample_every", "ckpt_every", "deterministic", "export_samples", "fid_every", "fid_samples",
                "fid_weights"}
    rows = []
    for d in run_dirs:
        try:
            with open(os.path.join(d, "args.json")) as f:
                args = json.load(f)
            with open(os.path.join(d, "metrics.jsonl")) as f:
                vals = [m[key] for m in map(json.loads, f) if key in m]
        except (OSError, ValueError) as e:
            print(f"skipping {d}: {e}", file=sys.stderr)
            continue
        if not vals:
            print(f"skipping {d}: no {key!r} in metrics.jsonl", file=sys.stderr)
            continue
        setting = {k: v for k, v in sorted(args.items()) if k not in plumbing}
        rows.append(dict(model=model or os.path.basename(os.path.normpath(d)).split("-")[0],
                         setting_id=hashlib.sha256(json.dumps(setting).encode()).hexdigest()[:8],
                         seed=args.get("seed"), fid=float(np.nanmin(vals))))
    return rows


def bench(args, others=None):
    """Extraction img/s and Frechet timings (NumPy/SciPy on the CPU). `others` maps a name to another
    extractor (uint8 batch -> features) run on the same batches, interleaved with ours so that both see
    the same machine load: tests/bench_pytorch_fid.py passes pytorch-fid's network this way."""
    model = build_inception(args.weights).to(args.device)
    x = torch.randint(0, 256, (args.n_images, 3, args.img_size, args.img_size), dtype=torch.uint8)
    nets = {"ours": lambda b: activations(b, model, args.batch_size), **(others(model) if others else {})}
    feats, secs = {k: [] for k in nets}, dict.fromkeys(nets, 0.0)
    for k, f in nets.items():
        f(x[:args.batch_size])                                               # warm-up
    for b in x.split(args.batch_size):
        for k, f in nets.items():
            t = time.perf_counter()
            feats[k].append(f(b))
            secs[k] += time.perf_counter() - t
    res = {f"{k}_img_s": args.n_images / v for k, v in secs.items()}
    for k in nets.keys() - {"ours"}:
        res[f"max_abs_feature_diff_{k}"] = float(np.abs(np.concatenate(feats["ours"]) - np.concatenate(feats[k])).max())
    rs = np.random.RandomState(0)
    a = rs.standard_normal((args.n_features, args.d))
    b = rs.standard_normal((args.n_features, args.d)) * rs.uniform(0.5, 1.5, args.d) + 0.1
    stats = [*statistics(a), *statistics(b)]
    for method in ("sqrtm", "eig", "eigh"):
        t = time.perf_counter()
        res[f"fid_{method}"] = frechet_distance(*stats, method=method)
        res[f"time_{method}_s"] = time.perf_counter() - t
    res["rel_diff_eig"] = abs(res["fid_eig"] / res["fid_sqrtm"] - 1)
    res["rel_diff_eigh"] = abs(res["fid_eigh"] / res["fid_sqrtm"] - 1)
    print(f"bench on {args.device} ({torch.get_num_threads()} threads), {args.n_images} images "
          f"{args.img_size}px -> 299, d={args.d}, N={args.n_features}: " + json.dumps(res), flush=True)
    return res


# ==== Main ====
def _source(path, args, get_model):
    """Features (or None) and statistics of one CLI source, with a description for the printed line."""
    if path.startswith("dataset:"):
        mu, sigma, n, ref = reference_stats(path[len("dataset:"):], args.data_root, args.img_size,
                                            get_model(), args.cache_dir, batch_size=args.batch_size,
                                            num_workers=args.num_workers)
        return dict(feats=None, mu=mu, sigma=sigma, n=n, desc=f"{path} train ({ref})")
    if not os.path.exists(path):
        raise FileNotFoundError(f"Invalid path: {path}")
    if path.endswith(".npz"):
        with np.load(path) as f:
            if "mu" in f:
                return dict(feats=None, mu=f["mu"][:], sigma=f["sigma"][:],
                            n=int(f["n"]) if "n" in f else "?", desc=f"stats {path}")
            images = torch.from_numpy(f["images"]).permute(0, 3, 1, 2)      # NHWC -> (N, C, H, W)
        if images.shape[1] == 1:                  # grayscale, as PIL's convert("RGB") does for files
            images = images.expand(-1, 3, -1, -1)
        feats = activations(images, get_model(), args.batch_size, args.device, args.allow_tf32, progress=True)
    else:
        files = list_images(path, args.recursive, args.ignore_case)
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {path}")
        batch_size = args.batch_size
        if batch_size > len(files):
            print("Warning: batch size is bigger than the data size. Setting batch size to data size")
            batch_size = len(files)
        loader = torch.utils.data.DataLoader(ImageFiles(files), batch_size=batch_size, shuffle=False,
                                             drop_last=False, num_workers=args.num_workers)
        feats = _extract(loader, get_model(), args.device, len(files), args.allow_tf32, progress=True)
    mu, sigma = statistics(feats)
    return dict(feats=feats, mu=mu, sigma=sigma, n=len(feats), desc=path)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in TOOLS:
        return run_tool(parse_tool_args(argv))
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("CUDA not available; pass --device cpu")
    if len(args.path) != 2 and not (len(args.path) == 1 and args.isc and not args.save_stats):
        raise SystemExit("fid.py: give two paths (one path only with --isc)")
    model = []

    def get_model():         # built on first use: two .npz statistics need no weights
        if not model:
            m = build_inception(args.weights, args.dims, args.mode, resize=not args.no_resize)
            model.append(m.to(args.device, torch.float64 if args.fp64_features else torch.float32))
        return model[0]

    if args.save_stats:
        if os.path.exists(args.path[1]):
            raise FileExistsError(f"Existing output file: {args.path[1]}")
        s = _source(args.path[0], args, get_model)
        print(f"Saving statistics for {args.path[0]} ({s['n']} images)")
        np.savez_compressed(args.path[1], mu=s["mu"], sigma=s["sigma"])
        return {"n": s["n"]}
    src = [_source(p, args, get_model) for p in args.path]
    tag = (f"mode {args.mode} | N {' vs '.join(str(s['n']) for s in src)} | ref {src[-1]['desc']} | "
           f"dims {args.dims} | weights {model[0].weights_hash if model else 'n/a (npz inputs)'}")
    res = {}
    if len(src) == 2:
        res["fid"] = frechet_distance(src[0]["mu"], src[0]["sigma"], src[1]["mu"], src[1]["sigma"],
                                      args.fd_method)
        print(f"FID:  {res['fid']}  | {args.fd_method} | {tag}", flush=True)
    if args.isc:
        if args.dims != 2048 or src[0]["feats"] is None:
            raise SystemExit("fid.py: --isc needs --dims 2048 and images (not statistics) as PATH1")
        res["is_mean"], res["is_std"] = inception_score(logits_unbiased(src[0]["feats"], get_model()),
                                                        args.isc_splits, not args.no_shuffle, args.seed)
        print(f"IS:  {res['is_mean']} +- {res['is_std']}  | {args.isc_splits} splits | {tag}", flush=True)
    needs_feats = [f for f in ("kid", "prc", "fid_inf") if getattr(args, f)]
    if needs_feats and (len(src) != 2 or src[0]["feats"] is None or
                        (src[1]["feats"] is None and needs_feats != ["fid_inf"])):
        raise SystemExit(f"fid.py: --{', --'.join(needs_feats)} need images (not statistics) for both paths")
    if args.kid:
        res["kid_mean"], res["kid_std"] = kid(src[0]["feats"], src[1]["feats"], args.kid_subsets,
                                              args.kid_subset_size, args.seed)
        print(f"KID:  {res['kid_mean']} +- {res['kid_std']}  | {args.kid_subsets} x {args.kid_subset_size} | "
              f"{tag}", flush=True)
    if args.prc:                           # DEVIATION: pool3 features, not VGG-16 fc2 (no second weights)
        res["precision"], res["recall"], res["f1"] = precision_recall(src[1]["feats"], src[0]["feats"],
                                                                      args.prc_k)
        print(f"PRC:  precision {res['precision']} recall {res['recall']} f1 {res['f1']}  | k {args.prc_k} | "
              f"{tag}", flush=True)
    if args.fid_inf:
        res["fid_inf"] = fid_infinity(src[0]["feats"], src[1]["mu"], src[1]["sigma"], seed=args.seed,
                                      method=args.fd_method)
        print(f"FID_inf:  {res['fid_inf']}  | {args.fd_method} | {tag}", flush=True)
    return res


def run_tool(args):
    if args.tool == "bench":
        return bench(args)
    if args.tool == "triangles":
        import torchvision.io
        images = make_polygons(args.n, args.n_vertices, seed=args.seed)
        for split, idx in zip(("train", "test", "holdout"), polygon_splits(args.n)):
            os.makedirs(os.path.join(args.out_dir, split), exist_ok=True)
            for i in idx:
                img = torch.from_numpy(np.round(images[i] * 255).astype(np.uint8))[None]   # (1, H, W)
                torchvision.io.write_png(img, os.path.join(args.out_dir, split, f"{i:05d}.png"))
        print(f"wrote {args.n} images to {args.out_dir}/{{train,test,holdout}}")
        return {"n": args.n}
    if args.tool == "sample-hparams":
        settings = sample_hparams(args.model, args.space, args.n, args.seed)
        for i, h in enumerate(settings):
            print(json.dumps(dict(setting_id=i, model=args.model, space=args.space, **h)))
        return settings
    if args.tool == "collect":
        rows = collect_runs(args.runs, args.model, args.key)
        w = csv.DictWriter(sys.stdout, fieldnames=["model", "setting_id", "seed", "fid"])
        w.writeheader()
        w.writerows(rows)
        return rows
    with open(args.csv, newline="") as f:
        rows = [dict(r, fid=float(r["fid"])) for r in csv.DictReader(f)]
    if args.tool == "budget-curve":
        out = {}
        print("model,k,mean_min_fid,lo95,hi95")
        for m in sorted({r["model"] for r in rows}):
            fids = [r["fid"] for r in rows if r["model"] == m]
            mean, lo, hi = budget_curve(fids, args.resamples, args.seed)
            out[m] = mean
            for k in range(len(mean)):
                print(f"{m},{k + 1},{mean[k]:.4f},{lo[k]:.4f},{hi[k]:.4f}")
        return out
    report = seed_report(rows)
    print("model      setting   n      min       q1   median       q3      max     mean      std")
    for r in report:
        print(f"{r['model']:<10} {r['setting_id']:<8} {r['n']:>2} " + " ".join(
            f"{r[k]:8.3f}" for k in ("min", "q1", "median", "q3", "max", "mean", "std")))
    return report


if __name__ == "__main__":
    main()
