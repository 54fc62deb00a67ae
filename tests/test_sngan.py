"""sngan.py: the card's fidelity checklist (spectral norm, losses, nets, init, schedule, sampling,
evaluation protocol) on CPU, through the functions a run uses (build_*, train_step, main)."""
import contextlib
import inspect
import io
import json
import math
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import sngan
from host_sync import trap_host_syncs
from tiny_args import TINY


def run(out_dir, *extra):
    return sngan.main(TINY["sngan.py"] + ["--out-dir", str(out_dir), *extra])


def read_metrics(out_dir):
    with open(out_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def untimed(rows, drop=()):
    return [{k: v for k, v in r.items() if k != "time_s" and k not in drop} for r in rows]


def top_sv(w):
    return torch.linalg.matrix_norm(w.detach().flatten(1), ord=2).item()


def sn_modules(net):
    return [m for m in net.modules() if hasattr(m, "weight_u")]


def tiny_args(*argv):
    """The args main builds its nets from (parse_args + the dataset's channel count)."""
    args = sngan.parse_args(list(argv))
    args.img_channels = 3
    return args


# ---- spectral normalization (Sec. 2, App. A; checklist 2-5) ----
@pytest.mark.parametrize("make, x_shape", [(lambda: nn.Linear(27, 64), (2, 27)),
                                           (lambda: nn.Conv2d(8, 16, 3), (2, 8, 5, 5))])
def test_power_iteration_converges_to_the_spectral_norm(make, x_shape):
    torch.manual_seed(0)
    m = sngan.spectral_norm(make()).train()
    w_mat = m.weight_orig.detach().reshape(m.weight_orig.shape[0], -1)   # (64, 27) or (16, 72)
    exact = torch.linalg.matrix_norm(w_mat, ord=2).item()
    x = torch.randn(x_shape)
    m(x)
    one_step_error = abs((m.weight_u @ w_mat @ m.weight_v).item() / exact - 1)
    for _ in range(49):
        m(x)
    estimate = (m.weight_u @ w_mat @ m.weight_v).item()
    assert abs(estimate / exact - 1) < 1e-3
    assert abs(top_sv(m.weight) - 1) < 1e-3
    assert one_step_error > 1e-3       # convergence comes from recycling u across forwards


def test_gradient_matches_eq10_closed_form_for_diag_3_1():
    m = sngan.spectral_norm(nn.Linear(2, 2, bias=False)).train()
    with torch.no_grad():
        m.weight_orig.copy_(torch.diag(torch.tensor([3.0, 1.0])))
    for _ in range(30):                 # u, v -> +-e1 (ratio 1/3 per step)
        m(torch.zeros(1, 2))
    assert torch.allclose(m.weight, torch.diag(torch.tensor([1.0, 1 / 3])), atol=1e-6)
    A = torch.tensor([[0.7, -1.3], [2.0, 0.4]])
    (A * m.weight).sum().backward()
    e11 = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    expected = (A - (A[0, 0] * 1 + A[1, 1] / 3) * e11) / 3      # Eq. (10), u = v = e1, sigma = 3
    assert torch.allclose(m.weight_orig.grad, expected, atol=1e-5)
    assert not torch.allclose(A / 3, expected, atol=1e-2)       # what a detached sigma would give


def test_one_power_iteration_per_training_forward():
    torch.manual_seed(0)
    m = sngan.spectral_norm(nn.Conv2d(4, 6, 3, padding=1)).train()
    u, W = m.weight_u.clone(), m.weight_orig.detach().reshape(6, -1)    # (d_out, d_in*k*k)
    v1 = W.t() @ u
    v1 = v1 / v1.norm()
    u1 = W @ v1
    u1 = u1 / u1.norm()
    sigma = u1 @ W @ v1
    x = torch.randn(2, 4, 5, 5)
    y = m(x)
    assert torch.allclose(m.weight_u, u1, atol=1e-6) and torch.allclose(m.weight_v, v1, atol=1e-6)
    assert torch.allclose(m.weight, m.weight_orig / sigma, atol=1e-6)
    assert torch.allclose(y, F.conv2d(x, m.weight_orig / sigma, m.bias, padding=1), atol=1e-5)
    u2 = W @ (W.t() @ u1)
    m(x)                                                          # a second forward: a second step
    assert torch.allclose(m.weight_u, u2 / u2.norm(), atol=1e-6)


def test_u_starts_as_a_normalized_gaussian_draw_and_eps_is_1e_12():
    torch.manual_seed(0)
    layer = nn.Linear(5, 7)
    rng = torch.get_rng_state()
    m = sngan.spectral_norm(layer)
    torch.set_rng_state(rng)
    u = torch.randn(7)                                            # isotropic: N(0, I), normalized
    assert torch.allclose(m.weight_u, u / u.norm(), atol=1e-7)
    with torch.no_grad():                                         # ||W v|| ~ 1e-7: eps must be tiny
        m.weight_orig.mul_(1e-7)
    m.train()(torch.zeros(1, 5))
    assert abs(m.weight_u.norm().item() - 1) < 1e-4 and abs(m.weight_v.norm().item() - 1) < 1e-4
    D = sngan.build_models(tiny_args("--d-ch", "16"))[1]     # what main builds
    hooks = [h for m in sn_modules(D) for h in m._forward_pre_hooks.values()]
    assert len(hooks) == 11 and all(h.eps == 1e-12 and h.n_power_iterations == 1 for h in hooks)


def test_u_persists_in_state_dict_and_only_changes_in_training_mode():
    torch.manual_seed(0)
    D = sngan.Discriminator(ch=16, img_size=32)
    x = torch.randn(4, 3, 32, 32)
    u0 = D.blocks[0].c1.weight_u.clone()                         # (d_out,) = (16,)
    D.train()(x)
    assert not torch.equal(u0, D.blocks[0].c1.weight_u)
    before = {k: v.clone() for k, v in D.named_buffers()}
    D.eval()(x)
    assert all(torch.equal(before[k], v) for k, v in D.named_buffers())
    sd = D.state_dict()
    assert sum(k.endswith("weight_u") for k in sd) == len(sn_modules(D)) == 11
    assert not any(k.endswith(".weight") for k in sd)               # W_SN is derived, not stored
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    torch.manual_seed(1)
    D2 = sngan.Discriminator(ch=16, img_size=32)
    D2.load_state_dict(torch.load(buf, weights_only=True))
    for mode in (False, True):
        assert torch.equal(D.train(mode)(x), D2.train(mode)(x))


def test_spectrally_normalized_dense_net_is_1_lipschitz():
    torch.manual_seed(0)
    layers = [nn.Linear(10, 32), nn.Linear(32, 32), nn.Linear(32, 1)]
    with torch.no_grad():
        for layer in layers:
            layer.weight.mul_(10)
    net = nn.Sequential(layers[0], nn.ReLU(), layers[1], nn.ReLU(), layers[2])
    x, y = torch.randn(512, 10), torch.randn(512, 10)

    def ratio():
        with torch.no_grad():
            return ((net(x) - net(y)).squeeze(1).abs() / (x - y).norm(dim=1)).max().item()

    assert ratio() > 2                                           # without SN the bound fails
    for layer in layers:
        sngan.spectral_norm(layer)
    net.train()
    for _ in range(300):
        net(x[:1])
    net.eval()
    assert ratio() <= 1 + 1e-3


def test_gamma_reparametrization_starts_at_sigma_w():
    torch.manual_seed(0)
    m = sngan.spectral_norm(nn.Linear(5, 7), gamma=True)
    assert torch.allclose(m.gamma, torch.linalg.matrix_norm(m.weight_orig.detach(), ord=2))
    assert "gamma" in dict(m.named_parameters())


# ---- losses (Eq. 15-17; checklist 6-7) ----
def test_loss_closed_forms():
    two, zero = torch.full((8, 1), 2.0), torch.zeros(8, 1)
    assert sngan.hinge_loss_D(two, -two).item() == 0.0
    assert sngan.hinge_loss_D(zero, zero).item() == 2.0
    assert sngan.hinge_loss_D(-two, two).item() == 6.0
    d_fake = torch.randn(8, 1)
    assert torch.allclose(sngan.hinge_loss_G(d_fake), -d_fake.mean())
    assert math.isclose(sngan.standard_loss_D(zero, zero).item(), 2 * math.log(2), rel_tol=1e-6)
    assert math.isclose(sngan.standard_loss_G(zero).item(), math.log(2), rel_tol=1e-6)
    assert sngan.standard_loss_G(torch.full((4, 1), 20.0)).item() < 1e-8   # non-saturating form


def _recorded_train_step(args, batch=4):
    """One train_step on tiny nets built like main's; returns (out, D outputs, G inputs)."""
    torch.manual_seed(0)
    G, D = sngan.build_models(args)
    d_out, z_in = [], []
    D.register_forward_hook(lambda m, i, o: d_out.append(o.detach()))
    G.register_forward_pre_hook(lambda m, i: z_in.append(i[0]))
    opt_G, opt_D = torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters())
    reals = [(torch.rand(batch, 3, 32, 32) * 2 - 1, torch.zeros(batch))] * args.n_dis
    out = sngan.train_step(G, D, opt_G, opt_D, iter(reals), args, common.Dist("cpu"),
                           contextlib.nullcontext)
    return out, d_out, torch.cat(z_in)


