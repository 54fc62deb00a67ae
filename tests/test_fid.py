"""fid.py (card 8.1 and 8.2): network layout and TF patches, closed forms of every metric, the
input pipeline, parity with pytorch-fid, torch-fidelity and clean-fid (development requirements:
these tests never skip), the CLI and its refusals (issue 13), TrainingFID (the --fid-every
contract) and the Lucic study tools. No real weight file is needed: a random state dict in the
published layout stands in for it. Small inputs (75x75 without resizing, the 64-d tap) keep the
file around a minute of CPU."""
import functools
import inspect
import os
import re
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
import scipy.spatial
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import common
import fid

ROOT = Path(__file__).resolve().parent.parent
PROGRESS = r"features \S+ (\d+)/\1 \(100%\) \| [\d.e+]+ img/s \| 0:00:\d\d elapsed \| eta 0:00:00"


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


def cli(*args):
    return fid.main([*map(str, args), "--device", "cpu", "--num-workers", "0"])


def fid_of(m, a, b):
    return fid.frechet_distance(*fid.statistics(fid.activations(a, m)),
                                *fid.statistics(fid.activations(b, m)))


# ---- network (card 8.1 items 1-3, checklist 1-4, 7) ----
def test_key_layout_loads_published_file_layout_strictly(weights, state_dict, tmp_path):
    sd = torch.load(weights, weights_only=True)
    assert len(sd) == 566 and sum(k.endswith("num_batches_tracked") for k in sd) == 94
    assert sd["fc.weight"].shape == (1008, 2048) and sd["fc.bias"].shape == (1008,)
    assert sd["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert not any(k.startswith("AuxLogits") for k in sd)
    per = {}
    for k in sd:
        per[k.split(".")[0]] = per.get(k.split(".")[0], 0) + 1
    assert per["Conv2d_1a_3x3"] == 6 and per["Mixed_5b"] == 42 and per["Mixed_6a"] == 24
    assert per["Mixed_6e"] == 60 and per["Mixed_7a"] == 36 and per["Mixed_7c"] == 54
    assert per["fc"] == 2
    m = fid.build_inception(weights)
    key = "Mixed_7c.branch_pool.conv.weight"
    assert torch.equal(m.Mixed_7c.branch_pool.conv.weight, state_dict[key])
    assert len(m.weights_hash) == 8 and not m.training
    without = {k: v for k, v in sd.items() if "num_batches" not in k}                # 472 keys
    meta_net().load_state_dict(without, strict=True, assign=True)
    torch.save({k: v for k, v in sd.items() if k != "fc.bias"}, tmp_path / "partial.pth")
    with pytest.raises(common.UserError, match="not an FID Inception state dict.*fc.bias"):
        fid.build_inception(str(tmp_path / "partial.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a zip")
    with pytest.raises(common.UserError, match="junk.pth is not an FID Inception state dict"):
        fid.build_inception(str(tmp_path / "junk.pth"))
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
        x = torch.randn(2, 3, 75, 75)
        taps = list(m.taps(x))
        for dims, t in zip(fid.DIMS, taps):                             # spatial taps averaged
            m.dims = dims
            assert torch.allclose(m(x), t.mean((2, 3)), atol=1e-6)


def identity_bn(module):
    for b in module.modules():
        if isinstance(b, nn.BatchNorm2d):
            b.running_mean.zero_(), b.running_var.fill_(1 - b.eps)
            b.weight.data.fill_(1), b.bias.data.zero_()


def test_pool_patches_are_live(state_dict):
    blocks = [fid.FIDInceptionA(2, pool_features=2), fid.FIDInceptionC(2, channels_7x7=2),
              fid.FIDInceptionE(2, max_pool=False)]
    stock = torchvision.models.inception.InceptionA(2, pool_features=2).eval()
    x = torch.full((1, 2, 5, 5), 3.0)
    for blk in blocks + [stock]:
        identity_bn(blk.eval())
        blk.branch_pool.conv.weight.data.zero_()
        blk.branch_pool.conv.weight.data[:2, :2] = torch.eye(2)[:, :, None, None]
    n_pool = blk.branch_pool.conv.out_channels
    with torch.no_grad():
        for blk in blocks:                              # count_include_pad=False: the constant
            out = blk(x)[:, -blk.branch_pool.conv.out_channels:][:, :2]
            assert torch.allclose(out, x, atol=1e-5), type(blk)
        assert abs(stock(x)[0, -n_pool, 0, 0] - 3.0 * 4 / 9) < 1e-4   # torchvision counts padding
    e = fid.FIDInceptionE(2, max_pool=True).eval()
    x = torch.rand(1, 2, 5, 5) + 0.1
    padded = F.pad(x[0, 0], (1, 1, 1, 1), value=-1.0)
    hand_max = torch.tensor([[padded[i:i + 3, j:j + 3].max() for j in range(5)] for i in range(5)])
    identity_bn(e)
    e.branch_pool.conv.weight.data.zero_()
    e.branch_pool.conv.weight.data[0, 0] = 1
    with torch.no_grad():
        assert torch.allclose(e(x)[0, -192], hand_max, atol=1e-5)     # Mixed_7c: max (patch 2)
    m = net(state_dict)
    assert m.Mixed_7c.max_pool and not m.Mixed_7b.max_pool
    assert all(type(getattr(m, f"Mixed_{b}")) is fid.FIDInceptionA for b in ("5b", "5c", "5d"))
    assert all(type(getattr(m, f"Mixed_6{b}")) is fid.FIDInceptionC for b in "bcde")


# ---- Frechet distance (items 4-9, checklist 9-10) ----
def spd_stats(d, n, seed):
    rs = np.random.RandomState(seed)
    x = rs.standard_normal((n, d)) @ rs.standard_normal((d, d)) / np.sqrt(d) + rs.rand(d)
    return fid.statistics(x)


def test_frechet_closed_forms():
    mu, sigma = spd_stats(64, 320, 0)
    for method in ("sqrtm", "eig", "eigh"):
        assert abs(fid.frechet_distance(mu, sigma, mu, sigma, method)) < 1e-8
        d = 128  # pytorch-fid's own test uses 2048; sqrtm of I_2048 takes a minute on this CPU
        eye = np.eye(d)
        assert rel(fid.frechet_distance(np.zeros(d), eye, np.ones(d), eye, method), d) < 1e-10
        rs = np.random.RandomState(1)
        a, b, m1, m2 = rs.rand(16) + 0.1, rs.rand(16) + 0.1, rs.randn(16), rs.randn(16)
        closed = ((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
        assert rel(fid.frechet_distance(m1, np.diag(a), m2, np.diag(b), method), closed) < 1e-10
    assert rel(fid.frechet_distance(1.0, 4.0, 3.0, 1.0), (1 - 3) ** 2 + (2 - 1) ** 2) < 1e-12
    with pytest.raises(ValueError):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


@pytest.mark.parametrize("d,n,tol", [(64, 320, 1e-11), (128, 640, 1e-11), (64, 40, 1e-6)])
def test_eigenvalue_routes_match_sqrtm(d, n, tol):         # last: rank-deficient (N < d)
    s1, s2 = spd_stats(d, n, 2), spd_stats(d, n, 3)
    ref = fid.frechet_distance(*s1, *s2, method="sqrtm")
    for method in ("eig", "eigh"):
        assert rel(fid.frechet_distance(*s1, *s2, method=method), ref) < tol


def test_complex_cast_and_imaginary_guard(monkeypatch, capsys):
    s1, s2, mu = np.diag([4.0, 1.0, -1e-18]), np.eye(3), np.zeros(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.isnan(np.sqrt(np.linalg.eigvals(s1 @ s2)).sum())        # without the cast: NaN
    assert np.isfinite(fid.frechet_distance(mu, s1, mu, s2, "eig"))
    bad = np.diag([-1.0, 1.0])                                           # imaginary diagonal 1
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
    eps = 1e-6 * np.eye(8)
    assert np.allclose(calls[1], (s1 + eps) @ (s2 + eps), rtol=0, atol=1e-15)
    assert "adding 1e-06 to diagonal" in capsys.readouterr().out


def test_statistics_use_n_minus_1_and_refuse_one_image():
    class Stub(nn.Module):                 # per-image channel means of the normalised input
        mode, resize, dims = "pytorch-fid", False, 3

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return x.mean((2, 3))
    images = torch.stack([torch.full((3, 4, 4), v) for v in (0.0, 0.5, 1.0)])   # -> -1, 0, 1
    mu, sigma = fid.statistics(fid.activations(images, Stub(), batch_size=2))
    assert np.allclose(mu, 0) and np.allclose(sigma, 1)                     # ddof 0: 2/3
    with pytest.raises(common.UserError, match="1 image"):
        fid.statistics(np.ones((1, 3)))


# ---- input pipeline (items 12-15, checklist 5, 6, 13, 14) ----
def test_resize_modes_and_normalisation():
    ramp = torch.tensor([[0.0, 0.0], [255.0, 255.0]])[None, None]                 # rows 0, 255
    assert torch.allclose(fid._tf1_resize(ramp, 4)[0, 0, :, 0] / 255, torch.tensor([0, .5, 1, 1]))
    x = ramp.to(torch.uint8).expand(1, 3, 2, 2)
    r = torch.arange(299, dtype=torch.float64)
    half_pixel = 2 * ((r + 0.5) * 2 / 299 - 0.5).clamp(0, 1) - 1                   # align False
    assert torch.allclose(fid.preprocess(x)[0, 0, :, 7].double(), half_pixel, atol=1e-6)
    assert torch.equal(fid.preprocess(x), 2 * F.interpolate(
        x.float() / 255, size=(299, 299), mode="bilinear", align_corners=False) - 1)
    tf1 = (255 * (r * 2 / 299).clamp(max=1) - 128) / 128                          # dst * in/out
    assert torch.allclose(fid.preprocess(x, "tf1")[0, 0, :, 7].double(), tf1, atol=1e-4)
    ends = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 1, 2)
    assert fid.preprocess(ends, resize=False)[0, 0, 0].tolist() == [-1.0, 1.0]
    assert fid.preprocess(ends, "tf1", resize=False)[0, 0, 0].tolist() == [-1.0, 0.9921875]
    assert fid.preprocess(ends.float() / 255, resize=False)[0, 0, 0].tolist() == [-1.0, 1.0]
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (1, 3, 20, 20), dtype=torch.uint8, generator=g)
    clean = fid._clean_resize(img.float(), 299)
    assert clean.min() >= 0 and clean.max() <= 255 and (clean != clean.round()).any()  # float
    assert torch.allclose(fid._clean_resize(torch.full((1, 1, 9, 9), 200.0), 299),
                          torch.tensor(200.0))


def test_quantize_equals_save_image_png_path(tmp_path, state_dict):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 75, 75, generator=g) * 2.4 - 1.2                        # out of range
    q = fid.quantize(torch.tensor([-1.5, -1.0, 0.0, 1.0, 0.999, 0.0039]))
    assert q.tolist() == [0, 0, 128, 255, 255, 128]                               # rounds
    for i, img in enumerate(x):
        torchvision.utils.save_image(img, tmp_path / f"{i}.png", normalize=True,
                                     value_range=(-1, 1))
    loaded = torch.stack([fid.read_images(fid.list_images(tmp_path))[0][i] for i in range(3)])
    assert torch.equal(fid.quantize(x), loaded)
    assert torch.equal(fid.quantize(x * 127.5 + 127.5, 0, 255), loaded)
    m = net(state_dict, dims=192)
    assert np.array_equal(fid.activations(fid.quantize(x), m), fid.activations(loaded, m))


def test_batch_invariance_on_cpu(state_dict):
    m = net(state_dict, dims=64, resize=True)      # at 299 as in use (75x75 picks other kernels)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=g)
    assert np.array_equal(fid.activations(x, m, batch_size=3), fid.activations(x, m, batch_size=1))


def test_image_types_and_folder_scan(tmp_path):
    white = torch.ones(3, 24, 24)
    for ext in fid.IMAGE_EXTENSIONS:
        torchvision.utils.save_image(white, tmp_path / f"w.{ext}")
    torchvision.io.write_png(torch.full((1, 24, 24), 255, dtype=torch.uint8),
                             str(tmp_path / "gray.png"))
    torchvision.io.write_png(torch.zeros(3, 24, 24, dtype=torch.uint8), str(tmp_path / "up.PNG"))
    (tmp_path / "notes.txt").write_text("x")
    files = fid.list_images(tmp_path)
    assert [f.name for f in files] == sorted(["gray.png"] + [f"w.{e}" for e in
                                                          fid.IMAGE_EXTENSIONS])
    x, bad = fid.read_images(files)
    assert x.shape == (len(files), 3, 24, 24) and x.dtype == torch.uint8 and not bad
    assert (x == 255).all()
    assert len(fid.list_images(tmp_path, ignore_case=True)) == len(files) + 1
    (tmp_path / "bad.png").write_bytes(b"not a png")
    x, bad = fid.read_images([files[0], tmp_path / "bad.png"])
    assert len(x) == 1 and len(bad) == 1 and bad[0].startswith(str(tmp_path / "bad.png"))


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
    with pytest.raises(common.UserError) as e:
        fid.build_inception()
    msg = str(e.value)
    assert fid.FID_WEIGHTS_FILE in msg and "--weights" in msg and "fid_weights" in msg
    assert str(tmp_path) in msg
    with pytest.raises(common.UserError, match="--weights"):
        fid.build_inception(str(tmp_path / "nope.pth"))


# ---- IS, KID, P&R, bias (items 16-19, checklist 15-18) ----
def test_inception_score_closed_forms(state_dict):
    same = np.tile(np.random.RandomState(0).randn(1, 1008), (50, 1))
    assert abs(fid.inception_score(same)[0] - 1) < 1e-10
    onehot = 100.0 * np.eye(1008)[np.arange(40) % 4]                 # 4 classes, balanced
    mean, std = fid.inception_score(onehot, splits=10, shuffle=False)
    assert abs(mean - 4) < 1e-6 and std < 1e-6
    rs = np.random.RandomState(2)                                    # ddof 0 and i * N // 10
    logits = rs.randn(23, 1008) * 3
    lp = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)
    parts = [lp[i * 23 // 10:(i + 1) * 23 // 10] for i in range(10)]
    scores = [np.exp((np.exp(p) * (p - np.log(np.exp(p).mean(0)))).sum(1).mean()) for p in parts]
    expected = (np.mean(scores), np.std(scores))
    assert np.allclose(fid.inception_score(logits, shuffle=False), expected, rtol=1e-12)
    with pytest.raises(common.UserError, match="at least 10"):
        fid.inception_score(logits[:9])
    m = net(state_dict)
    feats = np.random.RandomState(1).rand(5, 2048)
    with torch.no_grad():
        biased = m.fc(torch.from_numpy(feats).float()).double().numpy()
    assert np.allclose(biased - fid.logits_unbiased(feats, m), state_dict["fc.bias"].numpy()[None],
                       atol=1e-5)


def test_kid_estimator():
    rs = np.random.RandomState(0)
    x, y = rs.randn(6, 5), rs.randn(6, 5) + 0.3
    k = lambda a, b: (a @ b / 5 + 1) ** 3                                # noqa: E731
    m = 6
    pairs = [(i, j) for i in range(m) for j in range(m)]
    loop = (sum(k(x[i], x[j]) + k(y[i], y[j]) for i, j in pairs if i != j) / (m * (m - 1))
            - 2 * sum(k(x[i], y[j]) for i, j in pairs) / m ** 2)
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
    assert fid.kid(a, b, subsets=3, subset_size=100) == fid.kid(a, b, subsets=3, subset_size=100)
    with pytest.raises(common.UserError, match="--kid-subset-size"):
        fid.kid(a[:50], b, subset_size=100)


def cdist_precision_recall(real, fake, k):
    """Kynkaanniemi et al. with scipy cdist, written out plainly (the reference)."""
    r_real = np.sort(scipy.spatial.distance.cdist(real, real), axis=1)[:, k]
    r_fake = np.sort(scipy.spatial.distance.cdist(fake, fake), axis=1)[:, k]
    p = (scipy.spatial.distance.cdist(fake, real) <= r_real[None]).any(1).mean()
    r = (scipy.spatial.distance.cdist(real, fake) <= r_fake[None]).any(1).mean()
    return p, r


def test_precision_recall_blocked_matmul_equals_cdist():
    rs = np.random.RandomState(0)
    x = rs.randn(60, 8)
    assert fid.precision_recall(x, x, k=3) == (1.0, 1.0, 1.0)
    p, r, f = fid.precision_recall(x, rs.randn(60, 8) + 100, k=3, batch=7)
    assert (p, r) == (0.0, 0.0) and f == 0.0
    a, b = rs.randn(300, 8), rs.randn(250, 8) * 1.2 + 0.3
    d = fid.distances(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    assert np.allclose(d, scipy.spatial.distance.cdist(a, b), rtol=1e-12, atol=0)
    ref = cdist_precision_recall(a, b, 3)
    assert 0.2 < ref[0] < 0.9 and 0.2 < ref[1] < 0.99                   # a non-trivial case
    for batch in (1000, 64, 29):                                        # 29: last block < k + 1
        p, r, f1 = fid.precision_recall(a, b, k=3, batch=batch)
        assert (p, r) == ref and rel(f1, 2 * p * r / (p + r)) < 1e-12


def test_sample_size_bias_and_fid_infinity():
    rs = np.random.RandomState(0)
    fids = {n: fid.frechet_distance(*fid.statistics(rs.randn(n, 64)),
                                    *fid.statistics(rs.randn(n, 64))) for n in (500, 2000)}
    assert all(1900 <= n * v <= 2500 for n, v in fids.items()), fids    # ~ (d^2/2 + 2d) / N
    assert 3.2 <= fids[500] / fids[2000] <= 4.8
    ns = np.linspace(5000, 50000, 15).astype(int)
    assert rel(fid.fit_fid_infinity(ns, 3 + 200 / ns), 3.0) < 1e-9
    feats = rs.randn(3000, 8)
    assert abs(fid.fid_infinity(feats, np.zeros(8), np.eye(8), lo=300)) < 0.02
    for n in (4999, 5000, 5013):                  # below, at, or too close above the lowest N
        with pytest.raises(common.UserError, match="FID_inf"):
            fid.fid_infinity(rs.randn(n, 2), np.zeros(2), np.eye(2))


# ---- CLI (item 11, checklist 11, 12, 21; issue 13) ----
def test_cli_defaults_match_pytorch_fid(monkeypatch):
    a = fid.parse_args(["x", "y"])
    assert (a.dims, a.mode, a.fd_method, a.seed) == (2048, "pytorch-fid", "sqrtm", 2020)
    assert a.num_workers == min(8, len(os.sched_getaffinity(0)))
    assert a.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert (a.isc_splits, a.kid_subsets, a.kid_subset_size, a.prc_k) == (10, 100, 1000, 3)
    sizes = []
    monkeypatch.setattr(fid, "_source", lambda p, args, m: sizes.append(args.batch_size) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        fid.main(["x", "y", "--device", "cpu"])
    assert sizes == [50]                                               # pytorch-fid's, on CPU
    with pytest.raises(SystemExit):
        fid.parse_args(["x", "y", "--batch-size", "0"])


def test_cli_folders_npz_and_save_stats(tmp_path, weights, state_dict, capsys, monkeypatch):
    a_imgs = write_pngs(tmp_path / "a", 70, 32, seed=1)
    b_imgs = write_pngs(tmp_path / "b", 70, 32, seed=2)
    flags = ["--weights", weights, "--dims", 64, "--no-resize"]
    res = cli(tmp_path / "a", tmp_path / "b", *flags, "--kid", "--kid-subsets", 3,
              "--kid-subset-size", 20, "--prc", "--fid-inf", "--fid-inf-min", 20)
    out = capsys.readouterr().out
    assert "FID:  " in out and "mode pytorch-fid" in out and "N 70 vs 70" in out
    assert f"ref {tmp_path / 'b'}" in out and "sqrtm" in out and "15 N in [20, 70]" in out
    assert f"weights {fid.sha256_prefix(weights)}" in out and "KID:  " in out and "PRC:  " in out
    assert re.search(PROGRESS, out) and "dims: the covariance" not in out      # N 70 > 64 dims
    m = net(state_dict, dims=64)
    fa, fb = fid.activations(a_imgs, m), fid.activations(b_imgs, m)
    sa, sb = fid.statistics(fa), fid.statistics(fb)
    assert res["fid"] == fid.frechet_distance(*sa, *sb) and res["fid"] > 0
    assert res["kid_mean"] == fid.kid(fa, fb, 3, 20)[0]
    assert (res["precision"], res["recall"]) == cdist_precision_recall(fb, fa, 3)
    assert res["fid_inf"] == fid.fid_infinity(fa, *sb, lo=20)
    cli(tmp_path / "b", tmp_path / "b_stats", "--save-stats", *flags)        # writes b_stats.npz
    stats = tmp_path / "b_stats.npz"
    with np.load(stats) as f:
        assert np.array_equal(f["mu"], sb[0]) and np.array_equal(f["sigma"], sb[1])
        prov = {k: f[k][()] for k in f.files if k not in ("mu", "sigma")}
    assert prov == dict(n=70, mode="pytorch-fid", dims=64, resize=False,
                        weights=fid.sha256_prefix(weights), source=str(tmp_path / "b"))
    for target in ("b_stats", "b_stats.npz"):                  # the guard checks the real path
        with pytest.raises(common.UserError, match="Existing output file.*b_stats.npz"):
            cli(tmp_path / "a", tmp_path / target, "--save-stats", *flags)
    with np.load(stats) as f:
        assert np.array_equal(f["mu"], sb[0])                                 # untouched
    np.savez(tmp_path / "samples_70.npz", images=a_imgs.permute(0, 2, 3, 1).numpy())
    assert cli(tmp_path / "samples_70.npz", stats, *flags)["fid"] == res["fid"]
    monkeypatch.setattr(fid, "resolve_weights", lambda w=None: pytest.fail("npz need no network"))
    assert abs(cli(stats, stats, "--dims", 64, "--no-resize")["fid"]) < 1e-8


def test_npz_images_layouts_and_dtypes(tmp_path, weights, state_dict):
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (12, 3, 75, 75), dtype=torch.uint8, generator=g)
    nhwc = x.permute(0, 2, 3, 1).numpy()
    save = lambda name, **k: np.savez(tmp_path / name, **k) or tmp_path / name   # noqa: E731
    read = lambda name, *flags: fid.load_npz_images(str(tmp_path / name), *flags)  # noqa: E731
    save("nhwc.npz", images=nhwc)
    save("adm.npz", arr_0=nhwc, arr_1=np.arange(12))                   # OpenAI/ADM samples
    save("nchw.npz", images=x.numpy())
    for name in ("nhwc.npz", "adm.npz", "nchw.npz"):
        assert torch.equal(read(name), x), name
    grey = x[:, :1]
    save("nhw.npz", images=grey[:, 0].numpy())
    assert torch.equal(read("nhw.npz"), grey)
    m = net(state_dict, dims=64)
    assert np.array_equal(fid.activations(read("nhw.npz"), m),       # grey reads as RGB
                          fid.activations(grey.expand(-1, 3, -1, -1), m))
    u = nhwc.astype(np.float32) / 255
    save("unit.npz", images=u)
    save("signed.npz", images=u * 2 - 1)
    save("bytes.npz", images=nhwc.astype(np.float64))
    for name, lo, hi in (("unit.npz", 0, 1), ("signed.npz", -1, 1), ("bytes.npz", 0, 255)):
        with pytest.raises(common.UserError, match="not uint8: pass --float-range"):
            read(name)
        assert torch.equal(read(name, (lo, hi)), x), name             # save_image's rounding
    with pytest.raises(common.UserError, match=r"outside --float-range 0 1"):
        read("bytes.npz", (0, 1))                                      # 0..255 declared [0, 1]
    with pytest.raises(common.UserError, match=r"outside --float-range 0 1"):
        read("signed.npz", (0, 1))
    save("int64.npz", images=nhwc.astype(np.int64))
    with pytest.raises(common.UserError, match="int64: fid.py reads uint8"):
        read("int64.npz")
    save("nan.npz", images=np.full((2, 8, 8, 3), np.nan, np.float32))
    with pytest.raises(common.UserError, match="NaN"):
        read("nan.npz", (0, 1))
    save("rgba.npz", images=np.zeros((2, 8, 8, 4), np.uint8))
    save("other.npz", features=np.zeros((2, 8)))
    with pytest.raises(common.UserError, match=r"\(2, 8, 8, 4\) uint8: expected \(N, H, W, C\)"):
        read("rgba.npz")
    with pytest.raises(common.UserError, match="keys: features"):
        read("other.npz")
    fid_u8 = cli(tmp_path / "nhwc.npz", tmp_path / "nchw.npz", "--weights", weights, "--dims", 64,
                 "--no-resize")["fid"]
    assert abs(fid_u8) < 1e-8 and cli(tmp_path / "signed.npz", tmp_path / "adm.npz", "--weights",
                                      weights, "--dims", 64, "--no-resize",
                                      "--float-range", -1, 1)["fid"] == fid_u8


def test_statistics_provenance_is_checked(tmp_path, weights, state_dict, capsys):
    write_pngs(tmp_path / "a", 12, seed=4)
    flags = ["--weights", weights, "--dims", 64, "--no-resize"]
    cli(tmp_path / "a", tmp_path / "a.npz", "--save-stats", *flags)
    with pytest.raises(common.UserError, match="holds --mode pytorch-fid --no-resize statistics; "
                       "this run uses --mode tf1 --no-resize"):
        cli(tmp_path / "a", tmp_path / "a.npz", *flags, "--mode", "tf1")
    with pytest.raises(common.UserError, match="holds --mode pytorch-fid --no-resize statistics; "
                       "this run uses --mode pytorch-fid"):
        cli(tmp_path / "a", tmp_path / "a.npz", "--weights", weights, "--dims", 64)
    with pytest.raises(common.UserError, match="holds 64-d statistics; this run uses --dims 192"):
        cli(tmp_path / "a", tmp_path / "a.npz", "--weights", weights, "--dims", 192, "--no-resize")
    with np.load(tmp_path / "a.npz") as f:
        np.savez(tmp_path / "foreign.npz", mu=f["mu"], sigma=f["sigma"])   # as pytorch-fid writes
    capsys.readouterr()
    assert abs(cli(tmp_path / "a", tmp_path / "foreign.npz", *flags)["fid"]) < 1e-8
    out = capsys.readouterr().out
    assert "foreign.npz has no provenance" in out and "N 12 vs ?" in out
    other = tmp_path / "other.pth"
    torch.save(random_state_dict(1), other)
    cli(tmp_path / "a", tmp_path / "a.npz", "--weights", other, "--dims", 64, "--no-resize")
    assert "statistics from different Inception weights" in capsys.readouterr().out


def test_cli_small_n_corrupt_files_and_mixed_sizes(tmp_path, weights, state_dict, capsys):
    flags = ["--weights", weights, "--dims", 64]
    write_pngs(tmp_path / "one", 1, 32, seed=5)
    write_pngs(tmp_path / "b", 20, 32, seed=6)
    with pytest.raises(common.UserError, match=r"one: 1 image\(s\); FID statistics need at least"):
        cli(tmp_path / "one", tmp_path / "b", *flags)
    a = write_pngs(tmp_path / "a", 20, 32, seed=7)
    capsys.readouterr()
    clean = cli(tmp_path / "a", tmp_path / "b", *flags)["fid"]
    assert "N = 20 < 64 dims: the covariance is singular" in capsys.readouterr().out
    (tmp_path / "a" / "015x.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(common.UserError, match=r"cannot read image .*015x\.png.*--skip-unreadable"):
        cli(tmp_path / "a", tmp_path / "b", *flags)
    assert cli(tmp_path / "a", tmp_path / "b", *flags, "--skip-unreadable")["fid"] == clean
    assert "skipped 1 unreadable of 21 files" in capsys.readouterr().out
    os.remove(tmp_path / "a" / "015x.png")
    big = torch.randint(0, 256, (3, 40, 24), dtype=torch.uint8)            # not square either
    torchvision.io.write_png(big, str(tmp_path / "a" / "010x.png"))
    mixed = cli(tmp_path / "a", tmp_path / "b", *flags, "--batch-size", 8)["fid"]
    m = net(state_dict, dims=64, resize=True)
    imgs = list(a[:11]) + [big] + list(a[11:])                             # sorted file order
    each = np.concatenate([fid.activations(x[None], m) for x in imgs])     # one image at a time
    assert mixed == fid.frechet_distance(*fid.statistics(each), *fid.statistics(
        fid.activations(write_pngs(tmp_path / "c", 20, 32, seed=6), m)))
    with pytest.raises(common.UserError, match="different sizes.*drop --no-resize"):
        cli(tmp_path / "a", tmp_path / "b", *flags, "--no-resize")


def test_folders_named_like_tools_are_folders(tmp_path, weights, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("bench", "collect", "triangles"):
        write_pngs(tmp_path / name, 4, seed=len(name))
    assert cli("triangles", "bench", "--weights", weights, "--dims", 64, "--no-resize")["fid"] > 0
    assert cli("collect", "bench", "--weights", weights, "--dims", 64, "--no-resize")["fid"] > 0
    with pytest.raises(SystemExit):
        fid.main(["bench", "b", "--tool", "triangles", "t"])           # --tool only comes first


def test_cli_inception_score_single_path(tmp_path, weights):
    write_pngs(tmp_path / "g", 12, seed=3)
    res = cli(tmp_path / "g", "--isc", "--weights", weights, "--no-resize")
    assert "fid" not in res and res["is_mean"] >= 1.0 and np.isfinite(res["is_std"])
    with pytest.raises(common.UserError, match="--isc needs --dims 2048"):
        cli(tmp_path / "g", "--isc", "--dims", 64, "--weights", weights, "--no-resize")


@pytest.mark.parametrize("argv,message", [
    (["missing_dir", "b"], "Invalid path: missing_dir"),
    (["a"], "give two sources"),
    (["a", "b", "--device", "cuda"], "CUDA not available; pass --device cpu"),
    (["a", "b", "--weights", "nope.pth"], "--weights 'nope.pth' does not exist"),
    (["a", "b", "--fid-inf"], "FID_inf fits FID_N at 15 distinct N"),
    (["a", "a.npz", "--kid"], "need images (not statistics)"),
    (["notes.txt", "b"], "neither a folder nor an .npz"),
    (["--tool", "triangles", "a"], "a is not empty"),
    (["--tool", "seed-report", "notes.txt"], "cannot read notes.txt"),
])
def test_every_user_error_is_one_line_and_exit_2(argv, message, tmp_path, weights, monkeypatch,
                                                 capsys):
    if torch.cuda.is_available() and "cuda" in argv:
        pytest.skip("CUDA is available")
    monkeypatch.chdir(tmp_path)
    write_pngs(tmp_path / "a", 4, seed=8)
    write_pngs(tmp_path / "b", 4, seed=9)
    np.savez(tmp_path / "a.npz", mu=np.zeros(64), sigma=np.eye(64))
    (tmp_path / "notes.txt").write_text("x")
    flags = [] if argv[0] == "--tool" else ["--weights", weights, "--dims", "64", "--no-resize",
                                            "--device", "cpu", "--num-workers", "0"]
    if "--device" in argv or "--weights" in argv:
        flags = [f for f in flags if f not in ("--device", "cpu", "--weights", weights)]
    monkeypatch.setattr(sys, "argv", ["fid.py", *argv, *flags])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with pytest.raises(SystemExit) as e:
            common.cli(fid.main)                       # fid.py's __main__; it sets signal handlers
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert message in err, err


# ---- TrainingFID: the --fid-every contract (/work/prompts/plumbing.md) ----
@pytest.fixture
def no_resize(monkeypatch):
    monkeypatch.setattr(fid, "build_inception", functools.partial(fid.build_inception,
                                                                  resize=False))


def test_training_fid_contract_signature():
    sig = inspect.signature(fid.TrainingFID)
    assert list(sig.parameters) == ["dataset", "data_root", "img_size", "device", "n_samples",
                                    "weights", "ref_split", "ref_size", "cache_dir", "class_labels"]
    assert [sig.parameters[k].default for k in list(sig.parameters)[5:]] == \
        [None, "train", None, None, (None,)]
    assert list(inspect.signature(fid.TrainingFID.__call__).parameters) == \
        ["self", "sample_fn", "class_label", "n_samples"]


def test_training_fid_resolves_at_start_and_matches_the_api(tmp_path, weights, state_dict,
                                                           monkeypatch, capsys, no_resize):
    root = tmp_path / "imgs"
    ref = torch.cat([write_pngs(root / "a", 20, seed=4), write_pngs(root / "b", 20, seed=5)])
    loads, real_load = [], common.load_dataset
    monkeypatch.setattr(common, "load_dataset", lambda *a, **k: loads.append((a, k)) or
                        real_load(*a, **k))
    args = (f"folder:{root}", str(tmp_path / "data"), None, "cpu", 20)
    ev = fid.TrainingFID(*args, weights=weights, class_labels=(None, 0, 1))
    assert len(loads) == 1 and loads[0][1]["train"] is True                 # one pass, train
    cached = sorted(p.name for p in (tmp_path / "data" / "fid_stats").iterdir())
    assert len(cached) == 3 and all("-native-train-files40-nall-pytorch-fid-noresize-d2048-w"
                                    in n for n in cached)
    out = capsys.readouterr().out
    assert "FID of 20 < 2048 generated images" in out
    gen = torch.rand(70, 1, 75, 75, generator=torch.Generator().manual_seed(6)) * 2 - 1   # grey G
    drawn = []

    def sample_fn(n):
        drawn.append(n)
        return gen[sum(drawn) - n:sum(drawn)]
    methods = []          # 2048-d matrix roots take minutes on this CPU: FID without its cross
    # term tells which statistics TrainingFID compares (the distance itself is tested above)

    def fd(mu1, sigma1, mu2, sigma2, method="sqrtm"):
        methods.append(method)
        if method == "sqrtm" and len(methods) == 3:
            raise ValueError("Imaginary component 1.0")                 # the monitoring fallback
        return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2))
    monkeypatch.setattr(fid, "frechet_distance", fd)
    m = net(state_dict)
    feats = fid.activations(fid.quantize(gen).expand(-1, 3, -1, -1), m)
    res = ev(sample_fn, n_samples=70)
    assert drawn == [50, 20] and set(res) == {"fid", "is", "is_std"} and methods == ["sqrtm"]
    assert res["fid"] == fid.frechet_distance(*fid.statistics(feats),
                                              *fid.statistics(fid.activations(ref, m)))
    assert (res["is"], res["is_std"]) == fid.inception_score(fid.logits_unbiased(feats, m))
    drawn.clear()
    res1 = ev(sample_fn, class_label=1)                                     # intra-FID: class b
    feats = fid.activations(fid.quantize(gen[:20]).expand(-1, 3, -1, -1), m)
    assert drawn == [20] and methods[2:] == ["sqrtm", "eig"] and res1["fid"] == fd(
        *fid.statistics(feats), *fid.statistics(fid.activations(ref[20:], m)))
    out = capsys.readouterr().out
    assert "N_gen 20 vs N_ref 20 (dataset:folder:" in out and "class 1" in out
    assert "| eig (sqrtm failed: Imaginary component 1.0) |" in out
    with pytest.raises(ValueError, match="class_label 2"):
        ev(sample_fn, class_label=2)
    with pytest.raises(common.UserError, match=">= 10"):
        ev(sample_fn, n_samples=5)
    monkeypatch.setattr(fid, "extract", lambda *a, **k: pytest.fail("cached statistics unused"))
    ev2 = fid.TrainingFID(*args, weights=weights, class_labels=(None, 0, 1))
    assert all(np.array_equal(ev2.ref[c]["sigma"], ev.ref[c]["sigma"]) for c in (None, 0, 1))


def test_training_fid_reference_split_size_and_refusals(tmp_path, weights, state_dict,
                                                        monkeypatch, no_resize):
    root = tmp_path / "imgs"
    ref = torch.cat([write_pngs(root / "a", 12, seed=4), write_pngs(root / "b", 12, seed=5)])
    splits, real_load = [], common.load_dataset
    monkeypatch.setattr(common, "load_dataset", lambda *a, **k: splits.append(k["train"]) or
                        real_load(*a, **k))
    args = (f"folder:{root}", str(tmp_path / "data"), None, "cpu", 10)
    ev = fid.TrainingFID(*args, weights=weights, ref_split="test", ref_size=10,
                         class_labels=(None, 1), cache_dir=str(tmp_path / "c"))
    assert splits == [False] and ev.ref[None]["n"] == 10 and ev.ref[1]["n"] == 10
    feats = fid.activations(ref, net(state_dict))                  # one batch of 24, as there
    assert np.array_equal(ev.ref[1]["mu"], fid.statistics(feats[12:22])[0])
    assert np.array_equal(ev.ref[None]["sigma"], fid.statistics(feats[:10])[1])
    assert all("-test-files24-n10-" in p.name for p in (tmp_path / "c").iterdir())
    with pytest.raises(common.UserError, match="ref_size 13: .* class 0 has only 12 images"):
        fid.TrainingFID(*args, weights=weights, ref_size=13, class_labels=(0,))
    for kw, message in ((dict(n_samples=5), ">= 10"), (dict(ref_split="val"), "ref_split"),
                        (dict(weights=str(tmp_path / "nope.pth")), "does not exist"),
                        (dict(dataset="folder:" + str(tmp_path / "none")), "not found")):
        call = dict(zip(["dataset", "data_root", "img_size", "device", "n_samples"], args),
                    weights=weights)
        with pytest.raises(common.UserError, match=message):
            fid.TrainingFID(**{**call, **kw})


# ---- Lucic et al. tools (items 20-21, checklist 19-20) ----
def colab_polygons(n, n_vertices=3, min_angle=20.0, scale=0.75, dim=28, r=8, seed=0):
    """compare_gan's colabs/Convex_Polygons_Dataset.ipynb, transcribed step by step: numpy's
    legacy RNG in the colab's order, x . rot on row vectors, an even-odd ray-crossing inside test
    in place of matplotlib's Path, scipy.ndimage.convolve with cval 1, every r-th sample."""
    rs = np.random.RandomState(seed)
    images = np.zeros((n, dim, dim))
    gx, gy = np.mgrid[0:dim * r, 0:dim * r]
    px, py = gx.ravel()[:, None].astype(float), gy.ravel()[:, None].astype(float)
    for i in range(n):
        segment = 360.0 / n_vertices
        max_angle = segment - min_angle / 2.0
        angles = []
        for k in range(n_vertices):
            angles.append(k * segment + min_angle / 2.0 + rs.rand() * max_angle)
        a = np.array(angles) * np.pi / 180.0
        x = (np.column_stack((np.cos(a), np.sin(a))) + 1.0) / 2.0
        theta = np.radians(rs.rand() * 2 * np.pi)
        rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        vertices = np.dot(x, rot) * (dim * scale)
        vertices += dim / 2.0 - vertices.mean(axis=0)
        v0 = vertices * r
        v1 = np.roll(v0, -1, axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            cross_y = (v0[:, 1] > py) != (v1[:, 1] > py)
            x_at = v0[:, 0] + (py - v0[:, 1]) * (v1[:, 0] - v0[:, 0]) / (v1[:, 1] - v0[:, 1])
        inside = ((cross_y & (px < x_at)).sum(1) % 2 == 1).reshape(dim * r, dim * r)
        mask = scipy.ndimage.convolve((~inside).astype(np.float32), np.ones((r, r)),
                                      mode="constant", cval=1.0)
        images[i] = mask[::r, ::r] / (r * r)
    return images[rs.permutation(n)]


def test_triangles_equal_the_colab_and_split_like_compare_gan():
    imgs = fid.make_polygons(200, seed=0)
    assert imgs.shape == (200, 28, 28) and imgs.min() >= 0 and imgs.max() <= 1
    assert (imgs[:, 0, 0] == 1).all() and (imgs[:, -1, -1] == 1).all()      # white background
    assert 0.05 < (1 - imgs).mean() < 0.6
    assert np.array_equal(imgs, fid.make_polygons(200, seed=0))
    colab = colab_polygons(12, seed=3)
    ours = fid.make_polygons(12, seed=3)
    assert np.abs(ours - colab).max() <= 1 / 64 and (ours != colab).sum() <= 2   # boundary points
    assert np.abs(ours - colab).mean() < 1e-4
    squares = fid.make_polygons(6, n_vertices=4, seed=1)
    assert np.abs(squares - colab_polygons(6, n_vertices=4, seed=1)).mean() < 1e-4
    splits = [(r.start, r.stop) for r in fid.polygon_splits(80_000)]
    assert splits == [(0, 60000), (60000, 70000), (70000, 80000)]
    assert [len(r) for r in fid.polygon_splits(200)] == [150, 25, 25]
    full = fid.render_polygons([[[-5, -5], [-5, 40], [40, 40], [40, -5]]])[0]   # whole grid
    assert (full[1:, 1:] == 0).all() and full[0, 5] == 3 / 8             # row 0: 3 rows outside
    half = fid.render_polygons([[[-5, -5], [40, 40], [-5, 40]]])[0]      # (row, col): above diag.
    assert half[20, 2] == 1 and half[2, 20] == 0


def test_triangles_tool_writes_the_split_folders(tmp_path):
    fid.main(["--tool", "triangles", str(tmp_path / "tri"), "--n", "16"])
    counts = {d: len(os.listdir(tmp_path / "tri" / d)) for d in ("train", "test", "holdout")}
    assert counts == {"train": 12, "test": 2, "holdout": 2}
    x, _ = common.load_dataset(f"folder:{tmp_path / 'tri' / 'train'}")[0]   # a script's view
    assert x.shape == (3, 28, 28) and x.max() == 1.0
    png = torchvision.io.read_image(str(tmp_path / "tri" / "test" / "00012.png"))[0]
    assert torch.equal(png, torch.from_numpy(np.round(fid.make_polygons(16)[12] * 255)
                                             .astype(np.uint8)))
    with pytest.raises(common.UserError, match="not empty"):
        fid.main(["--tool", "triangles", str(tmp_path / "tri"), "--n", "16"])


def test_hparam_sampler_budget_curve_and_reports(tmp_path):
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
    rows = "model,setting_id,seed,fid\nwgan_gp,a1,0,40.0\nwgan_gp,a1,1,38.0\nwgan_gp,b2,0,50\n"
    (tmp_path / "runs.csv").write_text(rows)
    report = fid.main(["--tool", "seed-report", str(tmp_path / "runs.csv")])
    assert report[0]["setting_id"] == "a1" and report[0]["n"] == 2 and report[0]["min"] == 38.0
    assert report[0]["median"] == 39.0 and report[1]["std"] == 0
    curve = fid.main(["--tool", "budget-curve", str(tmp_path / "runs.csv"), "--resamples", "200"])
    assert curve["wgan_gp"][-1] <= curve["wgan_gp"][0] and len(curve["wgan_gp"]) == 3
    assert fid.main(["--tool", "sample-hparams", "wgan_gp", "wide", "--n", "2"])[0]["lambda_"] == 10


# ---- card 8.2: parity with pytorch-fid, torch-fidelity, clean-fid (requirements-dev.txt) ----
def test_pytorch_fid_parity(tmp_path, weights, state_dict, monkeypatch):
    from pytorch_fid import fid_score, inception
    monkeypatch.setattr(inception, "load_state_dict_from_url", lambda *a, **k: state_dict)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        for block, dims in enumerate(fid.DIMS):                              # every tap
            theirs = inception.InceptionV3([block]).eval()(x)[0]            # their get_activations
            theirs = F.adaptive_avg_pool2d(theirs, output_size=(1, 1)).flatten(1).numpy()
            ours = fid.activations(x, fid.build_inception(weights, dims))
            assert np.abs(theirs - ours).max() == 0.0, dims
    s1, s2 = spd_stats(64, 320, 8), spd_stats(64, 320, 9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)             # their sqrtm(disp=False)
        ref = fid_score.calculate_frechet_distance(*s1, *s2)
        for method in ("sqrtm", "eig", "eigh"):
            assert rel(fid.frechet_distance(*s1, *s2, method=method), ref) < 1e-10
        write_pngs(tmp_path / "a", 10, size=16, seed=10)        # singular covariances
        write_pngs(tmp_path / "b", 10, size=16, seed=11)
        paths = [str(tmp_path / "a"), str(tmp_path / "b")]
        theirs = fid_score.calculate_fid_given_paths(paths, 50, "cpu", 64, 0)
        ours = cli(tmp_path / "a", tmp_path / "b", "--weights", weights, "--dims", 64)["fid"]
        assert rel(ours, theirs) < 1e-10
        cli(tmp_path / "b", tmp_path / "b.npz", "--save-stats", "--weights", weights, "--dims", 64)
        with np.load(tmp_path / "b.npz") as f:
            assert {"mode", "dims", "n", "weights"} <= set(f.files)     # extra keys they ignore
        theirs = fid_score.calculate_fid_given_paths([paths[0], str(tmp_path / "b.npz")], 50,
                                                     "cpu", 64, 0)
        assert rel(ours, theirs) < 1e-10
        os.replace(tmp_path / "b" / "003.png", tmp_path / "a" / "003x.png")
        torchvision.io.write_png(torch.zeros(3, 20, 12, dtype=torch.uint8),
                                 str(tmp_path / "a" / "009x.png"))       # mixed sizes
        theirs = fid_score.calculate_fid_given_paths(paths, 1, "cpu", 64, 0)   # batch 1 only
    ours = cli(tmp_path / "a", tmp_path / "b", "--weights", weights, "--dims", 64)["fid"]
    assert rel(ours, theirs) < 1e-10


def test_torch_fidelity_parity_tf1(weights):
    from torch_fidelity import metric_isc, metric_kid
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    g = torch.Generator().manual_seed(12)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=g)
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
    assert rel(fid.inception_score(logits)[1], theirs["inception_score_std"]) < 1e-8
    theirs = metric_kid.kid_features_to_metric(
        torch.from_numpy(f1), torch.from_numpy(f2), kid_subsets=10, kid_subset_size=100,
        kid_degree=3, kid_gamma=None, kid_coef0=1, rng_seed=2020, verbose=False)
    assert rel(fid.kid(f1, f2, 10, 100)[0], theirs["kernel_inception_distance_mean"]) < 1e-10


def test_clean_fid_parity():
    from cleanfid import fid as cleanfid
    from cleanfid import resize
    x = np.random.RandomState(0).randint(0, 256, (20, 24, 3)).astype(np.uint8)   # HWC, not square
    theirs = resize.make_resizer("PIL", False, "bicubic", (299, 299))(x)
    ours = fid.preprocess(torch.from_numpy(x).permute(2, 0, 1)[None], "clean")[0]
    assert np.array_equal(ours.permute(1, 2, 0).numpy(), (theirs - 128) / 128)
    rs = np.random.RandomState(1)
    f1, f2 = rs.randn(300, 64), rs.randn(300, 64) + 0.1
    s1, s2 = fid.statistics(f1), fid.statistics(f2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert rel(fid.frechet_distance(*s1, *s2), cleanfid.frechet_distance(*s1, *s2)) < 1e-10
    np.random.seed(3)                      # clean-fid draws from the global RNG, set 2 before 1
    theirs = cleanfid.kernel_distance(f1, f2, num_subsets=10, max_subset_size=100)
    assert rel(fid.kid(f2, f1, 10, 100, seed=3)[0], theirs) < 1e-10


def test_speed_benchmark_runs(weights, capsys):
    import bench_fid
    res = bench_fid.bench(bench_fid.parse_args([
        "--weights", weights, "--device", "cpu", "--n-images", "2", "--batch-size", "1",
        "--img-size", "8", "--d", "16", "--n-features", "200"]))
    assert res["max_abs_feature_diff"] == 0.0 and res["ours_img_s"] > 0
    assert res["rel_diff_eig"] < 1e-10 and res["rel_diff_eigh"] < 1e-10


# ---- the copy-paste promise: fid.py with common.py, nothing else ----
def test_fid_runs_with_common_alone(tmp_path, weights):
    for name in ("fid.py", "common.py"):
        shutil.copy(ROOT / name, tmp_path / name)
    write_pngs(tmp_path / "a", 70, 32, seed=12)
    write_pngs(tmp_path / "b", 70, 32, seed=13)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": ""}
    run = dict(cwd=tmp_path, env=env, timeout=240, capture_output=True, text=True)
    out = subprocess.run([sys.executable, "fid.py", "a", "b", "--weights", weights, "--dims",
                          "64", "--no-resize", "--num-workers", "0"], check=True, **run).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("FID:  "))
    assert float(line.split()[1]) > 0 and "N 70 vs 70" in line
    assert re.search(PROGRESS, out)                              # common.Progress's format
    bad = subprocess.run([sys.executable, "fid.py", "a", "--weights", weights], **run)
    assert bad.returncode == 2 and bad.stderr == "error: give two sources (one with --isc only), " \
        "got 1\n"
    assert "usage:" in subprocess.run([sys.executable, "fid.py", "--tool", "--help"],
                                      check=True, **run).stdout
