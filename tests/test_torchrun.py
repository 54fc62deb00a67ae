"""torchrun data parallelism (issue 19), gloo on 2 CPU processes, for every script in
tiny_args.DIST. One `torchrun --standalone --nproc_per_node 2 tests/dist_driver.py` launch runs the
ones that the selected tests read, all of them in a full run (see the driver's docstring for
the runs); these tests read what it left:

  (a) 2 processes with the global batch split in two = 1 process with the global batch, parameters
      and optimizer state after k steps to float tolerance (exact entries: BN-free or
      per-sample-independent configurations); for entries with BatchNorm on the per-rank batch,
      both ranks hold the same parameters (the averaged gradients are one update)
  (b) a 2-process run stopped at `stop` (a stop request on rank 1 only: both save and stop) and
      resumed to k equals the uninterrupted one: checkpoint exactly, metrics rows but time_s (the
      stopped run may log one more row, at its stop)
  (c) only rank 0 writes: rank 1 opens nothing for writing under the run folder and prints
      nothing; metrics.jsonl holds each logged step once

Also: dp_gan, gd_stable and avb refuse a world size above 1 (common.single_process)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tiny_args import DIST, TINY

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def selected_scripts(items):
    """The DIST scripts that this file's selected tests (after -k, --lf, ...) read, in DIST's
    order (other files may have a fixture of the same name)."""
    wanted = {item.callspec.params.get("script") for item in items
              if getattr(getattr(item, "module", None), "__name__", None) == __name__
              and "runs" in item.fixturenames and hasattr(item, "callspec")}
    return [script for script in DIST if script in wanted]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, request):
    """One torchrun launch for the DIST scripts that the selected tests need (all of them in a
    full run)."""
    out = tmp_path_factory.mktemp("torchrun")
    scripts = selected_scripts(request.session.items)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "dist_driver.py"), str(out), *scripts]
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=120 + 90 * len(scripts))
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun did not finish in {e.timeout} s (a collective left waiting?)")
    assert p.returncode == 0, (p.stdout[-3000:] + p.stderr[-6000:])
    return out


def flat(state, prefix=""):
    """{dotted name: tensor or plain value} of a checkpoint, without the flags (out_dir differs)."""
    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return {prefix[:-1]: state}
    return {k: v for key, s in items if prefix or key != "args"
            for k, v in flat(s, f"{prefix}{key}.").items()}


def load(path):
    return flat(torch.load(path, map_location="cpu", weights_only=False))


def compare(a, b, tol, skip=()):
    assert a.keys() == b.keys()
    bad = []
    for k in a:
        if any(s in k for s in skip):
            continue
        x, y = a[k], b[k]
        if torch.is_tensor(x):
            if tol and x.is_floating_point():   # per tensor: float rounding of sums in another
                x, y = x.double(), y.double()     # order, relative to its scale; 1e-6 absolute for
                ok = x.shape == y.shape and bool(  # cancelling gradients (a WGAN D's output bias)
                    (x - y).abs().max() <= tol * y.abs().max() + 1e-6)
            else:
                ok = torch.equal(x, y)
        else:
            ok = x == y
        bad += [] if ok else [k]
    assert not bad, f"{len(bad)} entries differ, e.g. {bad[:5]}"


def rows(path):
    with open(path) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "time_s"} for line in f]


@pytest.mark.parametrize("script", list(DIST))
def test_two_processes_equal_one_with_the_global_batch(runs, script):
    d, spec = runs / script[:-3], DIST[script]
    full = load(d / "full" / "ckpt.pt")
    assert full["step"] == spec["steps"]
    # rank 1's own state: its parameters are rank 0's (BN statistics are per rank)
    compare(full, flat(torch.load(d / "rank1-full.pt", weights_only=False)), 0,
            skip=BN_BUFFERS + ("rng",))
    if spec["exact"]:
        compare(full, load(d / "single" / "ckpt.pt"), 1e-4)


@pytest.mark.parametrize("script", list(DIST))
def test_two_processes_resume_exactly(runs, script):
    d = runs / script[:-3]
    compare(load(d / "part" / "ckpt.pt"), load(d / "full" / "ckpt.pt"), 0)
    part, full = ({r["step"]: r for r in rows(d / run / "metrics.jsonl")}
                  for run in ("part", "full"))
    assert {s: part[s] for s in full} == full
    assert len(set(part) - set(full)) <= 1


@pytest.mark.parametrize("script", list(DIST))
def test_only_rank_0_writes_and_prints(runs, script):
    d, spec = runs / script[:-3], DIST[script]
    report = json.loads((d / "report.json").read_text())
    for run in ("full", "part"):
        assert report[run]["writes"] == [], f"rank 1 wrote {report[run]['writes'][:5]}"
        assert report[run]["printed"] == "", f"rank 1 printed {report[run]['printed'][:200]!r}"
        # each logged step once, also across the resume (TINY logs every step)
        steps = [r["step"] for r in rows(d / run / "metrics.jsonl")]
        assert steps == sorted(set(steps)) and set(range(1, spec["steps"] + 1)) <= set(steps)
        assert not [f for f in os.listdir(d / run) if f.startswith(".tmp-")]


@pytest.mark.parametrize("script", ["dp_gan.py", "gd_stable.py", "avb.py"])
def test_single_process_scripts_refuse_torchrun(script, monkeypatch, tmp_path):
    import importlib

    import common
    monkeypatch.setenv("WORLD_SIZE", "2")
    mod = importlib.import_module(script[:-3])
    with pytest.raises(common.UserError, match="runs as one process"):
        mod.main([*TINY[script], "--out-dir", str(tmp_path / "run")])
    assert not os.listdir(tmp_path)
