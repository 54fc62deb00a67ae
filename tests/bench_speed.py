"""Training-step and FID speed of every script at its paper configuration (issue 18).

    python tests/bench_speed.py [--device cuda] [--steps N] [--only SCRIPT ...] [--peak-tflops X]
                                [--anchors DIR] [--markdown]

Each row runs the script's own main() on `shapes` at the paper's resolution (no download; FID off,
sampling off), so models, optimizers, data pipeline and flags are built exactly as a run builds
them. The script's train_step is wrapped: the first call that counts (ProGAN: the first at the
final resolution) runs under FlopCounterMode's formulas (class Flops; FLOPs of one generator
iteration with its D steps, double backward included; matmul/conv FLOPs, as the counter counts
them), the next is a warm-up, then --steps calls are timed (CUDA synchronised around each) and the
run is stopped. Setup, logging, sampling and checkpoints are outside the timed calls; fetching the
real batches is inside where the script's train_step pulls them from an iterator.

  it/s       generator iterations (train_step calls) per second
  img/s      it/s x the global batch of generated images per iteration
  peak MiB   torch.cuda.max_memory_allocated over the timed calls (CPU: not measured, '-')
  GFLOP/it   torch.utils.flop_counter total of one iteration
  % peak     achieved FLOP/s over --peak-tflops (default by device name, see PEAK)

fid.py rows: Inception extraction (random weights unless --fid-weights; said in the row) on
random uint8 32x32 batches resized to 299, and the Frechet routes (sqrtm, eig, eigh) at d=2048.

--anchors DIR: DIR/pytorch-gan-collections (a checkout of w86763777/pytorch-gan-collections, never
committed here) gives its ResNet32 WGAN-GP and SN-GAN models, timed in a training step written
after its wgangp.py / sngan.py loops (n_dis 5, batch 64, G batch 128, z 128, Adam 2e-4 (0, 0.9),
GP 10 on real-fake interpolates; hinge for SN-GAN); pytorch-fid
(pip package pytorch-fid) gives the extraction anchor. Rows print ours/anchor ratios.

Not collected by pytest. On CPU: --steps 2 keeps each row short; --only for single scripts."""
import argparse
import contextlib
import datetime
import importlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

# Dense peak TFLOP/s per device name (substring, lower case): NVIDIA H100 SXM5 / H200 SXM
# datasheets, "TF32 Tensor Core 494.7 TFLOPS, BF16 989.4 TFLOPS" are the dense figures (the
# datasheets print 989 / 1,979 "with sparsity"; dense is half). H100 and H200 share the GH100
# compute, so the same figures.
PEAK = {"h100": {"tf32": 494.7, "bf16": 989.4}, "h200": {"tf32": 494.7, "bf16": 989.4}}

CPU_LOADER = ["--num-workers", "0"]
# name: (script, flags on top of the script's defaults (its paper configuration), note).
ROWS = {
    "wgan_gp cifar10-resnet": ("wgan_gp.py", ["--dataset", "shapes", "--img-size", "32",
                                              "--arch", "resnet", "--sample-every", "0"], ""),
    "sngan cifar10-resnet": ("sngan.py", ["--dataset", "shapes", "--img-size", "32",
                                          "--sample-every", "0"], ""),
    "projection cifar10": ("projection.py", ["--dataset", "shapes", "--img-size", "32",
                                             "--sample-every", "0"], ""),
    "projection imagenet128": ("projection.py", ["--dataset", "shapes", "--img-size", "128",
                                                 "--sample-every", "0"], "6 shapes classes"),
    "gd_stable mog8": ("gd_stable.py", ["--sample-every", "0"], ""),
    "dp_gan sprint_synth": ("dp_gan.py", [], ""),
    "avb mnist": ("avb.py", ["--dataset", "shapes", "--sample-every", "0"], "gray 28x28 shapes"),
    "progan celebahq1024": ("progan.py", ["--dataset", "shapes", "--resolution", "1024",
                                          "--stabilize-kimg", "0.001", "--fade-kimg", "0.001",
                                          "--sample-every", "0"],
                            "timed at 1024 after 1-step phases"),
    "pix2pixhd cityscapes-global": ("pix2pixhd.py", ["--dataset", "shapes", "--stage", "global",
                                                     "--no-vgg", "--sample-every", "0"],
                                    "no VGG loss (weights absent)"),
    "stackganpp cub256": ("stackganpp.py", ["--dataset", "shapes", "--sample-every", "0"], ""),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=20, help="timed generator iterations per row")
    p.add_argument("--only", nargs="+", help="scripts (e.g. sngan.py, fid.py) or row names")
    p.add_argument("--peak-tflops", type=float, help="device peak for the %% column; default: "
                   "PEAK by device name and --amp (TF32 for fp32)")
    p.add_argument("--batch-size", type=int, help="override every script's global batch (and "
                   "--g-batch-size) for a quick CPU pass; rows say so. Default: the paper's")
    p.add_argument("--amp", choices=["off", "bf16"], default="off", help="passed to every script")
    p.add_argument("--anchors", type=Path, help="folder holding pytorch-gan-collections/")
    p.add_argument("--fid-weights", help="Inception weights for the fid.py rows; default random")
    p.add_argument("--markdown", action="store_true", help="also print a markdown table")
    return p.parse_args(argv)


