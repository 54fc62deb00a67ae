"""pix2pixHD: High-Resolution Image Synthesis and Semantic Manipulation with Conditional GANs.
Wang, Liu, Zhu, Tao, Kautz, Catanzaro. CVPR 2018. arXiv:1711.11585
Official code: NVIDIA/pix2pixHD (models/networks.py, models/pix2pixHD_model.py, train.py)

Paper -> code
  Sec. 3.1  s = one-hot labels + boundary map (+ E features) ......... one_hot_labels(), prepare()
  Sec. 3.2  global generator G1 (App. A) ............................. GlobalGenerator, ResnetBlock
  Sec. 3.2  local enhancer G2 around G1, element-wise sum ............ LocalEnhancer
  Sec. 3.2  coarse-to-fine: G1 alone, then G2 alone, then all of G ... --stage, load_global_run()
  Eq. (2)   multi-scale PatchGAN discriminators ...................... MultiscaleDiscriminator
  Eq. (3)   feature matching over D's intermediate layers ............ feature_matching_loss()
  Eq. (4)   full objective with Sec. 4's LSGAN ....................... gan_loss(), train_step()
  Sec. 4    VGG19 perceptual loss, weights 1/32 .. 1 ................. VGG19Features, vgg_loss()
  Sec. 3.3  instance boundary map, 4-neighbour rule .................. boundary_map()
  Sec. 3.4  instance-wise feature encoder, instance average pooling .. Encoder
  Sec. 3.4  K-means (K = 10) per class, one centre per instance ...... kmeans(), sample_features()
  App. A    Adam(2e-4, 0.5, 0.999), constant then linear decay ....... lr_at()
  Sec. 4.1  semantic-consistency score (pixel acc, mean IoU) ......... segmentation_scores()
Deviations (each one also tagged in the code; grep DEVIATION|PAPER-VS-CODE)
  1. PAPER-VS-CODE  3 discriminators (paper, official 1024p); official 512p script: 2 (--num-D 2).
  2. PAPER-VS-CODE  FM weight lambda/num_D * 4/(n_layers_D + 1) per layer (official; Eq. 4 has no
     1/num_D); L_D halved, 0.5 (L_real + L_fake) (official train.py).
  3. PAPER-VS-CODE  VGG input in [-1, 1], not ImageNet-normalised (official; --vgg-imagenet-norm).
  4. PAPER-VS-CODE  after --niter-fix-global epochs a fresh Adam over G1 + G2 (+ E) is stepped and
     decayed (2017 train.py); today's official train.py keeps the first one (card item 8).
  5. PAPER-VS-CODE  lr: niter + 1 epochs at lr, then lr/niter_decay less per epoch (official rule).
  6. PAPER-VS-CODE  D: 4x4 convs with padding 2, strides 2, 2, 2, 1, 1 (official networks.py).
  7. DEVIATION  everything is resized to one --size H x W (official 512p: scale the width to 1024,
     keep the aspect): the same on Cityscapes' 2:1 frames; ADE20K frames are squeezed.
  8. DEVIATION  scipy kmeans2 (one k-means++ start) instead of sklearn KMeans (10 starts); an
     instance's class is the label at its median pixel (official: Cityscapes' id // 1000, equal).
  9. DEVIATION  no PSPNet (Tab. 1): the user's --seg-model, else a proxy trained on the real pairs.
  10. DEVIATION  local stage: the global run's D scale k becomes scale k + 1 (same resolution).
  11. DEVIATION  --amp bf16 (paper fp32). Not here: RGB inputs (label_nc 0), precomputed
     features (--load_features), the image pool (official default pool_size 0), the editing UI.
  12. DEVIATION  torchrun: --batch-size is global, 1 per process (official example: 8 on 8 GPUs).
Run
  python pix2pixhd.py --dataset cityscapes              # G1 at 512x1024, 3 Ds, 100 + 100 epochs
  python pix2pixhd.py --dataset cityscapes --stage local --load-global runs/pix2pixhd-cityscapes-s0
                                                        # G1 + G2 at 1024x2048, 50 + 50 epochs
  python pix2pixhd.py --dataset cityscapes --num-D 2    # official scripts/train_512p.sh
  torchrun --nproc_per_node 8 pix2pixhd.py --dataset cityscapes --batch-size 8   # DEVIATION 12
  python pix2pixhd.py --dataset cityscapes --instance-feat --sample-features 4   # Sec. 3.4
  python pix2pixhd.py --dataset cityscapes --size 256x512 --seg-every 10000 --fid-every 10000
  python pix2pixhd.py --dataset ade20k --size 256x256 --no-vgg
  python pix2pixhd.py --dataset pix2pixhd:/data/mine --label-nc 20   # train_label/_inst/_img
  python pix2pixhd.py --dataset shapes --device cpu --size 32x32 --ngf 8 --ndf 8 --no-vgg \
      --n-downsample-global 2 --n-blocks-global 1 --n-layers-D 2 --epochs 1 --max-dataset-size 64
  G = load_generator("runs/.../ckpt.pt", "cuda"); x_fake = G(prepare(batch, args, "cuda")["s"])
Paper reports (Tab. 1, Cityscapes 2048x1024, PSPNet): pixel accuracy 83.78%, mean IoU 0.6389
(real images: 84.29% / 0.6857). SPADE's re-training at 256x512: mIoU 58.3, acc 81.4, FID 95.0.
Our numbers: README.
"""

import argparse
import contextlib
import math
import os
import random
import warnings

import numpy as np
import scipy.cluster.vq
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.functional as TF
from torch.utils.data import Dataset, default_collate

import common

DATASETS = ("cityscapes", "ade20k", "pix2pixhd:<path>", "shapes")
# Cityscapes labelId -> trainId (the 19 evaluation classes, 255 = ignored), cityscapesscripts
CITYSCAPES_TRAIN_ID = [255] * 7 + [0, 1, 255, 255, 2, 3, 4, 255, 255, 255, 5, 255, 6, 7, 8, 9, 10,
                                   11, 12, 13, 14, 15, 255, 255, 16, 17, 18, 255]
VGG_URL = torchvision.models.VGG19_Weights.IMAGENET1K_V1.url
MUTABLE = ("epochs", "niter_decay", "seg_every", "seg_images", "seg_model", "seg_steps",
           "sample_features")                      # flags a --resume may change


# ==== Args ====
def parse_size(text):
    try:
        h, w = (common.positive_int(v) for v in text.lower().split("x"))
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"expected HxW > 0, e.g. 512x1024, got {text!r}") from None
    return [h, w]


