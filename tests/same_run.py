"""Before/after check for refactors: a script at a git revision and in the working tree, run on the
same tiny flags, must write the same run (metrics.jsonl without timings, every checkpoint tensor,
every sample file byte for byte).

    python tests/same_run.py wgan_gp.py                       # HEAD vs working tree, TINY flags
    python tests/same_run.py wgan_gp.py --ref main~3 -- --mode dcgan   # extra flags after --

Development tool, not a test (it runs each script twice, seconds to minutes). Exits 1 on any
difference and prints where.
"""
import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from tiny_args import TINY  # noqa: E402

TIMING = ("time_s",)   # the only wall-clock value in metrics.jsonl (common.Run.log)


def diff(a, b, where=""):
    """Where a and b differ (tensors exactly, dicts and lists recursively), as a list of paths."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a, b))
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        keys = set(a) | set(b)
        return [d for k in sorted(keys, key=str) for d in
                (diff(a.get(k), b.get(k), f"{where}.{k}") if k in a and k in b
                 else [f"{where}.{k} (only in {'before' if k in a else 'after'})"])]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where} (length {len(a)} vs {len(b)})"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in diff(x, y, f"{where}[{i}]")]
    return [] if a == b or (a != a and b != b) else [f"{where}: {a!r} vs {b!r}"]


def run(src, script, flags, out):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONHASHSEED": "0"}
    r = subprocess.run([sys.executable, script, *flags, "--out-dir", str(out)], cwd=src, env=env,
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{script} failed in {src}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")


def compare(before, after):
    import json
    problems = []
    fa, fb = (sorted(p.relative_to(d) for p in d.rglob("*") if p.is_file()) for d in (before,
                                                                                       after))
    if fa != fb:
        problems.append(f"files differ: {sorted(set(fa) ^ set(fb))}")
    for rel in sorted(set(fa) & set(fb)):
        a, b = before / rel, after / rel
        if rel.name == "metrics.jsonl":
            rows = [[{k: v for k, v in json.loads(line).items()
                      if k not in TIMING} for line in p.read_text().splitlines()]
                    for p in (a, b)]
            problems += diff(rows[0], rows[1], str(rel))
        elif rel.suffix == ".pt":
            problems += diff(*(torch.load(p, map_location="cpu", weights_only=False)
                               for p in (a, b)), str(rel))
        elif rel.name == "args.json":
            ja, jb = (json.loads(p.read_text()) for p in (a, b))
            ja.pop("out_dir", None), jb.pop("out_dir", None)
            problems += diff(ja, jb, str(rel))
        elif a.read_bytes() != b.read_bytes():
            problems.append(f"{rel}: bytes differ")
    return problems


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="flags after -- are added after the TINY ones")
    p.add_argument("script")
    p.add_argument("--ref", default="HEAD", help="git revision to compare against")
    p.add_argument("--no-tiny", action="store_true", help="only the flags after --")
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)     # flags after --: the script's own
    args, extra = p.parse_args(argv[:cut]), argv[cut + 1:]
    flags = ([] if args.no_tiny else TINY[args.script]) + extra
    with tempfile.TemporaryDirectory(prefix="same-run-") as d:
        d = Path(d)
        ref = d / "ref"
        ref.mkdir()
        archive = subprocess.run(["git", "archive", args.ref], cwd=ROOT, capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(ref)], input=archive, check=True)
        for src, name in ((ref, "before"), (ROOT, "after")):     # one path: it is in the ckpt
            run(src, args.script, flags, d / "run")
            (d / "run").rename(d / name)
        problems = compare(d / "before", d / "after")
    for line in problems:
        print("DIFF", line)
    print(f"{args.script} {' '.join(flags)}: "
          + ("same run" if not problems else f"{len(problems)} differences vs {args.ref}"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
