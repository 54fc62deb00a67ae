"""The copy-paste promise, and what only a real process can show.

Each script is copied with common.py (no fid.py) into an empty folder and run there as a real
process (one torch import per process is the slow part, so one test does it all):
  1. SIGTERM in the middle of the run: the process saves a checkpoint at the step it stopped,
     logs that step, and exits 143;
  2. --resume, then kill -9 in the middle: nothing can be saved;
  3. --resume again (in-process): the whole metrics.jsonl equals an uninterrupted run's, every
     step once, with time_s increasing.
(A user error's one-line exit 2 is common.cli's: tests/test_common.py runs it once as a process,
and tests/test_style.py checks that every script's __main__ goes through it.)
Scripts without a tiny_args.SPEC entry only get the plain run."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_args import SPEC, TINY

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = [s for s, argv in TINY.items() if argv is not None and (ROOT / s).exists()]


def _spawn(script, argv, cwd):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, script, *argv], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _run_until(proc, prefix=None, sig=None):
    """Reads progress lines; sends `sig` once a line starts with `prefix`.

    Returns (out, err, rc)."""
    lines = []
    if prefix:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(prefix):
                proc.send_signal(sig)
                break
    out, err = proc.communicate(timeout=240)
    return "".join(lines) + out, err, proc.returncode


def _rows(d):
    return [json.loads(line) for line in (Path(d) / "metrics.jsonl").read_text().splitlines()]


def _untimed(rows):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_runs_alone_saves_on_sigterm_and_resumes_after_kill9(script, tmp_path):
    for f in (script, "common.py"):
        shutil.copy(ROOT / f, tmp_path / f)
    module = __import__(script[:-3])
    with pytest.raises(SystemExit):                       # --help works (in-process: cheap)
        module.parse_args(["--help"])
    spec = SPEC.get(script)
    if spec is None:
        _, err, rc = _run_until(_spawn(script, [*TINY[script], "--out-dir", "run"], tmp_path))
        assert rc == 0, err[-3000:]
        names = {p.name for p in (tmp_path / "run").iterdir()}
        assert {"ckpt.pt", "metrics.jsonl", "args.json"} <= names
        return
    argv = [*TINY[script], spec["length"], str(spec["total"]), "--ckpt-every", "3",
            "--log-every", "1"]
    run, ref = tmp_path / "run", tmp_path / "ref"
    module.main([*argv, "--out-dir", str(ref)])           # the uninterrupted reference

    out, err, rc = _run_until(_spawn(script, [*argv, "--out-dir", "run"], tmp_path),
                              spec["kill_at"], signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM and "SIGTERM" in out, (rc, err[-3000:])
    names = {p.name for p in run.iterdir()}
    assert {"ckpt.pt", "metrics.jsonl", "args.json", "curves.png"} <= names
    saved = torch.load(run / "ckpt.pt", weights_only=True)["step"]
    assert saved == _rows(run)[-1]["step"] < spec["total"]   # saved at the step it stopped

    unit = spec["kill_at"].split(" ")[0]
    out, err, rc = _run_until(_spawn(script, [*argv, "--out-dir", "run", "--resume"], tmp_path),
                              f"{unit} {saved + 2}/", signal.SIGKILL)
    assert rc == -signal.SIGKILL, (rc, err[-3000:])
    module.main([*argv, "--out-dir", str(run), "--resume"])
    assert _untimed(_rows(run)) == _untimed(_rows(ref))    # every step once, the same values
    times = [r["time_s"] for r in _rows(run)]
    assert times == sorted(times)
