"""Data loading and checkpointing shared by the paper scripts, and nothing else.

Everything an auditor needs to check a paper lives in the paper's own script; this file holds only
what several scripts need and no paper has an opinion on (STYLE.md 2.5).

Data
  load_dataset(name, root, img_size, train=True, extras=())  -> Dataset of (x, y), x in [-1, 1], CHW
      cifar10 | cifar100 | stl10 | mnist | fashion-mnist | celeba | lsun-<category> | folder:<path> | shapes
  ShapesDataset     procedural, deterministic, learnable images: item i is a pure function of (seed, i).
                    With extras it also gives a semantic label map, an instance map and a caption.
                    Measured: about 5,500 items/s at 32x32 on one core of the 2-core CI machine
                    (python -c "import common; common._bench_shapes()"; 2026-11-28).
  infinite_batches  endless, per-epoch seeded shuffling that can start at any step (exact resume).
Checkpoints
  save_checkpoint   atomic write: temp file, flush + fsync, os.replace
  load_checkpoint   torch.load(weights_only=True); reports every flag that differs from the run's
  prepare_run       refuses to overwrite a run without --resume
  rng_state / set_rng_state   Python, numpy, torch CPU and CUDA generator states
"""

import os
import random
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
    """One to three coloured shapes of six kinds on a plain or gradient background.

    Item i is drawn from np.random.default_rng([seed, i]) alone, so it is the same in every process,
    worker and run. y is the kind of the main (largest, front-most) shape. With `extras` y becomes a
    dict holding "label" and any of "label_map" (H, W) int64 with 0 = background and 1 + kind for a
    shape pixel, "instance_map" (H, W) int64 with 0 = background and k = k-th drawn shape, and
    "caption", e.g. "a large red circle above a small blue square".
    """

    num_classes = len(SHAPE_KINDS)

    def __init__(self, n=50_000, img_size=32, seed=0, extras=()):
        bad = set(extras) - set(SHAPE_EXTRAS)
        if bad:
            raise ValueError(f"unknown shapes extras {sorted(bad)}; valid: {SHAPE_EXTRAS}")
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
        if style == 0:
            img = np.empty((s, s, 3), np.float32)
            img[:] = bg[0]
        else:
            t = (self._yy if style == 1 else self._xx)[..., None]           # (H, W, 1) in (0, 1)
            img = bg[0] + (bg[1] - bg[0]) * t
        n_shapes = int(rng.integers(1, 4))
        kinds = rng.integers(0, len(SHAPE_KINDS), size=n_shapes)
        colors = rng.choice(len(_COLOR_NAMES), size=n_shapes, replace=False)
        # shape 0 is the main one: large and drawn last (front-most); the others are small
        radii = np.concatenate([rng.uniform(0.22, 0.32, 1), rng.uniform(0.10, 0.16, n_shapes - 1)])
        centres = np.empty((n_shapes, 2))
        for k in range(n_shapes):        # keep every shape visible: the farthest of 8 candidate spots
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
        text = f"{words[0]} {rel} {words[1]}"
        return text + (f" and {words[2]}" if len(words) == 3 else "")

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
    """Images under `path`: one subfolder per class (labels in sorted order), or a flat folder
    (every label 0). Unreadable files raise an error naming the file."""

    def __init__(self, path, transform):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"image folder not found: {path!r}")
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
            raise FileNotFoundError(f"no images ({', '.join(exts)}) in {path!r} or its subfolders")
        self.transform = transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        f, y = self.items[i]
        try:
            img = torchvision.datasets.folder.default_loader(f)
        except Exception as e:  # PIL raises many types; name the file instead
            raise OSError(f"cannot read image {f!r}: {e}") from None
        return self.transform(img), y


def _image_transform(img_size, crop=None):
    ts = [T.CenterCrop(crop)] if crop else []
    if img_size:
        ts += [T.Resize(img_size, antialias=True), T.CenterCrop(img_size)]
    return T.Compose(ts + [T.ToTensor(), T.Normalize(0.5, 0.5)])    # [0, 1] -> [-1, 1]


def load_dataset(name, root="data", img_size=None, train=True, extras=(), download=True):
    """A Dataset of (x, y): x a float (C, H, W) tensor in [-1, 1], y an int label (-1 if none).

    img_size=None keeps the native resolution (shapes: 32). MNIST-like sets have C = 1.
    `extras` is for `shapes` only (see ShapesDataset)."""
    tf = _image_transform(img_size)
    tv = torchvision.datasets
    try:
        if name == "shapes":
            # train and test are disjoint streams of the same distribution
            return ShapesDataset(50_000 if train else 10_000, img_size or 32, seed=0 if train else 1,
                                 extras=extras)
        if extras:
            raise ValueError(f"extras {extras} are only available for 'shapes', not {name!r}")
        if name in ("cifar10", "cifar100"):
            cls = tv.CIFAR10 if name == "cifar10" else tv.CIFAR100
            return cls(root, train=train, download=download, transform=tf)
        if name == "stl10":  # the 100k unlabelled images (label -1), as in SN-GAN's STL-10 runs
            return tv.STL10(root, split="unlabeled" if train else "test", download=download,
                            transform=tf)
        if name in ("mnist", "fashion-mnist"):
            cls = tv.MNIST if name == "mnist" else tv.FashionMNIST
            return cls(root, train=train, download=download, transform=tf)
        if name == "celeba":
            return _celeba(root, img_size, train, download)
        if name.startswith("lsun-"):
            cat = name[len("lsun-"):]
            path = os.path.join(root, "lsun", f"{cat}_{'train' if train else 'val'}")
            if not os.path.isdir(path):
                raise FileNotFoundError(
                    f"LSUN {cat!r} is not downloadable through torchvision without the lmdb package, "
                    f"which this project does not depend on. Download {cat}_{'train' if train else 'val'}"
                    f"_lmdb.zip from the LSUN site, export its images (e.g. with the LSUN repo's "
                    f"data.py export), and put them in {path!r} (or pass --dataset folder:<dir>).")
            return ImageFolderDataset(path, tf)
        if name.startswith("folder:"):
            return ImageFolderDataset(name[len("folder:"):], tf)
    except RuntimeError as e:   # torchvision's "Dataset not found or corrupted" and friends
        raise RuntimeError(f"could not load {name!r} from {root!r}: {e}. With internet access "
                           f"torchvision downloads it into --data-root.") from None
    raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")


