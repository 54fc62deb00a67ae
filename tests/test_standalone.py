"""The copy-paste promise: each script plus common.py (plus fid.py where it evaluates) runs alone."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_args import TINY

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = [s for s, argv in TINY.items() if argv is not None and (ROOT / s).exists()]


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_runs_alone(script, tmp_path):
    for f in (script, "common.py"):
        shutil.copy(ROOT / f, tmp_path / f)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    run = dict(cwd=tmp_path, env=env, check=True, timeout=240, capture_output=True, text=True)
    out = subprocess.run([sys.executable, script, "--help"], **run).stdout
    assert "usage:" in out
    subprocess.run([sys.executable, script, *TINY[script], "--out-dir", "run"], **run)
    written = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"ckpt.pt", "metrics.jsonl", "args.json"} <= written, written
