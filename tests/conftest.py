import os

import pytest
import torch

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")   # the CPU suite never touches a GPU
torch.set_num_threads(1)   # tiny models: one thread is fastest and never oversubscribes


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fid_recorder(monkeypatch):
    """Replaces fid.fid_for_training for a training script's --fid-every.

    See tests/fid_recorder.py."""
    import sys

    from fid_recorder import Recorder
    rec = Recorder()
    monkeypatch.setitem(sys.modules, "fid", rec)
    return rec