def device_name(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores, " \
           f"{torch.get_num_threads()} threads)"


def peak_tflops(args):
    if args.peak_tflops:
        return args.peak_tflops
    name = device_name(args.device).lower()
    key = next((k for k in PEAK if k in name), None)
    return PEAK[key]["bf16" if args.amp == "bf16" else "tf32"] if key else None


class _Done(Exception):
    pass


class Flops(TorchDispatchMode):
    """FlopCounterMode's own per-op formulas (flop_registry), summed, without its module tracker:
    the tracker's backward hooks break steps that call autograd.grad (wgan_gp's penalty:
    "A leaf node was passed to _will_engine_execute_node"). Same totals where both run."""

    def __enter__(self):
        self.total = 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.overloadpacket in flop_registry:
            self.total += flop_registry[func.overloadpacket](*args, **kwargs, out_val=out)
        return out

    def get_total_flops(self):
        return self.total


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed_calls(step, n, device, images_of, ready=lambda a: True):
    """Wraps `step`: FLOPs on the first ready call, one warm-up, then n timed calls; then _Done."""
    rec = {"flops": None, "times": [], "images": None, "warm": False}

    def wrapped(*a, **k):
        if not ready(a):
            return step(*a, **k)
        if rec["flops"] is None:
            with Flops() as fc:
                out = step(*a, **k)
            rec["flops"], rec["images"] = fc.get_total_flops(), images_of(a)
            return out
        if not rec["warm"] and torch.device(device).type == "cuda":   # cuDNN autotuning
            rec["warm"] = True
            out = step(*a, **k)
            sync(device)
            if torch.device(device).type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            return out
        t = time.perf_counter()
        out = step(*a, **k)
        sync(device)
        rec["times"].append(time.perf_counter() - t)
        if len(rec["times"]) >= n:
            raise _Done
        return out
    return wrapped, rec


def batch_flags(mod, b):
    """--batch-size b, and --g-batch-size b where the script has it (progan: --batch-at none)."""
    text = Path(mod.__file__).read_text()
    out = ["--batch-size", str(b)]
    out += ["--g-batch-size", str(b)] if '"--g-batch-size"' in text else []
    out += ["--batch-at"] if '"--batch-at"' in text else []         # no per-resolution batches
    return out


def batch_of(args):
    return getattr(args, "g_batch_size", None) or args.batch_size