@pytest.mark.parametrize("loss", ["hinge", "standard"])
def test_train_step_uses_the_loss_the_flag_names(loss):
    args = tiny_args("--g-ch", "8", "--d-ch", "8", "--batch-size", "4", "--n-dis", "2",
                     "--loss", loss)
    out, d_out, _ = _recorded_train_step(args)
    d_gen, d_real, d_fake = d_out[0], d_out[-2], d_out[-1]       # G step first, last D step last
    if loss == "hinge":
        loss_G, loss_D = -d_gen.mean(), F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
    else:
        loss_G = F.softplus(-d_gen).mean()
        loss_D = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
    assert torch.allclose(out["loss_G"], loss_G, atol=1e-6)
    assert torch.allclose(out["loss_D"], loss_D, atol=1e-6)


@pytest.mark.parametrize("dist", ["normal", "uniform"])
def test_train_step_draws_z_from_the_z_dist_flag(dist):
    args = tiny_args("--g-ch", "8", "--d-ch", "8", "--batch-size", "64", "--n-dis", "1",
                     "--z-dist", dist)
    z = _recorded_train_step(args, batch=64)[2]                 # (128 + 64, 128): 24,576 draws
    assert z.shape == (192, 128)
    if dist == "normal":                                         # Sec. 4: N(0, I)
        assert abs(z.mean()) < 0.03 and abs(z.std() - 1) < 0.03 and z.abs().max() > 3
    else:                                                        # chainer-gan-lib: U[-1, 1]
        assert z.min() >= -1 and z.max() <= 1 and z.min() < -0.99 and z.max() > 0.99
        assert abs(z.mean()) < 0.02 and abs(z.std() - 3 ** -0.5) < 0.02


