"""fid.py's speed: feature extraction beside pytorch-fid's own network, and the Frechet routes.

Not a test (pytest does not collect it) and not a runtime dependency (pytorch-fid is a
development-only package, requirements-dev.txt). Both networks get the same weights and the same
uint8 batches, interleaved so that both see the same machine load; the row also gives the largest
feature difference between them (0.0 on CPU).
    python tests/bench_fid.py --weights pt_inception-2015-12-05-6726825d.pth --device cuda
    python tests/bench_fid.py --device cpu --n-images 16 --batch-size 8   # random weights
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fid  # noqa: E402
from pytorch_fid import inception as pf  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--weights", help="Inception weights; default: a random state dict")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n-images", type=int, default=64, help="random uint8 images to extract")
    p.add_argument("--img-size", type=int, default=32, help="their size; resized to 299")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--d", type=int, default=2048, help="feature dimension of the Frechet timings")
    p.add_argument("--n-features", type=int, default=10_000, help="samples per Gaussian set")
    p.add_argument("--no-pytorch-fid", action="store_true", help="time fid.py only")
    p.add_argument("--folders", type=int, metavar="N", help="end to end instead: two folders of "
                   "N random PNGs (--img-size), `fid.py A B` against pytorch-fid's "
                   "calculate_fid_given_paths on them (same weights, batch, workers)")
    p.add_argument("--num-workers", type=int, default=2, help="decoding workers, both tools")
    return p.parse_args(argv)


def random_weights(path):
    """A random state dict in the published layout (He-scaled convs, O(1) activations)."""
    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        shapes = fid.FIDInceptionV3().state_dict()
    sd = {}
    for k, v in shapes.items():
        t = torch.zeros(v.shape, dtype=v.dtype)
        if k.endswith("conv.weight"):
            t = torch.randn(v.shape, generator=g) * (2 / v[0].numel()) ** 0.5
        elif k.endswith(("running_var", "bn.weight")):
            t = torch.rand(v.shape, generator=g) * 0.5 + 0.75
        elif k.startswith("fc."):
            t = torch.randn(v.shape, generator=g) * 0.05
        sd[k] = t
    torch.save(sd, path)
    return path


def pytorch_fid_extractor(model, device):
    """pytorch-fid's InceptionV3([pool3]) with our model's weights (its loader patched)."""
    loader, pf.load_state_dict_from_url = pf.load_state_dict_from_url, lambda *a, **k: \
        model.state_dict()
    try:
        theirs = pf.InceptionV3([3]).to(device).eval()
    finally:
        pf.load_state_dict_from_url = loader

    def extract(b):
        with fid.exact_fp32(), torch.no_grad():
            return theirs(b.to(device).float().div(255))[0].flatten(1).cpu().double().numpy()
    return extract


def bench(args):
    if args.weights is None:
        args.weights = random_weights(Path(tempfile.mkdtemp()) / "random_inception.pth")
    model = fid.build_inception(args.weights).to(args.device)
    x = torch.randint(0, 256, (args.n_images, 3, args.img_size, args.img_size), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0))
    nets = {"ours": lambda b: fid.activations(b, model, args.batch_size)}
    if not args.no_pytorch_fid:
        nets["pytorch_fid"] = pytorch_fid_extractor(model, args.device)
    feats, secs = {k: [] for k in nets}, dict.fromkeys(nets, 0.0)
    for f in nets.values():
        f(x[:args.batch_size])                                          # warm-up
    for b in x.split(args.batch_size):
        for k, f in nets.items():
            t = time.perf_counter()
            feats[k].append(f(b))
            secs[k] += time.perf_counter() - t
    res = {f"{k}_img_s": args.n_images / v for k, v in secs.items()}
    if "pytorch_fid" in nets:
        res["max_abs_feature_diff"] = float(np.abs(np.concatenate(feats["ours"])
                                                   - np.concatenate(feats["pytorch_fid"])).max())
        res["speedup"] = res["ours_img_s"] / res["pytorch_fid_img_s"]
    rs = np.random.RandomState(0)
    a = rs.standard_normal((args.n_features, args.d))
    b = rs.standard_normal((args.n_features, args.d)) * rs.uniform(0.5, 1.5, args.d) + 0.1
    stats = [*fid.statistics(a), *fid.statistics(b)]
    for method in ("sqrtm", "eig", "eigh"):
        t = time.perf_counter()
        res[f"fid_{method}"] = fid.frechet_distance(*stats, method=method)
        res[f"time_{method}_s"] = time.perf_counter() - t
    for method in ("eig", "eigh"):
        res[f"rel_diff_{method}"] = abs(res[f"fid_{method}"] / res["fid_sqrtm"] - 1)
    print(f"bench on {args.device} ({torch.get_num_threads()} threads), {args.n_images} images "
          f"{args.img_size}px -> 299, batch {args.batch_size}, d={args.d}, N={args.n_features}: "
          + json.dumps(res), flush=True)
    return res


def end_to_end(args):
    """Wall time of the whole FID between two PNG folders, reading included, and both values."""
    from PIL import Image
    from pytorch_fid import fid_score
    tmp = Path(tempfile.mkdtemp())
    if args.weights is None:
        args.weights = random_weights(tmp / "random_inception.pth")
    g = np.random.default_rng(0)
    for d in ("a", "b"):
        (tmp / d).mkdir()
        for i in range(args.folders):
            x = g.integers(0, 256 if d == "a" else 200, (args.img_size, args.img_size, 3))
            Image.fromarray(x.astype(np.uint8)).save(tmp / d / f"{i:05d}.png")
    dirs = [str(tmp / "a"), str(tmp / "b")]
    res = {}
    t = time.perf_counter()
    res["fid_ours"] = fid.main([*dirs, "--weights", args.weights, "--device", args.device,
                                "--batch-size", str(args.batch_size), "--num-workers",
                                str(args.num_workers)])["fid"]
    res["ours_s"] = time.perf_counter() - t
    sd = torch.load(args.weights, weights_only=True)
    loader, pf.load_state_dict_from_url = pf.load_state_dict_from_url, lambda *a, **k: sd
    try:
        t = time.perf_counter()
        with fid.exact_fp32():
            res["fid_pytorch_fid"] = fid_score.calculate_fid_given_paths(
                dirs, args.batch_size, args.device, 2048, args.num_workers)
        res["pytorch_fid_s"] = time.perf_counter() - t
    finally:
        pf.load_state_dict_from_url = loader
    res["speedup"] = res["pytorch_fid_s"] / res["ours_s"]
    print(f"end to end on {args.device} ({torch.get_num_threads()} threads), 2 x {args.folders} "
          f"PNGs {args.img_size}px, batch {args.batch_size}, {args.num_workers} workers: "
          + json.dumps(res, default=float), flush=True)
    return res


if __name__ == "__main__":
    a = parse_args()
    end_to_end(a) if a.folders else bench(a)
