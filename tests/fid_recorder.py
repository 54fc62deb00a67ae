"""A stand-in for fid.TrainingFID that records what a training script's --fid-every passes.

Use the `fid_recorder` fixture (tests/conftest.py): it puts a Recorder in sys.modules["fid"], so a
script's `import fid` inside its eval code gets it, and `fid.TrainingFID(...)` builds an evaluator
that records. tests/test_fid_wiring.py checks that both signatures equal the real ones, so the two
sides of the contract cannot drift apart. Like the real one, the stand-in refuses fewer than 10
samples (IS uses 10 splits) and class labels it was not built for.

    rec.built   one dict per TrainingFID(...): every argument by name
    rec.calls   one dict per evaluation: dataset, img_size, n, weights, class_label, ref_split,
                ref_size, shape and value range (lo, hi) of sample_fn(3)
    returns     {"fid": 10 + number of calls so far, "is": 1 + that / 10, "is_std": 0.1}
"""
import common


def _check_n(n):
    if not isinstance(n, int) or n < 10:
        raise common.UserError(f"FID/IS samples must be an integer >= 10 (IS uses 10 splits), got "
                               f"{n!r}")
    return n


class RecordingEvaluator:
    def __init__(self, recorder, args):
        self.recorder, self.args = recorder, args

    def __call__(self, sample_fn, class_label=None, n_samples=None):
        a = self.args
        n = a["n_samples"] if n_samples is None else _check_n(n_samples)
        if class_label not in tuple(a["class_labels"]):
            raise ValueError(f"class_label {class_label!r} has no reference statistics; built "
                             f"for class_labels={tuple(a['class_labels'])}")
        x = sample_fn(min(3, n))
        calls = self.recorder.calls
        calls.append({"dataset": a["dataset"], "img_size": a["img_size"], "n": n,
                      "weights": a["weights"], "class_label": class_label,
                      "ref_split": a["ref_split"], "ref_size": a["ref_size"],
                      "shape": tuple(x.shape), "lo": x.min().item(), "hi": x.max().item()})
        return {"fid": 10.0 + len(calls), "is": 1.0 + len(calls) / 10, "is_std": 0.1}


class Recorder:
    def __init__(self):
        self.built, self.calls = [], []

    def TrainingFID(self, dataset, data_root, img_size, device, n_samples, weights=None,
                    ref_split="train", ref_size=None, cache_dir=None, class_labels=(None,)):
        args = dict(dataset=dataset, data_root=data_root, img_size=img_size, device=device,
                    n_samples=_check_n(n_samples), weights=weights, ref_split=ref_split,
                    ref_size=ref_size, cache_dir=cache_dir, class_labels=tuple(class_labels))
        self.built.append(args)
        return RecordingEvaluator(self, args)
