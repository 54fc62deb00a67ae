"""sngan.py: the card's paper invariants (spectral norm, losses, nets, schedule) on CPU, plus smoke,
resume and determinism runs through main()."""
import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sngan
from tiny_args import TINY


def run(out_dir, *extra):
    return sngan.main(TINY["sngan.py"] + ["--out-dir", str(out_dir), *extra])


def read_metrics(out_dir):
    with open(out_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def top_sv(w):
    return torch.linalg.matrix_norm(w.detach().flatten(1), ord=2).item()


def sn_modules(net):
    return [m for m in net.modules() if hasattr(m, "weight_u")]


# ---- spectral normalization (Sec. 2, App. A) ----
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


# ---- losses (Eq. 15-17) ----
def test_loss_closed_forms():
    two, zero = torch.full((8, 1), 2.0), torch.zeros(8, 1)
    assert sngan.hinge_loss_D(two, -two).item() == 0.0
    assert sngan.hinge_loss_D(zero, zero).item() == 2.0
    d_fake = torch.randn(8, 1)
    assert torch.allclose(sngan.hinge_loss_G(d_fake), -d_fake.mean())
    assert math.isclose(sngan.standard_loss_D(zero, zero).item(), 2 * math.log(2), rel_tol=1e-6)
    assert math.isclose(sngan.standard_loss_G(zero).item(), math.log(2), rel_tol=1e-6)
    assert sngan.standard_loss_G(torch.full((4, 1), 20.0)).item() < 1e-8   # non-saturating form


# ---- networks (Tab. 3-5, Fig. 8) ----
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
    G, D = sngan.Generator(128, 256, 32), sngan.Discriminator(128, 32)
    assert G.l1.out_features == 4 * 4 * 256 and len(G.blocks) == 3
    assert all(b.c1.out_channels == 256 for b in G.blocks) and G.c_out.out_channels == 3
    assert [b.c2.out_channels for b in D.blocks] == [128] * 4 and D.fc.in_features == 128
    assert [b.downsample for b in D.blocks[1:]] == [True, False, False] and D.fc.bias is None
    D48 = sngan.Discriminator(1024, 48)
    assert [b.c2.out_channels for b in D48.blocks] == [64, 128, 256, 512, 1024]
    assert [b.c2.out_channels for b in sngan.Generator(128, 512, 48).blocks] == [256, 128, 64]
    convs = lambda D: [m for m in D.convs if isinstance(m, nn.Conv2d)]   # noqa: E731
    code = sngan.CNNDiscriminator(512, 32)
    paper = sngan.CNNDiscriminator(512, 32, table3_literal=True)
    assert [c.out_channels for c in convs(code)] == [64, 128, 128, 256, 256, 512, 512]
    assert [c.out_channels for c in convs(paper)] == [64, 64, 128, 128, 256, 256, 512]
    assert [(c.kernel_size[0], c.stride[0], c.padding[0]) for c in convs(code)] == [
        (3, 1, 1), (4, 2, 1), (3, 1, 1), (4, 2, 1), (3, 1, 1), (4, 2, 1), (3, 1, 1)]


@pytest.mark.parametrize("arch", ["resnet32", "resnet48", "cnn"])
def test_sn_on_every_D_layer_and_none_in_G(arch):
    G, D, n_sn = {"resnet32": (sngan.Generator(128, 16, 32), sngan.Discriminator(16, 32), 11),
                  "resnet48": (sngan.Generator(128, 32, 48), sngan.Discriminator(32, 48), 16),
                  "cnn": (sngan.CNNGenerator(128, 32, 32), sngan.CNNDiscriminator(32, 32), 8)}[arch]
    weighted = [m for m in D.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding))]
    assert len(sn_modules(D)) == len(weighted) == n_sn
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in D.modules())
    assert sn_modules(G) == [] and not any("weight_orig" in k for k in G.state_dict())
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in G.modules())


