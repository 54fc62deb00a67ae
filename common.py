"""What several paper scripts need and no paper has an opinion on (STYLE.md 2.5); everything an
auditor needs to check a paper lives in the paper's own script.

Data         load_dataset(name, root, img_size, train=True, extras=()) -> Dataset of (x in [-1, 1]
             CHW, y): cifar10 | cifar100 | stl10 | mnist | fashion-mnist | celeba | lsun-<category>
             | folder:<path> | shapes (ShapesDataset: procedural, deterministic, learnable; label
             and instance maps, captions); infinite_batches (seeded per epoch, exact resume)
Checkpoints  save_checkpoint (temp file, fsync, os.replace), load_checkpoint (weights_only, clear
             messages), rng_state / set_rng_state (Python, numpy, torch CPU and CUDA)
Run          cli, argparse types, Run (args.json, metrics.jsonl, curves.png, ckpt.pt)
Processes    Dist (torchrun data parallelism), single_process
Figures      canvas, draw_text, title_strip, draw_curves: uint8 tensors, no PIL
"""

import argparse
import glob
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import sys
import tempfile
import time

import numpy as np
import torch
import torchvision
import torchvision.transforms as T
from torch.utils.data import DataLoader, Dataset

DATASETS = ("cifar10", "cifar100", "stl10", "mnist", "fashion-mnist", "celeba", "lsun-<category>",
            "folder:<path>", "shapes")
SHAPE_KINDS = ("circle", "square", "triangle", "diamond", "cross", "ring")  # class label = index
SHAPE_EXTRAS = ("label_map", "instance_map", "caption")
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 230),
          "yellow": (235, 215, 40), "magenta": (205, 50, 205), "cyan": (40, 205, 215),
          "orange": (245, 140, 30), "white": (240, 240, 240)}
_COLOR_NAMES = tuple(COLORS)
_COLOR_RGB = np.array([COLORS[c] for c in _COLOR_NAMES], dtype=np.float32)


# ==== Data ====
class ShapesDataset(Dataset):
    """One to three coloured shapes of six kinds on a plain or gradient background; item i comes
    from np.random.default_rng([seed, i]) alone. y: the kind of the main (large, front-most) shape,
    or with `extras` a dict of "label" and any of "label_map" (H, W) (0 background, 1 + kind),
    "instance_map" (H, W) (k = k-th shape) and "caption" ("a large red circle above ...")."""

    num_classes = len(SHAPE_KINDS)

    def __init__(self, n=50_000, img_size=32, seed=0, extras=()):
        bad = set(extras) - set(SHAPE_EXTRAS)
        if bad:
            raise UserError(f"unknown shapes extras {sorted(bad)}; valid: {SHAPE_EXTRAS}")
        self.n, self.size, self.seed, self.extras = n, img_size, seed, tuple(extras)
        c = (np.arange(img_size, dtype=np.float32) + 0.5) / img_size   # pixel centres in (0, 1)
        self._yy, self._xx = np.meshgrid(c, c, indexing="ij")

    def __len__(self):
        return self.n

    def _mask(self, kind, cx, cy, r):
        dx, dy = self._xx - cx, self._yy - cy
        if kind == 0:                                                   # circle
            return dx * dx + dy * dy <= r * r
        if kind == 1:                                                   # square
            return np.maximum(np.abs(dx), np.abs(dy)) <= 0.8 * r
        if kind == 2:                                                   # triangle, apex up
            return (dy <= 0.7 * r) & (np.abs(dx) <= (dy + r) / 1.7)
        if kind == 3:                                                   # diamond
            return np.abs(dx) + np.abs(dy) <= r
        if kind == 4:                                                   # cross (plus sign)
            ax, ay = np.abs(dx), np.abs(dy)
            return ((ax <= r / 3) & (ay <= r)) | ((ay <= r / 3) & (ax <= r))
        d2 = dx * dx + dy * dy                                          # ring
        return (d2 <= r * r) & (d2 >= 0.3 * r * r)

    def sample(self, i):
        """Returns (uint8 HWC image, description dict) for item i."""
        rng = np.random.default_rng([self.seed, i])
        s = self.size
        bg = rng.uniform(0, 90, size=(2, 3)).astype(np.float32)        # dark: shapes stay visible
        style = rng.integers(0, 3)                  # 0 plain, 1 vertical gradient, 2 horizontal
        t = (np.zeros_like(self._yy), self._yy, self._xx)[style][..., None]  # (H, W, 1) in [0, 1)
        img = bg[0] + (bg[1] - bg[0]) * t                                    # (H, W, 3)
        n_shapes = int(rng.integers(1, 4))
        kinds = rng.integers(0, len(SHAPE_KINDS), size=n_shapes)
        colors = rng.choice(len(_COLOR_NAMES), size=n_shapes, replace=False)
        # shape 0 is the main one: large and drawn last (front-most); the others are small
        radii = np.concatenate([rng.uniform(0.22, 0.32, 1), rng.uniform(0.10, 0.16, n_shapes - 1)])
        centres = np.empty((n_shapes, 2))
        for k in range(n_shapes):  # keep every shape visible: the farthest of 8 candidate spots
            cand = rng.uniform(radii[k], 1 - radii[k], size=(8, 2))
            gap = np.full(8, np.inf) if k == 0 else (np.linalg.norm(
                cand[:, None] - centres[None, :k], axis=2) - radii[:k] - radii[k]).min(1)
            centres[k] = cand[np.argmax(gap >= 0)] if (gap >= 0).any() else cand[np.argmax(gap)]
        label_map = np.zeros((s, s), np.int64)
        instance_map = np.zeros((s, s), np.int64)
        for k in range(n_shapes - 1, -1, -1):
            m = self._mask(kinds[k], centres[k, 0], centres[k, 1], radii[k])
            img[m] = _COLOR_RGB[colors[k]]
            label_map[m] = 1 + kinds[k]
            instance_map[m] = k + 1
        info = {"label": int(kinds[0]), "kinds": kinds, "colors": colors, "centres": centres,
                "label_map": label_map, "instance_map": instance_map}
        return img.astype(np.uint8), info

    def caption(self, info):
        words = [f"a {'large' if k == 0 else 'small'} {_COLOR_NAMES[c]} {SHAPE_KINDS[t]}"
                 for k, (t, c) in enumerate(zip(info["kinds"], info["colors"]))]
        if len(words) == 1:
            return words[0]
        dx, dy = info["centres"][1] - info["centres"][0]   # second shape relative to the main one
        if abs(dy) >= abs(dx):
            rel = "above" if dy > 0 else "below"             # image y grows downwards
        else:
            rel = "to the left of" if dx > 0 else "to the right of"
        return f"{words[0]} {rel} " + " and ".join(words[1:])

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        img, info = self.sample(i)
        x = torch.from_numpy(img).permute(2, 0, 1).float().div_(127.5).sub_(1.0)   # (3, H, W)
        if not self.extras:
            return x, info["label"]
        y = {"label": info["label"]}
        for e in self.extras:
            y[e] = self.caption(info) if e == "caption" else torch.from_numpy(info[e])
        return x, y


