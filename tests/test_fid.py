"""fid.py (card 8.1 and 8.2): network layout and TF patches, closed forms of every metric, the input
pipeline, pytorch-fid parity, the CLI, the training hook and the Lucic study tools. No real weight file
is needed: a random state dict in the published layout stands in for it. Small inputs (75x75 without
resizing, the 64-d tap) keep the file well under a minute of CPU."""
import functools
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import common
import fid

ROOT = Path(__file__).resolve().parent.parent


def random_state_dict(seed=0):
    """Published key layout; He-scaled convs and randomised BN statistics keep activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = fid.FIDInceptionV3().state_dict()
    sd = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in shapes.items()}
    for k, v in sd.items():
        if k.endswith("conv.weight"):
            v.copy_(torch.randn(v.shape, generator=g) * (2 / v[0].numel()) ** 0.5)
        elif k.endswith("running_var"):
            v.copy_(torch.rand(v.shape, generator=g) + 0.5)
        elif k.endswith(("running_mean", "bn.bias")):
            v.copy_(torch.randn(v.shape, generator=g) * 0.1)
        elif k.endswith("bn.weight"):
            v.copy_(torch.rand(v.shape, generator=g) * 0.5 + 0.75)
        elif k.startswith("fc."):
            v.copy_(torch.randn(v.shape, generator=g) * 0.05)
    return sd


@pytest.fixture(scope="module")
def state_dict():
    return random_state_dict()


@pytest.fixture(scope="module")
def weights(tmp_path_factory, state_dict):
    path = tmp_path_factory.mktemp("weights") / "random_inception.pth"
    torch.save(state_dict, path)
    return str(path)


def net(state_dict, dims=2048, mode="pytorch-fid", resize=False):
    with torch.device("meta"):
        m = fid.FIDInceptionV3(dims, mode, resize)
    m.load_state_dict(state_dict, strict=True, assign=True)
    return m.eval().requires_grad_(False)


def meta_net():
    with torch.device("meta"):
        return fid.FIDInceptionV3()


def write_pngs(folder, n, size=75, seed=0, channels=3):
    os.makedirs(folder, exist_ok=True)
    imgs = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))
    for i, img in enumerate(imgs):
        torchvision.io.write_png(img, os.path.join(folder, f"{i:03d}.png"))
    return imgs


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


# ---- network (card 8.1 items 1-3, checklist 1-4, 7) ----
def test_key_layout_loads_published_file_layout_strictly(weights, state_dict):
    sd = torch.load(weights, weights_only=True)
    assert len(sd) == 566 and sum(k.endswith("num_batches_tracked") for k in sd) == 94
    assert sd["fc.weight"].shape == (1008, 2048) and sd["fc.bias"].shape == (1008,)
    assert sd["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert not any(k.startswith("AuxLogits") for k in sd)
    per = {}
    for k in sd:
        per[k.split(".")[0]] = per.get(k.split(".")[0], 0) + 1
    assert per["Conv2d_1a_3x3"] == 6 and per["Mixed_5b"] == 42 and per["Mixed_6a"] == 24
    assert per["Mixed_6e"] == 60 and per["Mixed_7a"] == 36 and per["Mixed_7c"] == 54 and per["fc"] == 2
    m = fid.build_inception(weights)
    key = "Mixed_7c.branch_pool.conv.weight"
    assert torch.equal(m.Mixed_7c.branch_pool.conv.weight, state_dict[key])
    assert len(m.weights_hash) == 8 and not m.training
    without = {k: v for k, v in sd.items() if "num_batches" not in k}                # 472 keys
    meta_net().load_state_dict(without, strict=True, assign=True)
    with pytest.raises(RuntimeError):
        meta_net().load_state_dict({k: v for k, v in sd.items() if k != "fc.bias"}, strict=True, assign=True)
    assert all(b.eps == 1e-3 for b in m.modules() if isinstance(b, nn.BatchNorm2d))
    assert all(c.bias is None for c in m.modules() if isinstance(c, nn.Conv2d))
    assert m.AuxLogits is None and not m.transform_input and m.fc.out_features == 1008
    assert type(m.Mixed_6a) is torchvision.models.inception.InceptionB
    assert type(m.Mixed_7a) is torchvision.models.inception.InceptionD
    assert (m.maxpool1.kernel_size, m.maxpool1.stride, m.maxpool1.padding) == (3, 2, 0)


def test_tap_shapes_at_299_and_minimum_unresized_input(state_dict):
    m = net(state_dict)
    with torch.no_grad():
        shapes = [tuple(t.shape[1:]) for t in m.taps(torch.randn(1, 3, 299, 299))]
        assert shapes == [(64, 73, 73), (192, 35, 35), (768, 17, 17), (2048, 1, 1)]
        assert m(torch.randn(1, 3, 75, 75)).shape == (1, 2048)
        with pytest.raises(RuntimeError):
            m(torch.randn(1, 3, 74, 74))


def identity_bn(module):
    for b in module.modules():
        if isinstance(b, nn.BatchNorm2d):
            b.running_mean.zero_(), b.running_var.fill_(1 - b.eps)
            b.weight.data.fill_(1), b.bias.data.zero_()


def test_pool_patches_are_live():
    a = fid.FIDInceptionA(2, pool_features=2).eval()
    stock = torchvision.models.inception.InceptionA(2, pool_features=2).eval()
    for blk in (a, stock):
        identity_bn(blk)
        blk.branch_pool.conv.weight.data = torch.eye(2)[:, :, None, None]
    x = torch.full((1, 2, 5, 5), 3.0)
    with torch.no_grad():
        assert torch.allclose(a(x)[:, -2:], x, atol=1e-5)                 # count_include_pad=False
        assert abs(stock(x)[0, -1, 0, 0] - 3.0 * 4 / 9) < 1e-4           # torchvision counts the padding
    e = fid.FIDInceptionE(2, max_pool=True).eval()
    e_avg = fid.FIDInceptionE(2, max_pool=False).eval()
    x = torch.rand(1, 2, 5, 5) + 0.1
    padded = F.pad(x[0, 0], (1, 1, 1, 1), value=-1.0)
    hand_max = torch.tensor([[padded[i:i + 3, j:j + 3].max() for j in range(5)] for i in range(5)])
    for blk in (e, e_avg):
        identity_bn(blk)
        blk.branch_pool.conv.weight.data.zero_()
        blk.branch_pool.conv.weight.data[0, 0] = 1
    with torch.no_grad():
        assert torch.allclose(e(x)[0, -192], hand_max, atol=1e-5)        # Mixed_7c: max pool (patch 2)
        assert abs(e_avg(x)[0, -192, 0, 0] - x[0, 0, :2, :2].mean()) < 1e-5


# ---- Frechet distance (items 4-9, checklist 9-10) ----
def spd_stats(d, n, seed):
    rs = np.random.RandomState(seed)
    return fid.statistics(rs.standard_normal((n, d)) @ rs.standard_normal((d, d)) / np.sqrt(d) + rs.rand(d))


def test_frechet_closed_forms():
    mu, sigma = spd_stats(64, 320, 0)
    for method in ("sqrtm", "eig", "eigh"):
        assert abs(fid.frechet_distance(mu, sigma, mu, sigma, method)) < 1e-8
        d = 128  # pytorch-fid's own test uses 2048; sqrtm of I_2048 alone takes a minute on this CPU
        assert rel(fid.frechet_distance(np.zeros(d), np.eye(d), np.ones(d), np.eye(d), method), d) < 1e-10
        rs = np.random.RandomState(1)
        a, b, m1, m2 = rs.rand(16) + 0.1, rs.rand(16) + 0.1, rs.randn(16), rs.randn(16)
        closed = ((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
        assert rel(fid.frechet_distance(m1, np.diag(a), m2, np.diag(b), method), closed) < 1e-10
    assert rel(fid.frechet_distance(1.0, 4.0, 3.0, 1.0), (1 - 3) ** 2 + (2 - 1) ** 2) < 1e-12   # 1-D
    with pytest.raises(ValueError):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


@pytest.mark.parametrize("d,n", [(64, 320), (128, 640), (64, 40)])   # last: rank-deficient (N < d)
def test_eigenvalue_routes_match_sqrtm(d, n):
    s1, s2 = spd_stats(d, n, 2), spd_stats(d, n, 3)
    ref = fid.frechet_distance(*s1, *s2, method="sqrtm")
    for method in ("eig", "eigh"):
        assert rel(fid.frechet_distance(*s1, *s2, method=method), ref) < 1e-6


def test_complex_cast_and_imaginary_guard(monkeypatch, capsys):
    s1, s2, mu = np.diag([4.0, 1.0, -1e-18]), np.eye(3), np.zeros(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.isnan(np.sqrt(np.linalg.eigvals(s1 @ s2)).sum())        # without the cast: NaN
    assert np.isfinite(fid.frechet_distance(mu, s1, mu, s2, "eig"))
    bad = np.diag([-1.0, 1.0])                                           # sqrtm has imaginary diagonal 1
    with pytest.raises(ValueError, match="Imaginary component"):
        fid.frechet_distance(np.zeros(2), bad, np.zeros(2), np.eye(2))
    assert np.isfinite(fid.frechet_distance(np.zeros(2), bad, np.zeros(2), np.eye(2), "eig"))
    calls, real_sqrtm = [], fid.scipy.linalg.sqrtm

    def fake_sqrtm(a):                     # first product "singular": the eps retry must follow
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)
    monkeypatch.setattr(fid.scipy.linalg, "sqrtm", fake_sqrtm)
    s1, s2 = spd_stats(8, 40, 4)[1], spd_stats(8, 40, 5)[1]
    fid.frechet_distance(np.zeros(8), s1, np.zeros(8), s2)
    assert np.allclose(calls[1], (s1 + 1e-6 * np.eye(8)) @ (s2 + 1e-6 * np.eye(8)), rtol=0, atol=1e-15)
    assert "adding 1e-06 to diagonal" in capsys.readouterr().out


def test_statistics_use_n_minus_1():
    class Stub(nn.Module):                 # per-image channel means of the normalised input
        mode, resize, dims = "pytorch-fid", False, 3

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return x.mean((2, 3))
    images = torch.stack([torch.full((3, 4, 4), v) for v in (0.0, 0.5, 1.0)])   # -> -1, 0, 1
    mu, sigma = fid.statistics(fid.activations(images, Stub(), batch_size=2))
    assert np.allclose(mu, 0) and np.allclose(sigma, 1)                          # ddof 0 would give 2/3


# ---- input pipeline (items 12-15, checklist 5, 6, 13, 14) ----
def test_resize_modes_and_normalisation():
    ramp = torch.tensor([[0.0, 0.0], [255.0, 255.0]])[None, None]                 # rows 0 and 255
    assert torch.allclose(fid._tf1_resize(ramp, 4)[0, 0, :, 0] / 255, torch.tensor([0, 0.5, 1, 1.0]))
    x = ramp.to(torch.uint8).expand(1, 3, 2, 2)
    r = torch.arange(299, dtype=torch.float64)
    half_pixel = 2 * ((r + 0.5) * 2 / 299 - 0.5).clamp(0, 1) - 1                   # align_corners=False
    assert torch.allclose(fid.preprocess(x)[0, 0, :, 7].double(), half_pixel, atol=1e-6)
    tf1 = (255 * (r * 2 / 299).clamp(max=1) - 128) / 128                          # src = dst * in/out
    assert torch.allclose(fid.preprocess(x, "tf1")[0, 0, :, 7].double(), tf1, atol=1e-4)
    ends = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 1, 2)
    assert fid.preprocess(ends, resize=False)[0, 0, 0].tolist() == [-1.0, 1.0]
    assert fid.preprocess(ends, "tf1", resize=False)[0, 0, 0].tolist() == [-1.0, 0.9921875]
    assert fid.preprocess(ends.float() / 255, resize=False)[0, 0, 0].tolist() == [-1.0, 1.0]   # [0, 1] floats
    img = torch.randint(0, 256, (1, 3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    clean = fid._clean_resize(img.float(), 299)
    assert clean.min() >= 0 and clean.max() <= 255 and (clean != clean.round()).any()   # no re-quantisation
    assert torch.allclose(fid._clean_resize(torch.full((1, 1, 9, 9), 200.0), 299), torch.tensor(200.0))


def test_quantize_equals_save_image_png_path(tmp_path, state_dict):
    x = torch.rand(3, 3, 75, 75, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2   # out of range too
    assert fid.quantize(torch.tensor([-1.5, -1.0, 0.0, 1.0, 0.999])).tolist() == [0, 0, 128, 255, 255]
    for i, img in enumerate(x):
        torchvision.utils.save_image(img, tmp_path / f"{i}.png", normalize=True, value_range=(-1, 1))
    loaded = torch.stack([fid.ImageFiles(fid.list_images(tmp_path))[i] for i in range(3)])
    assert torch.equal(fid.quantize(x), loaded)
    m = net(state_dict, dims=192)
    assert np.array_equal(fid.activations(fid.quantize(x), m), fid.activations(loaded, m))


def test_batch_invariance_on_cpu(state_dict):
    m = net(state_dict, dims=64, resize=True)      # at 299, as in use (75x75 picks batch-dependent kernels)
    x = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    assert np.array_equal(fid.activations(x, m, batch_size=3), fid.activations(x, m, batch_size=1))


def test_image_types_and_folder_scan(tmp_path):
    white = torch.ones(3, 24, 24)
    for ext in fid.IMAGE_EXTENSIONS:
        torchvision.utils.save_image(white, tmp_path / f"w.{ext}")
    torchvision.io.write_png(torch.full((1, 24, 24), 255, dtype=torch.uint8), str(tmp_path / "gray.png"))
    torchvision.io.write_png(torch.zeros(3, 24, 24, dtype=torch.uint8), str(tmp_path / "upper.PNG"))
    (tmp_path / "notes.txt").write_text("x")
    files = fid.list_images(tmp_path)
    assert [f.name for f in files] == sorted(["gray.png"] + [f"w.{e}" for e in fid.IMAGE_EXTENSIONS])
    ds = fid.ImageFiles(files)
    for i in range(len(ds)):
        assert ds[i].shape == (3, 24, 24) and ds[i].dtype == torch.uint8 and (ds[i] == 255).all(), files[i]
    assert len(fid.list_images(tmp_path, ignore_case=True)) == len(files) + 1


def test_exact_fp32_disables_tf32_and_restores_flags():
    b = torch.backends
    flags = lambda: (b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision,   # noqa: E731
                     b.cudnn.deterministic, b.cudnn.benchmark)
    before = flags()
    with fid.exact_fp32():
        assert (b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision) == ("ieee", "ieee")
        assert b.cudnn.deterministic and not b.cudnn.benchmark
    assert flags() == before
    with fid.exact_fp32(allow_tf32=True):
        assert b.cudnn.conv.fp32_precision == before[1]


def test_missing_weights_offline_error(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(*a, **k):
        raise OSError("Network is unreachable")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FileNotFoundError) as e:
        fid.build_inception()
    msg = str(e.value)
    assert fid.FID_WEIGHTS_FILE in msg and "--weights" in msg and "fid_weights" in msg
    assert str(tmp_path) in msg
    with pytest.raises(FileNotFoundError, match="--weights"):
        fid.build_inception(str(tmp_path / "nope.pth"))


# ---- IS, KID, P&R, bias (items 16-19, checklist 15-18) ----
def test_inception_score_closed_forms(state_dict):
    assert abs(fid.inception_score(np.tile(np.random.RandomState(0).randn(1, 1008), (50, 1)))[0] - 1) < 1e-10
    onehot = 100.0 * np.eye(1008)[np.arange(40) % 4]                     # 4 classes, balanced in each split
    mean, std = fid.inception_score(onehot, splits=10, shuffle=False)
    assert abs(mean - 4) < 1e-6 and std < 1e-6
    m = net(state_dict)
    feats = np.random.RandomState(1).rand(5, 2048)
    with torch.no_grad():
        biased = m.fc(torch.from_numpy(feats).float()).double().numpy()
    assert np.allclose(biased - fid.logits_unbiased(feats, m), state_dict["fc.bias"].numpy()[None], atol=1e-5)


def test_kid_estimator():
    rs = np.random.RandomState(0)
    x, y = rs.randn(6, 5), rs.randn(6, 5) + 0.3
    k = lambda a, b: (a @ b / 5 + 1) ** 3                                # noqa: E731
    m = 6
    loop = (sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
            - 2 * sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m ** 2)
    assert rel(fid.mmd2_poly(x, y), loop) < 1e-10
    kxx = k(x, x.T)
    s_off, s_diag = kxx.sum() - np.trace(kxx), np.trace(kxx)
    closed = 2 * (s_off / (m ** 2 * (m - 1)) - s_diag / m ** 2)
    assert rel(fid.mmd2_poly(x, x), closed) < 1e-10 and closed < 0
    a, b = rs.randn(400, 16), rs.randn(400, 16)
    mean, std = fid.kid(a, b, subsets=20, subset_size=100)
    assert abs(mean) < 3 * std / np.sqrt(20) + 1e-12
    shifted, _ = fid.kid(a, b + 1.0, subsets=20, subset_size=100)
    assert shifted > 10 * std
    assert fid.kid(a, b, subsets=3, subset_size=100) == fid.kid(a, b, subsets=3, subset_size=100)   # seeded
    with pytest.raises(ValueError):
        fid.kid(a[:50], b, subset_size=100)


def test_precision_recall_extremes():
    rs = np.random.RandomState(0)
    x = rs.randn(60, 8)
    assert fid.precision_recall(x, x, k=3) == (1.0, 1.0, 1.0)
    p, r, f = fid.precision_recall(x, rs.randn(60, 8) + 100, k=3, batch=7)
    assert (p, r) == (0.0, 0.0) and f == 0.0


def test_sample_size_bias_and_fid_infinity():
    rs = np.random.RandomState(0)
    fids = {n: fid.frechet_distance(*fid.statistics(rs.randn(n, 64)), *fid.statistics(rs.randn(n, 64)))
            for n in (500, 2000)}
    assert all(1900 <= n * v <= 2500 for n, v in fids.items()), fids    # ~ (d^2/2 + 2d) / N
    assert 3.2 <= fids[500] / fids[2000] <= 4.8
    ns = np.linspace(5000, 50000, 15).astype(int)
    assert rel(fid.fit_fid_infinity(ns, 3 + 200 / ns), 3.0) < 1e-9
    feats = rs.randn(3000, 8)
    assert abs(fid.fid_infinity(feats, np.zeros(8), np.eye(8), lo=300)) < 0.02


# ---- CLI and training hook (item 11, checklist 11, 12, 21) ----
def cli(*args):
    return fid.main([*map(str, args), "--device", "cpu", "--num-workers", "0"])


def test_cli_defaults_match_pytorch_fid():
    a = fid.parse_args(["x", "y"])
    assert (a.batch_size, a.dims, a.mode, a.fd_method, a.seed) == (50, 2048, "pytorch-fid", "sqrtm", 2020)
    assert a.num_workers == min(8, len(os.sched_getaffinity(0)))
    assert a.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert (a.isc_splits, a.kid_subsets, a.kid_subset_size, a.prc_k) == (10, 100, 1000, 3)


def test_cli_folders_npz_and_save_stats(tmp_path, weights, state_dict, capsys, monkeypatch):
    a_imgs, b_imgs = write_pngs(tmp_path / "a", 70, 32, seed=1), write_pngs(tmp_path / "b", 70, 32, seed=2)
    flags = ["--weights", weights, "--dims", 64, "--no-resize"]
    res = cli(tmp_path / "a", tmp_path / "b", *flags, "--kid", "--kid-subsets", 3, "--kid-subset-size", 20,
              "--prc", "--fid-inf")
    out = capsys.readouterr().out
    assert "FID:  " in out and "mode pytorch-fid" in out and "N 70 vs 70" in out and "sqrtm" in out
    assert f"ref {tmp_path / 'b'}" in out
    assert f"weights {fid.sha256_prefix(weights)}" in out and "KID:  " in out and "PRC:  " in out
    m = net(state_dict, dims=64)
    sa, sb = fid.statistics(fid.activations(a_imgs, m)), fid.statistics(fid.activations(b_imgs, m))
    assert res["fid"] == fid.frechet_distance(*sa, *sb) and res["fid"] > 0
    assert res["kid_mean"] == fid.kid(fid.activations(a_imgs, m), fid.activations(b_imgs, m), 3, 20)[0]
    stats = tmp_path / "b.npz"
    cli(tmp_path / "b", stats, "--save-stats", *flags)
    with np.load(stats) as f:
        assert sorted(f.files) == ["mu", "sigma"] and np.array_equal(f["mu"], sb[0])
        assert np.array_equal(f["sigma"], sb[1])
    with pytest.raises(FileExistsError):
        cli(tmp_path / "a", stats, "--save-stats", *flags)
    np.savez(tmp_path / "samples_70.npz", images=a_imgs.permute(0, 2, 3, 1).numpy())    # --export-samples
    assert cli(tmp_path / "samples_70.npz", stats, *flags)["fid"] == res["fid"]
    grey = a_imgs[:, :1]                        # a grayscale export (MNIST-like scripts) reads as RGB
    np.savez(tmp_path / "grey.npz", images=grey.permute(0, 2, 3, 1).numpy())
    np.savez(tmp_path / "grey3.npz", images=grey.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy())
    assert cli(tmp_path / "grey.npz", stats, *flags)["fid"] == cli(tmp_path / "grey3.npz", stats, *flags)["fid"]
    monkeypatch.setattr(fid, "resolve_weights", lambda w=None: pytest.fail("two npz need no network"))
    assert abs(cli(stats, stats)["fid"]) < 1e-8
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA not available; pass --device cpu"):
            fid.main([str(stats), str(stats), "--device", "cuda"])


def test_cli_inception_score_single_path(tmp_path, weights):
    write_pngs(tmp_path / "g", 6, seed=3)
    res = cli(tmp_path / "g", "--isc", "--isc-splits", 2, "--weights", weights, "--no-resize")
    assert "fid" not in res and res["is_mean"] >= 1.0 and np.isfinite(res["is_std"])
    with pytest.raises(SystemExit):
        cli(tmp_path / "g", "--isc", "--dims", 64, "--weights", weights, "--no-resize")


def test_fid_for_training_matches_api_and_caches(tmp_path, weights, state_dict, monkeypatch, capsys):
    root = tmp_path / "imgs"
    ref = torch.cat([write_pngs(root / "a", 40, 32, seed=4), write_pngs(root / "b", 40, 32, seed=5)])
    monkeypatch.setattr(fid, "build_inception", functools.partial(fid.build_inception, dims=64, resize=False))
    gen = torch.rand(70, 1, 32, 32, generator=torch.Generator().manual_seed(6)) * 2 - 1   # grayscale G
    drawn = []

    def sample_fn(n):
        drawn.append(n)
        return gen[sum(drawn) - n:sum(drawn)]
    args = (sample_fn, f"folder:{root}", str(tmp_path / "data"), None, 70, "cpu")
    value = fid.fid_for_training(*args, weights=weights)
    assert drawn == [50, 20]
    m = net(state_dict, dims=64)
    gen_rgb = fid.quantize(gen).expand(-1, 3, -1, -1)
    expected = fid.frechet_distance(*fid.statistics(fid.activations(gen_rgb, m)),
                                    *fid.statistics(fid.activations(ref, m)))
    assert value == expected
    cached = list((tmp_path / "data" / "fid_stats").iterdir())
    assert len(cached) == 1 and "-native-all-pytorch-fid-noresize-d64-w" in cached[0].name
    assert "N_gen 70 vs N_ref 80" in capsys.readouterr().out
    monkeypatch.setattr(common, "load_dataset", lambda *a, **k: pytest.fail("cache not used"))
    drawn.clear()
    assert fid.fid_for_training(*args, weights=weights) == value
    monkeypatch.undo()
    monkeypatch.setattr(fid, "build_inception", functools.partial(fid.build_inception, dims=64, resize=False))
    drawn.clear()
    v1 = fid.fid_for_training(*args, weights=weights, cache_dir=str(tmp_path / "c"), class_label=1)
    (path,) = (tmp_path / "c").iterdir()
    with np.load(path) as f:
        assert "class1" in path.name and int(f["n"]) == 40
        assert np.allclose(f["mu"], fid.statistics(fid.activations(ref[40:], m))[0])
    assert np.isfinite(v1)


# ---- Lucic et al. tools (items 20-21, checklist 19-20) ----
def test_triangles_generator_and_approximate_precision_recall():
    imgs = fid.make_polygons(200, seed=0)
    assert imgs.shape == (200, 28, 28) and imgs.min() >= 0 and imgs.max() <= 1
    assert (imgs[:, 0, 0] == 1).all() and (imgs[:, -1, -1] == 1).all()      # white background
    assert 0.05 < (1 - imgs).mean() < 0.6 and np.array_equal(imgs, fid.make_polygons(200, seed=0))
    splits = [(r.start, r.stop) for r in fid.polygon_splits(80_000)]
    assert splits == [(0, 60000), (60000, 70000), (70000, 80000)]
    assert [len(r) for r in fid.polygon_splits(200)] == [150, 25, 25]
    full = fid.render_polygons([[[-5, -5], [-5, 40], [40, 40], [40, -5]]])[0]    # covers the whole grid
    assert (full[1:, 1:] == 0).all() and full[0, 5] == 3 / 8                 # row 0 reaches 3 rows outside
    half = fid.render_polygons([[[-5, -5], [40, 40], [-5, 40]]])[0]          # (row, col): above the diagonal
    assert half[20, 2] == 1 and half[2, 20] == 0
    noise = np.random.RandomState(0).rand(20, 28, 28)
    squares = fid.make_polygons(50, n_vertices=4, seed=1)
    assert (fid.polygon_distance(imgs[:50]) < 5.0).mean() >= 0.95 and (fid.polygon_distance(noise) > 5).all()
    assert (fid.polygon_distance(squares) > 5.0).mean() >= 0.9
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(4, 784), nn.Tanh())
    target = ((G(torch.rand(3, 4) * 2 - 1) + 1) / 2).detach().numpy()
    dist = fid.invert_distance(G, target, 4, steps=150, lr=0.05, restarts=2)
    assert (dist < 0.5).all() and (fid.invert_distance(G, 1 - target, 4, steps=20, restarts=1) > 5).all()
    p, r, f1 = fid.approx_prf(G, 4, target, n_gen=10, steps=150, lr=0.05, restarts=2)
    assert p == 0.0 and r == 1.0 and f1 == 0.0                               # noise-like G: off the manifold


def test_triangles_and_bench_tools(tmp_path, weights):
    fid.main(["triangles", str(tmp_path / "tri"), "--n", "16"])
    counts = {d: len(os.listdir(tmp_path / "tri" / d)) for d in ("train", "test", "holdout")}
    assert counts == {"train": 12, "test": 2, "holdout": 2}
    x, _ = common.load_dataset(f"folder:{tmp_path / 'tri' / 'train'}")[0]    # a training script's view
    assert x.shape == (3, 28, 28) and x.max() == 1.0
    res = fid.main(["bench", "--weights", weights, "--device", "cpu", "--n-images", "1", "--batch-size", "1",
                    "--img-size", "8", "--d", "16", "--n-features", "200"])
    assert res["rel_diff_eig"] < 1e-10 and res["rel_diff_eigh"] < 1e-10 and res["ours_img_s"] > 0
    pytest.importorskip("pytorch_fid")                                        # dev-only extra
    import bench_pytorch_fid
    args = fid.parse_tool_args(["bench", "--weights", weights, "--device", "cpu", "--n-images", "2", "--batch-size", "1",
                           "--img-size", "8", "--d", "16", "--n-features", "200"])
    res = fid.bench(args, others=bench_pytorch_fid.pytorch_fid_net(args))
    assert res["max_abs_feature_diff_pytorch_fid"] == 0.0 and res["pytorch_fid_img_s"] > 0


def test_hparam_sampler_budget_curve_and_reports(tmp_path, capsys):
    for model, defaults in fid.AUTHOR_DEFAULTS.items():
        wide = fid.sample_hparams(model, "wide", 50, seed=1)
        assert wide[0] == defaults and wide == fid.sample_hparams(model, "wide", 50, seed=1)
        assert all(1e-5 <= h["lr"] <= 1e-2 for h in wide)
        if model != "vae":
            assert {h["disc_iters"] for h in wide[1:]} == {1, 5}
        narrow = fid.sample_hparams(model, "narrow", 30, seed=2)[1:]
        assert all(1e-4 <= h["lr"] <= 1e-3 and h["beta1"] == 0.5 for h in narrow)
        assert all(not h["batch_norm"] for h in narrow) == (model in ("wgan_gp", "dragan"))
    wgan_gp = dict(beta1=0.5, lr=1e-4, disc_iters=5, batch_norm=False, lambda_=10.0)
    assert fid.AUTHOR_DEFAULTS["wgan_gp"] == wgan_gp
    fids = np.random.RandomState(0).uniform(20, 80, 30)
    mean, lo, hi = fid.budget_curve(fids, resamples=500)
    assert (np.diff(mean) <= 0).all() and abs(mean[0] - fids.mean()) < 3 and mean[-1] >= fids.min()
    assert (lo <= mean).all() and (mean <= hi).all()
    runs = []
    for seed, vals in ((0, [50.0, 40.0, 45.0]), (1, [42.0, 38.0])):
        d = tmp_path / f"wgan_gp-shapes-s{seed}"
        d.mkdir()
        (d / "args.json").write_text(json.dumps({"seed": seed, "lr": 1e-4, "out_dir": str(d)}))
        lines = [json.dumps({"step": i, "fid": v}) for i, v in enumerate(vals)]
        (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        runs.append(str(d))
    rows = fid.main(["collect", *runs])
    assert [r["fid"] for r in rows] == [40.0, 38.0] and rows[0]["setting_id"] == rows[1]["setting_id"]
    assert rows[0]["model"] == "wgan_gp"
    (tmp_path / "runs.csv").write_text(capsys.readouterr().out)
    report = fid.main(["seed-report", str(tmp_path / "runs.csv")])
    assert report[0]["n"] == 2 and report[0]["min"] == 38.0 and report[0]["median"] == 39.0
    curve = fid.main(["budget-curve", str(tmp_path / "runs.csv"), "--resamples", "200"])
    assert curve["wgan_gp"][-1] <= curve["wgan_gp"][0]
    assert fid.main(["sample-hparams", "wgan_gp", "wide", "--n", "2"])[0]["lambda_"] == 10.0


# ---- card 8.2: parity with pytorch-fid (a test-only extra; skipped when absent) ----
def test_pytorch_fid_parity(tmp_path, weights, state_dict, monkeypatch):
    pytest.importorskip("pytorch_fid")
    from pytorch_fid import fid_score, inception
    monkeypatch.setattr(inception, "load_state_dict_from_url", lambda *a, **k: state_dict)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        theirs = inception.InceptionV3([3]).eval()(x)[0].flatten(1).numpy()
    assert np.abs(theirs - fid.activations(x, fid.build_inception(weights))).max() == 0.0
    s1, s2 = spd_stats(64, 320, 8), spd_stats(64, 320, 9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)             # their sqrtm(disp=False)
        ref = fid_score.calculate_frechet_distance(*s1, *s2)
        for method in ("sqrtm", "eig", "eigh"):
            assert rel(fid.frechet_distance(*s1, *s2, method=method), ref) < 1e-10
        write_pngs(tmp_path / "a", 10, size=16, seed=10)        # singular covariances: same number
        write_pngs(tmp_path / "b", 10, size=16, seed=11)
        paths = [str(tmp_path / "a"), str(tmp_path / "b")]
        theirs = fid_score.calculate_fid_given_paths(paths, 50, "cpu", 64, 0)
    ours = cli(tmp_path / "a", tmp_path / "b", "--weights", weights, "--dims", 64)["fid"]
    assert rel(ours, theirs) < 1e-10


def test_torch_fidelity_parity_tf1(weights):
    pytest.importorskip("torch_fidelity")
    from torch_fidelity import metric_isc, metric_kid
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(12))
    fe = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                     feature_extractor_weights_path=weights).eval()
    with torch.no_grad():
        pool3, unbiased = (t.double().numpy() for t in fe(x))
    m = fid.build_inception(weights, mode="tf1")
    ours = fid.activations(x, m)
    assert np.abs(ours - pool3).max() <= 1e-6 * np.abs(pool3).max()         # measured: 0.0
    assert np.abs(fid.logits_unbiased(ours, m) - unbiased).max() <= 1e-6 * np.abs(unbiased).max()
    rs = np.random.RandomState(0)
    logits, f1, f2 = rs.randn(200, 1008) * 3, rs.randn(300, 64), rs.randn(300, 64) + 0.1
    theirs = metric_isc.isc_features_to_metric(torch.from_numpy(logits), splits=10, shuffle=True,
                                               rng_seed=2020)
    assert rel(fid.inception_score(logits)[0], theirs["inception_score_mean"]) < 1e-10
    theirs = metric_kid.kid_features_to_metric(torch.from_numpy(f1), torch.from_numpy(f2), kid_subsets=10,
                                               kid_subset_size=100, kid_degree=3, kid_gamma=None, kid_coef0=1,
                                               rng_seed=2020, verbose=False)
    assert rel(fid.kid(f1, f2, 10, 100)[0], theirs["kernel_inception_distance_mean"]) < 1e-10


def test_clean_fid_parity():
    resize = pytest.importorskip("cleanfid.resize")
    cleanfid = pytest.importorskip("cleanfid.fid")
    x = np.random.RandomState(0).randint(0, 256, (20, 24, 3)).astype(np.uint8)       # HWC, not square
    theirs = resize.make_resizer("PIL", False, "bicubic", (299, 299))(x)
    ours = fid.preprocess(torch.from_numpy(x).permute(2, 0, 1)[None], "clean")[0].permute(1, 2, 0).numpy()
    assert np.array_equal(ours, (theirs - 128) / 128)
    rs = np.random.RandomState(1)
    f1, f2 = rs.randn(300, 64), rs.randn(300, 64) + 0.1
    s1, s2 = fid.statistics(f1), fid.statistics(f2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert rel(fid.frechet_distance(*s1, *s2), cleanfid.frechet_distance(*s1, *s2)) < 1e-10
    np.random.seed(3)                      # clean-fid draws from the global RNG, set 2 before set 1
    theirs = cleanfid.kernel_distance(f1, f2, num_subsets=10, max_subset_size=100)
    assert rel(fid.kid(f2, f1, 10, 100, seed=3)[0], theirs) < 1e-10


# ---- the copy-paste promise: fid.py + common.py alone ----
def test_fid_runs_alone(tmp_path, weights):
    for f in ("fid.py", "common.py"):
        shutil.copy(ROOT / f, tmp_path / f)
    write_pngs(tmp_path / "a", 70, 32, seed=12)
    write_pngs(tmp_path / "b", 70, 32, seed=13)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": ""}
    run = dict(cwd=tmp_path, env=env, check=True, timeout=240, capture_output=True, text=True)
    out = subprocess.run([sys.executable, "fid.py", "--help"], **run).stdout
    assert "usage:" in out and "--fd-method" in out and "sample-hparams" in out
    out = subprocess.run([sys.executable, "fid.py", "a", "b", "--weights", weights, "--dims", "64",
                          "--no-resize", "--num-workers", "0"], **run).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("FID:  "))
    assert float(line.split()[1]) > 0 and "N 70 vs 70" in line