def test_resblocks_follow_fig8():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    blk = sngan.DBlock(4, 6, True, sngan.spectral_norm).eval()
    blk(x)                                                         # sets W_SN (eval: u unchanged)
    pool, c1, c2, sc = F.avg_pool2d, blk.c1, blk.c2, blk.c_sc
    ref = pool(F.conv2d(F.relu(F.conv2d(F.relu(x), c1.weight, c1.bias, padding=1)), c2.weight,
                        c2.bias, padding=1), 2) + pool(F.conv2d(x, sc.weight, sc.bias), 2)
    assert torch.allclose(blk(x), ref, atol=1e-5)                 # shortcut sees x, not relu(x)
    assert c1.out_channels == 4                                    # hidden width = in (official)
    opt = sngan.OptimizedDBlock(3, 4, sngan.spectral_norm).eval()
    x3 = torch.randn(2, 3, 8, 8)
    opt(x3)
    h = F.relu(F.conv2d(x3, opt.c1.weight, opt.c1.bias, padding=1))
    ref = pool(F.conv2d(h, opt.c2.weight, opt.c2.bias, padding=1), 2) + F.conv2d(
        pool(x3, 2), opt.c_sc.weight, opt.c_sc.bias)
    assert torch.allclose(opt(x3), ref, atol=1e-5)
    g = sngan.GBlock(4, 4).eval()
    up = lambda t: t.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)   # noqa: E731 nearest
    ref = g.c2(F.relu(g.b2(g.c1(up(F.relu(g.b1(x))))))) + g.c_sc(up(x))
    assert torch.allclose(g(x), ref, atol=1e-5)


def test_glorot_init_gains():
    torch.manual_seed(0)
    blk = sngan.GBlock(64, 64)
    for conv, gain in [(blk.c1, math.sqrt(2)), (blk.c_sc, 1.0)]:
        bound = gain * math.sqrt(6 / (conv.weight[0].numel() + conv.weight[:, 0].numel()))
        assert 0.95 * bound < conv.weight.abs().max() <= bound and conv.bias.abs().max() == 0


def test_global_sum_pooling():
    torch.manual_seed(0)
    D = sngan.Discriminator(8, 32)
    D.blocks.register_forward_hook(lambda m, i, o: torch.full_like(o, 0.5))   # constant 8x8 map
    seen = []
    D.fc.register_forward_pre_hook(lambda m, i: seen.append(i[0]))
    D(torch.randn(2, 3, 32, 32))
    assert torch.allclose(seen[0], torch.full((2, 8), 64 * 0.5))


# ---- schedule and train step (Tab. 1, official updater.py) ----
def test_defaults_table_and_settings():
    assert sngan.SETTINGS == {"A": (1e-4, 0.5, 0.9, 5), "B": (1e-4, 0.5, 0.999, 1),
                              "C": (2e-4, 0.5, 0.999, 1), "D": (1e-3, 0.5, 0.9, 5),
                              "E": (1e-3, 0.5, 0.999, 5), "F": (1e-3, 0.9, 0.999, 5),
                              "resnet": (2e-4, 0.0, 0.9, 5)}
    a = vars(sngan.parse_args([]))
    keys = ("lr", "betas", "n_dis", "batch_size", "g_batch_size", "lr_decay", "steps", "loss",
            "g_ch", "d_ch", "img_size", "z_dim", "dequantize")
    assert {k: a[k] for k in keys} == {
        "lr": 2e-4, "betas": [0.0, 0.9], "n_dis": 5, "batch_size": 64, "g_batch_size": 128,
        "lr_decay": True, "steps": 50_000, "loss": "hinge", "g_ch": 256, "d_ch": 128,
        "img_size": 32, "z_dim": 128, "dequantize": True}
    c = vars(sngan.parse_args(["--arch", "cnn"]))
    assert (c["setting"], c["loss"], c["n_dis"], c["g_batch_size"], c["lr_decay"], c["steps"]) == (
        "C", "standard", 1, 64, False, 100_000)
    s = vars(sngan.parse_args(["--dataset", "stl10"]))
    assert (s["img_size"], s["g_ch"], s["d_ch"], s["steps"], s["lr_decay"]) == (
        48, 512, 1024, 100_000, True)
    assert sngan.parse_args(["--dataset", "stl10", "--arch", "cnn"]).setting == "B"


def test_linear_lr_decay():
    args = sngan.parse_args(["--steps", "10"])
    assert [sngan.lr_factor(k, args) for k in (0, 3, 10)] == [1.0, 0.7, 0.0]
    assert sngan.lr_factor(5, sngan.parse_args(["--arch", "cnn"])) == 1.0