def dataset_info(name, label_nc=None):
    """(label_nc, has instance maps, eval map labelId -> eval class or None, n eval classes)."""
    if name == "cityscapes":
        return 35, True, CITYSCAPES_TRAIN_ID, 19
    if name == "ade20k":             # 0 = unlabelled, classes 1..150 (MIT Scene Parsing)
        return 151, False, [255] + list(range(150)), 150
    if name == "shapes":
        return 1 + len(common.SHAPE_KINDS), True, None, 1 + len(common.SHAPE_KINDS)
    if name.startswith("pix2pixhd:"):
        nc = 35 if label_nc is None else label_nc       # official base_options default
        return nc, os.path.isdir(os.path.join(name[len("pix2pixhd:"):], "train_inst")), None, nc
    raise common.UserError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                formatter_class=common.HelpFormatter)
    g = p.add_argument_group("paper", "derived defaults: rule in the help, value in args.json")
    g.add_argument("--stage", choices=["global", "local"], default="global",
                   help="G1 alone, or G2 around a (loaded) G1 [Sec. 3.2]")
    g.add_argument("--load-global", type=str, help="ckpt.pt of a finished global run: G1, D "
                   "and E start from it (local stage) [Sec. 3.2; official --load_pretrain]")
    g.add_argument("--size", type=parse_size, help="HxW: 512x1024 global, 1024x2048 local "
                   "(ade20k 512x512, 1024x1024) [Sec. 4; DEVIATION: fixed size]")
    g.add_argument("--label-nc", type=common.positive_int, help="classes: cityscapes 35, ade20k "
                   "151, shapes 7, else 35 [official base_options]")
    g.add_argument("--instance", action=argparse.BooleanOptionalAction, help="boundary-map "
                   "channel; on when the dataset has instance maps [Sec. 3.3]")
    g.add_argument("--instance-feat", action="store_true",
                   help="instance-wise feature encoder E [Sec. 3.4; off in official scripts]")
    g.add_argument("--feat-num", type=common.positive_int, default=3, help="E channels [Sec. 4]")
    g.add_argument("--nef", type=common.positive_int, default=16, help="E width [official]")
    g.add_argument("--n-downsample-E", type=common.positive_int, default=4, help="[official]")
    g.add_argument("--n-clusters", type=common.positive_int, default=10, help="K [Sec. 4]")
    g.add_argument("--ngf", "--g-width", type=common.positive_int,
                   help="G width: 64 global, 32 local (G1 inside: 2x) [App. A, official scripts]")
    g.add_argument("--n-downsample-global", type=common.positive_int, default=4, help="[App. A]")
    g.add_argument("--n-blocks-global", type=common.positive_int, default=9, help="[App. A]")
    g.add_argument("--n-blocks-local", type=common.positive_int, default=3, help="[App. A]")
    g.add_argument("--ndf", "--d-width", type=common.positive_int, default=64, help="[App. A]")
    g.add_argument("--n-layers-D", type=common.positive_int, default=3, help="[App. A]")
    g.add_argument("--num-D", type=common.positive_int, default=3,
                   help="discriminator scales [Sec. 3.2; official 512p: 2, PAPER-VS-CODE]")
    g.add_argument("--lsgan", action=argparse.BooleanOptionalAction, default=True,
                   help="least squares GAN loss; --no-lsgan: cross entropy [Sec. 4]")
    g.add_argument("--gan-feat", action=argparse.BooleanOptionalAction, default=True,
                   help="D feature-matching loss [Eq. 3]")
    g.add_argument("--vgg", action=argparse.BooleanOptionalAction, default=True,
                   help="VGG19 perceptual loss; --no-vgg: 'Ours (w/o VGG)' [Sec. 4, Tab. 2]")
    g.add_argument("--vgg-weights", type=str, help="torchvision vgg19 state dict; default: "
                   "torch.hub's checkpoints/" + os.path.basename(VGG_URL) + " [official]")
    g.add_argument("--vgg-imagenet-norm", action="store_true", help="ImageNet mean/std before "
                   "VGG [ours; official feeds [-1, 1]: PAPER-VS-CODE]")
    g.add_argument("--lambda-feat", type=common.nonnegative_float, default=10.0,
                   help="lambda of FM and VGG [Eq. 4, Sec. 4]")
    g.add_argument("--lr", type=common.positive_float, default=2e-4, help="Adam lr [App. A]")
    g.add_argument("--betas", type=common.unit_float, nargs=2, default=[0.5, 0.999],
                   help="Adam betas [App. A, official]")
    g.add_argument("--batch-size", type=common.positive_int, default=1, help="[official]")
    g.add_argument("--epochs", type=common.positive_int,
                   help="epochs of this stage: 200 global, 100 local [App. A, official scripts]")
    g.add_argument("--niter-decay", type=common.nonnegative_int, help="last epochs with linear "
                   "decay: 100 global, 50 local (official niter = epochs - this) [App. A]")
    g.add_argument("--niter-fix-global", type=common.nonnegative_int,
                   help="local stage: epochs training G2 only, 10 [Sec. 3.2, official]")
    g.add_argument("--max-dataset-size", type=common.positive_int,
                   help="use the first N training pairs [official base_options]")
    e = p.add_argument_group("eval")
    e.add_argument("--seg-every", type=common.nonnegative_int, default=0, help="semantic-"
                   "consistency score every K steps and at the end, 0 = off [Sec. 4.1, Tab. 1]")
    e.add_argument("--seg-images", type=common.positive_int, default=500,
                   help="validation label maps scored [Sec. 4.1: Cityscapes val]")
    e.add_argument("--seg-model", type=str, help="torch.export .pt2 segmenter: "
                   "(1, 3, H, W) in [-1, 1] -> logits of the eval classes [Sec. 4.1]")
    e.add_argument("--seg-steps", type=common.positive_int, default=2000,
                   help="proxy segmenter training steps without --seg-model [ours: DEVIATION]")
    e.add_argument("--sample-features", type=common.nonnegative_int, default=0, help="after "
                   "training: K-means of E's features, N draws per label map [Sec. 3.4]")
    e.add_argument("--fid-every", type=common.nonnegative_int, default=0,
                   help="FID via fid.py every K steps, 0 = off [ours: SPADE's protocol]")
    e.add_argument("--fid-samples", type=common.positive_int, default=500,
                   help="generated images per FID [ours: SPADE, all val maps]")
    e.add_argument("--fid-weights", type=str, help="Inception weights for fid.py [run]")
    e.add_argument("--export-samples", type=common.nonnegative_int, default=0,
                   help="write samples_N.npz (uint8 NHWC) from val label maps, 0 = off [run]")
    r = p.add_argument_group("run")
    r.add_argument("--dataset", default="cityscapes", help=f"{' | '.join(DATASETS)} [run]")
    r.add_argument("--data-root", type=str, default="data", help="dataset folder [run]")
    r.add_argument("--out-dir", type=str, help="default runs/pix2pixhd-<dataset>-s<seed> [run]")
    r.add_argument("--seed", type=common.nonnegative_int, default=0, help="random seed [run]")
    r.add_argument("--device", default="cuda", help="torch device [run]")
    r.add_argument("--num-workers", type=common.nonnegative_int, default=4, help="[run]")
    r.add_argument("--log-every", type=common.positive_int, default=100,
                   help="log every N steps [official print_freq]")
    r.add_argument("--sample-every", type=common.nonnegative_int, default=1000,
                   help="grid of val maps every N steps, 0 = off [run]")
    r.add_argument("--ckpt-every", type=common.positive_int, default=1000,
                   help="checkpoint every N steps [official save_latest_freq]")
    r.add_argument("--resume", action="store_true", help="continue out_dir/ckpt.pt [run]")
    r.add_argument("--deterministic", action="store_true", help="deterministic kernels, no "
                   "cudnn.benchmark; CUDA: CUBLAS_WORKSPACE_CONFIG=:4096:8, some ops raise [run]")
    r.add_argument("--amp", choices=["off", "bf16"], default="off",
                   help="bf16 autocast of the forwards [run; DEVIATION: paper fp32]")
    args = p.parse_args(argv)

    # Derived defaults of the two stages (card Sec. 2.5)
    if args.out_dir is None:
        args.out_dir = common.default_out_dir("pix2pixhd", args, vars(p.parse_args([])))
    local = args.stage == "local"
    try:
        nc, has_inst, _, _ = dataset_info(args.dataset, args.label_nc)
    except common.UserError as err:
        p.error(str(err))
    if args.label_nc is None:
        args.label_nc = nc
    if args.instance is None:
        args.instance = has_inst              # pitfall 1: no instance maps -> no boundary map
    if args.size is None:
        args.size = ([512, 512] if args.dataset == "ade20k" else [512, 1024])
        args.size = [2 * v for v in args.size] if local else args.size
    for k, per_stage in (("ngf", (64, 32)), ("epochs", (200, 100)), ("niter_fix_global", (0, 10))):
        if getattr(args, k) is None:                # (global, local)
            setattr(args, k, per_stage[local])
    if args.niter_decay is None:
        args.niter_decay = args.epochs // 2
    if max(args.betas) >= 1:
        p.error("--betas must be < 1")
    if args.niter_decay > args.epochs:
        p.error(f"--niter-decay {args.niter_decay} exceeds --epochs {args.epochs}")
    if not local and (args.niter_fix_global or args.load_global):
        p.error("--niter-fix-global and --load-global belong to --stage local")
    if args.instance_feat and not has_inst:
        p.error(f"--instance-feat needs instance maps; {args.dataset} has none")
    base = 2 ** max(args.n_downsample_global + local, args.n_downsample_E * args.instance_feat)
    if any(v % base or v // base < 2 for v in args.size):
        p.error(f"--size {args.size[0]}x{args.size[1]}: both sides must be multiples of {base} "
                "and at least twice it (2^downsamplings) [official __make_power_2]")
    if args.sample_features and not args.instance_feat:
        p.error("--sample-features needs --instance-feat (it samples E's feature clusters)")
    return args


# ==== Data ====
class PairDataset(Dataset):
    """(label, instance, image) at --size (official base_dataset.py); a bad label names its file."""

    def __init__(self, files, size, label_nc, shapes=None):
        self.files, self.size, self.label_nc, self.shapes = files, size, label_nc, shapes

    def __len__(self):
        return len(self.shapes) if self.shapes is not None else len(self.files)

    def __getitem__(self, i):
        if self.shapes is not None:
            img, info = self.shapes.sample(i)
            label, inst, name = info["label_map"], info["instance_map"], f"shapes[{i}]"
            img = TF.to_pil_image(img)
        else:
            name, inst_f, img_f = self.files[i]
            try:
                label = read_map(name)
                inst = read_map(inst_f) if inst_f else label
                img = torchvision.datasets.folder.pil_loader(img_f)              # RGB
            except common.UserError:
                raise
            except Exception as err:  # decoders raise many types; name the file instead
                raise common.UserError(f"cannot read {name!r} / {img_f!r}: {err}") from None
        bad = label[(label < 0) | (label >= self.label_nc)]
        if bad.size:
            raise common.UserError(f"{name}: label value {int(bad[0])} outside [0, "
                                   f"{self.label_nc}); set --label-nc or fix the label map")
        # maps: nearest with pixel centres (nearest-exact: the pixels of PIL's NEAREST, which
        # the official code uses); image: PIL's bicubic through torchvision (official Scale)
        label, inst = (F.interpolate(torch.from_numpy(a)[None, None].double(), self.size,
                                     mode="nearest-exact")[0].long() for a in (label, inst))
        x = TF.pil_to_tensor(TF.resize(img, list(self.size), TF.InterpolationMode.BICUBIC))
        return {"label": label, "inst": inst, "image": x.float() / 127.5 - 1.0}   # [-1, 1]


def read_map(path):
    """A label or instance map PNG (8- or 16-bit, one channel) as an (H, W) int64 array."""
    with warnings.catch_warnings():   # torchvision 0.29 deprecates its decoders (for TorchCodec)
        warnings.simplefilter("ignore", DeprecationWarning)
        m = torchvision.io.decode_image(path, torchvision.io.ImageReadMode.UNCHANGED)
    if m.shape[0] != 1:
        raise common.UserError(f"{path!r} has {m.shape[0]} channels: a label or instance map "
                               "must be a one-channel PNG of ids (not a palette or RGB image)")
    return m[0].to(torch.int64).numpy()


def _sorted_files(d):
    if not os.path.isdir(d):
        raise common.UserError(f"folder not found: {d!r}")
    return [os.path.join(d, f) for f in sorted(os.listdir(d)) if not f.startswith(".")]


def load_pairs(args, train=True):
    """The dataset in its own layout (Cityscapes, the official pix2pixHD one, ADE20K, shapes)."""
    name, root, split = args.dataset, args.data_root, "train" if train else "val"
    if name == "shapes":   # ours: Cityscapes-sized splits; random colours per shape instance
        shapes = common.ShapesDataset(2975 if train else 500, max(args.size), seed=1 - train)
        ds = PairDataset(None, args.size, args.label_nc, shapes)
    elif name == "cityscapes":
        try:   # torchvision lists its files: leftImg8bit, gtFine *_labelIds, *_instanceIds
            cs = torchvision.datasets.Cityscapes(os.path.join(root, "cityscapes"), split=split,
                                                 mode="fine", target_type=["semantic", "instance"])
        except (RuntimeError, ValueError) as err:
            raise common.UserError(f"Cityscapes not found in {os.path.join(root, 'cityscapes')!r}"
                                   f" ({err}); it needs registration at cityscapes-dataset.com: "
                                   "unzip gtFine and leftImg8bit there") from None
        ds = [(t[0], t[1], im) for im, t in zip(cs.images, cs.targets)]
    elif name == "ade20k":   # MIT Scene Parsing: images/<sub>/*.jpg, annotations/<sub>/*.png
        d, sub = os.path.join(root, "ADEChallengeData2016"), "training" if train else "validation"
        ds = [(os.path.join(d, "annotations", sub, os.path.basename(f)[:-4] + ".png"), None, f)
              for f in _sorted_files(os.path.join(d, "images", sub))]
    else:   # official layout: <root>/train_label, train_inst, train_img, paired by sorted order
        path = name[len("pix2pixhd:"):]
        if not train and not os.path.isdir(os.path.join(path, "val_label")):
            print(f"note: {path!r} has no val_label folder; evaluating on train pairs", flush=True)
            split = "train"
        labels, imgs = (_sorted_files(os.path.join(path, f"{split}_{k}")) for k in ("label", "img"))
        insts = (_sorted_files(os.path.join(path, f"{split}_inst")) if args.instance
                 or args.instance_feat else [None] * len(labels))
        if not len(labels) == len(insts) == len(imgs):
            raise common.UserError(f"{path!r}: {split}_label, _inst and _img hold different "
                                   "numbers of files")
        ds = list(zip(labels, insts, imgs))
    if isinstance(ds, list):
        if not ds:
            raise common.UserError(f"no {split} pairs found for --dataset {name} in {root!r}")
        ds = PairDataset(ds, args.size, args.label_nc)
    if train and args.max_dataset_size and args.max_dataset_size < len(ds):
        ds = torch.utils.data.Subset(ds, range(args.max_dataset_size))
    return ds


def flip_batch(batch, dist):
    """One random horizontal flip per pair, shared by label, instance map and image (official
    base_dataset.py); drawn for the global batch on every process, each keeps its rows."""
    flip = dist.shard(torch.rand(len(batch["image"]) * dist.world_size) < 0.5).view(-1, 1, 1, 1)
    out = {k: torch.where(flip, v.flip(-1), v) for k, v in batch.items()}
    return {k: v.pin_memory() for k, v in out.items()} if torch.cuda.is_available() else out


def one_hot_labels(label_map, label_nc, device=None):
    """(B, 1, H, W) int labels -> (B, label_nc, H, W) one-hot [Sec. 3.1], range checked on host."""
    lo, hi = int(label_map.min()), int(label_map.max())
    if lo < 0 or hi >= label_nc:
        raise common.UserError(f"label value {lo if lo < 0 else hi} outside [0, {label_nc})")
    label_map = label_map.to(device or label_map.device, non_blocking=True).long()
    b, _, h, w = label_map.shape
    return torch.zeros(b, label_nc, h, w, device=label_map.device).scatter_(1, label_map, 1.0)


def boundary_map(instance_map):
    """Sec. 3.3: 1 where an instance id differs from a 4-neighbour's (both marked, get_edges)."""
    t = instance_map
    e = torch.zeros_like(t, dtype=torch.bool)
    dx = t[..., :, 1:] != t[..., :, :-1]            # (B, 1, H, W-1) horizontal neighbours
    dy = t[..., 1:, :] != t[..., :-1, :]            # (B, 1, H-1, W) vertical neighbours
    e[..., :, 1:] |= dx
    e[..., :, :-1] |= dx
    e[..., 1:, :] |= dy
    e[..., :-1, :] |= dy
    return e.float()


def instance_segments(instance_map):
    """(B, 1, H, W) instance ids -> (B, H, W) segment index unique over the batch, and the count."""
    segs, n = [], 0
    for inst in instance_map[:, 0]:                 # per image of the batch, not per instance
        ids, inverse = torch.unique(inst, return_inverse=True)
        segs.append(inverse + n)
        n += len(ids)
    return torch.stack(segs), n


def segment_stats(seg, n_seg, label):
    """Per segment: area, flat index of its median pixel (official encode_features), its class."""
    flat = seg.reshape(-1)
    area = torch.zeros(n_seg, dtype=torch.long, device=seg.device).index_add_(
        0, flat, torch.ones_like(flat))
    order = torch.argsort(flat, stable=True)        # pixels grouped by segment, row-major inside
    median = order[torch.cumsum(area, 0) - area + area // 2]
    return area, median, label.reshape(-1)[median]


def prepare(batch, args, device):
    """Device tensors: s (one-hot + boundary map), real image x, segments, label map."""
    seg, n_seg = instance_segments(batch["inst"])
    s = one_hot_labels(batch["label"], args.label_nc, device)
    if args.instance:
        s = torch.cat([s, boundary_map(batch["inst"].to(device, non_blocking=True))], 1)
    return {"s": s, "x": batch["image"].to(device, non_blocking=True), "n_seg": n_seg,
            "seg": seg.to(device, non_blocking=True),
            "label": batch["label"].to(device, non_blocking=True)}   # no host sync in the step


# ==== Models ====
def init_weights_(net):
    """App. A: Gaussian N(0, 0.02) conv weights; biases keep PyTorch's default (official)."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
    return net


def norm(c):
    return nn.InstanceNorm2d(c, affine=False)      # official: non-affine, no running stats


def c7s1(c_in, c_out):                              # App. A c7s1-k: ReflPad 3, conv 7x7, IN, ReLU
    return [nn.ReflectionPad2d(3), nn.Conv2d(c_in, c_out, 7), norm(c_out), nn.ReLU(True)]


def down(c_in, c_out):                              # App. A dk: conv 3x3 stride 2, IN, ReLU
    return [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), norm(c_out), nn.ReLU(True)]


def up(c_in, c_out):                                # App. A uk: 3x3 fractional stride 1/2
    return [nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=1),
            norm(c_out), nn.ReLU(True)]


def to_rgb(c_in, c_out=3):                          # last c7s1-3 with Tanh instead of IN-ReLU
    return nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(c_in, c_out, 7), nn.Tanh())


class ResnetBlock(nn.Module):
    """App. A Rk: ReflPad1-conv3x3-IN-ReLU-ReflPad1-conv3x3-IN plus identity, no ReLU after."""

    def __init__(self, c):
        super().__init__()
        self.block = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), norm(c),
                                   nn.ReLU(True), nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3),
                                   norm(c))

    def forward(self, x):
        return x + self.block(x)


class GlobalGenerator(nn.Module):
    """G1 (Sec. 3.2, App. A): c7s1-64, d128, d256, d512, d1024, 9 x R1024, u512 .. u64, c7s1-3."""

    def __init__(self, in_ch, out_ch=3, ngf=64, n_down=4, n_blocks=9):
        super().__init__()
        layers = c7s1(in_ch, ngf)
        for i in range(n_down):
            layers += down(ngf * 2 ** i, ngf * 2 ** (i + 1))
        layers += [ResnetBlock(ngf * 2 ** n_down) for _ in range(n_blocks)]
        for i in range(n_down, 0, -1):
            layers += up(ngf * 2 ** i, ngf * 2 ** (i - 1))
        self.features = nn.Sequential(*layers)
        self.head = to_rgb(ngf, out_ch)
        init_weights_(self)

    def forward(self, s):
        return self.head(self.features(s))          # (B, 3, H, W) in [-1, 1]


def avg_down():
    """Sec. 3.2: the 2x downsampling of G2's and D's inputs; borders average real pixels only."""
    return nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)


class LocalEnhancer(nn.Module):
    """G = {G1, G2} (Sec. 3.2): c7s1-32, d64 on s + G1 (2 ngf, no head) on s / 2; R64 x 3, u32."""

    def __init__(self, in_ch, out_ch=3, ngf=32, n_down_global=4, n_blocks_global=9,
                 n_blocks_local=3):
        super().__init__()
        self.G1 = GlobalGenerator(in_ch, out_ch, 2 * ngf, n_down_global, n_blocks_global)
        self.G1.head = nn.Identity()                # G1 returns its 2 ngf-channel feature map
        self.front = nn.Sequential(*c7s1(in_ch, ngf), *down(ngf, 2 * ngf))
        self.back = nn.Sequential(*[ResnetBlock(2 * ngf) for _ in range(n_blocks_local)],
                                  *up(2 * ngf, ngf), to_rgb(ngf, out_ch))
        self.downsample = avg_down()
        init_weights_(self.front)
        init_weights_(self.back)

    def local_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("G1.")]

    def forward(self, s):
        return self.back(self.front(s) + self.G1(self.downsample(s)))   # sum at half size


class NLayerDiscriminator(nn.Module):
    """PatchGAN D_k (App. A): C64 s2 (no norm), C128 s2, C256 s2, C512 s1, 1 channel s1; LReLU
    0.2; every block's output. PAPER-VS-CODE: padding 2 and the stride-1 C512 (networks.py)."""

    def __init__(self, in_ch, ndf=64, n_layers=3):
        super().__init__()
        widths = [min(ndf * 2 ** i, 512) for i in range(n_layers + 1)]
        blocks = [[nn.Conv2d(in_ch, ndf, 4, stride=2, padding=2), nn.LeakyReLU(0.2, True)]]
        for i in range(1, n_layers + 1):
            stride = 2 if i < n_layers else 1
            blocks.append([nn.Conv2d(widths[i - 1], widths[i], 4, stride=stride, padding=2),
                           norm(widths[i]), nn.LeakyReLU(0.2, True)])
        blocks.append([nn.Conv2d(widths[-1], 1, 4, stride=1, padding=2)])   # patch logits
        self.blocks = nn.ModuleList(nn.Sequential(*b) for b in blocks)
        init_weights_(self)

    def forward(self, x):
        out = []
        for block in self.blocks:
            x = block(x)
            out.append(x)
        return out


class MultiscaleDiscriminator(nn.Module):
    """Eq. (2): num_D PatchGANs; D_k sees (s, x) after k - 1 avg_downs. -> [scale][block]."""

    def __init__(self, in_ch, ndf=64, n_layers=3, num_D=3):
        super().__init__()
        self.scales = nn.ModuleList(NLayerDiscriminator(in_ch, ndf, n_layers) for _ in range(num_D))
        self.downsample = avg_down()

    def forward(self, x):
        out = []
        for k, D_k in enumerate(self.scales):
            if k:
                x = self.downsample(x)
            out.append(D_k(x))
        return out


def instance_average_pool(feat, seg, n_seg):
    """Sec. 3.4 instance-wise average pooling, one index_add (the official loops per instance)."""
    b, c, h, w = feat.shape
    f = feat.permute(0, 2, 3, 1).reshape(-1, c)     # (B*H*W, C)
    idx = seg.reshape(-1)                           # (B*H*W,) segment of each pixel
    sums = f.new_zeros(n_seg, c).index_add_(0, idx, f)
    count = f.new_zeros(n_seg).index_add_(0, idx, torch.ones_like(idx, dtype=f.dtype))
    mean = sums / count[:, None]                    # every segment has >= 1 pixel
    return mean[idx].view(b, h, w, c).permute(0, 3, 1, 2)


class Encoder(nn.Module):
    """E (Sec. 3.4): c7s1-16, d32 .. d256, u128 .. u16, c7s1-3 Tanh, instance_average_pool."""

    def __init__(self, in_ch=3, feat_num=3, nef=16, n_down=4):
        super().__init__()
        layers = c7s1(in_ch, nef)
        for i in range(n_down):
            layers += down(nef * 2 ** i, nef * 2 ** (i + 1))
        for i in range(n_down, 0, -1):
            layers += up(nef * 2 ** i, nef * 2 ** (i - 1))
        self.model = nn.Sequential(*layers, to_rgb(nef, feat_num))
        init_weights_(self)

    def forward(self, x, seg, n_seg):
        return instance_average_pool(self.model(x), seg, n_seg)   # (B, feat_num, H, W)


class VGG19Features(nn.Module):
    """Sec. 4: frozen ImageNet VGG19 cut after relu1_1 .. relu5_1 (official Vgg19)."""

    CUTS = (2, 7, 12, 21, 30)

    def __init__(self, path, device):             # path None: torch.hub's cache
        super().__init__()
        path = path or os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(VGG_URL))
        with torch.device("meta"):
            features = torchvision.models.vgg19().features[:30]
        if not os.path.isfile(path):
            raise common.UserError(f"VGG19 weights not found at {path!r}: download {VGG_URL} "
                                   "there (or pass --vgg-weights FILE), or train without the "
                                   "perceptual loss with --no-vgg")
        state = common.load_checkpoint(path, device)
        state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        try:
            features.load_state_dict(state, strict=False, assign=True)
        except RuntimeError as err:
            raise common.UserError(f"{path!r} is not a torchvision VGG19 state dict: "
                                   f"{common._first_line(err)}") from None
        if any(p.is_meta for p in features.parameters()):
            raise common.UserError(f"{path!r} lacks VGG19 'features.*' weights")
        self.slices = nn.ModuleList(features[a:b] for a, b in zip((0,) + self.CUTS, self.CUTS))
        self.requires_grad_(False)
        self.eval()
        stats = torch.tensor([[0.485, 0.456, 0.406], [0.229, 0.224, 0.225]], device=device)
        self.register_buffer("mean", stats[0, :, None, None])     # (3, 1, 1)
        self.register_buffer("std", stats[1, :, None, None])

    def forward(self, x, imagenet_norm=False):
        if imagenet_norm:                           # ImageNet statistics of [0, 1] images
            x = ((x + 1) / 2 - self.mean) / self.std
        out = []
        for s in self.slices:
            x = s(x)
            out.append(x)
        return out


# ==== Losses ====
def gan_loss(preds, real, lsgan=True):
    """Eq. (2), Sec. 4's LSGAN: sum over scales of mean((D_k - target)^2); else BCE on logits."""
    loss = 0.0
    for p in preds:
        p = p[-1].float()
        target = torch.full_like(p, 1.0 if real else 0.0)
        loss = loss + (F.mse_loss(p, target) if lsgan else
                       F.binary_cross_entropy_with_logits(p, target))
    return loss


def d_loss(pred_real, pred_fake, lsgan=True):
    """Eq. (2) for D: (loss_D, L_real, L_fake). PAPER-VS-CODE: halved (official train.py)."""
    real, fake = gan_loss(pred_real, True, lsgan), gan_loss(pred_fake, False, lsgan)
    return 0.5 * (real + fake), real, fake


def feature_matching_loss(pred_fake, pred_real, lambda_feat=10.0):
    """Eq. (3) over D's intermediate outputs, real detached. PAPER-VS-CODE: weight lambda/num_D
    * 4/(n_layers + 1) (official; Eq. 4 has no 1/num_D)."""
    num_D, n_feats = len(pred_fake), len(pred_fake[0]) - 1
    w = lambda_feat / num_D * 4.0 / n_feats
    return sum(w * F.l1_loss(f.float(), r.detach().float())
               for pf, pr in zip(pred_fake, pred_real) for f, r in zip(pf[:-1], pr[:-1]))


VGG_WEIGHTS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)   # official VGGLoss, relu1_1 .. relu5_1


