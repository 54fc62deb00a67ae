"""The --fid-every contract between the training scripts and fid.py (/work/prompts/plumbing.md):
the stand-in of tests/fid_recorder.py has fid.TrainingFID's signatures, and a script copied
without fid.py refuses --fid-every at start-up with a UserError naming fid.py. Each script's own
--fid-every wiring test lives in its own test file and uses the `fid_recorder` fixture."""
import inspect
import sys

import pytest

import common
import fid
import wgan_gp
from fid_recorder import Recorder, RecordingEvaluator
from tiny_args import TINY


def params(f, drop=("self",)):
    return [(p.name, p.default, p.kind) for p in inspect.signature(f).parameters.values()
            if p.name not in drop]


def test_recorder_has_the_real_signatures():
    assert params(Recorder.TrainingFID) == params(fid.TrainingFID)          # the constructor
    assert params(RecordingEvaluator.__call__) == params(fid.TrainingFID.__call__)


def test_a_script_copied_without_fid_trains_and_refuses_fid_every_at_start(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "fid", None)                   # `import fid` raises
    assert wgan_gp.main(TINY["wgan_gp.py"] + ["--out-dir", str(tmp_path / "a")])["step"] == 2
    with pytest.raises(common.UserError, match=r"fid\.py"):
        wgan_gp.main(TINY["wgan_gp.py"] + ["--out-dir", str(tmp_path / "b"), "--fid-every", "1"])
    assert not (tmp_path / "b" / "ckpt.pt").exists()                 # refused before training