# ---- networks (Tab. 3-5, Fig. 8; checklist 1, 9-14) ----
def test_shapes_of_all_architectures():
    z = torch.randn(2, 128)
    for G, D, m in [(sngan.Generator(128, 32, 32), sngan.Discriminator(32, 32), 32),
                    (sngan.Generator(128, 64, 48), sngan.Discriminator(64, 48), 48),
                    (sngan.CNNGenerator(128, 64, 32), sngan.CNNDiscriminator(64, 32), 32),
                    (sngan.CNNGenerator(128, 64, 48), sngan.CNNDiscriminator(64, 48), 48)]:
        x = G(z)
        assert x.shape == (2, 3, m, m) and x.abs().max() <= 1
        assert D(x).shape == (2, 1)
    for m in (32, 48):                                           # dense input (M/8)^2 * 512
        assert sngan.CNNDiscriminator(512, m).fc.in_features == (m // 8) ** 2 * 512
        assert sngan.CNNGenerator(128, 512, m).l0.out_features == (m // 8) ** 2 * 512


def test_paper_widths():
    G, D = sngan.build_models(tiny_args())
    assert G.l1.out_features == 4 * 4 * 256 and len(G.blocks) == 3
    assert all(b.c1.out_channels == 256 for b in G.blocks) and G.c_out.out_channels == 3
    assert [b.c2.out_channels for b in D.blocks] == [128] * 4 and D.fc.in_features == 128
    assert [b.downsample for b in D.blocks[1:]] == [True, False, False] and D.fc.bias is None
    assert isinstance(D.blocks[0], sngan.OptimizedDBlock)
    stl = tiny_args("--dataset", "stl10")                        # Tab. 5 at 48x48
    G48, D48 = sngan.build_models(stl)
    assert [b.c2.out_channels for b in D48.blocks] == [64, 128, 256, 512, 1024]
    assert [b.downsample for b in D48.blocks[1:]] == [True, True, True, False]
    assert G48.l1.out_features == 6 * 6 * 512
    assert [b.c2.out_channels for b in G48.blocks] == [256, 128, 64]
    convs = lambda D: [m for m in D.convs if isinstance(m, nn.Conv2d)]   # noqa: E731
    code = sngan.build_models(tiny_args("--arch", "cnn"))[1]
    paper = sngan.build_models(tiny_args("--arch", "cnn", "--table3-literal"))[1]
    assert [c.out_channels for c in convs(code)] == [64, 128, 128, 256, 256, 512, 512]
    assert [c.out_channels for c in convs(paper)] == [64, 64, 128, 128, 256, 256, 512]
    assert [(c.kernel_size[0], c.stride[0], c.padding[0]) for c in convs(code)] == [
        (3, 1, 1), (4, 2, 1), (3, 1, 1), (4, 2, 1), (3, 1, 1), (4, 2, 1), (3, 1, 1)]
    cnn_G = sngan.build_models(tiny_args("--arch", "cnn"))[0]
    ups = [m for m in cnn_G.ups if isinstance(m, nn.ConvTranspose2d)]
    assert [(c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0]) for c in ups] == [
        (256, 4, 2, 1), (128, 4, 2, 1), (64, 4, 2, 1)]
    assert (cnn_G.out.kernel_size[0], cnn_G.out.stride[0], cnn_G.out.padding[0]) == (3, 1, 1)


@pytest.mark.parametrize("arch", ["resnet32", "resnet48", "cnn"])
def test_sn_on_every_D_layer_and_none_in_G(arch):
    argv, n_sn = {"resnet32": ([], 11), "resnet48": (["--img-size", "48"], 16),
                  "cnn": (["--arch", "cnn"], 8)}[arch]
    args = tiny_args(*argv, "--g-ch", "32", "--d-ch", "32")
    G, D = sngan.build_models(args)
    weighted = [m for m in D.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding))]
    assert len(sn_modules(D)) == len(weighted) == n_sn
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in D.modules())
    assert sn_modules(G) == [] and not any("weight_orig" in k for k in G.state_dict())
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in G.modules())