def vgg_loss(vgg, x_fake, x_real, lambda_feat=10.0, imagenet_norm=False):
    """Sec. 4: lambda sum_i w_i (1/M_i) ||F^(i)(x) - F^(i)(G(s))||_1; VGG frozen, x detached."""
    with torch.no_grad():
        f_real = vgg(x_real, imagenet_norm)
    f_fake = vgg(x_fake, imagenet_norm)
    return lambda_feat * sum(w * F.l1_loss(a.float(), b.float())
                             for w, a, b in zip(VGG_WEIGHTS, f_fake, f_real))


# ==== Train step ====
def lr_at(epoch, args):
    """App. A, the official rule: epoch e (from 1) at lr (1 - max(0, e - 1 - niter) / decay)."""
    if not args.niter_decay:
        return args.lr
    niter = args.epochs - args.niter_decay
    return args.lr * max(0.0, 1.0 - max(0, epoch - 1 - niter) / args.niter_decay)


def g_input(s, E, b):
    """G's input: s, plus E's instance-pooled features of the real image when E is on."""
    return s if E is None else torch.cat([s, E(b["x"], b["seg"], b["n_seg"])], 1)


def train_step(G, D, E, vgg, opt_G, opt_D, b, args, dist, autocast):
    """One iteration of the official train.py: one G forward, step G (and E), then D; under
    torchrun the finished gradients are averaged (IN and pooling are per image)."""
    with autocast():
        x_fake = G(g_input(b["s"], E, b))
        D.requires_grad_(False)                     # L_G's pass: gradients reach G only
        pred_fake_G = D(torch.cat([b["s"], x_fake], 1))
        D.requires_grad_(True)
        pred_fake = D(torch.cat([b["s"], x_fake.detach()], 1))   # no image pool (pool_size 0)
        pred_real = D(torch.cat([b["s"], b["x"]], 1))
        loss_D, loss_D_real, loss_D_fake = d_loss(pred_real, pred_fake, args.lsgan)
        out = {"loss_G_GAN": gan_loss(pred_fake_G, True, args.lsgan)}
        if args.gan_feat:
            out["loss_fm"] = feature_matching_loss(pred_fake_G, pred_real, args.lambda_feat)
        if vgg is not None:
            out["loss_vgg"] = vgg_loss(vgg, x_fake, b["x"], args.lambda_feat,
                                       args.vgg_imagenet_norm)
    loss_G = sum(out.values())                      # Eq. (4) (+ Sec. 4's VGG term)
    opt_G.zero_grad(set_to_none=True)
    loss_G.backward()
    dist.average_gradients(*(m for m in (G, E) if m is not None))
    opt_G.step()
    opt_D.zero_grad(set_to_none=True)
    loss_D.backward()
    dist.average_gradients(D)
    opt_D.step()
    out.update(loss_G=loss_G, loss_D=loss_D, loss_D_real=loss_D_real, loss_D_fake=loss_D_fake)
    return {k: v.detach() for k, v in out.items()}