class ImageFolderDataset(Dataset):
    """Images under `path`: one subfolder per class (sorted), or a flat folder (every label 0)."""

    def __init__(self, path, transform):
        if not os.path.isdir(path):
            raise UserError(f"image folder not found: {path!r}")
        exts = torchvision.datasets.folder.IMG_EXTENSIONS
        subdirs = sorted(d.name for d in os.scandir(path) if d.is_dir())
        groups = [(c, os.path.join(path, c)) for c in subdirs] if subdirs else [("", path)]
        self.classes, self.items = [], []
        for c, d in groups:
            files = sorted(f for f in os.listdir(d) if f.lower().endswith(exts))
            if files:
                self.items += [(os.path.join(d, f), len(self.classes)) for f in files]
                self.classes.append(c)
        if not self.items:
            raise UserError(f"no images ({', '.join(exts)}) in {path!r} or its subfolders")
        self.transform = transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        f, y = self.items[i]
        try:
            img = torchvision.datasets.folder.default_loader(f)
        except Exception as e:  # PIL raises many types; name the file instead
            raise UserError(f"cannot read image {f!r}: {e}") from None
        return self.transform(img), y


def _image_transform(img_size, crop=None):
    ts = [T.CenterCrop(crop)] if crop else []
    if img_size:
        ts += [T.Resize(img_size, antialias=True), T.CenterCrop(img_size)]
    return T.Compose(ts + [T.ToTensor(), T.Normalize(0.5, 0.5)])    # [0, 1] -> [-1, 1]