def test_resblocks_follow_fig8_and_never_overwrite_their_input():
    torch.manual_seed(0)
    pool = F.avg_pool2d
    for c_out, down in ((6, True), (4, False)):
        blk = sngan.DBlock(4, c_out, down, sngan.spectral_norm).eval()
        x = torch.randn(2, 4, 8, 8)
        x0 = x.clone()                                           # before the block sees x
        out = blk(x)
        assert torch.equal(x, x0)                               # no in-place ReLU on the input
        c1, c2, sc = blk.c1, blk.c2, blk.c_sc
        h = F.conv2d(F.relu(F.conv2d(F.relu(x0), c1.weight, c1.bias, padding=1)), c2.weight,
                     c2.bias, padding=1)
        s = F.conv2d(x0, sc.weight, sc.bias) if sc is not None else x0   # shortcut sees x
        ref = pool(h, 2) + pool(s, 2) if down else h + s
        assert torch.allclose(out, ref, atol=1e-5)
        assert c1.out_channels == 4 and (sc is None) == (not down and c_out == 4)  # hidden = in
    opt = sngan.OptimizedDBlock(3, 4, sngan.spectral_norm).eval()
    x3 = torch.randn(2, 3, 8, 8)
    out = opt(x3)
    h = F.relu(F.conv2d(x3, opt.c1.weight, opt.c1.bias, padding=1))   # no ReLU on the image
    ref = pool(F.conv2d(h, opt.c2.weight, opt.c2.bias, padding=1), 2) + F.conv2d(
        pool(x3, 2), opt.c_sc.weight, opt.c_sc.bias)
    assert torch.allclose(out, ref, atol=1e-5)
    g = sngan.GBlock(4, 4).eval()
    x = torch.randn(2, 4, 8, 8)
    up = lambda t: t.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)   # noqa: E731 nearest
    ref = g.c2(F.relu(g.b2(g.c1(up(F.relu(g.b1(x))))))) + g.c_sc(up(x))
    assert torch.allclose(g(x), ref, atol=1e-5)


def test_generator_heads():
    torch.manual_seed(0)
    G = sngan.build_models(tiny_args("--g-ch", "16"))[0]        # Tab. 4: BN-ReLU-conv3x3-tanh
    z = torch.randn(4, 128)
    h = G.blocks(G.l1(z).view(4, 16, 4, 4))                      # no BN/ReLU after the Linear
    ref = torch.tanh(F.conv2d(F.relu(G.b_out(h)), G.c_out.weight, G.c_out.bias, padding=1))
    assert torch.allclose(G(z), ref, atol=1e-5)
    cnn = sngan.build_models(tiny_args("--arch", "cnn", "--g-ch", "32"))[0]   # official net.py
    seen = {}
    cnn.bn0.register_forward_hook(lambda m, i, o: seen.update(bn=o))
    cnn.ups.register_forward_pre_hook(lambda m, i: seen.update(ups=i[0]))
    cnn(z)
    assert seen["bn"].shape == (4, 16 * 32) and seen["ups"].shape == (4, 32, 4, 4)
    assert torch.allclose(seen["bn"].mean(0), torch.zeros(512), atol=1e-5)   # per-unit BN
    assert torch.equal(seen["ups"], F.relu(seen["bn"]).view(4, 32, 4, 4))      # then ReLU