def make_opt(params, args, lr, device):
    return torch.optim.Adam(params, lr=lr, betas=tuple(args.betas), fused=device.type == "cuda")


def g_params(G, E, g1_fixed):
    """G's optimizer: G2 only while G1 is fixed (local stage), else all of G; E always."""
    params = G.local_parameters() if g1_fixed else list(G.parameters())
    return params + (list(E.parameters()) if E is not None else [])


def release_g1(G, E, args, lr, device, dist, epoch):
    """Sec. 3.2's last phase: G1 trains again. PAPER-VS-CODE (card item 8): a fresh Adam over
    G1 + G2 (+ E) is stepped and decayed from here (2017 code; today's keeps G2's)."""
    G.G1.requires_grad_(True)
    if dist.main:
        print(f"epoch {epoch} done: G1 joins training, fresh Adam over all of G"
              + (" and E" if E is not None else ""), flush=True)
    return make_opt(g_params(G, E, False), args, lr, device)


def build_nets(args):
    """G, D, E (or None) from the flags; channel counts follow Sec. 3.1 / 3.3."""
    s_ch = args.label_nc + args.instance            # one-hot (+ boundary map)
    g_ch = s_ch + args.feat_num * args.instance_feat
    if args.stage == "global":
        G = GlobalGenerator(g_ch, 3, args.ngf, args.n_downsample_global, args.n_blocks_global)
    else:
        G = LocalEnhancer(g_ch, 3, args.ngf, args.n_downsample_global, args.n_blocks_global,
                          args.n_blocks_local)
    D = MultiscaleDiscriminator(s_ch + 3, args.ndf, args.n_layers_D, args.num_D)
    E = Encoder(3, args.feat_num, args.nef, args.n_downsample_E) if args.instance_feat else None
    return G, D, E