def load_dataset(name, root="data", img_size=None, train=True, extras=(), download=True):
    """(x, y): x float (C, H, W) in [-1, 1] (img_size None: native), y int (-1: none)."""
    tf = _image_transform(img_size)
    tv = torchvision.datasets
    try:
        if name == "shapes":
            # train and test are disjoint streams of the same distribution
            return ShapesDataset(50_000 if train else 10_000, img_size or 32,
                                 seed=0 if train else 1, extras=extras)
        if extras:
            raise UserError(f"extras {extras} are only available for 'shapes', not {name!r}")
        if name in ("cifar10", "cifar100", "mnist", "fashion-mnist"):
            cls = {"cifar10": tv.CIFAR10, "cifar100": tv.CIFAR100, "mnist": tv.MNIST,
                   "fashion-mnist": tv.FashionMNIST}[name]
            return cls(root, train=train, download=download, transform=tf)
        if name == "stl10":  # the 100k unlabelled images (label -1), as in SN-GAN's STL-10 runs
            return tv.STL10(root, split="unlabeled" if train else "test", download=download,
                            transform=tf)
        if name == "celeba":  # 178x178 centre crop of the aligned 178x218 images, as GAN papers do
            try:
                return tv.CelebA(root, split="train" if train else "test", target_type="identity",
                                 download=download, transform=_image_transform(img_size, crop=178))
            except Exception as e:
                where = os.path.join(root, "celeba")
                raise UserError(f"CelebA could not be loaded from {where!r} ({e}); Drive quotas "
                                "often block the download: put img_align_celeba.zip (unzipped), "
                                "identity_CelebA.txt and the four list_*.txt files from the CelebA "
                                "page there by hand") from None
        if name.startswith("lsun-"):
            cat = name[len("lsun-"):]
            path = os.path.join(root, "lsun", f"{cat}_{'train' if train else 'val'}")
            if not os.path.isdir(path):  # torchvision's LSUN needs lmdb, not a dependency here
                raise UserError(f"LSUN needs the lmdb package: download {os.path.basename(path)}"
                                f"_lmdb.zip from the LSUN site, export its images (LSUN repo's "
                                f"data.py) into {path!r}, or pass --dataset folder:<dir>")
            return ImageFolderDataset(path, tf)
        if name.startswith("folder:"):
            return ImageFolderDataset(name[len("folder:"):], tf)
    except RuntimeError as e:   # torchvision's "Dataset not found or corrupted" and friends
        raise UserError(f"could not load {name!r} from {root!r}: {e}. With internet access "
                           f"torchvision downloads it into --data-root.") from None
    raise UserError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")


class _EpochBatches:
    """Endless batch sampler: epoch e is torch.randperm(n) under seed + e, cut into full batches of
    the global batch size; process `rank` of `world_size` takes its contiguous share of each."""

    def __init__(self, n, batch_size, seed, start_step, rank=0, world_size=1):
        if n < batch_size:
            raise UserError(f"dataset has {n} items, fewer than one batch of {batch_size}")
        if batch_size % world_size:
            raise UserError(f"--batch-size {batch_size} is the global batch: it must be divisible "
                            f"by the {world_size} processes")
        self.n, self.b, self.seed, self.start = n, batch_size, seed, start_step
        self.share = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)

    def epochs(self):
        """(epoch's (batches, share) index tensor, first batch) from the start step on."""
        per_epoch = self.n // self.b                 # drop the last partial batch of each epoch
        epoch, offset = divmod(self.start, per_epoch)
        while True:
            g = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(self.n, generator=g)[: per_epoch * self.b].view(per_epoch, self.b)
            yield perm[:, self.share], offset
            epoch, offset = epoch + 1, 0

    def __iter__(self):
        for perm, offset in self.epochs():
            yield from perm[offset:].tolist()


def infinite_batches(dataset, batch_size, seed, start_step=0, num_workers=4, device=None, rank=0,
                     world_size=1, on_device=None):
    """Batches forever; batch k is the same whether the stream started at 0 or at start_step <= k
    (exact resume). batch_size is global: each of `world_size` ranks gets its slice. A dataset
    device_cache accepts is indexed on `device` (on_device None: CUDA only; True: any; False:
    never), the same values in the same order; else a DataLoader with workers, pinned memory."""
    sampler = _EpochBatches(len(dataset), batch_size, seed, start_step, rank, world_size)
    cache = None
    if device is not None and (on_device or (on_device is None
                                             and torch.device(device).type == "cuda")):
        cache = device_cache(dataset, device, num_workers)
    if cache is None:
        yield from DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                              pin_memory=torch.cuda.is_available(),
                              persistent_workers=num_workers > 0,
                              generator=torch.Generator().manual_seed(seed))  # no global RNG draw
        return
    images, labels, to_float = cache
    for perm, offset in sampler.epochs():
        perm = perm.to(images.device)                 # one copy per epoch, none per batch
        for idx in perm[offset:]:
            yield to_float(images[idx]), labels[idx]


_TO_FLOAT = (lambda u: u.float().div_(255).sub_(0.5).div_(0.5),   # ToTensor, Normalize(0.5, 0.5)
             lambda u: u.float().div_(127.5).sub_(1.0))           # ShapesDataset


def device_cache(dataset, device, num_workers=0, limit_bytes=4 << 30):
    """(uint8 images, int64 labels, uint8 -> float) on `device` if every item is an image on the
    uint8 grid (checked exactly) with an int label, all within `limit_bytes`; else None."""
    x0, y0 = dataset[0]
    if not (torch.is_tensor(x0) and isinstance(y0, int)) or len(dataset) * x0.numel() > limit_bytes:
        return None
    images = torch.empty((len(dataset), *x0.shape), dtype=torch.uint8, device=device)
    labels = torch.empty(len(dataset), dtype=torch.int64, device=device)
    to_float, i = None, 0
    progress = Progress("caching the dataset on the device", len(dataset), unit="img")
    for x, y in DataLoader(dataset, batch_size=500, num_workers=num_workers,
                           generator=torch.Generator()):     # no global RNG draw
        x = x.to(device)
        u = (x + 1).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8)
        if to_float is None:
            to_float = next((f for f in _TO_FLOAT if torch.equal(f(u), x)), None)
        if to_float is None or not torch.equal(to_float(u), x):
            return None                                 # not on the uint8 grid: keep the loader
        images[i:i + len(u)], labels[i:i + len(u)] = u, y.to(device)
        i += len(u)
        progress.update(len(u))
    return images, labels, to_float