def _assert_glorot(w, gain, name):
    fan_in, fan_out = w[0].numel(), w.shape[0] * w[0, 0].numel()
    bound = gain * math.sqrt(6 / (fan_in + fan_out))             # GlorotUniform(gain)
    w = w.detach()
    assert 0.8 * bound < w.abs().max() <= bound * (1 + 1e-6), name
    assert abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 0.2, name


def test_glorot_init_gains_of_the_nets_main_builds():
    torch.manual_seed(0)
    args = tiny_args("--g-ch", "64", "--d-ch", "64")
    G, D = sngan.build_models(args)
    root2 = math.sqrt(2)                                          # residual 3x3 convs: sqrt(2)
    layers = [("G.l1", G.l1.weight, 1.0), ("G.c_out", G.c_out.weight, 1.0),
              ("D.fc", D.fc.weight_orig, 1.0)]
    for i, b in enumerate(G.blocks):
        layers += [(f"G{i}.c1", b.c1.weight, root2), (f"G{i}.c2", b.c2.weight, root2),
                   (f"G{i}.c_sc", b.c_sc.weight, 1.0)]
    for i, b in enumerate(D.blocks):
        layers += [(f"D{i}.c1", b.c1.weight_orig, root2), (f"D{i}.c2", b.c2.weight_orig, root2)]
        if b.c_sc is not None:
            layers.append((f"D{i}.c_sc", b.c_sc.weight_orig, 1.0))
    assert len(layers) == 3 + 9 + 10
    for name, w, gain in layers:
        _assert_glorot(w, gain, name)
    biases = [m.bias for net in (G, D) for m in net.modules()
              if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None]
    assert len(biases) == 21 and all(b.abs().max() == 0 for b in biases)


def test_cnn_init_is_normal_0_02():
    torch.manual_seed(0)
    args = tiny_args("--arch", "cnn", "--g-ch", "64", "--d-ch", "64")
    G, D = sngan.build_models(args)
    kinds = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)
    ws = [m.weight for m in G.modules() if isinstance(m, kinds)]
    ws += [m.weight_orig for m in sn_modules(D)]
    assert len(ws) == 5 + 8
    for w in ws:
        assert abs(w.std().item() / 0.02 - 1) < 0.2 and abs(w.mean().item()) < 0.005
    biases = [m.bias for n in (G, D) for m in n.modules() if isinstance(m, kinds)]
    assert all(b.abs().max() == 0 for b in biases)


def test_cnn_D_is_tab3_with_leaky_slope_0_1():
    torch.manual_seed(0)
    for argv, slope in (([], 0.1), (["--lrelu-slope", "0.2"], 0.2)):
        D = sngan.build_models(tiny_args("--arch", "cnn", "--d-ch", "32", *argv))[1].eval()
        x = torch.randn(2, 3, 32, 32)
        out = D(x)
        h = x
        for conv in [m for m in D.convs if isinstance(m, nn.Conv2d)]:
            h = F.leaky_relu(F.conv2d(h, conv.weight, conv.bias, stride=conv.stride, padding=1),
                             slope)
        assert torch.allclose(out, F.linear(h.flatten(1), D.fc.weight, D.fc.bias), atol=1e-5)


def test_global_sum_pooling_of_relu():
    torch.manual_seed(0)
    D = sngan.build_models(tiny_args("--d-ch", "8"))[1]
    for value, pooled in ((0.5, 64 * 0.5), (-0.5, 0.0)):        # 8x8 map, ReLU before the sum
        hook = D.blocks.register_forward_hook(lambda m, i, o: torch.full_like(o, value))
        seen = []
        pre = D.fc.register_forward_pre_hook(lambda m, i: seen.append(i[0]))
        D(torch.randn(2, 3, 32, 32))
        hook.remove(), pre.remove()
        assert torch.allclose(seen[0], torch.full((2, 8), pooled))