def _celeba(root, img_size, train, download):
    try:  # 178x178 centre crop of the aligned 178x218 images, as in most GAN papers' CelebA runs
        return torchvision.datasets.CelebA(root, split="train" if train else "test",
                                           target_type="identity", download=download,
                                           transform=_image_transform(img_size, crop=178))
    except Exception as e:
        raise RuntimeError(
            f"CelebA could not be loaded from {os.path.join(root, 'celeba')!r} ({e}). Its Google "
            "Drive files often hit their download quota: download img_align_celeba.zip, "
            "list_eval_partition.txt, identity_CelebA.txt, list_attr_celeba.txt, "
            "list_bbox_celeba.txt and list_landmarks_align_celeba.txt from the CelebA page by hand, "
            f"put them in {os.path.join(root, 'celeba')!r}, unzip the images there and run again.") from None


class _EpochBatches:
    """Endless batch sampler: epoch e is torch.randperm(n) under seed + e, cut into full batches."""

    def __init__(self, n, batch_size, seed, start_step):
        if n < batch_size:
            raise ValueError(f"dataset has {n} items, fewer than one batch of {batch_size}")
        self.n, self.b, self.seed, self.start = n, batch_size, seed, start_step

    def __iter__(self):
        per_epoch = self.n // self.b                 # drop the last partial batch of each epoch
        epoch, offset = divmod(self.start, per_epoch)
        while True:
            g = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(self.n, generator=g)[: per_epoch * self.b].view(per_epoch, self.b)
            yield from perm[offset:].tolist()
            epoch, offset = epoch + 1, 0


def infinite_batches(dataset, batch_size, seed, start_step=0, num_workers=4):
    """Yields batches forever. Batch k of the stream is the same whether the stream started at 0
    or at start_step <= k, so a resumed run sees the batches an uninterrupted one would."""
    loader = DataLoader(dataset, batch_sampler=_EpochBatches(len(dataset), batch_size, seed, start_step),
                        num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                        persistent_workers=num_workers > 0,
                        generator=torch.Generator().manual_seed(seed))  # never draws from the global RNG
    yield from loader


def _bench_shapes(n=4000, img_size=32):
    ds = ShapesDataset(n, img_size)
    t = time.perf_counter()
    for i in range(n):
        ds[i]
    rate = n / (time.perf_counter() - t)
    print(f"shapes {img_size}x{img_size}: {rate:.0f} items/s on one core")
    return rate


# ==== Checkpoints ====
def save_checkpoint(path, state):
    """Writes `state` atomically: a kill mid-save leaves the previous file intact."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(d, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
    except OSError:
        pass


def load_checkpoint(path, device="cpu", args=None, shape_flags=()):
    """Loads with weights_only=True. With `args`, prints every flag that differs from the saved run
    and raises if any of `shape_flags` (flags that change tensor shapes) differs."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path!r} (nothing to resume; drop --resume)")
    state = torch.load(path, map_location=device, weights_only=True)
    if args is not None and "args" in state:
        now = vars(args)
        diff = {k: (v, now.get(k)) for k, v in state["args"].items() if now.get(k) != v and k != "resume"}
        for k, (old, new) in diff.items():
            print(f"resume: --{k.replace('_', '-')} was {old!r} in the checkpoint, now {new!r}", flush=True)
        bad = [k for k in shape_flags if k in diff]
        if bad:
            raise ValueError(f"checkpoint {path!r} was trained with different shape flags: " + ", ".join(
                f"--{k.replace('_', '-')} {diff[k][0]!r} (now {diff[k][1]!r})" for k in bad)
                + ". Pass the checkpoint's values or use another --out-dir.")
    return state


def prepare_run(out_dir, resume, ckpt_name="ckpt.pt"):
    """Creates out_dir; returns the checkpoint path to resume from, or None for a fresh run."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, ckpt_name)
    if resume:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--resume given but {path!r} does not exist")
        return path
    if os.path.exists(path):
        raise FileExistsError(f"{path!r} exists: pass --resume to continue it, or choose another --out-dir")
    return None


def rng_state():
    """Python, numpy, torch CPU and CUDA RNG states as a weights_only-loadable dict."""
    mt, keys, pos, has_gauss, gauss = np.random.get_state()
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