# ==== Checkpoints ====
def save_checkpoint(path, state):
    """Atomic write: a kill or a failed write (full disk: UserError) leaves the old file intact."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch reports ENOSPC as "unexpected pos ..."
        free = shutil.disk_usage(d).free / 2**30
        raise UserError(f"could not write {path!r} ({_first_line(e)}; {free:.2f} GiB free on that "
                        "disk); the previous checkpoint is intact") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    try:  # make the rename itself durable
        dfd = os.open(d, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
    except OSError:
        pass


def load_checkpoint(path, device="cpu"):
    """torch.load(weights_only=True); a clear message for a missing, empty, bad, foreign file."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path!r} (nothing to resume; drop --resume)")
    size = os.path.getsize(path)
    if size == 0:
        raise UserError(f"{path!r} is empty (0 bytes): it was never completely written. Delete "
                        "it to start again, or restore a copy")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():  # objects other than tensors and plain containers
            raise UserError(f"refusing to load {path!r}: it holds Python objects that "
                            "weights_only=True will not run (not one of our checkpoints)") from None
        raise UserError(f"{path!r} is not a torch checkpoint ({size:,} bytes; "
                        f"{_first_line(e)})") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise UserError(f"{path!r} is truncated or corrupt ({size:,} bytes; torch: "
                        f"{_first_line(e)}). Restore a copy, or delete it to start again") from None
    if not isinstance(state, dict):
        raise UserError(f"{path!r} holds a {type(state).__name__}, not a checkpoint of these "
                        "scripts")
    return state