def load_global_run(G, D, E, args, device):
    """Sec. 3.2: G1 <- the global G without its head, E <- E; DEVIATION: D scale k -> k + 1."""
    path = args.load_global
    path = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
    state = common.load_checkpoint(path, device)
    old = state.get("args", {})
    if state.get("script") != "pix2pixhd" or old.get("stage") != "global":
        raise common.UserError(f"--load-global {path!r} is not a pix2pixhd global-stage run")
    want = {"ngf": 2 * args.ngf, **{k: getattr(args, k) for k in (
        "label_nc", "instance", "instance_feat", "feat_num", "nef", "n_downsample_E",
        "n_downsample_global", "n_blocks_global", "ndf", "n_layers_D")}}
    bad = [f"--{k.replace('_', '-')} {old.get(k)!r} there (needs {v!r})"
           for k, v in want.items() if old.get(k) != v]
    if bad:
        raise common.UserError(f"--load-global {path!r} does not fit: " + ", ".join(bad) +
                               " (the local stage's --ngf is half the global one)")
    G.G1.load_state_dict({k: v for k, v in state["G"].items() if not k.startswith("head.")})
    for k in range(min(old["num_D"], args.num_D - 1)):
        D.scales[k + 1].load_state_dict({n[len(f"scales.{k}."):]: v for n, v in
                                         state["D"].items() if n.startswith(f"scales.{k}.")})
    if E is not None:
        E.load_state_dict(state["E"])
    if [2 * v for v in old["size"]] != args.size:
        print(f"note: G1 was trained at {old['size']}, it now sees {[v // 2 for v in args.size]}")
    print(f"loaded G1, D scales 2..{min(old['num_D'] + 1, args.num_D)}" +
          (", E" if E is not None else "") + f" from {path} (step {state['step']})", flush=True)