def bench_script(name, script, flags, args):
    mod = importlib.import_module(script[:-3])
    captured = {}
    parse = mod.parse_args

    def parse_args(argv=None):
        captured["args"] = parse(argv)
        return captured["args"]

    ready = (lambda a: 4 * 2 ** a[5] == captured["args"].resolution and a[6] == 1.0) \
        if script == "progan.py" else (lambda a: True)
    if args.batch_size:
        flags = [*flags, *batch_flags(mod, args.batch_size)]
    images = ((lambda a: len(a[4])) if script == "progan.py"
              else (lambda a: batch_of(captured["args"])))
    original = mod.train_step
    step, rec = timed_calls(original, args.steps, args.device, images, ready)
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(open(os.devnull, "w")):
        mod.parse_args, mod.train_step = parse_args, step
        try:
            mod.main([*flags, "--device", args.device, "--amp", args.amp, "--out-dir",
                      os.path.join(out, "run"), *(CPU_LOADER if args.device == "cpu" else [])])
        except _Done:
            pass
        finally:
            mod.parse_args, mod.train_step = parse, original
    if len(rec["times"]) < args.steps:
        raise RuntimeError(f"{name}: the run ended after {len(rec['times'])} timed steps")
    return row(name, rec, args, "")


def row(name, rec, args, note, anchor=None):
    dt = float(np.median(rec["times"]))
    r = {"name": name, "it_s": 1 / dt, "img_s": rec["images"] / dt if rec["images"] else None,
         "gflop": rec["flops"] / 1e9 if rec["flops"] is not None else None, "note": note,
         "mib": (torch.cuda.max_memory_allocated(args.device) / 2**20
                 if torch.device(args.device).type == "cuda" else None)}
    peak = peak_tflops(args)
    r["pct"] = 100 * rec["flops"] / dt / 1e12 / peak if peak and rec["flops"] else None
    r["anchor"] = anchor
    return r


# ==== anchors: w86763777/pytorch-gan-collections ResNet32 steps ====
def anchor_step(kind, root, args):
    sys.path.insert(0, str(root / "pytorch-gan-collections"))
    models = importlib.import_module(f"source.models.{'wgangp' if kind == 'wgan' else 'sngan'}")
    dev = args.device
    G, D = models.ResGenerator32(128).to(dev), models.ResDiscriminator32().to(dev)
    opt_G = torch.optim.Adam(G.parameters(), 2e-4, betas=(0.0, 0.9))
    opt_D = torch.optim.Adam(D.parameters(), 2e-4, betas=(0.0, 0.9))
    b = args.batch_size or 64               # their batch_size 64; the G step draws 2 x 64
    bg = args.batch_size or 128
    real = torch.rand(b, 3, 32, 32, device=dev) * 2 - 1

    def step():
        for _ in range(5):
            with torch.no_grad():
                fake = G(torch.randn(b, 128, device=dev))
            if kind == "wgan":
                a = torch.rand(b, 1, 1, 1, device=dev)
                x = (a * real + (1 - a) * fake).requires_grad_(True)
                g, = torch.autograd.grad(D(x).sum(), x, create_graph=True)
                gp = ((g.flatten(1).norm(dim=1) - 1) ** 2).mean()
                loss = D(fake).mean() - D(real).mean() + 10 * gp
            else:
                loss = torch.relu(1 - D(real)).mean() + torch.relu(1 + D(fake)).mean()
            opt_D.zero_grad()
            loss.backward()
            opt_D.step()
        D.requires_grad_(False)
        loss = -D(G(torch.randn(bg, 128, device=dev))).mean()
        opt_G.zero_grad()
        loss.backward()
        opt_G.step()
        D.requires_grad_(True)
    rec = {"times": [], "images": bg}
    with Flops() as fc:
        step()
    rec["flops"] = fc.get_total_flops()
    step()
    for _ in range(args.steps):
        sync(dev)
        t = time.perf_counter()
        step()
        sync(dev)
        rec["times"].append(time.perf_counter() - t)
    return rec