def rng_state():
    """Python, numpy, torch CPU and CUDA RNG states as a weights_only-loadable dict."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s):
    v, internal, gauss = s["python"]
    random.setstate((v, tuple(internal), gauss))
    n = s["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))
    torch.set_rng_state(s["torch"].cpu())
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in s["cuda"]])


# ==== Run ====
class UserError(Exception):
    """A mistake the user can fix (a flag, a path, a file): cli() prints it as one line, exit 2."""


class NonFiniteError(UserError):
    """A logged value or a tensor to be saved is NaN or Inf; the last good checkpoint is kept."""


def _first_line(e):
    """The message of `e` on one line (from a DataLoader worker: its traceback's last line)."""
    lines = [s.strip() for s in str(e).splitlines() if s.strip()] or [type(e).__name__]
    return lines[0] if len(lines) == 1 else re.sub(r"^[\w.]*(Error|Exception): ", "", lines[-1])


_STOP = []  # signals received by cli()'s handler; Run.stopping tells the loop to save and stop
_TRAINING = []  # a Run exists: a signal means "save after this step"; before one, nothing to save


def request_stop(signum):
    """SIGTERM/SIGINT under cli(): in training, save after this step and stop; before a Run exists
    (--evaluate, loading) or on a second signal, stop at once."""
    _STOP.append(signum)
    if len(_STOP) > 1 or not _TRAINING:
        raise KeyboardInterrupt
    print(f"{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping "
          "(send it again to stop at once)", flush=True)


def cli(main):
    """The `if __name__ == "__main__":` entry point of every script."""
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda signum, frame: request_stop(signum))
    try:
        main()
    except UserError as e:  # bugs keep their traceback; mistakes a user can fix get one line
        print(f"error: {_first_line(e)}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:  # request_stop: stop at once (checkpoints are written atomically)
        name = signal.Signals(_STOP[0]).name if _STOP else "SIGINT"
        print(f"stopped by {name}" + (": the last saved checkpoint is kept" if _TRAINING else ""),
              file=sys.stderr, flush=True)
        sys.exit(128 + (_STOP[0] if _STOP else signal.SIGINT))
    if _STOP:
        sys.exit(128 + _STOP[0])  # the shell's code for death by that signal; the run was saved


def _flag_type(convert, ok, what):
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    parse.__name__ = what
    return parse


# argparse types: an invalid value is a one-line usage error (exit 2), never a silent default
positive_int = _flag_type(int, lambda v: v > 0, "an integer > 0")
nonnegative_int = _flag_type(int, lambda v: v >= 0, "an integer >= 0 (0 = off)")
positive_float = _flag_type(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
nonnegative_float = _flag_type(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
probability = _flag_type(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
unit_float = _flag_type(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def get_device(name):
    """torch.device(name), or a UserError when it cannot be used (never a silent CPU fallback)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}; e.g. cuda, cuda:1, cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("CUDA not available; pass --device cpu")
    return device


# Flags that only steer the run, not the model or its training: they may change on --resume.
RUN_FLAGS = ("out_dir", "resume", "device", "data_root", "num_workers", "log_every", "sample_every",
             "ckpt_every", "export_samples", "fid_every", "fid_samples", "fid_weights",
             "fid_ref_split", "fid_ref_size", "deterministic", "amp")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each default, except None: a derived default states its rule in the help."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def quantize(x):
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8, rounded as save_image (--export-samples)."""
    return ((x.detach().float() + 1) / 2).mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(
        0, 2, 3, 1).cpu()


def default_out_dir(script, args, defaults):
    """runs/<script>-<dataset>-s<seed>, plus a hash of the flags that differ from `defaults` except
    the run flags and the length of training (so a run can be extended in its folder)."""
    keep = set(RUN_FLAGS) | {"dataset", "seed", "steps", "epochs", "kimg"}
    diff = {k: v for k, v in sorted(vars(args).items()) if k not in keep and defaults.get(k) != v}
    dataset = re.sub(r"[^A-Za-z0-9.-]+", "_", str(getattr(args, "dataset", "run"))).strip("_")
    name = f"{script}-{dataset}-s{args.seed}"
    if diff:
        name += "-" + hashlib.sha1(json.dumps(diff, default=str).encode()).hexdigest()[:6]
    return os.path.join("runs", name)


def _hms(seconds):
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def progress_line(unit, done, total, values, rate, rate_unit, elapsed, eta):
    """`step 1200/100000 (1%) | loss_D -2.31 | 8.4 it/s | 0:02:10 elapsed | eta 3:17:02`"""
    parts = [f"{unit} {done:g}/{total:g} ({100 * done / max(total, 1e-12):.0f}%)"]
    parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()]
    parts += [f"{rate:.3g} {rate_unit}", f"{_hms(elapsed)} elapsed", f"eta {_hms(eta)}"]
    return " | ".join(parts)


class Progress:
    """The progress line for long work outside the training loop: every `every` s and at the end."""

    def __init__(self, what, total, unit="it", every=10.0):
        self.what, self.total, self.unit, self.every = what, total, unit, every
        self.done, self.t0 = 0, time.time()
        self.t_print = self.t0

    def update(self, n=1, **values):
        self.done += n
        now = time.time()
        if now - self.t_print >= self.every or self.done >= self.total:
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-12)
            print(progress_line(self.what, self.done, self.total, values, rate, f"{self.unit}/s",
                                now - self.t0, eta), flush=True)
            self.t_print = now


def _nonfinite(state, prefix=""):
    """Names of the floating-point tensors in a nested state that hold NaN or Inf."""
    if isinstance(state, dict):
        return [n for k, v in state.items() for n in _nonfinite(v, f"{prefix}{k}.")]
    if isinstance(state, (list, tuple)):
        return [n for i, v in enumerate(state) for n in _nonfinite(v, f"{prefix}{i}.")]
    if torch.is_tensor(state) and state.is_floating_point() and not torch.isfinite(state).all():
        return [prefix[:-1]]
    return []


class Run:
    """The run's files in args.out_dir: ckpt.pt (save(): atomic, never a NaN/Inf state), args.json
    (the flags), metrics.jsonl (log(): strict JSON with step and time_s, trimmed to the checkpoint's
    step on resume) and curves.png; the progress line; `stopping`. Refuses, before writing: ckpt.pt
    or a stale metrics.jsonl on a fresh run, --resume without ckpt.pt or with another script's, and
    a changed flag that is neither a run flag nor in `mutable`."""

    def __init__(self, args, script, total, unit="step", mutable=(), nonfinite_ok=(), dist=None):
        self.args, self.script, self.total, self.unit = args, script, total, unit
        _TRAINING.append(script)
        self.dist = dist if dist is not None else Dist.__new__(Dist)   # one process: no setup
        self.mutable = set(RUN_FLAGS) | set(mutable)
        self.nonfinite_ok = set(nonfinite_ok)
        self.dir = args.out_dir
        self.ckpt = os.path.join(self.dir, "ckpt.pt")
        self.metrics = os.path.join(self.dir, "metrics.jsonl")
        self.rows, self.changed, self.t_curves = [], {}, 0.0
        if args.resume and not os.path.isfile(self.ckpt):
            raise UserError(f"--resume given but {self.ckpt!r} does not exist")
        if not args.resume and os.path.exists(self.ckpt):
            raise UserError(f"{self.ckpt!r} exists: pass --resume to continue it, or choose "
                            "another --out-dir")
        if not args.resume and os.path.exists(self.metrics):
            raise UserError(f"{self.metrics!r} is left from an earlier run that saved no "
                            "checkpoint: delete it, or choose another --out-dir")

    @property
    def stopping(self):
        """True once SIGTERM/SIGINT arrived at any process: save, then stop. Under torchrun a
        collective: read it on every rank equally often (never after `dist.main and`)."""
        return self.dist.any(_STOP)

    def load(self, device="cpu"):
        """On --resume the checkpoint's state (else None), if its script and flag changes are ok."""
        if not self.args.resume:
            return None
        state = load_checkpoint(self.ckpt, device)
        if state.get("script") != self.script:
            raise UserError(f"{self.ckpt!r} is not a checkpoint of {self.script}.py (it was "
                            f"written by {state.get('script') or 'something else'})")
        now = vars(self.args)
        self.changed = {k: (v, now[k]) for k, v in state["args"].items()
                        if k in now and now[k] != v}
        refused = [k for k in self.changed if k not in self.mutable]
        if refused:
            raise UserError("--resume cannot change " + ", ".join(
                f"--{k.replace('_', '-')} ({self.changed[k][0]!r} in the checkpoint, now "
                f"{self.changed[k][1]!r})" for k in refused)
                + ": pass the checkpoint's values, or start a new --out-dir")
        for k, (old, new) in self.changed.items():
            if k != "resume" and self.dist.main:
                print(f"resume: --{k.replace('_', '-')} {old!r} -> {new!r} (takes effect)",
                      flush=True)
        return state

    def start(self, step, device=None, **nets):
        """Before the loop: writes args.json or trims metrics.jsonl; prints flags, device, sizes."""
        if self.args.resume:
            self.rows = [r for r in _read_jsonl(self.metrics) if r.get("step", 0) <= step]
        if self.dist.main:  # under torchrun only rank 0 prints and writes
            os.makedirs(self.dir, exist_ok=True)
            for f in glob.glob(os.path.join(self.dir, ".tmp-*")):  # left by a kill during a save
                os.remove(f)
            if self.args.resume:
                _write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in self.rows))
            if not self.args.resume or set(self.changed) - set(RUN_FLAGS):
                _write_text(os.path.join(self.dir, "args.json"),
                            json.dumps(vars(self.args), indent=1))
            print(json.dumps(vars(self.args), indent=1), flush=True)
            head = [f"out_dir {self.dir}", f"device {device}", f"torch {torch.__version__}"]
            head += [f"processes {self.dist.world_size}"] if self.dist.world_size > 1 else []
            head += [f"params {k} {sum(p.numel() for p in m.parameters()):,}"
                     for k, m in nets.items()]
            print(" | ".join(head), flush=True)
        self.offset = self.rows[-1].get("time_s", 0.0) if self.rows else 0.0
        self.t0 = self.t_last = time.time()
        self.step0 = self.step_last = step

    def log(self, step, values):
        """Appends {step, time_s, **values} to metrics.jsonl, prints the progress line, returns the
        row; a NaN/Inf (not in `nonfinite_ok`) is written as null, then raises NonFiniteError."""
        values = self.dist.average(values)
        now = time.time()
        row, bad = {"step": step, "time_s": round(self.offset + now - self.t0, 3)}, []
        for k, v in values.items():
            v = v.item() if hasattr(v, "item") else v
            row[k] = v = int(v) if isinstance(v, int) else float(v)    # bool -> int
            if isinstance(v, float) and not math.isfinite(v) and k not in self.nonfinite_ok:
                bad.append(f"{k} = {v}")
        self.rows.append(row)
        if self.dist.main:
            with open(self.metrics, "a") as f:
                f.write(json.dumps({k: v if not isinstance(v, float) or math.isfinite(v) else None
                                    for k, v in row.items()}, allow_nan=False) + "\n")
            rate = (step - self.step_last) / max(now - self.t_last, 1e-9)
            avg = (step - self.step0) / max(now - self.t0, 1e-9)
            print(progress_line(self.unit, step, self.total, {k: row[k] for k in values}, rate,
                                "it/s" if self.unit == "step" else f"{self.unit}/s", row["time_s"],
                                (self.total - step) / avg if avg > 0 else math.inf), flush=True)
            self.t_last, self.step_last = now, step
            if now - self.t_curves > 30 or bad:
                self.draw_curves()
        if bad:
            raise NonFiniteError(
                f"{self.unit} {step}: {', '.join(bad)}; stopped without saving, so {self.ckpt!r} "
                "keeps the last good state. Lower the learning rate (or check the data), then "
                "continue with --resume or start again")
        return row

    def save(self, step, state):
        """ckpt.pt = state + script, step and flags; a NaN/Inf tensor raises NonFiniteError."""
        bad = _nonfinite(state)
        if bad:
            names = ", ".join(bad[:4]) + (" ..." if bad[4:] else "")
            raise NonFiniteError(f"{self.unit} {step}: {names} hold NaN/Inf; not saved, so "
                                 f"{self.ckpt!r} keeps the last good state. Lower the learning "
                                 "rate (or check the data)")
        if self.dist.main:
            save_checkpoint(self.ckpt, {"script": self.script, "step": step,
                                        "args": vars(self.args), **state})

    def finish(self, step, device=None):
        """Draws curves.png and prints the closing line; returns the last logged row (with step)."""
        if self.dist.main:
            self.draw_curves()
            dt = time.time() - self.t0
            line = f"done: {step - self.step0:g} {self.unit}s in {_hms(dt)}"
            if step > self.step0:
                line += f" ({(step - self.step0) / max(dt, 1e-9):.3g}/s incl. logging and sampling)"
            cuda = device is not None and torch.device(device).type == "cuda"
            line += f" | peak memory {peak_memory_mib(device):,.0f} MiB"
            print(line + (" (CUDA allocated)" if cuda else " (process RSS)"), flush=True)
            if _STOP:
                print(f"stopped by {signal.Signals(_STOP[0]).name} at {self.unit} {step:g}: "
                      f"{self.ckpt} is saved; continue with --resume", flush=True)
        return self.rows[-1] if self.rows and self.rows[-1]["step"] == step else {"step": step}

    def draw_curves(self):
        if self.rows:
            draw_curves(self.rows, os.path.join(self.dir, "curves.png"),
                        f"{self.script} | {self.dir} | {self.unit} {self.rows[-1]['step']:g}")
            self.t_curves = time.time()


def peak_memory_mib(device=None):
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _read_jsonl(path):
    """The rows of a JSON-lines file; a line cut off by a kill (the last one) is dropped."""
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path) as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise UserError(f"{path!r} line {i + 1} is not JSON: {line[:60]!r}") from None
    return rows


