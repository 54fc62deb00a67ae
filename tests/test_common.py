"""common.py: loaders on data the tests write, the shapes generator, resumable batches,
checkpoints."""
import itertools
import json
import os
import pickle
import random
import re

import numpy as np
import pytest
import torch
import torchvision

import common


# ---- shapes ----
def test_shapes_is_a_pure_function_of_seed_and_index():
    a, b = common.ShapesDataset(100, 32), common.ShapesDataset(100, 32)
    for i in (0, 7, 99):
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
    assert not torch.equal(a[0][0], a[1][0])
    assert not torch.equal(a[3][0], common.ShapesDataset(100, 32, seed=1)[3][0])
    x, y = a[5]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    assert common.ShapesDataset(10, 48)[2][0].shape == (3, 48, 48)


def test_shapes_labels_cover_every_kind_and_extras_agree():
    ds = common.ShapesDataset(300, 32, extras=("label_map", "instance_map", "caption"))
    labels = set()
    for i in range(300):
        x, y = ds[i]
        labels.add(y["label"])
        lm, im = y["label_map"], y["instance_map"]
        assert lm.shape == im.shape == (32, 32) and lm.dtype == torch.int64
        assert ((lm == 0) == (im == 0)).all()                   # background agrees in both maps
        assert (lm[im == 1] == 1 + y["label"]).all()            # instance 1 is the main shape
        assert (im == 1).sum() >= 20                            # the main shape is large and on top
        kind = common.SHAPE_KINDS[y["label"]]
        assert y["caption"].startswith("a large ") and y["caption"].split(" ")[3] == kind
        assert (im > 1).any() == (" small " in y["caption"])
    assert labels == set(range(len(common.SHAPE_KINDS)))
    # no extras: y is a plain int and the dataset does not compute captions
    assert isinstance(common.ShapesDataset(5)[0][1], int)
    with pytest.raises(common.UserError, match="unknown shapes extras"):
        common.ShapesDataset(5, extras=("depth",))


def test_shapes_is_learnable_structure_not_noise():
    x = torch.stack([common.ShapesDataset(64, 32)[i][0] for i in range(64)])
    # neighbouring pixels are nearly always equal (flat colour regions), unlike noise
    same = (x[..., 1:] - x[..., :-1]).abs().lt(0.05).float().mean()
    assert same > 0.85
    # the main shape's colour is one of the palette colours
    img, info = common.ShapesDataset(1, 32).sample(0)
    ys, xs = np.nonzero(info["instance_map"] == 1)
    assert tuple(img[ys[0], xs[0]]) in {tuple(v) for v in common.COLORS.values()}


def test_caption_relation_follows_positions():
    ds = common.ShapesDataset(1, 32)
    info = {"kinds": [0, 1], "colors": [0, 2], "centres": np.array([[0.5, 0.2], [0.5, 0.8]])}
    assert ds.caption(info) == "a large red circle above a small blue square"
    info["centres"] = np.array([[0.8, 0.5], [0.2, 0.5]])
    assert ds.caption(info) == "a large red circle to the right of a small blue square"


# ---- batches ----
def test_infinite_batches_resume_matches_uninterrupted_stream_across_epochs():
    ds = common.ShapesDataset(50, 8)
    full = [y for _, y in itertools.islice(common.infinite_batches(ds, 16, 3, 0, 0), 10)]
    late = [y for _, y in itertools.islice(common.infinite_batches(ds, 16, 3, 4, 0), 6)]
    assert all(torch.equal(a, b) for a, b in zip(full[4:], late))
    # 50 // 16 = 3 batches per epoch; each epoch draws distinct items, epochs are shuffled
    # differently
    e0, e1 = torch.cat(full[:3]), torch.cat(full[3:6])
    idx0 = [b for b in common._EpochBatches(50, 16, 3, 0).__iter__().__next__()]
    assert len(set(idx0)) == 16
    assert not torch.equal(e0, e1)


def test_infinite_batches_rejects_a_dataset_smaller_than_a_batch():
    with pytest.raises(common.UserError, match="fewer than one batch"):
        next(common.infinite_batches(common.ShapesDataset(4, 8), 8, 0, 0, 0))


