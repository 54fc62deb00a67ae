"""Tiny but real flags per script: small widths, resolutions, batches and step counts that still
reach every branch (sampling, checkpointing, resume). Used by the in-process tests and by
tests/test_standalone.py, which runs each script alone in a temp folder."""

TINY = {
    # One entry per training script; each owner edits only its own line. No --out-dir here: the
    # tests add their own. fid.py has its own standalone test in tests/test_fid.py.
    "wgan_gp.py": None,
    "sngan.py": ["--dataset", "shapes", "--device", "cpu", "--steps", "2", "--g-ch", "16", "--d-ch", "16",
                 "--batch-size", "8", "--num-workers", "0", "--log-every", "1", "--sigma-every", "2",
                 "--sample-every", "2", "--ckpt-every", "1", "--deterministic"],
    "projection.py": ["--dataset", "shapes", "--device", "cpu", "--steps", "2", "--g-ch", "16", "--d-ch", "16", "--batch-size", "8", "--g-batch-size", "16", "--n-dis", "2", "--num-workers", "0", "--log-every", "1", "--sample-every", "1", "--ckpt-every", "1", "--deterministic", "--export-samples", "12", "--morph", "0", "1"],
    "gd_stable.py": None,
    "dp_gan.py": ["--device", "cpu", "--n-train", "64", "--n-test", "32", "--sample-rate", "0.25", "--epochs", "2", "--width", "0.0625", "--tstr-samples", "64", "--clf-steps", "20", "--select-picks", "2", "--log-every", "2", "--sample-every", "4", "--ckpt-every", "3", "--deterministic"],
    "avb.py": None,
}