def _write_text(path, text):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ==== Processes (torchrun) ====
def single_process(script):
    """First line of a one-process script's main: a UserError under torchrun with WORLD_SIZE > 1."""
    n = int(os.environ.get("WORLD_SIZE", "1"))
    if n > 1:
        raise UserError(f"{script}.py runs as one process (WORLD_SIZE is {n}): start it with "
                        f"python {script}.py, not torchrun --nproc_per_node > 1")


class Dist:
    """Data parallelism under torchrun: one process per device (NCCL on CUDA, gloo on CPU),
    --batch-size the global batch; without torchrun rank 0 of 1 and every method a no-op."""

    rank, world_size = 0, 1

    def __init__(self, device_name):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = get_device(device_name)
        if self.world_size > 1:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            if not torch.distributed.is_initialized():
                if not os.environ.get("MASTER_ADDR"):   # WORLD_SIZE set by hand, not by torchrun
                    raise UserError(f"WORLD_SIZE={self.world_size} but no torchrun rendezvous "
                                    "(MASTER_ADDR unset): start with torchrun --nproc_per_node N")
                torch.distributed.init_process_group(
                    "nccl" if self.device.type == "cuda" else "gloo")
            self.flags = torch.distributed.new_group(backend="gloo")  # agree on a stop, no GPU sync

    @property
    def main(self):
        """Rank 0: the only process that prints, samples and writes files."""
        return self.rank == 0

    def share(self, n):
        """This rank's contiguous slice of a global batch of n (n divisible by the world size)."""
        if n % self.world_size:
            raise UserError(f"a global batch of {n} does not split over {self.world_size} "
                            "processes")
        return slice(self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size)

    def shard(self, x):
        """x[share]: every rank draws the same global noise (one RNG stream) and keeps its rows."""
        return x if self.world_size == 1 else x[self.share(len(x))]

    def average_gradients(self, *modules):
        """Mean of every .grad over the processes after backward: one flat all-reduce."""
        if self.world_size == 1:
            return
        grads = [p.grad for m in modules for p in m.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world_size
        for g, v in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(v.view_as(g))

    def broadcast_buffers(self, *modules):
        """Rank 0's buffers (BN statistics) to every rank; call at the same steps on every rank."""
        if self.world_size > 1:
            for b in (b for m in modules for b in m.buffers()):
                torch.distributed.broadcast(b, 0)

    def average(self, values):
        """Logged scalars averaged over the processes (at log steps only: it syncs)."""
        if self.world_size == 1 or not values:
            return values
        t = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(self.device)
                         for v in values.values()])
        torch.distributed.all_reduce(t)
        return dict(zip(values, (t / self.world_size).tolist()))

    def any(self, flag):
        """True on every rank if true on one (a SIGTERM seen by one process first)."""
        if self.world_size == 1:
            return bool(flag)
        t = torch.tensor([int(bool(flag))])
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self.flags)
        return bool(t.item())