def test_train_step_runs_n_dis_D_steps_and_a_double_G_batch():
    torch.manual_seed(0)
    args = sngan.parse_args(["--batch-size", "4"])               # resnet: n_dis 5, G batch 8
    G, D = sngan.Generator(128, 8, 32), sngan.Discriminator(8, 32)
    sizes = []
    D.register_forward_pre_hook(lambda m, i: sizes.append(i[0].shape[0]))
    opt_G, opt_D = torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters())
    batches = iter([(torch.rand(4, 3, 32, 32) * 2 - 1, torch.zeros(4))] * 5)
    u0 = D.blocks[1].c1.weight_u.clone()
    sngan.train_step(G, D, opt_G, opt_D, batches, args, torch.device("cpu"), contextlib.nullcontext)
    assert sizes == [8] + [4, 4] * 5                             # G step, then (real, fake) x n_dis
    assert next(batches, None) is None                           # one real batch per D step
    assert opt_D.state[D.fc.weight_orig]["step"] == 5 and opt_G.state[G.l1.weight]["step"] == 1
    assert not torch.equal(u0, D.blocks[1].c1.weight_u)


def test_dequantize_matches_official_loader():
    k = torch.arange(256.0)
    x = sngan.dequantize(k / 127.5 - 1)                        # common.py's [-1, 1] scaling
    assert ((x >= k / 128 - 1) & (x < (k + 1) / 128 - 1 + 1e-6)).all()


def test_spectral_norm_logging_leaves_D_untouched():
    torch.manual_seed(0)
    D = sngan.Discriminator(8, 32).train()
    D(torch.randn(2, 3, 32, 32))
    before = {k: v.clone() for k, v in D.state_dict().items()}
    sig = sngan.d_spectral_norms(D)
    assert len(sig) == 11 and all(v >= 1 - 1e-5 for v in sig.values())   # u^T W v <= sigma(W)
    assert all(torch.equal(before[k], v) for k, v in D.state_dict().items())


# ---- runs through main() ----
def test_smoke_resnet(tmp_path):
    m = run(tmp_path, "--steps", "3")
    assert m["step"] == 3 and all(math.isfinite(v) for v in m.values())
    for f in ("ckpt.pt", "metrics.jsonl", "args.json", "reals.png", "samples/0000002.png"):
        assert (tmp_path / f).exists(), f
    lines = read_metrics(tmp_path)
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert all(math.isclose(r["lr"], 2e-4 * (1 - r["step"] / 3), abs_tol=1e-12) for r in lines)
    sig = {k: v for k, v in lines[1].items() if k.startswith("sigma/")}
    assert len(sig) == 11 and all(v >= 1 - 1e-4 for v in sig.values())
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert math.isclose(state["opt_D"]["param_groups"][0]["lr"], 2e-4 / 3, rel_tol=1e-9)
    assert sum(k.endswith("weight_u") for k in state["D"]) == 11


def test_smoke_cnn_48_standard_loss_gamma_export(tmp_path):
    m = run(tmp_path, "--arch", "cnn", "--img-size", "48", "--g-ch", "32", "--d-ch", "32",
            "--gamma-reparam", "--export-samples", "8")
    args = json.loads((tmp_path / "args.json").read_text())
    assert (args["setting"], args["loss"], args["n_dis"]) == ("B", "standard", 1)
    assert all(math.isfinite(v) for v in m.values())
    imgs = np.load(tmp_path / "samples_8.npz")["images"]
    assert imgs.shape == (8, 48, 48, 3) and imgs.dtype == np.uint8


def test_resume_equals_uninterrupted_and_runs_are_deterministic(tmp_path):
    flags = ["--no-lr-decay"]                        # the linear schedule depends on --steps itself
    full = run(tmp_path / "a", "--steps", "3", *flags)
    run(tmp_path / "b", "--steps", "2", *flags)
    drop = lambda m: {k: v for k, v in m.items() if k not in ("it_s", "eta_s")}   # noqa: E731
    a_lines, b_lines = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [drop(m) for m in a_lines[:2]] == [drop(m) for m in b_lines]   # same seed, same run
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:   # a line logged after the last ckpt
        f.write(json.dumps({"step": 3, "loss_D": 0.0}) + "\n")
    resumed = run(tmp_path / "b", "--steps", "3", "--resume", *flags)
    assert drop(full) == drop(resumed)
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("a", "b"))
    for net in ("G", "D"):
        assert all(torch.equal(a[net][k], b[net][k]) for k in a[net])
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == [1, 2, 3]