# ---- schedule and train step (Tab. 1, official updater.py; checklist 15-17, 19) ----
def test_defaults_table_and_settings():
    assert sngan.SETTINGS == {"A": (1e-4, 0.5, 0.9, 5), "B": (1e-4, 0.5, 0.999, 1),
                              "C": (2e-4, 0.5, 0.999, 1), "D": (1e-3, 0.5, 0.9, 5),
                              "E": (1e-3, 0.5, 0.999, 5), "F": (1e-3, 0.9, 0.999, 5),
                              "resnet": (2e-4, 0.0, 0.9, 5)}
    a = vars(sngan.parse_args([]))
    keys = ("lr", "betas", "n_dis", "batch_size", "g_batch_size", "lr_decay", "steps", "loss",
            "g_ch", "d_ch", "img_size", "z_dim", "z_dist", "dequantize", "lrelu_slope",
            "fid_samples", "fid_ref_size", "fid_ref_split")
    assert {k: a[k] for k in keys} == {
        "lr": 2e-4, "betas": [0.0, 0.9], "n_dis": 5, "batch_size": 64, "g_batch_size": 128,
        "lr_decay": True, "steps": 50_000, "loss": "hinge", "g_ch": 256, "d_ch": 128,
        "img_size": 32, "z_dim": 128, "z_dist": "normal", "dequantize": True, "lrelu_slope": 0.1,
        "fid_samples": 5000, "fid_ref_size": 10_000, "fid_ref_split": "train"}
    c = vars(sngan.parse_args(["--arch", "cnn"]))
    assert (c["setting"], c["loss"], c["n_dis"], c["g_batch_size"], c["lr_decay"], c["steps"],
            c["betas"], c["lr"], c["dequantize"]) == (
        "C", "standard", 1, 64, False, 100_000, [0.5, 0.999], 2e-4, False)
    s = vars(sngan.parse_args(["--dataset", "stl10"]))
    assert (s["img_size"], s["g_ch"], s["d_ch"], s["steps"], s["lr_decay"], s["dequantize"]) == (
        48, 512, 1024, 100_000, True, False)
    assert sngan.parse_args(["--dataset", "stl10", "--arch", "cnn"]).setting == "B"
    d = sngan.parse_args(["--setting", "D"])
    assert (d.lr, d.betas, d.n_dis) == (1e-3, [0.5, 0.9], 5)
    h = sngan.parse_args(["--setting", "D", "--lr", "3e-4", "--betas", "0.1", "0.8", "--d-steps",
                          "2", "--g-width", "64", "--d-width", "32"])   # house aliases
    assert (h.lr, h.betas, h.n_dis, h.g_ch, h.d_ch) == (3e-4, [0.1, 0.8], 2, 64, 32)


def test_linear_lr_decay():
    args = sngan.parse_args(["--steps", "10"])
    assert [sngan.lr_factor(k, args) for k in (0, 3, 10)] == [1.0, 0.7, 0.0]
    assert sngan.lr_factor(5, sngan.parse_args(["--arch", "cnn"])) == 1.0


def test_train_step_runs_n_dis_D_steps_and_a_double_G_batch():
    torch.manual_seed(0)
    args = tiny_args("--batch-size", "4", "--g-ch", "8", "--d-ch", "8")   # resnet: n_dis 5, G 8
    G, D = sngan.build_models(args)
    sizes = []
    D.register_forward_pre_hook(lambda m, i: sizes.append(i[0].shape[0]))
    opt_G, opt_D = torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters())
    batches = iter([(torch.rand(4, 3, 32, 32) * 2 - 1, torch.zeros(4))] * 5)
    u0 = D.blocks[1].c1.weight_u.clone()
    sngan.train_step(G, D, opt_G, opt_D, batches, args, common.Dist("cpu"), contextlib.nullcontext)
    assert sizes == [8] + [4, 4] * 5                             # G step, then (real, fake) x n_dis
    assert next(batches, None) is None                           # one real batch per D step
    assert opt_D.state[D.fc.weight_orig]["step"] == 5 and opt_G.state[G.l1.weight]["step"] == 1
    assert not torch.equal(u0, D.blocks[1].c1.weight_u)


def test_dequantize_matches_official_loader():
    k = torch.arange(256.0)
    x = sngan.dequantize(k / 127.5 - 1, torch.rand(256))       # common.py's [-1, 1] scaling
    assert ((x >= k / 128 - 1) & (x < (k + 1) / 128 - 1 + 1e-6)).all()
    assert torch.equal(sngan.dequantize(k / 127.5 - 1, torch.zeros(256)), k / 128 - 1)