# ==== Figures ====
REAL_RGB, FAKE_RGB = (245, 140, 30), (40, 160, 60)  # one convention: real orange, generated green


def canvas(height, width, rgb=(255, 255, 255)):
    """A (3, height, width) uint8 image of one colour: what every figure is drawn on."""
    return torch.tensor(rgb, dtype=torch.uint8).view(3, 1, 1).repeat(1, height, width)


def fill_rect(img, x0, y0, x1, y1, rgb):
    """Paints the pixels x0..x1, y0..y1 (inclusive, clipped) of a (3, H, W) uint8 image in place."""
    H, W = img.shape[1:]
    x0, y0, x1, y1 = max(int(x0), 0), max(int(y0), 0), min(int(x1), W - 1), min(int(y1), H - 1)
    if x0 <= x1 and y0 <= y1:
        img[:, y0:y1 + 1, x0:x1 + 1] = torch.tensor(rgb, dtype=torch.uint8).view(3, 1, 1)
    return img


def draw_text(img, items, rgb=(0, 0, 0)):
    """A new img with each (x, y, text) of `items` at top-left (x, y): draw_bounding_boxes labels of
    width-0 boxes (placed one pixel inside), PIL's ImageDraw.text pixels (tests/test_common.py)."""
    items = [(x, y, str(t)) for x, y, t in items if str(t)]
    if not items:
        return img
    boxes = torch.tensor([[x - 1, y - 1, x - 1, y - 1] for x, y, _ in items], dtype=torch.float)
    return torchvision.utils.draw_bounding_boxes(img, boxes, labels=[t for _, _, t in items],
                                                 colors=[tuple(rgb)] * len(items), width=0)