def setup(args):
    """Seeds, torchrun, deterministic kernels, the bf16 autocast context: (dist, autocast)."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    dist = common.Dist(args.device)
    dist.share(args.batch_size)
    if args.deterministic and dist.device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = not args.deterministic
    torch.use_deterministic_algorithms(args.deterministic)
    autocast = ((lambda: torch.autocast(dist.device.type, dtype=torch.bfloat16))
                if args.amp == "bf16" else contextlib.nullcontext)
    return dist, autocast


def restore(state, G, D, E, opt_G, opt_D, args, device, dist):
    """--resume: nets, optimizers, RNG; else the local stage from --load-global (Sec. 3.2)."""
    if state:
        for k, net in (("G", G), ("D", D), ("E", E), ("opt_G", opt_G), ("opt_D", opt_D)):
            if net is not None:
                net.load_state_dict(state[k])
        common.set_rng_state(state["rng"])
    elif args.load_global:
        load_global_run(G, D, E, args, device)
    elif args.stage == "local" and dist.main:
        print("warning: local stage without --load-global: G1 starts from scratch (Sec. 3.2 "
              "trains G1 first; NVIDIA/pix2pixHD#294)", flush=True)


def snapshot(G, D, E, opt_G, opt_D, segmenter, args):
    """The checkpoint: nets, optimizers, RNG, and the proxy segmenter the run trained."""
    out = {"G": G.state_dict(), "D": D.state_dict(), "opt_G": opt_G.state_dict(),
           "opt_D": opt_D.state_dict(), "rng": common.rng_state()}
    if E is not None:
        out["E"] = E.state_dict()
    if segmenter is not None and not args.seg_model:
        out["segmenter"] = segmenter.state_dict()
    return out


# ==== Eval ====
@torch.no_grad()
def generate(G, E, b, centres=None, gen=None):
    """G(s) with E's features of the real image, or with a drawn cluster centre per instance."""
    if E is not None and centres is not None:
        return G(torch.cat([b["s"], sample_features(b, *centres, gen)], 1)).float()
    return G(g_input(b["s"], E, b)).float()


def val_batch(ds, i, args, device):
    return prepare(default_collate([ds[i % len(ds)]]), args, device)


