"""A stand-in for fid.fid_for_training that records what a training script's --fid-every passes.

Use the `fid_recorder` fixture (tests/conftest.py): it puts a Recorder in sys.modules["fid"], so the
script's `import fid` inside its eval function gets it. tests/test_fid_wiring.py checks that the
Recorder's signature equals the real function's."""


class Recorder:
    def __init__(self):
        self.calls = []

    def fid_for_training(self, sample_fn, dataset, data_root, img_size, n_samples, device, weights=None,
                         cache_dir=None, class_label=None):
        x = sample_fn(3)
        self.calls.append({"dataset": dataset, "img_size": img_size, "n": n_samples, "weights": weights,
                           "class_label": class_label, "shape": tuple(x.shape),
                           "lo": x.min().item(), "hi": x.max().item()})
        return 10.0 + len(self.calls)