def draw_polyline(img, xy, rgb, width=2):
    """Straight segments through the points xy [(x, y), ...], `width` pixels thick, in place."""
    H, W = img.shape[1:]
    color = torch.tensor(rgb, dtype=torch.uint8).view(3, 1)
    for (xa, ya), (xb, yb) in zip(xy[:-1], xy[1:]):
        t = torch.linspace(0, 1, int(max(abs(xb - xa), abs(yb - ya))) + 2)
        xs, ys = (xa + t * (xb - xa)).round().long(), (ya + t * (yb - ya)).round().long()
        for dy in range(width):
            ok = (xs >= 0) & (xs < W) & (ys + dy >= 0) & (ys + dy < H)
            img[:, ys[ok] + dy, xs[ok]] = color
    return img


def save_png(img, path):
    """A (3, H, W) uint8 image as PNG, atomically (save_image of img / 255 gives these bytes)."""
    tmp = f"{path}.tmp-{os.getpid()}.png"
    torchvision.utils.save_image(img.float() / 255, tmp, format="png")
    os.replace(tmp, path)


def title_strip(img, lines, key=()):
    """`img` ((3, H, W) uint8) under a white strip: text `lines`, a colour key [(label, rgb)]."""
    h = 14 * (len(lines) + (1 if key else 0)) + 8
    out = canvas(img.shape[1] + h, max(img.shape[2], 240))
    out[:, h:, :img.shape[2]] = img
    items = [(4, 4 + 14 * i, text) for i, text in enumerate(lines)]
    x, y = 4, 4 + 14 * len(lines)
    for label, rgb in key:
        fill_rect(out, x, y + 2, x + 9, y + 11, rgb)
        items.append((x + 13, y, label))
        x += 24 + 7 * len(label)
    return draw_text(out, items)


def draw_curves(rows, path, title="", width=360, height=190):
    """curves.png: one panel per logged scalar (x = step), with its name and value/step ranges."""
    keys = list(dict.fromkeys(k for r in rows for k, v in r.items()
                              if k not in ("step", "time_s") and isinstance(v, (int, float))))
    cols = max(1, min(3, len(keys)))
    img = canvas(20 + -(-len(keys) // cols) * height, cols * width)
    items, grey, blue = [(6, 4, title)], (160, 160, 160), (30, 90, 200)
    for i, k in enumerate(keys):
        pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
        ox, oy = i % cols * width, 20 + i // cols * height
        x0, y0, x1, y1 = ox + 70, oy + 18, ox + width - 12, oy + height - 26
        for edge in ((x0, y0, x1, y0), (x0, y1, x1, y1), (x0, y0, x0, y1), (x1, y0, x1, y1)):
            fill_rect(img, *edge, grey)
        (lo_x, lo_y), (hi_x, hi_y) = np.min(pts, 0), np.max(pts, 0)
        xy = [(x0 + (x1 - x0) * ((s - lo_x) / (hi_x - lo_x) if hi_x > lo_x else 0.5),
               y1 - (y1 - y0) * ((v - lo_y) / (hi_y - lo_y) if hi_y > lo_y else 0.5))
              for s, v in pts]
        if len(xy) > 1:
            draw_polyline(img, xy, blue)
        else:
            fill_rect(img, xy[0][0] - 2, xy[0][1] - 2, xy[0][0] + 2, xy[0][1] + 2, blue)
        items += [(x0, oy + 4, k), (ox + 4, y0, f"{hi_y:.4g}"), (ox + 4, y1 - 10, f"{lo_y:.4g}"),
                  (x0, y1 + 4, f"{lo_x:g}"), (x1 - 6 * len(f"{hi_x:g}"), y1 + 4, f"{hi_x:g}")]
    save_png(draw_text(img, items), path)