# ---- real loaders on data written here ----
def _write_cifar10(root, n=20):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, n).tolist()}
        with open(d / name, "wb") as f:
            pickle.dump(batch, f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return batch


def test_cifar10_pickle_loads_in_range(tmp_path, monkeypatch):
    last = _write_cifar10(tmp_path)
    # the files are ours, so torchvision's md5 check of the real archive would refuse them
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    ds = common.load_dataset("cifar10", str(tmp_path), train=False, download=False)
    assert len(ds) == 20
    x, y = ds[3]
    assert x.shape == (3, 32, 32) and y == last["labels"][3]
    expect = torch.tensor(last["data"][3], dtype=torch.float32).view(3, 32, 32) / 127.5 - 1
    assert torch.allclose(x, expect, atol=1e-5)                 # pixel p -> p / 127.5 - 1
    assert len(common.load_dataset("cifar10", str(tmp_path), img_size=16, download=False)) == 100
    ds = common.load_dataset("cifar10", str(tmp_path), img_size=16, download=False)
    assert ds[0][0].shape == (3, 16, 16)


def test_missing_torchvision_dataset_gives_an_actionable_error(tmp_path):
    with pytest.raises(common.UserError, match="could not load 'cifar10'.*data-root"):
        common.load_dataset("cifar10", str(tmp_path), download=False)


def _png(path, colour, size=(12, 10)):
    img = torch.zeros(3, size[1], size[0], dtype=torch.uint8)
    img[:] = torch.tensor(colour, dtype=torch.uint8)[:, None, None]
    torchvision.io.write_png(img, str(path))


def test_image_folder_with_classes_and_flat(tmp_path):
    for c, colour in (("cats", (255, 0, 0)), ("dogs", (0, 0, 255))):
        (tmp_path / "cls" / c).mkdir(parents=True)
        for i in range(3):
            _png(tmp_path / "cls" / c / f"{i}.png", colour)
    ds = common.load_dataset(f"folder:{tmp_path / 'cls'}", img_size=8)
    assert ds.classes == ["cats", "dogs"] and len(ds) == 6
    x, y = ds[4]
    assert x.shape == (3, 8, 8) and y == 1
    assert torch.allclose(x[2], torch.ones(8, 8)) and (x[0] == -1).all()
    (tmp_path / "flat").mkdir()
    for i in range(2):
        _png(tmp_path / "flat" / f"{i}.PNG", (0, 255, 0))
    flat = common.load_dataset(f"folder:{tmp_path / 'flat'}")
    assert len(flat) == 2 and flat[1][1] == 0 and flat[1][0].shape == (3, 10, 12)


def test_bad_folders_and_files_name_the_path(tmp_path):
    with pytest.raises(common.UserError, match="not found: .*nowhere"):
        common.load_dataset(f"folder:{tmp_path / 'nowhere'}")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(common.UserError, match="no images .*empty"):
        common.load_dataset(f"folder:{tmp_path / 'empty'}")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    ds = common.load_dataset(f"folder:{tmp_path / 'bad'}")
    with pytest.raises(common.UserError, match="cannot read image .*broken.jpg"):
        ds[0]


def test_unknown_and_manual_datasets_say_what_to_do(tmp_path):
    with pytest.raises(common.UserError, match="valid: cifar10, cifar100, stl10.*shapes"):
        common.load_dataset("imagenet")
    with pytest.raises(common.UserError, match="lmdb.*bedroom_train.*folder:"):
        common.load_dataset("lsun-bedroom", str(tmp_path))
    (tmp_path / "lsun" / "bedroom_train").mkdir(parents=True)
    _png(tmp_path / "lsun" / "bedroom_train" / "a.png", (1, 2, 3))
    assert len(common.load_dataset("lsun-bedroom", str(tmp_path))) == 1
    with pytest.raises(common.UserError, match="CelebA could not be loaded.*img_align_celeba.zip"):
        common.load_dataset("celeba", str(tmp_path), download=False)
    with pytest.raises(common.UserError, match="only available for 'shapes'"):
        common.load_dataset("mnist", str(tmp_path), extras=("caption",))


# ---- checkpoints ----
def test_checkpoint_roundtrip_is_weights_only_and_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    state = {"step": 3, "w": torch.arange(4.0), "args": {"dim": 8}, "rng": common.rng_state()}
    common.save_checkpoint(path, state)
    back = common.load_checkpoint(path)
    assert back["step"] == 3 and torch.equal(back["w"], state["w"])
    torch.load(path, weights_only=True)                         # loadable without pickle code

    def dies_midway(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        common.save_checkpoint(path, {"step": 4})
    monkeypatch.undo()
    assert common.load_checkpoint(path)["step"] == 3            # the old file is intact
    assert os.listdir(tmp_path) == ["ckpt.pt"]                  # and no temp file is left


def test_load_checkpoint_names_a_missing_file(tmp_path):
    with pytest.raises(common.UserError, match="no checkpoint"):
        common.load_checkpoint(str(tmp_path / "none.pt"))


def test_rng_state_roundtrip_through_a_checkpoint(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    common.save_checkpoint(str(tmp_path / "c.pt"), {"rng": common.rng_state()})
    first = (random.random(), np.random.rand(), torch.rand(1).item(), np.random.randn())
    common.set_rng_state(common.load_checkpoint(str(tmp_path / "c.pt"))["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item(), np.random.randn()) == first


# ---- the run plumbing (through the scripts: tests/test_run_plumbing.py, test_standalone.py) ----
def test_cli_prints_a_user_error_as_one_line_and_exits_2(tmp_path):
    import subprocess
    import sys
    (tmp_path / "tool.py").write_text(
        "import common\n"
        "def main():\n"
        "    common.load_dataset('no-such-set')\n"
        "common.cli(main)\n")
    env = {**os.environ, "PYTHONPATH": os.path.dirname(common.__file__)}
    r = subprocess.run([sys.executable, "tool.py"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: unknown dataset 'no-such-set'")
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_flag_types_refuse_zero_negative_and_nan():
    import argparse
    for parse, bad, good in ((common.positive_int, ["0", "-3", "1.5", "x"], "7"),
                             (common.nonnegative_int, ["-1", "nan"], "0"),
                             (common.positive_float, ["0", "-1e-3", "nan", "inf"], "2e-4"),
                             (common.probability, ["0", "1.01", "nan"], "1"),
                             (common.unit_float, ["-0.1", "nan"], "0")):
        for text in bad:
            with pytest.raises(argparse.ArgumentTypeError):
                parse(text)
        assert parse(good) == float(good)


def test_default_out_dir_carries_the_non_default_flags():
    import argparse
    base = dict(dataset="shapes", seed=0, lr=1e-4, steps=10, log_every=5, out_dir=None)
    d = common.default_out_dir("s", argparse.Namespace(**base), base)
    assert d == os.path.join("runs", "s-shapes-s0")
    assert common.default_out_dir("s", argparse.Namespace(**{**base, "steps": 99, "log_every": 1}),
                                  base) == d                  # length and run flags keep the folder
    other = common.default_out_dir("s", argparse.Namespace(**{**base, "lr": 2e-4}), base)
    assert other.startswith(d + "-") and other != d


def test_run_log_is_strict_json_trimmed_on_resume_and_stops_on_nan(tmp_path, capsys):
    import argparse
    args = argparse.Namespace(out_dir=str(tmp_path / "r"), resume=False, seed=0, lr=1.0)
    run = common.Run(args, "s", total=10)
    run.start(0)
    for step in (1, 2, 3):
        run.log(step, {"loss": torch.tensor(0.5 * step), "n": 3})
        if step == 2:
            run.save(step, {"w": torch.ones(2)})
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"step 3/10 \(30%\) \| loss 1\.5 \| n 3 \| \S+ it/s \| 0:00:0\d elapsed "
                        r"\| eta \d+:\d\d:\d\d", line), line
    with pytest.raises(common.NonFiniteError, match="step 4: loss = nan"):
        run.log(4, {"loss": float("nan"), "n": 3})
    with pytest.raises(common.NonFiniteError, match="w hold NaN"):
        run.save(4, {"w": torch.tensor([1.0, float("inf")])})
    rows = [json.loads(s) for s in open(tmp_path / "r" / "metrics.jsonl")]   # strict JSON
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] is None
    assert common.load_checkpoint(str(tmp_path / "r" / "ckpt.pt"))["step"] == 2
    assert (tmp_path / "r" / "curves.png").exists()

    args.resume = True
    run = common.Run(args, "s", total=10)
    assert run.load()["step"] == 2
    run.start(2)
    assert [json.loads(s)["step"] for s in open(tmp_path / "r" / "metrics.jsonl")] == [1, 2]
    args.lr = 2.0
    with pytest.raises(common.UserError,
                       match="cannot change --lr \\(1.0 in the checkpoint, now 2.0"):
        common.Run(args, "s", total=10).load()
    assert common.Run(args, "s", total=10, mutable=("lr",)).load()["step"] == 2


def test_a_failed_save_says_so_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    common.save_checkpoint(path, {"step": 1})

    def disk_full(obj, f, *a, **k):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed "
                           "writing file data/0: file write failed: unexpected pos 203776")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(common.UserError,
                       match="could not write .*unexpected pos.*GiB free.*intact"):
        common.save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert common.load_checkpoint(path)["step"] == 1 and os.listdir(tmp_path) == ["ckpt.pt"]


def test_device_cache_gives_the_loader_values_in_the_loader_order(tmp_path, monkeypatch):
    """The device-resident path (CUDA by default; forced here on the CPU) yields exactly the
    DataLoader's batches: torchvision's ToTensor + Normalize pipeline and shapes' own scaling."""
    _write_cifar10(tmp_path, n=40)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    for ds in (common.load_dataset("cifar10", str(tmp_path), download=False),
               common.ShapesDataset(90, 16)):
        ref = list(itertools.islice(common.infinite_batches(ds, 16, 7, 3, 0), 14))
        got = list(itertools.islice(common.infinite_batches(ds, 16, 7, 3, 0, device="cpu",
                                                            on_device=True), 14))
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(ref, got))
    assert common.device_cache(common.ShapesDataset(4, 8, extras=("caption",)), "cpu") is None


def test_each_rank_gets_its_share_of_the_global_batch():
    whole = list(itertools.islice(iter(common._EpochBatches(100, 12, 1, 2)), 20))
    shares = [list(itertools.islice(iter(common._EpochBatches(100, 12, 1, 2, r, 3)), 20))
              for r in range(3)]
    assert all(w == a + b + c for w, a, b, c in zip(whole, *shares))
    with pytest.raises(common.UserError, match="divisible"):
        common._EpochBatches(100, 10, 1, 0, 0, 3)


def test_figure_kit_draws_text_as_pil_and_writes_exact_pngs(tmp_path):
    from PIL import Image, ImageDraw   # the reference only: scripts and common.py never import PIL
    img = common.canvas(30, 200)
    ref = Image.new("RGB", (200, 30), "white")
    ImageDraw.Draw(ref).text((4, 9), "step 5/10 | x in [-1, 1]", fill=(20, 40, 120))
    out = common.draw_text(img, [(4, 9, "step 5/10 | x in [-1, 1]")], rgb=(20, 40, 120))
    assert np.array_equal(out.permute(1, 2, 0).numpy(), np.asarray(ref))
    assert (img == 255).all()                                      # a new image, input untouched
    fig = common.title_strip(common.canvas(50, 300, (0, 0, 0)), ["a", "b"],
                             key=[("real", common.REAL_RGB), ("generated", common.FAKE_RGB)])
    assert fig.shape == (3, 50 + 14 * 3 + 8, 300) and (fig[:, -50:] == 0).all()
    assert (fig[:, 34, 6] == torch.tensor(common.REAL_RGB, dtype=torch.uint8)).all()   # the key
    common.save_png(fig, tmp_path / "f.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "f.png")), fig.permute(1, 2, 0).numpy())
    line = common.draw_polyline(common.canvas(10, 10), [(0, 0), (9, 9)], (0, 0, 0), width=1)
    assert all(line[:, i, i].tolist() == [0, 0, 0] for i in range(10))


def test_world_size_without_torchrun_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(common.UserError, match="start with torchrun"):
        common.Dist("cpu")


@pytest.mark.parametrize("training", [False, True])
def test_a_signal_before_training_stops_at_once_with_one_line(training, capsys):
    """SIGTERM during work that no Run saves (avb --evaluate, data loading) stops at once, with one
    line and the shell's 128 + signal code (it used to print "saving a checkpoint after this step"
    and run on, and a second signal gave a traceback); in training the first one only asks the
    loop to save and stop, and a second one stops at once the same way."""
    import signal
    import time
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    saved = list(common._TRAINING)
    common._TRAINING[:] = ["wgan_gp"] if training else []

    def main():
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(200):                 # the loop a Run would end; without one, never reached
            time.sleep(0.01)
            if common._STOP and training:
                os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the signal did not stop main")
    try:
        with pytest.raises(SystemExit) as e:
            common.cli(main)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        common._STOP.clear()
        common._TRAINING[:] = saved
    assert e.value.code == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["stopped by SIGTERM" + (": the last saved checkpoint is kept" if training
                                           else "")], err