# ==== fid.py ====
def fid_rows(args):
    import bench_fid
    import fid
    weights, note = args.fid_weights, ""
    if weights is None:
        weights, note = bench_fid.random_weights(Path(tempfile.mkdtemp()) / "r.pth"), \
            "random weights"
    model = fid.build_inception(weights).to(args.device)
    bs = args.batch_size or 50                          # pytorch-fid's default batch
    n = max(1, args.steps) * bs
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0))
    fid.activations(x[:bs], model, bs)
    with Flops() as fc:
        fid.activations(x[:bs], model, bs)
    rows = []
    t = time.perf_counter()
    fid.activations(x, model, bs)
    dt = (time.perf_counter() - t) / (n // bs)
    anchor = None
    if args.anchors is not None:
        theirs = bench_fid.pytorch_fid_extractor(model, args.device)
        theirs(x[:bs])
        t = time.perf_counter()
        for b in x.split(bs):
            theirs(b)
        anchor = (time.perf_counter() - t) / (n // bs)
    r = row(f"fid.py extraction 32->299, batch {bs}", {"times": [dt], "images": bs,
                                                     "flops": fc.get_total_flops()}, args, note)
    r["anchor"] = 1 / anchor * bs if anchor else None
    r["anchor_name"] = "pytorch-fid"
    rows.append(r)
    rs = np.random.RandomState(0)
    a = rs.standard_normal((4096, 2048))
    b = rs.standard_normal((4096, 2048)) * rs.uniform(0.5, 1.5, 2048) + 0.1
    stats = [*fid.statistics(a), *fid.statistics(b)]
    for method in ("sqrtm", "eig", "eigh"):
        t = time.perf_counter()
        fid.frechet_distance(*stats, method=method)
        rows.append(row(f"fid.py Frechet {method}, d=2048", {"times": [time.perf_counter() - t],
                                                              "images": None, "flops": None},
                        args, "float64 on CPU (NumPy/SciPy)"))
    return rows


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    selected = [k for k, (s, _, _) in ROWS.items() if not args.only or s in args.only
                or k in args.only]
    rows = []
    for name in selected:
        script, flags, note = ROWS[name]
        t = time.perf_counter()
        try:
            r = bench_script(name, script, flags, args)
            r["note"] = "; ".join(filter(None, [note, args.batch_size and
                                                f"batch {args.batch_size}, not the paper's"]))
        except Exception as e:  # one broken row does not hide the others
            r = {"name": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
        if args.anchors is not None and name in ("wgan_gp cifar10-resnet", "sngan cifar10-resnet"):
            a = anchor_step("wgan" if script == "wgan_gp.py" else "sngan", args.anchors, args)
            r["anchor"], r["anchor_name"] = a["images"] / float(np.median(a["times"])), \
                "pytorch-gan-collections"
        r["wall_s"] = time.perf_counter() - t
        rows.append(r)
        print(line(r), flush=True)
    if not args.only or "fid.py" in args.only:
        for r in fid_rows(args):
            rows.append(r)
            print(line(r), flush=True)
    if args.markdown:
        print(markdown(rows, args))
    return rows


def line(r):
    if "error" in r:
        return f"{r['name']:32s} ERROR {r['error']}"
    s = (f"{r['name']:32s} {fmt(r['it_s'], '8.3g')} it/s {fmt(r['img_s'], '8.3g')} img/s "
         f"{fmt(r['mib'], '8.0f')} MiB {fmt(r['gflop'], '9.4g')} GFLOP/it "
         f"{fmt(r['pct'], '5.1f')} % peak")
    if r.get("anchor"):
        s += f" | ours/{r['anchor_name']} {r['img_s'] / r['anchor']:.2f}x"
    return s + (f" | {r['note']}" if r.get("note") else "")


def markdown(rows, args):
    dev = device_name(args.device)
    kind = "GPU" if torch.device(args.device).type == "cuda" else "CPU"
    out = [f"{kind}: {dev}, torch {torch.__version__}, {datetime.date.today().isoformat()}, "
           f"--steps {args.steps}, --amp {args.amp}", "",
           "| configuration | it/s | img/s | peak MiB | GFLOP/it | % peak | ours/anchor | note |",
           "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['name']} | | | | | | | error: {r['error']} |")
            continue
        ratio = f"{r['img_s'] / r['anchor']:.2f}" if r.get("anchor") else "-"
        out.append(f"| {r['name']} | {fmt(r['it_s'], '.3g')} | {fmt(r['img_s'], '.3g')} | "
                   f"{fmt(r['mib'], '.0f')} | {fmt(r['gflop'], '.4g')} | {fmt(r['pct'], '.1f')} "
                   f"| {ratio} | {r.get('note', '')} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
