"""progan.py: the card's checklist (shared/papers/progan.md, Sec. 7-8), each item through the code
a run uses (main, train_step, the modules) where a test can see it; tests/mutants.py breaks each."""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
import scipy.signal
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import progan
from host_sync import trap_host_syncs
from tiny_args import TINY

SQRT2 = math.sqrt(2)


def _argv(out, *extra):
    return [*TINY["progan.py"], "--out-dir", str(out), *extra]


def _rows(d):
    return [json.loads(line) for line in (Path(d) / "metrics.jsonl").read_text().splitlines()]


def _untimed(rows):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


def _tiny_nets(resolution=16, group=0):
    torch.manual_seed(0)
    return (progan.Generator(resolution, 64, 32, 16, 3),
            progan.Discriminator(resolution, 64, 32, 3, group))


def _nearest_up(x, f=2):
    return x.repeat_interleave(f, dim=2).repeat_interleave(f, dim=3)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The TINY run (8x8: 4x4 stabilize, 8x8 fade-in, 8x8 stabilize; export), with its stdout."""
    out = tmp_path_factory.mktemp("progan") / "run"
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        m = progan.main(_argv(out))
    return out, m, buf.getvalue()


# ---- Sec. 4.2: pixel norm ----
def test_pixel_norm_gives_unit_mean_square_per_pixel_and_ignores_scale():
    x = torch.randn(4, 16, 5, 5)
    out = progan.PixelNorm()(x)
    assert torch.allclose(out.square().mean(dim=1), torch.ones(4, 5, 5), atol=1e-5)
    assert torch.allclose(progan.PixelNorm()(7.3 * x), out, atol=1e-5)


def test_pixel_norm_on_the_latent_and_after_every_g_conv_but_not_after_to_rgb():
    G, _ = _tiny_nets()
    seen = []
    for m in G.modules():   # every layer's input: PN(z), PN'd features (nearest-upsampled or not)
        if isinstance(m, (progan.EqualizedConv2d, progan.EqualizedLinear)):
            m.register_forward_pre_hook(lambda mod, a: seen.append(a[0].square().mean(dim=1)))
    z = 3 * torch.randn(5, 16)
    with torch.no_grad():
        for level in range(3):
            G(z, level, 0.5)
    assert len(seen) > 10 and all(torch.allclose(s, torch.ones_like(s), atol=1e-4) for s in seen)
    with torch.no_grad():                       # toRGB is linear, with nothing after it
        y = G(z, 2, 1.0)
        G.to_rgb[2].weight.mul_(-3)
        assert torch.allclose(G(z, 2, 1.0), -3 * y, atol=1e-5)


# ---- Sec. 3: minibatch stddev ----
def test_minibatch_stddev_equals_the_hand_computed_statistic():
    mbstd = progan.MinibatchStdDev()
    same = torch.randn(1, 4, 3, 3).repeat(6, 1, 1, 1)
    out = mbstd(same)
    assert out.shape == (6, 5, 3, 3) and torch.equal(out[:, :4], same)
    assert torch.allclose(out[:, 4], torch.full((6, 3, 3), 1e-4), rtol=1e-3)   # sqrt(1e-8)
    a_b = torch.stack([torch.full((2, 3, 3), 0.3), torch.full((2, 3, 3), -1.1)])
    assert torch.allclose(mbstd(a_b)[:, 2], torch.full((2, 3, 3), 0.7), atol=1e-6)   # |a - b| / 2
    x = torch.randn(8, 3, 4, 4)
    want = (x.var(dim=0, unbiased=False) + 1e-8).sqrt().mean()   # population std, averaged
    assert torch.allclose(mbstd(x)[:, 3], want.expand(8, 4, 4), atol=1e-6)


def test_minibatch_stddev_groups_are_strided_as_in_tf(tmp_path):
    x = torch.randn(4, 2, 3, 3)
    out = progan.MinibatchStdDev(group_size=2)(x)[:, 2, 0, 0]
    for i in range(4):   # sample i is in the group {i mod 2, i mod 2 + 2}
        g = x[[i % 2, i % 2 + 2]]
        assert torch.allclose(out[i], (g.var(dim=0, unbiased=False) + 1e-8).sqrt().mean())
    with pytest.raises(ValueError):
        progan.MinibatchStdDev(group_size=4)(torch.randn(6, 2, 3, 3))
    with pytest.raises(common.UserError, match="not divisible by --mbstd-group-size 4"):
        progan.main(["--dataset", "shapes", "--device", "cpu", "--batch-size", "6",
                     "--mbstd-group-size", "4", "--out-dir", str(tmp_path)])
    assert not tmp_path.exists() or not any(tmp_path.iterdir())     # refused before any write


def test_d_head_is_mbstd_conv3x3_conv4x4_valid_dense():
    _, D = _tiny_nets()
    head, c = D.blocks[0], 32
    assert head.conv.weight.shape == (c, c + 1, 3, 3) and head.conv4.weight.shape == (32, c, 4, 4)
    assert head.conv4.padding == 0 and head.fc.weight.shape == (1, 32)
    assert D(torch.randn(3, 3, 4, 4), 0).shape == (3,)


# ---- Sec. 4.1: equalized learning rate ----
def test_equalized_lr_scale_init_and_unscaled_zero_biases_per_layer():
    G, D = _tiny_nets()
    expected = {id(G.blocks[0].dense): SQRT2 / math.sqrt(16 * 16)}    # fan_in 16 z (Theano 4x4)
    expected |= {id(m): 1 / math.sqrt(m.weight.shape[1]) for m in [*G.to_rgb, D.blocks[0].fc]}
    n = 0
    for net in (G, D):
        for m in net.modules():
            if isinstance(m, (progan.EqualizedConv2d, progan.EqualizedLinear)):
                fan_in = m.weight[0].numel()
                assert m.scale == pytest.approx(expected.get(id(m), SQRT2 / math.sqrt(fan_in)))
                assert m.bias is None or not m.bias.any()
                n += 1
    assert n == 9 + 10                                 # every conv and dense of G and D
    assert not G.blocks[0].bias.any()
    weights = torch.cat([p.flatten() for name, p in [*G.named_parameters(), *D.named_parameters()]
                         if name.endswith("weight")])
    assert abs(weights.std().item() - 1) < 0.05 and abs(weights.mean().item()) < 0.05
    conv = progan.EqualizedConv2d(64, 64, 3)
    assert abs(conv.weight.std().item() - 1) < 0.05
    x = torch.randn(2, 64, 5, 5)
    assert torch.allclose(conv(x), F.conv2d(x, conv.weight * math.sqrt(2 / (64 * 9)), padding=1),
                          atol=1e-5)
    for layer, x in ((conv, x), (progan.EqualizedLinear(8, 3), torch.randn(2, 8))):
        with torch.no_grad():
            layer.weight.zero_()
            layer.bias.fill_(1.0)
        assert torch.equal(layer(x), torch.ones_like(layer(x)))   # the bias is not rescaled


def test_lrelu_0p2_and_no_normalization_layers():
    assert torch.equal(progan.lrelu(torch.tensor([-1.0, 2.0])), torch.tensor([-0.2, 2.0]))
    G, D = _tiny_nets()
    norms = (nn.BatchNorm2d, nn.BatchNorm1d, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm2d)
    assert not any(isinstance(m, norms) for m in [*G.modules(), *D.modules()])
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        y = D(x, 2)
        D.blocks[0].fc.weight.neg_()
        assert torch.allclose(D(x, 2), -y, atol=1e-6)          # the last dense is linear


def test_table2_parameter_counts():
    with torch.device("meta"):
        G, D = progan.Generator(), progan.Discriminator()                      # CelebA-HQ 1024
        G1, D1 = progan.Generator(128, 2048, 512, 512), progan.Discriminator(128, 2048, 512)
    n = lambda ms: sum(p.numel() for m in ms for p in m.parameters())  # noqa: E731
    assert (n([G]), n([D])) == (23_079_115, 23_087_249)        # every per-resolution RGB layer
    assert n([G]) - n(G.to_rgb[:-1]) == 23_071_507             # only the 1024 toRGB
    assert n([D]) - n(D.from_rgb[:-1]) == 23_077_137           # only the 1024 fromRGB
    assert round(n([G1]) / 1e6, 1) == round(n([D1]) / 1e6, 1) == 13.6   # Tab. 1 net (App. A.2)


# ---- Sec. 2, Fig. 2: fade-in ----
def test_generator_fade_endpoints():
    G, _ = _tiny_nets()
    z = torch.randn(4, 16)
    with torch.no_grad():
        for level in (1, 2):
            old = G(z, level - 1, 1.0)
            assert torch.equal(G(z, level, 0.0), _nearest_up(old))      # exactly the old path
            new = G(z, level, 1.0)
            assert torch.allclose(G(z, level, 0.3), 0.3 * new + 0.7 * _nearest_up(old), atol=1e-6)
    G(z, 2, 1.0).sum().backward()
    assert G.to_rgb[1].weight.grad is None and G.to_rgb[2].weight.grad is not None


def test_discriminator_fade_endpoints():
    _, D = _tiny_nets()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        for level, xs in ((1, F.avg_pool2d(x, 2)), (2, x)):
            assert torch.equal(D(xs, level, 0.0), D(F.avg_pool2d(xs, 2), level - 1, 1.0))
            assert not torch.allclose(D(xs, level, 0.5), D(xs, level, 1.0))
    D(x, 2, 1.0).sum().backward()
    assert D.from_rgb[1].weight.grad is None and D.from_rgb[2].weight.grad is not None


def test_reals_are_box_downsampled_then_faded():
    x = torch.randn(16, 3, 16, 16)
    x8 = x.reshape(16, 3, 8, 2, 8, 2).mean(dim=(3, 5))
    assert torch.allclose(progan.process_reals(x, 8, 1.0), x8, atol=1e-6)
    x4 = x8.reshape(16, 3, 4, 2, 4, 2).mean(dim=(3, 5))     # repeated 2x2 averaging
    assert torch.allclose(progan.process_reals(x, 4, 1.0), x4, atol=1e-6)
    assert torch.allclose(progan.process_reals(x, 8, 0.0), _nearest_up(x4), atol=1e-6)
    assert torch.allclose(progan.process_reals(x, 8, 0.25),
                          0.25 * x8 + 0.75 * _nearest_up(x4), atol=1e-6)
    flip = torch.rand(16, 1, 1, 1, generator=torch.Generator().manual_seed(1)) < 0.5
    m = progan.process_reals(x, 8, 1.0, flip)
    flipped = [torch.allclose(m[i], x8[i].flip(2), atol=1e-6) for i in range(16)]
    assert all(f or torch.allclose(m[i], x8[i], atol=1e-6) for i, f in enumerate(flipped))
    assert flipped == flip.view(-1).tolist() and 0 < sum(flipped) < 16


@pytest.mark.parametrize("mirror", [False, True])
def test_train_step_shows_d_the_faded_reals_and_one_level_alpha(mirror):
    args = progan.parse_args(TINY["progan.py"] + ["--resolution", "16", "--fmap-base", "64",
                                                  "--fmap-max", "32", "--z-dim", "16",
                                                  "--batch-size", "16"])
    args.mirror, args.eps_drift = mirror, 0.5                  # a drift weight a test can see
    G, D = _tiny_nets()
    opt_G, opt_D = (torch.optim.Adam(n.parameters(), lr=1e-3, betas=(0.0, 0.99)) for n in (G, D))
    calls, outs = [], []
    D.register_forward_pre_hook(lambda m, a: calls.append(a))
    D.register_forward_hook(lambda m, a, o: outs.append(o.detach()))
    x = torch.randn(16, 3, 16, 16)
    torch.manual_seed(0)
    out = progan.train_step(G, D, opt_G, opt_D, x, 2, 0.4, args, common.Dist("cpu"))
    assert [(c[1], c[2]) for c in calls] == [(2, 0.4)] * 4     # reals, fakes, x_hat, G step
    want = progan.process_reals(x, 16, 0.4)
    seen = calls[0][0]
    same = [torch.allclose(seen[i], want[i], atol=1e-6) for i in range(16)]
    flip = [torch.allclose(seen[i], want[i].flip(2), atol=1e-6) for i in range(16)]
    assert all(s or f for s, f in zip(same, flip)) and (not all(same)) == mirror
    d = {k: v.item() for k, v in out.items()}
    assert d["loss_D"] == pytest.approx(d["d_fake"] - d["d_real"] + 10 * d["gp"]
                                        + 0.5 * d["drift"], rel=1e-5, abs=1e-6)
    assert d["d_real"] == pytest.approx(outs[0].mean().item(), abs=1e-6)
    assert d["drift"] == pytest.approx(outs[0].square().mean().item(), rel=1e-5)  # on the reals


# ---- App. A.1: losses ----
def test_gradient_penalty_drift_and_loss_signs():
    w = torch.randn(3, 4, 4)
    w /= w.norm()                                               # ||grad D|| = 1 over C, H, W
    critic = lambda x, level, alpha: (x * w).sum(dim=(1, 2, 3))  # noqa: E731
    xr, xf = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4)
    assert progan.gradient_penalty(critic, xr, xf, 0, 1.0, 1.0)[0].abs() < 1e-10
    gp750 = progan.gradient_penalty(critic, xr, xf, 0, 1.0, 750.0)[0]
    assert gp750.item() == pytest.approx((1 - 750) ** 2 / 750**2, rel=1e-6)
    seen = []
    progan.gradient_penalty(lambda x, lv, a: seen.append(x) or x.sum(dim=(1, 2, 3)),
                            torch.zeros(8, 3, 4, 4), torch.ones(8, 3, 4, 4), 0, 1.0, 1.0)
    u = seen[0].detach().flatten(1)                             # x_hat = u per sample
    assert torch.equal(u, u[:, :1].expand_as(u)) and u[:, 0].unique().numel() == 8
    conv = progan.EqualizedConv2d(3, 2, 3)
    nonlinear = lambda x, level, alpha: progan.lrelu(conv(x)).square().sum(dim=(1, 2, 3))  # noqa
    progan.gradient_penalty(nonlinear, xr, xf, 0, 1.0, 1.0)[0].backward()   # create_graph
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    d = torch.tensor([1.0, 2.0, 3.0])
    assert progan.drift_penalty(d).item() == pytest.approx(14 / 3)
    assert progan.wasserstein_loss_D(d + 1, d) < progan.wasserstein_loss_D(d, d)
    assert progan.generator_loss(d).item() == pytest.approx(-2.0)


def test_gamma_reaches_the_penalty_in_train_step():
    args = progan.parse_args(TINY["progan.py"] + ["--gamma", "750", "--batch-size", "16"])
    torch.manual_seed(0)
    G, D = progan.Generator(8, 16, 8, 8, 3), progan.Discriminator(8, 16, 8, 3)
    opt_G, opt_D = (torch.optim.Adam(n.parameters(), lr=1e-3, betas=(0.0, 0.99)) for n in (G, D))
    out = progan.train_step(G, D, opt_G, opt_D, torch.randn(16, 3, 8, 8), 1, 1.0, args,
                            common.Dist("cpu"))
    gp, norm = out["gp"].item(), out["grad_norm"].item()
    assert norm < 50 and abs(gp - (1 - norm / 750) ** 2) < 1e-4     # (||g|| - 750)^2 / 750^2


# ---- Sec. 2: schedule ----
def test_schedule_closed_form_at_phase_boundaries():
    T = F_ = 0.010   # 10 images each
    s = lambda n: progan.schedule(n / 1000, T, F_, 16, 16, {})  # noqa: E731
    assert s(0) == (0, 1.0, 16) and s(10) == (0, 1.0, 16)      # 4x4 until p exceeds T
    assert s(11)[:2] == (1, pytest.approx(0.1)) and s(15)[:2] == (1, 0.5)
    assert s(20) == s(30) == (1, 1.0, 16) and s(35)[:2] == (2, 0.5)      # 8x8, then 16x16 fades
    assert s(40) == s(10**6) == (2, 1.0, 16)
    assert progan.schedule(5, 0, 0, 16, 16, {}) == (2, 1.0, 16)   # T = F = 0: no growing
    prev, changes, tf_resets, tf_prev = None, [], [], None
    for n in range(60):
        phase, p = divmod(n, 20)                                   # official TrainingSchedule
        lod = max(2 - phase - max(p - 10, 0) / 10, 0.0)
        level, alpha, _ = s(n)
        assert level == 2 - math.floor(lod) and alpha == pytest.approx(1 - (lod - math.floor(lod)))
        if tf_prev is not None and (math.floor(lod) != math.floor(tf_prev)
                                    or math.ceil(lod) != math.ceil(tf_prev)):
            tf_resets.append(n)                                    # reset_opt_for_new_lod
        key = (level, alpha < 1)
        if prev is not None and key != prev:
            changes.append(n)
        prev, tf_prev = key, lod
    assert changes == tf_resets == [11, 20, 31, 40]


def test_minibatch_per_resolution_and_the_celebahq_defaults():
    assert progan.schedule(0) == (0, 1.0, 16)
    assert progan.schedule(8000) == (5, 1.0, 16)                # 128x128 stabilizing
    assert progan.schedule(8800.5)[::2] == (6, 14)              # fading 256x256 in: its batch
    assert progan.schedule(12000.5)[::2] == (8, 3) and progan.schedule(19000) == (8, 1.0, 3)


def test_lr_rampup():
    assert progan.lr_rampup(0, 40) == pytest.approx(math.exp(-5))
    assert progan.lr_rampup(20, 40) == pytest.approx(math.exp(-1.25))
    assert progan.lr_rampup(40, 40) == progan.lr_rampup(3, 0) == 1.0


# ---- App. A.1: EMA ----
def test_ema_update_arithmetic():
    G, _ = _tiny_nets()
    G_ema = progan.Generator(16, 64, 32, 16, 3)
    old = [p.detach().clone() for p in G_ema.parameters()]
    progan.ema_update(G_ema, G, 0.999)
    for o, e, p in zip(old, G_ema.parameters(), G.parameters()):
        assert torch.allclose(e, 0.999 * o + 0.001 * p, atol=1e-7)


# ---- configurations (card 2.8) and flags ----
def test_dataset_configurations_and_paper_defaults():
    a = progan.parse_args([])
    assert (a.dataset, a.resolution, a.fmap_base, a.fmap_max, a.z_dim) == ("celebahq", 1024, 8192,
                                                                          512, 512)
    assert (a.stabilize_kimg, a.fade_kimg, a.kimg, a.gamma, a.mirror, a.lr_rampup_kimg) == (
        800, 800, 19000, 1.0, True, 40)
    assert a.batch_size == 16 and a.batch_at == ["256:14", "512:6", "1024:3"]
    assert (a.lr, a.betas, a.adam_eps, a.lambda_gp, a.eps_drift, a.ema_beta, a.mbstd_group_size) \
        == (0.001, [0.0, 0.99], 1e-8, 10.0, 0.001, 0.999, 0)
    want = {"celeba": (128, 2048, 512, 512, 800, 10000, 1.0, True, 0),
            "lsun-church": (256, 8192, 512, 512, 800, 20000, 1.0, True, 40),
            "lsun-bedroom": (256, 8192, 512, 512, 800, 20000, 1.0, False, 40),
            "cifar10": (32, 4096, 128, 128, 400, 20000, 750.0, False, 0),
            "shapes": (32, 4096, 128, 128, 400, 20000, 1.0, False, 0)}
    for name, row in want.items():
        a = progan.parse_args(["--dataset", name])
        assert (a.resolution, a.fmap_base, a.fmap_max, a.z_dim, a.stabilize_kimg, a.kimg,
                a.gamma, a.mirror, a.lr_rampup_kimg) == row, name
        assert a.fade_kimg == a.stabilize_kimg and a.batch_at == []
    assert progan.parse_args(["--dataset", "folder:x", "--resolution", "64"]).resolution == 64
    for bad in (["--dataset", "folder:x"], ["--resolution", "24"], ["--batch-at", "2048:4"],
                ["--stabilize-kimg", "0.0005"], ["--dataset", "celeba", "--fid-every", "10"]):
        with pytest.raises(SystemExit):
            progan.parse_args(bad)


def test_celeba_is_the_official_crop_and_missing_sets_are_named(tmp_path):
    d = tmp_path / "celeba" / "img_align_celeba"
    d.mkdir(parents=True)
    img = np.random.default_rng(0).integers(0, 256, (218, 178, 3), dtype=np.uint8)
    from PIL import Image
    Image.fromarray(img).save(d / "000001.png")
    args = progan.parse_args(["--dataset", "celeba", "--data-root", str(tmp_path)])
    x = progan.load_reals(args)[0][0]
    want = torch.from_numpy(img[121 - 64:121 + 64, 89 - 64:89 + 64]).permute(2, 0, 1) / 127.5 - 1
    assert x.shape == (3, 128, 128) and torch.allclose(x, want, atol=1e-6)
    Image.fromarray(img[:200]).save(d / "000002.png")
    with pytest.raises(common.UserError, match="178x218"):
        progan.load_reals(args)[1]
    with pytest.raises(common.UserError, match="CelebA-HQ not found"):
        progan.main(["--data-root", str(tmp_path), "--device", "cpu", "--out-dir",
                     str(tmp_path / "r")])


# ---- Sec. 5: SWD and MS-SSIM ----
def _smooth_images(n=32, res=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, res // 4, res // 4, generator=g)
    return F.interpolate(x, scale_factor=4, mode="bilinear").tanh()


def test_laplacian_pyramid_matches_the_official_scipy_filters():
    x = torch.rand(2, 3, 32, 32) * 255
    k = np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1])[None, None] / 256.0
    a = x.numpy().astype(np.float64)
    down = scipy.ndimage.convolve(a, k, mode="mirror")[:, :, ::2, ::2]    # official pyr_down
    up = np.zeros_like(a)
    up[:, :, ::2, ::2] = down
    band = a - scipy.ndimage.convolve(up, k * 4, mode="mirror")           # official pyr_up
    levels = progan.laplacian_pyramid(x, 2)
    assert np.allclose(levels[0].numpy(), band, atol=1e-3)
    assert np.allclose(levels[1].numpy(), down, atol=1e-3)


def test_swd_is_zero_for_identical_sets_and_grows_with_a_shift():
    x = _smooth_images(8)                                  # 2 levels x 1024 descriptors
    batches = lambda t: [t[:4], t[4:]]  # noqa: E731
    same = progan.sliced_wasserstein_distance(batches(x), batches(x.clone()))
    assert set(same) == {"swd32", "swd16", "swd_avg"} and all(v == 0 for v in same.values())
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    d = [progan.sliced_wasserstein_distance(batches(x), batches(x + s * noise))["swd_avg"]
         for s in (0.05, 0.2, 0.6)]
    assert 0 < d[0] < d[1] < d[2]
    level = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).view(2, 3, 16, 16)
    p = progan._patches(level, torch.Generator().manual_seed(0))   # 128 7x7 windows per image
    assert p.shape == (256, 3, 7, 7) and (p[:, :, 1:] - p[:, :, :-1] == 16).all()
    assert (p[:, :, :, 1:] - p[:, :, :, :-1] == 1).all() and (p[:, 1] - p[:, 0] == 256).all()
    desc = torch.randn(300, 3, 7, 7) * torch.tensor([1.0, 5.0, 0.2]).view(1, 3, 1, 1) + 2
    n = progan._normalize(desc).view(300, 3, 7, 7)              # per colour channel
    assert torch.allclose(n.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(n.std(dim=(0, 2, 3), correction=0), torch.ones(3), atol=1e-5)
    a = torch.randn(500, 12)
    perm = a[torch.randperm(500)]                               # same set, other order
    assert progan.sliced_wasserstein(a, perm, torch.Generator().manual_seed(0)) < 1e-6
    assert progan.sliced_wasserstein(a, perm + 1, torch.Generator().manual_seed(0)) > 0.1


def _official_ms_ssim(img1, img2):
    """metrics/ms_ssim.py of the official code, condensed (NHWC float images in [0, 255])."""
    def ssim(a, b):
        size = min(11, a.shape[1], a.shape[2])
        r = np.arange(size) - (size - 1) / 2
        sigma = size * 1.5 / 11
        g = np.exp(-(r[:, None] ** 2 + r[None] ** 2) / (2 * sigma**2))
        w = (g / g.sum()).reshape(1, size, size, 1)
        conv = lambda t: scipy.signal.fftconvolve(t, w, mode="valid")  # noqa: E731
        m1, m2 = conv(a), conv(b)
        s11, s22, s12 = conv(a * a) - m1**2, conv(b * b) - m2**2, conv(a * b) - m1 * m2
        c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
        v1, v2 = 2 * s12 + c2, s11 + s22 + c2
        return (((2 * m1 * m2 + c1) * v1) / ((m1**2 + m2**2 + c1) * v2)).mean(axis=(1, 2, 3)), \
            (v1 / v2).mean(axis=(1, 2, 3))
    wts = np.array([0.0448, 0.2856, 0.3001, 0.2363, 0.1333])
    ms, cs = [], []
    for _ in wts:
        s, c = ssim(img1, img2)
        ms.append(s)
        cs.append(c)
        img1, img2 = [(t[:, 0::2, 0::2] + t[:, 1::2, 0::2] + t[:, 0::2, 1::2] + t[:, 1::2, 1::2])
                      / 4 for t in (img1, img2)]
    ms, cs = np.clip(np.array(ms), 0, None), np.clip(np.array(cs), 0, None)
    return np.prod(cs[:-1] ** wts[:-1, None], axis=0) * ms[-1] ** wts[-1]


def test_ms_ssim_matches_the_official_code():
    x = (_smooth_images(8, 32) + 1) * 127.5
    y = (_smooth_images(8, 32, seed=2) + 1) * 127.5
    ours = progan.ms_ssim(x, y).numpy()
    ref = _official_ms_ssim(x.permute(0, 2, 3, 1).double().numpy(),
                            y.permute(0, 2, 3, 1).double().numpy())
    assert np.allclose(ours, ref, atol=1e-4)
    assert torch.allclose(progan.ms_ssim(x, x), torch.ones(8), atol=1e-5)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    noisy = [progan.ms_ssim(x, (x + s * noise).clamp(0, 255)).mean() for s in (5, 40)]
    assert 1 > noisy[0] > noisy[1]


# ---- runs through main ----
def test_tiny_run_writes_the_run_files_phase_grids_and_per_phase_speed(tiny_run):
    out, m, stdout = tiny_run
    assert m["step"] == 1 and all(math.isfinite(v) for v in m.values())
    assert {"ckpt.pt", "metrics.jsonl", "args.json", "curves.png", "reals.png",
            "samples_8.npz"} <= {p.name for p in out.iterdir()}
    names = sorted(p.name for p in (out / "samples").iterdir())
    assert sum("-phase" in n for n in names) == 2 and "kimg000001.000-final.png" in names
    phase_lines = [line for line in stdout.splitlines() if line.startswith("phase ")]
    assert len(phase_lines) == 3 and all("img/s" in s and "peak memory" in s for s in phase_lines)
    rows = _rows(out)
    assert [r["step"] for r in rows] == [0.25, 0.5, 0.75, 1]   # n_critic 1: one batch of reals
    assert [(r["res"], r["alpha"]) for r in rows] == [(4, 1.0), (4, 1.0), (8, 0.5), (8, 1.0)]


def test_run_crosses_two_resolutions_resets_adam_and_keeps_the_full_ema(tmp_path):
    out = tmp_path / "run"
    m = progan.main(_argv(out, "--resolution", "16", "--batch-size", "125", "--stabilize-kimg",
                          "0.25", "--fade-kimg", "0.25", "--kimg", "2", "--lr-rampup-kimg", "4",
                          "--metrics-every", "100", "--swd-images", "16", "--ms-ssim-pairs", "4"))
    rows = _rows(out)
    seq = [(r["res"], r["alpha"]) for r in rows]
    assert seq[:8] == [(4, 1.0)] * 3 + [(8, 0.5)] + [(8, 1.0)] * 3 + [(16, 0.5)]
    assert seq[8:] == [(16, 1.0)] * 8 and m["step"] == 2
    for r in rows:                                    # lr of the iteration: ramped by its kimg
        assert r["lr"] == pytest.approx(1e-3 * math.exp(-5 * (1 - (r["step"] - 0.125) / 4) ** 2))
    assert {"swd16", "swd_avg", "ms_ssim"} <= set(m) and m["swd16"] > 0 and 0 < m["ms_ssim"] < 1
    state = torch.load(out / "ckpt.pt", weights_only=True)
    for net, opt, unused in (("G", "opt_G", "to_rgb."), ("D", "opt_D", "from_rgb.")):
        names = list(state[net])                                # parameter order of net
        used = {i for i, n in enumerate(names) if not n.startswith((unused + "0", unused + "1"))}
        steps = {i: s["step"].item() for i, s in state[opt]["state"].items()}
        assert set(steps) == used and set(steps.values()) == {8.0}   # 8 its since 16x16 began
        g = state[opt]["param_groups"][0]
        assert (g["lr"], tuple(g["betas"]), g["eps"]) == (pytest.approx(rows[-1]["lr"]),
                                                          (0.0, 0.99), 1e-8)
    assert state["G_ema"].keys() == state["G"].keys()


def test_ema_starts_as_g_and_covers_blocks_not_yet_faded_in(tmp_path):
    out = tmp_path / "run"
    progan.main(_argv(out, "--resolution", "16", "--stabilize-kimg", "2"))   # 4x4 only
    s = torch.load(out / "ckpt.pt", weights_only=True)
    for k, v in s["G_ema"].items():
        trained = k.startswith(("blocks.0.", "to_rgb.0."))
        assert torch.allclose(v, s["G"][k], atol=1e-5) != trained, k


def test_ema_is_updated_every_iteration_with_decay_beta(tmp_path):
    progan.main(_argv(tmp_path / "run", "--ema-beta", "0"))      # beta 0: G_ema = G after a step
    s = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert all(torch.allclose(s["G_ema"][k], v, atol=1e-7) for k, v in s["G"].items())


def test_resume_in_the_middle_of_a_fade_in_equals_an_uninterrupted_run(tmp_path):
    flags = ["--stabilize-kimg", "0.5", "--fade-kimg", "1", "--ckpt-every", "100"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    progan.main(_argv(ref, *flags, "--kimg", "2"))
    progan.main(_argv(cut, *flags, "--kimg", "1"))
    state = torch.load(cut / "ckpt.pt", weights_only=True)
    assert state["nimg"] == 1000 and progan.schedule(1, 0.5, 1, 8, 250, {})[1] == 0.5  # mid-fade
    progan.main(_argv(cut, *flags, "--kimg", "2", "--resume"))
    assert _untimed(_rows(cut)) == _untimed(_rows(ref))
    a, b = (torch.load(d / "ckpt.pt", weights_only=True) for d in (ref, cut))
    for k in ("G", "D", "G_ema"):
        assert all(torch.equal(a[k][n], b[k][n]) for n in a[k]), k
    assert torch.equal(a["fixed_z"], b["fixed_z"]) and a["streams"] == b["streams"]


def test_a_small_dataset_cached_on_the_device_gives_the_same_run(monkeypatch, tmp_path):
    """Issue 18: main hands its device to the stream, so a small set lives there as uint8 (on
    CUDA; forced here on the CPU) and the run is bit for bit the DataLoader's."""
    from PIL import Image
    (tmp_path / "img").mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (250, 8, 8, 3), dtype=np.uint8)
    for i, a in enumerate(pixels):
        Image.fromarray(a).save(tmp_path / "img" / f"{i:03d}.png")
    flags = ["--dataset", f"folder:{tmp_path / 'img'}", "--mirror"]
    progan.main(_argv(tmp_path / "loader", *flags))
    stream, cache, cached = common.infinite_batches, common.device_cache, []
    monkeypatch.setattr(common, "infinite_batches",
                        lambda *a, **k: stream(*a, **{**k, "on_device": True}))
    monkeypatch.setattr(common, "device_cache",
                        lambda *a, **k: cached.append(cache(*a, **k)) or cached[-1])
    progan.main(_argv(tmp_path / "cached", *flags))
    assert len(cached) == 1 and cached[0] is not None and cached[0][0].dtype == torch.uint8
    assert _untimed(_rows(tmp_path / "cached")) == _untimed(_rows(tmp_path / "loader"))
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("loader", "cached"))
    assert all(torch.equal(a[k][n], b[k][n]) for k in ("G", "D", "G_ema") for n in a[k])


