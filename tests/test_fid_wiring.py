"""--fid-every in the training scripts reaches fid.fid_for_training with the contract's arguments.

fid.py's own tests check fid_for_training against the API (features, cache, class subsets); here a
recorder stands in for it, so no Inception forward is needed, and the recorder's signature is
checked against the real function so that the two sides of the contract cannot drift apart."""
import inspect
import sys

import pytest

import fid
import projection
import sngan
import wgan_gp
from fid_recorder import Recorder
from tiny_args import TINY


def test_recorder_has_the_real_signature():
    assert inspect.signature(Recorder.fid_for_training).parameters.keys() - {"self"} == \
        inspect.signature(fid.fid_for_training).parameters.keys()


@pytest.mark.parametrize("module", [wgan_gp, sngan])
def test_unconditional_scripts_call_fid_at_the_requested_steps(module, fid_recorder, tmp_path):
    script = module.__name__ + ".py"
    m = module.main(TINY[script] + ["--out-dir", str(tmp_path), "--fid-every", "2", "--fid-samples", "7",
                                    "--fid-weights", "w.pth"])
    assert len(fid_recorder.calls) == 1 and m["fid"] == 11.0            # TINY runs 2 steps: FID at step 2
    c = fid_recorder.calls[0]
    assert (c["dataset"], c["img_size"], c["n"], c["weights"], c["class_label"]) == ("shapes", 32, 7, "w.pth", None)
    assert c["shape"] == (3, 3, 32, 32) and -1 <= c["lo"] and c["hi"] <= 1


def test_projection_computes_fid_and_intra_fid_over_every_class(fid_recorder, tmp_path):
    m = projection.main(TINY["projection.py"] + ["--out-dir", str(tmp_path), "--fid-every", "100",
                                                 "--fid-samples", "6", "--intra-fid-samples", "4"])
    calls = fid_recorder.calls
    assert [c["class_label"] for c in calls] == [None, 0, 1, 2, 3, 4, 5]   # shapes has 6 classes
    assert [c["n"] for c in calls] == [6] + [4] * 6
    assert m["fid"] == 11.0 and m["intra_fid"] == pytest.approx(sum(range(12, 18)) / 6)
    assert all(c["shape"][1:] == (3, 32, 32) and -1 <= c["lo"] and c["hi"] <= 1 for c in calls)


def test_a_script_copied_without_fid_still_imports_and_trains(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "fid", None)                  # `import fid` would raise
    assert wgan_gp.main(TINY["wgan_gp.py"] + ["--out-dir", str(tmp_path)])["step"] == 2
    with pytest.raises(ImportError):
        wgan_gp.main(TINY["wgan_gp.py"] + ["--out-dir", str(tmp_path / "f"), "--fid-every", "1"])
