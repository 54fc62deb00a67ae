"""Mutation check: every paper fact a test guards must fail that test when it is broken.

    python tests/mutants.py                 # every mutant of every script
    python tests/mutants.py sngan.py -j 2   # one script's mutants, two at a time
    python tests/mutants.py --list          # what is here, per script

Each mutant is (file, old text, new text, test file, what it breaks): the old text must occur
exactly once in the file. The runner copies the project into a scratch folder, applies the one
edit there, runs `pytest -x -q <test file>` on the copy, and reports `killed` (the tests fail) or
`SURVIVED` (they pass). It exits 1 if any mutant survived or did not apply. Not part of the
default pytest run (it is not a test_*.py file): it takes minutes per script.

Each script keeps its own block below, one or more mutants per checklist item of its paper card.
"""
import argparse
import concurrent.futures
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MUTANTS = {
    # ---- common.py: the run plumbing every script relies on ----
    "common.py": [
        ("common.py", 'if r.get("step", 0) <= step]', 'if True]', "tests/test_common.py",
         "metrics.jsonl not trimmed to the checkpoint's step on resume"),
        ("common.py", "        bad = _nonfinite(state)\n", "        bad = []\n",
         "tests/test_common.py", "a NaN state overwrites the last good checkpoint"),
        ("common.py", 'positive_int = _flag_type(int, lambda v: v > 0,',
         'positive_int = _flag_type(int, lambda v: v >= 0,', "tests/test_common.py",
         "an explicit 0 accepted as a count"),
    ],
    # ---- sngan.py ----
    "sngan.py": [
    ],
    # ---- projection.py ----
    "projection.py": [
    ],
    # ---- wgan_gp.py ----
    "wgan_gp.py": [
    ],
    # ---- gd_stable.py ----
    "gd_stable.py": [
    ],
    # ---- dp_gan.py ----
    "dp_gan.py": [
    ],
    # ---- avb.py ----
    "avb.py": [
    ],
    # ---- fid.py ----
    "fid.py": [
    ],
    # ---- progan.py ----
    "progan.py": [
    ],
    # ---- pix2pixhd.py ----
    "pix2pixhd.py": [
    ],
    # ---- stackganpp.py ----
    "stackganpp.py": [
    ],
}


def _copy_project(dst):
    for p in ROOT.iterdir():
        if p.suffix in (".py", ".ini", ".toml") and p.is_file():
            shutil.copy(p, dst / p.name)
    shutil.copytree(ROOT / "tests", dst / "tests",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def run_one(mutant, timeout):
    """Applies one mutant in a scratch copy and runs its test file: 'killed' or 'SURVIVED'."""
    file, old, new, test, what = mutant
    with tempfile.TemporaryDirectory(prefix="mutant-") as d:
        d = Path(d)
        _copy_project(d)
        src = (d / file).read_text()
        if src.count(old) != 1:
            return f"NOT APPLIED ({src.count(old)} matches)", 0.0
        (d / file).write_text(src.replace(old, new))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        t = time.time()
        try:
            r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                test], cwd=d, env=env, capture_output=True, text=True,
                               timeout=timeout)
            status = "SURVIVED" if r.returncode == 0 else "killed"
        except subprocess.TimeoutExpired:
            status = "killed (timeout)"
        return status, time.time() - t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("scripts", nargs="*", help="scripts whose mutants to run (default: all)")
    p.add_argument("-j", "--jobs", type=int, default=1, help="mutants run at the same time")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per mutant")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = p.parse_args(argv)
    names = args.scripts or list(MUTANTS)
    unknown = [n for n in names if n not in MUTANTS]
    if unknown:
        p.error(f"no mutants for {unknown}; known: {', '.join(MUTANTS)}")
    todo = [(n, m) for n in names for m in MUTANTS[n]]
    if args.list:
        for n in names:
            print(f"{n}: {len(MUTANTS[n])} mutants")
            for m in MUTANTS[n]:
                print(f"  - {m[4]}  [{m[3]}]")
        return 0
    results = []
    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = {pool.submit(run_one, m, args.timeout): (n, m) for n, m in todo}
        for f in concurrent.futures.as_completed(futures):
            n, m = futures[f]
            status, dt = f.result()
            results.append((n, m, status))
            print(f"{status:<18} {dt:6.0f}s  {n}: {m[4]}", flush=True)
    bad = [r for r in results if not r[2].startswith("killed")]
    print(f"\n{len(results) - len(bad)} of {len(results)} mutants killed"
          + (f"; {len(bad)} not killed:" if bad else ""))
    for n, m, status in bad:
        print(f"  {status}: {n}: {m[4]}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