def save_figure(G, E, val, args, device, path, title, centres=None, draws=1):
    """Rows of val pairs: label map, real, `draws` generated; >= 512 px wide. Returns the rows."""
    i = torch.arange(args.label_nc)
    colors = sum(((i[:, None] >> (3 * j + torch.arange(3))) & 1) << (7 - j) for j in range(8))
    gen, rows = torch.Generator().manual_seed(args.seed + 4), []
    for k in range(3 if centres else 4):
        b = val_batch(val, k, args, device)
        label = colors[b["label"][0, 0].cpu()].permute(2, 0, 1) / 127.5 - 1   # (3, H, W)
        rows.append([label, b["x"][0].cpu()] + [generate(G, E, b, centres, gen)[0].cpu()
                                                for _ in range(draws)])
    grid = torchvision.utils.make_grid(torch.stack(sum(rows, [])), nrow=2 + draws,
                                       normalize=True, value_range=(-1, 1))
    img = grid.mul(255).add(0.5).clamp(0, 255).byte()                     # (3, H, W)
    scale = math.ceil(512 / img.shape[2])                                # nearest upscale
    img = img.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    common.save_png(common.title_strip(img, [title], key=[("real", common.REAL_RGB),
                                                          ("generated", common.FAKE_RGB)]), path)
    return rows


class Segmenter(nn.Module):
    """DEVIATION (ours): the proxy for the paper's PSPNet, trained on the real training pairs."""

    def __init__(self, n_classes, w=32):
        super().__init__()
        self.net = nn.Sequential(*c7s1(3, w), *down(w, 2 * w), *down(2 * w, 4 * w),
                                 ResnetBlock(4 * w), ResnetBlock(4 * w), *up(4 * w, 2 * w),
                                 *up(2 * w, w), nn.Conv2d(w, n_classes, 3, padding=1))

    def forward(self, x):
        return self.net(x)


def eval_classes(args):
    """labelId -> eval class (255 = ignored) and the number of eval classes."""
    _, _, emap, n_eval = dataset_info(args.dataset, args.label_nc)
    return torch.tensor(emap if emap is not None else range(args.label_nc)), n_eval