def test_spectral_norm_logging_leaves_D_untouched():
    torch.manual_seed(0)
    D = sngan.Discriminator(8, 32).train()
    D(torch.randn(2, 3, 32, 32))
    before = {k: v.clone() for k, v in D.state_dict().items()}
    sig = sngan.d_spectral_norms(D)
    assert len(sig) == 11 and all(v >= 1 - 1e-5 for v in sig.values())   # u^T W v <= sigma(W)
    assert all(torch.equal(before[k], v) for k, v in D.state_dict().items())


# ---- runs through main() (checklist 16-18, 20) ----
def test_smoke_resnet_schedule_and_optimizers(tmp_path):
    m = run(tmp_path, "--steps", "3")
    assert m["step"] == 3 and all(math.isfinite(v) for v in m.values())
    for f in ("ckpt.pt", "metrics.jsonl", "args.json", "reals.png", "curves.png",
              "samples/0000002.png"):
        assert (tmp_path / f).exists(), f
    lines = read_metrics(tmp_path)
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert all(math.isclose(r["lr"], 2e-4 * (1 - r["step"] / 3), abs_tol=1e-12) for r in lines)
    sig = {k: v for k, v in lines[1].items() if k.startswith("sigma/")}
    assert len(sig) == 11 and all(v >= 1 - 1e-4 for v in sig.values())
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    for opt, n_updates in (("opt_G", 3), ("opt_D", 3 * 5)):     # n_dis D updates per G iteration
        group = state[opt]["param_groups"][0]
        assert math.isclose(group["lr"], 2e-4 / 3, rel_tol=1e-9)   # the lr of the last step
        assert tuple(group["betas"]) == (0.0, 0.9)
        assert all(s["step"] == n_updates for s in state[opt]["state"].values()), opt
    assert sum(k.endswith("weight_u") for k in state["D"]) == 11


def test_cnn_setting_export_in_eval_mode_and_load_generator(tmp_path):
    m = run(tmp_path, "--arch", "cnn", "--img-size", "48", "--g-ch", "32", "--d-ch", "32",
            "--gamma-reparam", "--steps", "3")
    args = json.loads((tmp_path / "args.json").read_text())
    assert (args["setting"], args["loss"], args["n_dis"]) == ("B", "standard", 1)
    assert all(math.isfinite(v) for v in m.values())
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    for opt in ("opt_G", "opt_D"):                               # Tab. 1 setting B in both Adams
        group = state[opt]["param_groups"][0]
        assert (group["lr"], tuple(group["betas"])) == (1e-4, (0.5, 0.999))
        assert all(s["step"] == 3 for s in state[opt]["state"].values()), opt
    args_json = (tmp_path / "args.json").read_bytes()
    run(tmp_path, "--arch", "cnn", "--img-size", "48", "--g-ch", "32", "--d-ch", "32",
        "--gamma-reparam", "--steps", "3", "--resume", "--export-samples", "8")
    assert (tmp_path / "args.json").read_bytes() == args_json   # a finished run only exports
    imgs = np.load(tmp_path / "samples_8.npz")["images"]
    assert imgs.shape == (8, 48, 48, 3) and imgs.dtype == np.uint8
    G = sngan.load_generator(tmp_path / "ckpt.pt")
    assert not G.training                                        # BN running averages
    z = sngan.sample_z(8, 128, "normal", "cpu", torch.Generator().manual_seed(1))   # seed + 1
    with torch.no_grad():
        x = G(z)
    official = np.clip(x.numpy() * 127.5 + 127.5, 0, 255).astype(np.uint8)   # evaluation.py
    assert np.array_equal(imgs, official.transpose(0, 2, 3, 1))
    G.train()
    with torch.no_grad():
        assert not torch.allclose(G(z), x, atol=1e-3)          # train mode would differ


def test_resume_equals_uninterrupted_deterministic_and_takes_a_new_lr(tmp_path):
    flags = ["--no-lr-decay"]                        # the linear schedule depends on --steps itself
    full = run(tmp_path / "a", "--steps", "3", *flags)
    run(tmp_path / "b", "--steps", "2", *flags)
    a_lines, b_lines = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert untimed(a_lines[:2]) == untimed(b_lines)              # same seed, same run
    resumed = run(tmp_path / "b", "--steps", "3", "--resume", *flags)
    assert untimed([full]) == untimed([resumed])
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("a", "b"))
    for net in ("G", "D", "fixed_z"):
        items = a[net].items() if net != "fixed_z" else [("z", a[net])]
        other = b[net] if net != "fixed_z" else {"z": b[net]}
        assert all(torch.equal(v, other[k]) for k, v in items)
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == [1, 2, 3]
    run(tmp_path / "b", "--steps", "4", "--resume", "--lr", "1e-4", *flags)   # lr is mutable
    state = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert all(g["lr"] == 1e-4 for o in ("opt_G", "opt_D") for g in state[o]["param_groups"])
    assert read_metrics(tmp_path / "b")[-1]["lr"] == 1e-4
    with pytest.raises(common.UserError, match="cannot change --d-ch"):
        run(tmp_path / "b", "--steps", "5", "--resume", "--d-ch", "8", *flags)