def test_train_step_has_no_host_sync_and_amp_keeps_losses_fp32(monkeypatch, tmp_path):
    """Issue 18: nothing in train_step waits for the GPU; --amp bf16 runs G's convolutions in
    bf16 and every loss and score in fp32."""
    seen = []

    def prepare(G, *a):
        if not seen:                                # hook once: G's first toRGB
            G.to_rgb[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        return (G, *a)
    outs = trap_host_syncs(monkeypatch, progan, prepare)
    m = progan.main(_argv(tmp_path / "run", "--amp", "bf16", "--mirror", "--kimg", "1"))
    assert len(outs) == 4 and math.isfinite(m["loss_D"]) and seen[0] == torch.bfloat16
    assert all({v.dtype for v in out.values()} == {torch.float32} for out in outs)  # 4 iterations


def test_export_samples_come_from_g_ema_and_load_generator_rebuilds_it(tiny_run):
    out, _, _ = tiny_run
    images = np.load(out / "samples_8.npz")["images"]
    assert images.shape == (8, 8, 8, 3) and images.dtype == np.uint8
    G, level, alpha = progan.load_generator(out / "ckpt.pt")
    assert (level, alpha, G.z_dim) == (1, 1.0, 8)
    z = torch.randn(8, 8, generator=torch.Generator().manual_seed(0 + 6))
    with torch.no_grad():
        assert np.array_equal(common.quantize(G(z, level, alpha)).numpy(), images)


def test_fid_every_builds_training_fid_at_start_up_and_scores_full_resolution(fid_recorder,
                                                                              tmp_path):
    m = progan.main(_argv(tmp_path / "run", "--fid-every", "2", "--fid-samples", "10",
                          "--fid-weights", "w.pth"))
    b = fid_recorder.built[0]
    assert (b["dataset"], b["img_size"], b["n_samples"], b["weights"]) == ("shapes", 8, 10, "w.pth")
    calls = fid_recorder.calls
    assert len(calls) == 2 and all(c["shape"] == (3, 3, 8, 8) for c in calls)  # 4x4 upsampled
    assert all(-1 <= c["lo"] and c["hi"] <= 1 for c in calls)
    assert (m["fid"], m["is"], m["is_std"]) == (12.0, 1.2, 0.1)


def test_fid_every_without_fid_py_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "fid", None)
    with pytest.raises(common.UserError, match="needs fid.py"):
        progan.main(_argv(tmp_path / "run", "--fid-every", "1"))
    assert not (tmp_path / "run").exists()