def train_segmenter(train, args, device, show=True):
    """Ours: cross entropy on real training pairs, Adam 1e-3, batch 1, its own seeded stream."""
    emap, n_eval = eval_classes(args)
    seg = Segmenter(n_eval).to(device)
    opt = torch.optim.Adam(seg.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(args.seed + 3)
    prog = common.Progress("proxy segmenter", args.seg_steps, unit="step") if show else None
    for _ in range(args.seg_steps):
        item = train[int(torch.randint(len(train), (1,), generator=gen))]
        logits = seg(item["image"][None].to(device))
        loss = F.cross_entropy(logits, emap[item["label"]].to(device), ignore_index=255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if prog:
            prog.update(1, loss=loss.item())
    return seg.eval()


def build_segmenter(train, val, state, args, device, dist):
    """Sec. 4.1: --seg-model (torch.export), else the proxy from the ckpt or trained now; and its
    scores on the real val images (Tab. 1's "oracle" row). (None, None) without --seg-every."""
    if not args.seg_every:
        return None, None
    if args.seg_model:
        try:
            segmenter = torch.export.load(args.seg_model).module().to(device)
        except Exception as err:  # missing file, foreign format: one line naming the file
            raise common.UserError(f"cannot load --seg-model {args.seg_model!r}: "
                                   f"{common._first_line(err)}") from None
    elif state and "segmenter" in state:
        segmenter = Segmenter(eval_classes(args)[1]).to(device).eval()
        segmenter.load_state_dict(state["segmenter"])
    else:
        segmenter = train_segmenter(train, args, device, show=dist.main)
    seg_real = semantic_consistency(segmenter, None, None, val, args, device, real=True)
    if dist.main:
        print(f"segmenter on real val images: pixel acc {seg_real[0]:.4f}, mIoU "
              f"{seg_real[1]:.4f}", flush=True)
    return segmenter, seg_real


@torch.no_grad()
def segmentation_scores(segmenter, pairs, emap, n_eval):
    """Sec. 4.1: pixel accuracy and mean IoU of the segmented images against their label maps."""
    conf = torch.zeros(n_eval * n_eval, dtype=torch.long)
    for x, label in pairs:
        logits = segmenter(x).float()
        if logits.shape[-2:] != x.shape[-2:]:
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear")
        pred, gt = logits.argmax(1).flatten().cpu(), emap[label.flatten().cpu()]
        keep = gt != 255
        conf += torch.bincount(gt[keep] * n_eval + pred[keep], minlength=n_eval ** 2)
    conf = conf.view(n_eval, n_eval)                # rows: label, columns: prediction
    inter, union = conf.diag(), conf.sum(0) + conf.sum(1) - conf.diag()
    iou = inter[union > 0] / union[union > 0]       # classes absent from both are left out
    return float(inter.sum() / conf.sum().clamp(min=1)), float(iou.mean()) if len(iou) else 0.0


def semantic_consistency(segmenter, G, E, val, args, device, real=False):
    """Tab. 1 on the first --seg-images val label maps: generated images, or the real ones."""
    def pairs():
        for i in range(min(args.seg_images, len(val))):
            b = val_batch(val, i, args, device)
            yield (b["x"] if real else generate(G, E, b)), b["label"]
    return segmentation_scores(segmenter, pairs(), *eval_classes(args))


def scores(G, E, val, args, device, segmenter, seg_real, ev_fid):
    """A log step's eval: the Sec. 4.1 score beside the real images' (segmenter), FID."""
    values = {}
    if segmenter is not None:
        acc, miou = semantic_consistency(segmenter, G, E, val, args, device)
        values.update(seg_acc=acc, seg_miou=miou, seg_acc_real=seg_real[0],
                      seg_miou_real=seg_real[1])
    if ev_fid is not None:
        values.update(ev_fid(val_sampler(G, E, val, args, device, crop=True)))
    return values


@torch.no_grad()
def encode_features(E, train, args, device, show=True):
    """Sec. 3.4 (official encode_features): E's feature and class per training instance."""
    feats, classes = [], []
    prog = common.Progress("encode features", len(train), unit="img") if show else None
    for i in range(len(train)):
        b = val_batch(train, i, args, device)
        f = E(b["x"], b["seg"], b["n_seg"]).permute(0, 2, 3, 1).reshape(-1, args.feat_num)
        area, median, cls = segment_stats(b["seg"], b["n_seg"], b["label"])
        keep = area / (args.size[0] * args.size[1] // 32) > 0.5   # official block_num 32
        feats.append(f[median[keep]].cpu())
        classes.append(cls[keep].cpu())
        if prog:
            prog.update(1)
    return torch.cat(feats), torch.cat(classes)


def kmeans(feats, classes, args):
    """Sec. 3.4: K-means (K = 10) per class. DEVIATION: scipy kmeans2, k-means++, one start."""
    centres = torch.zeros(args.label_nc, args.n_clusters, args.feat_num)
    counts = torch.zeros(args.label_nc, dtype=torch.long)
    rng = np.random.default_rng(args.seed)
    for c in range(args.label_nc):
        data = feats[classes == c].double().numpy()
        if len(data):
            k = min(len(data), args.n_clusters)
            cent, _ = scipy.cluster.vq.kmeans2(data, k, minit="++", rng=rng)
            centres[c, :k], counts[c] = torch.from_numpy(cent).float(), k
    return centres, counts


def sample_features(b, centres, counts, gen=None):
    """Sec. 3.4 at test time: each instance gets one random centre of its class. UNSPECIFIED:
    classes without centres get 0 (the official leaves that memory uninitialised)."""
    cls = segment_stats(b["seg"], b["n_seg"], b["label"])[2].cpu()
    pick = (torch.rand(len(cls), generator=gen) * counts[cls]).long()     # (n_seg,)
    f = centres[cls, pick.clamp(max=centres.shape[1] - 1)].to(b["s"].device)   # (n_seg, F)
    bsz, h, w = b["seg"].shape
    return f[b["seg"].reshape(-1)].view(bsz, h, w, -1).permute(0, 3, 1, 2)   # (B, F, H, W)


def val_sampler(G, E, val, args, device, crop=False):
    """sample_fn(n): G on the val label maps in turn; crop: central square (fid.py's reference)."""
    seen, (h, w) = [0], args.size
    m = min(h, w)

    def sample_fn(n):
        x = torch.cat([generate(G, E, val_batch(val, seen[0] + j, args, device))
                       for j in range(n)])
        seen[0] += n
        return x[..., (h - m) // 2:(h - m) // 2 + m, (w - m) // 2:(w - m) // 2 + m] if crop else x
    return sample_fn


def save_multimodal(G, E, val, centres, args, device):
    """Sec. 3.4's figure: --sample-features draws of cluster features per val label map."""
    rows = save_figure(G, E, val, args, device, os.path.join(args.out_dir, "multimodal.png"),
                       f"pix2pixhd | {args.dataset} val | label map, real, "
                       f"{args.sample_features} draws of cluster features (K = {args.n_clusters})",
                       centres, args.sample_features)
    diff = float((rows[0][2] - rows[0][-1]).abs().mean())
    print(f"multimodal.png: mean |first - last draw| = {diff:.4f}", flush=True)


def export_samples(G, E, val, args, device):
    """samples_N.npz (uint8 NHWC) for fid.py: G on the first N val label maps, 50 at a time."""
    sample_fn, n = val_sampler(G, E, val, args, device), args.export_samples
    x = torch.cat([sample_fn(min(50, n - k)) for k in range(0, n, 50)])
    np.savez(os.path.join(args.out_dir, f"samples_{n}.npz"), images=common.quantize(x).numpy())


def build_fid(args, device):
    """fid.TrainingFID against the real val images (ours: SPADE compares with the val set)."""
    try:
        import fid  # evaluation only: a copy of this script without fid.py still trains
    except ImportError:
        raise common.UserError("--fid-every needs fid.py (the project's metric file) next to "
                               "pix2pixhd.py") from None
    if args.dataset == "shapes" and args.size[0] != args.size[1]:
        raise common.UserError("FID on shapes needs a square --size (its reference images)")
    folders = {"cityscapes": (args.data_root, "cityscapes", "leftImg8bit", "val"),
               "ade20k": (args.data_root, "ADEChallengeData2016", "images", "validation")}
    folder = folders.get(args.dataset, (args.dataset[len("pix2pixhd:"):], "val_img"))
    ref = "shapes" if args.dataset == "shapes" else "folder:" + os.path.join(*folder)
    return fid.TrainingFID(ref, args.data_root, min(args.size), device, args.fid_samples,
                           weights=args.fid_weights)


def load_generator(ckpt_path, device):
    """G (GlobalGenerator or LocalEnhancer) rebuilt from a checkpoint alone, in eval mode."""
    state = common.load_checkpoint(ckpt_path, device)
    G = build_nets(argparse.Namespace(**state["args"]))[0].to(device)
    G.load_state_dict(state["G"])
    return G.eval()


# ==== Main ====
def main(argv=None):
    args = parse_args(argv)
    dist, autocast = setup(args)
    device = dist.device
    train, val = load_pairs(args, train=True), load_pairs(args, train=False)
    per_epoch = len(train) // args.batch_size       # official: full batches only
    if per_epoch == 0:
        raise common.UserError(f"{len(train)} training pairs, fewer than --batch-size")
    total = args.epochs * per_epoch                 # the loop counts G iterations (steps)
    run = common.Run(args, "pix2pixhd", total=total, mutable=MUTABLE, dist=dist)
    local = args.stage == "local"
    G, D, E = (None if n is None else n.to(device) for n in build_nets(args))
    vgg = VGG19Features(args.vgg_weights, device) if args.vgg else None
    state = run.load(device)
    step = state["step"] if state else 0
    g1_fixed = local and step // per_epoch < args.niter_fix_global
    opt_G = make_opt(g_params(G, E, g1_fixed), args, args.lr, device)
    opt_D = make_opt(D.parameters(), args, args.lr, device)
    segmenter, seg_real = build_segmenter(train, val, state, args, device, dist)
    ev_fid = build_fid(args, device) if args.fid_every else None
    restore(state, G, D, E, opt_G, opt_D, args, device, dist)
    if local:
        G.G1.requires_grad_(not g1_fixed)           # no weight gradients for a fixed G1

    run.start(step, device, G=G, D=D, **({"E": E} if E is not None else {}))
    if dist.main:
        os.makedirs(os.path.join(args.out_dir, "samples"), exist_ok=True)
    batches = common.infinite_batches(train, args.batch_size, args.seed, start_step=step,
                                      num_workers=args.num_workers, rank=dist.rank,
                                      world_size=dist.world_size)
    saved = step
    while step < total and not run.stopping:
        epoch = step // per_epoch + 1               # 1-based, as the official loop
        lr = lr_at(epoch, args)
        for opt in (opt_G, opt_D):
            for group in opt.param_groups:
                group["lr"] = lr
        b = prepare(flip_batch(next(batches), dist), args, device)
        out = train_step(G, D, E, vgg, opt_G, opt_D, b, args, dist, autocast)
        step += 1
        if local:
            out["g1_fixed"] = int(g1_fixed)
        stop = run.stopping
        seg_now = args.seg_every and (step % args.seg_every == 0 or step == total)
        fid_now = args.fid_every and (step % args.fid_every == 0 or step == total)
        if step % args.log_every == 0 or step == total or stop or seg_now or fid_now:
            run.log(step, {**out, "lr": lr, "epoch": epoch, **scores(
                G, E, val, args, device, segmenter if seg_now else None, seg_real,
                ev_fid if fid_now else None)})
        if g1_fixed and step == args.niter_fix_global * per_epoch:   # Sec. 3.2: G1 joins
            g1_fixed = False
            opt_G = release_g1(G, E, args, lr, device, dist, epoch)
        if dist.main and args.sample_every and (step % args.sample_every == 0 or step == total):
            save_figure(G, E, val, args, device, os.path.join(
                args.out_dir, "samples", f"{step:07d}.png"), f"pix2pixhd | step {step} | "
                f"{args.dataset} val | label map, real, generated")
        if step % args.ckpt_every == 0 or step == total or stop:
            run.save(step, snapshot(G, D, E, opt_G, opt_D, segmenter, args))
            saved = step
    if run.stopping and saved != step:              # the signal came after this step's save
        run.save(step, snapshot(G, D, E, opt_G, opt_D, segmenter, args))
    if step == total and not run.stopping and args.sample_features:   # Sec. 3.4, every rank
        centres = kmeans(*encode_features(E, train, args, device, dist.main), args)
        run.save(step, {**snapshot(G, D, E, opt_G, opt_D, segmenter, args),
                        "centres": centres[0], "n_centres": centres[1]})
        if dist.main:
            save_multimodal(G, E, val, centres, args, device)
    if step == total and not run.stopping and args.export_samples and dist.main:
        export_samples(G, E, val, args, device)
    return run.finish(step, device)


if __name__ == "__main__":
    common.cli(main)