class FakeTrainingFID:
    """fid.TrainingFID's contract (/work/prompts/plumbing.md): records what sngan passes."""
    made = []

    def __init__(self, dataset, data_root, img_size, device, n_samples, weights=None,
                 ref_split="train", ref_size=None, cache_dir=None, class_labels=(None,)):
        self.kw = dict(dataset=dataset, img_size=img_size, n_samples=n_samples, weights=weights,
                       ref_split=ref_split, ref_size=ref_size, class_labels=class_labels)
        self.images = []
        FakeTrainingFID.made.append(self)

    def __call__(self, sample_fn, class_label=None, n_samples=None):
        n = n_samples or self.kw["n_samples"]
        self.images.append(torch.cat([sample_fn(min(50, n - i)) for i in range(0, n, 50)]))
        return {"fid": 100.0 - len(self.images), "is": 1.5, "is_std": 0.25}


def test_fid_every_logs_is_and_fid_from_eval_mode_samples_without_touching_training(
        tmp_path, monkeypatch):
    FakeTrainingFID.made = []
    monkeypatch.setitem(sys.modules, "fid", types.SimpleNamespace(TrainingFID=FakeTrainingFID))
    m = run(tmp_path / "fid", "--steps", "3", "--fid-every", "2", "--fid-samples", "12",
            "--sample-every", "1")
    (ev,) = FakeTrainingFID.made                                 # built once, at start-up
    assert ev.kw == dict(dataset="shapes", img_size=32, n_samples=12, weights=None,
                         ref_split="train", ref_size=10_000, class_labels=(None,))
    rows = read_metrics(tmp_path / "fid")
    assert [(r["step"], r.get("fid"), r.get("is"), r.get("is_std")) for r in rows] == [
        (1, None, None, None), (2, 99.0, 1.5, 0.25), (3, 98.0, 1.5, 0.25)]   # and at the end
    assert m["fid"] == 98.0
    G = sngan.load_generator(tmp_path / "fid" / "ckpt.pt")
    z = sngan.sample_z(12, 128, "normal", "cpu", torch.Generator().manual_seed(2))   # seed + 2
    with torch.no_grad():
        x = G(z)
    assert torch.equal(ev.images[-1], sngan.to_uint8(x).float() / 127.5 - 1)   # eval mode
    plain = run(tmp_path / "plain", "--steps", "3")              # the training stream is untouched
    assert untimed([m], ("fid", "is", "is_std")) == untimed([plain])
    monkeypatch.setitem(sys.modules, "fid", None)               # a copy without fid.py
    with pytest.raises(common.UserError, match="--fid-every needs fid.py"):
        run(tmp_path / "nofid", "--fid-every", "2")
    assert not (tmp_path / "nofid").exists()


def test_fake_training_fid_has_the_signature_of_the_real_one():
    import fid
    if not hasattr(fid, "TrainingFID"):
        pytest.skip("fid.TrainingFID not in fid.py yet")
    for name in ("__init__", "__call__"):
        ours = inspect.signature(getattr(FakeTrainingFID, name)).parameters
        assert list(ours) == list(inspect.signature(getattr(fid.TrainingFID, name)).parameters)


# ---- speed (issue 18): same math, no host sync in the step, bf16 forwards with fp32 losses ----
def test_train_step_has_no_host_sync_and_amp_keeps_losses_fp32(tmp_path, monkeypatch):
    seen = []

    def prepare(G, D, opt_G, opt_D, batches, args, *rest):
        G.c_out.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        reals = iter([next(batches) for _ in range(args.n_dis)])  # on CUDA: common's cache
        return (G, D, opt_G, opt_D, reals, args, *rest)
    outs = trap_host_syncs(monkeypatch, sngan, prepare)
    m = run(tmp_path, "--steps", "1", "--amp", "bf16", "--n-dis", "2")
    seen.extend(v.dtype for v in outs[-1].values())
    assert len(outs) == 1 and math.isfinite(m["loss_D"])
    assert seen[0] == torch.bfloat16                                 # G's convs in bf16
    assert seen[-4:] == [torch.float32] * 4                       # losses and D outputs fp32
