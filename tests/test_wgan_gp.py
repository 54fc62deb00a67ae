"""wgan_gp.py: the card's section 8 tests and every fidelity-checklist item (card section 7),
through main / train_step and the modules a run builds. Mutants: tests/mutants.py."""
import json
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import wgan_gp
from tiny_args import TINY

ARGV = TINY["wgan_gp.py"]
TOY = ["--dataset", "8gaussians", "--device", "cpu", "--dim-g", "16", "--dim-d", "16",
       "--batch-size", "32", "--steps", "3", "--log-every", "1", "--sample-every", "0",
       "--ckpt-every", "1"]
TEXT = ["--dataset", "shapes-text", "--device", "cpu", "--dim-g", "8", "--batch-size", "8",
        "--n-critic", "2", "--steps", "2", "--max-examples", "200", "--js-samples", "16",
        "--log-every", "1", "--sample-every", "1", "--ckpt-every", "1"]     # Sec. 5.5, tiny
OFF = lambda: torch.autocast("cpu", enabled=False)   # noqa: E731  the amp context of a CPU run
ONE = common.Dist("cpu")   # one process (no torchrun here): every Dist method a no-op


def run(tmp_path, *extra, base=ARGV):
    return wgan_gp.main(base + ["--out-dir", str(tmp_path)] + list(extra))


def rows(path):
    return [{k: v for k, v in json.loads(s).items() if k != "time_s"}
            for s in (path / "metrics.jsonl").read_text().splitlines()]


def args_for(*flags):
    return wgan_gp.parse_args(list(flags) + ["--out-dir", "unused"])


# ---- flags (checklist 1, 7, 11, 12, 18) ----
def test_paper_defaults_per_configuration_and_help_shows_each_rule(capsys):
    r = args_for()
    assert (r.dataset, r.arch, r.n_critic, r.lam, r.lr, r.betas, r.steps, r.batch_size,
            r.g_batch_size, r.z_dim, r.dim_g, r.dim_d, r.lr_decay, r.dequantize, r.img_size) == (
        "cifar10", "resnet", 5, 10.0, 2e-4, [0.0, 0.9], 100_000, 64, 128, 128, 128, 128, True,
        True, 32)                                                   # App. F, gan_cifar_resnet.py
    t = args_for("--dataset", "8gaussians")
    assert (t.arch, t.batch_size, t.z_dim, t.dim_g, t.lr, t.betas, t.lr_decay, t.n_critic) == (
        "mlp", 256, 2, 512, 1e-4, [0.5, 0.9], False, 5)             # official gan_toy.py
    c = args_for("--arch", "dcgan")
    assert (c.lr, c.betas, c.steps, c.g_batch_size, c.lr_decay, c.dim_g, c.dequantize) == (
        1e-4, [0.5, 0.9], 200_000, 64, False, 128, False)           # Sec. 5.3, gan_cifar.py
    w = args_for("--arch", "dcgan", "--mode", "wgan")
    assert (w.lr, w.n_critic) == (5e-5, 5)
    g = args_for("--arch", "dcgan", "--mode", "dcgan")
    assert (g.lr, g.betas, g.n_critic) == (2e-4, [0.5, 0.999], 1)   # Adam(2e-4, beta1 0.5)
    b = args_for("--arch", "resnet64")
    assert (b.img_size, b.betas, b.dim_g, b.steps, b.lr) == (64, [0.5, 0.9], 64, 200_000, 1e-4)
    assert args_for("--batch-size", "32").g_batch_size == 64
    assert args_for("--n-critic", "3").n_critic == args_for("--d-steps", "3").n_critic == 3
    assert args_for("--g-width", "8").dim_d == 8
    with pytest.raises(SystemExit):
        wgan_gp.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "None" not in text and "0.0002 (resnet)" in text and "5e-05 in --mode wgan" in text
    assert all(group in text for group in ("paper:", "eval:", "run:"))


# ---- Eq. (3), Alg. 1 through train_step (checklist 1, 2, 7, 12) ----
class LinearCritic(nn.Module):
    def __init__(self, w, b):
        super().__init__()
        self.w, self.b = nn.Parameter(w.clone()), nn.Parameter(torch.tensor(b))

    def forward(self, x):
        return x.flatten(1) @ self.w + self.b, None


class Recorder(nn.Module):
    """A G whose output is a learnable constant image; records every z it is given."""

    def __init__(self, shape):
        super().__init__()
        self.c, self.z = nn.Parameter(torch.randn(shape)), []

    def forward(self, z, y=None):
        self.z.append(z.detach().clone())
        return self.c.expand(len(z), *self.c.shape)


def test_critic_and_generator_losses_through_train_step_in_closed_form():
    args = args_for("--batch-size", "4", "--g-batch-size", "6", "--n-critic", "1")
    torch.manual_seed(0)
    w = torch.randn(12)
    D, G = LinearCritic(w, 0.3), Recorder((3, 2, 2))
    x = torch.randn(4, 3, 2, 2)
    opt_G, opt_D = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (G, D))
    out = wgan_gp.train_step(G, D, opt_G, opt_D, iter([(x, None)]), args, 1, OFF, ONE)
    c0 = (G.c.detach() - 0.1 * D.w.detach().view(3, 2, 2)).flatten()   # G before its SGD step
    fake = c0 @ w + 0.3
    w_loss = fake - (x.flatten(1) @ w + 0.3).mean()
    assert out["w_dist"].item() == pytest.approx(-w_loss.item(), rel=1e-5)
    assert out["gp"].item() == pytest.approx((w.norm().item() - 1) ** 2, rel=1e-5)   # any eps
    assert out["loss_D"].item() == pytest.approx(w_loss.item() + 10 * out["gp"].item(), rel=1e-5)
    d_after = D.w.detach() @ c0 + D.b.detach()                       # the critic after its step
    assert out["loss_G"].item() == pytest.approx(-d_after.item(), rel=1e-5)   # -mean D(G(z))
    assert [len(z) for z in G.z] == [4, 6]                          # critic batch, G batch


def test_every_critic_step_draws_a_fresh_normal_z_and_a_fresh_real_batch():
    args = args_for("--batch-size", "64", "--n-critic", "5", "--z-dim", "128")
    G, D = Recorder((2,)), LinearCritic(torch.randn(2), 0.0)
    batches = iter([(torch.randn(64, 2), None)] * 9)
    wgan_gp.train_step(G, D, torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters()),
                       batches, args, 1, OFF, ONE)
    assert len(list(batches)) == 9 - 5                              # one real batch per step
    zs = G.z[:5]
    assert len(G.z) == 6 and all(not torch.equal(a, b) for a in zs for b in zs if a is not b)
    z = torch.cat(G.z)                                              # z ~ N(0, I_128)
    assert abs(z.mean().item()) < 0.03 and z.std().item() == pytest.approx(1, abs=0.03)
    assert G.z[5].shape == (128, 128)                               # G batch 2x the critic's


def test_critic_steps_do_not_touch_G_and_the_G_step_does_not_touch_the_critic():
    args = args_for("--dataset", "8gaussians", "--dim-g", "8", "--dim-d", "8", "--batch-size", "5")
    G, D = wgan_gp.build_models(args, 2, 1)
    g_hits, d_hits = [], []
    for p in G.parameters():
        p.register_hook(lambda g: g_hits.append(1))
    for p in D.parameters():
        p.register_hook(lambda g: d_hits.append(1))
    batches = iter([(torch.randn(5, 2), None)] * 10)
    wgan_gp.train_step(G, D, torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters()),
                       batches, args, 1, OFF, ONE)
    assert len(g_hits) == len(list(G.parameters()))                 # G: once, its own step
    assert len(d_hits) == 5 * len(list(D.parameters()))             # D: each critic step only


# ---- gradient penalty (checklist 3, 4, 5) ----
@pytest.mark.parametrize("slope", [1.0, 2.0, 0.5])
def test_linear_critic_of_slope_s_gives_exactly_s_minus_1_squared(slope):
    D = nn.Sequential(nn.Flatten(), nn.Linear(12, 1))
    with torch.no_grad():
        D[1].weight.copy_(torch.randn(1, 12)).div_(D[1].weight.norm()).mul_(slope)
    x, y = torch.randn(5, 3, 2, 2), torch.randn(5, 3, 2, 2)
    assert wgan_gp.gradient_penalty(D, x, y).item() == pytest.approx((slope - 1) ** 2, abs=1e-6)
    one_sided = wgan_gp.gradient_penalty(D, x, y, one_sided=True).item()
    assert one_sided == pytest.approx(max(0.0, slope - 1) ** 2, abs=1e-6)          # App. C


def test_norm_is_per_sample_over_all_non_batch_dims():
    x = torch.randn(4, 3, 32, 32)
    gp = wgan_gp.gradient_penalty(lambda t: t.sum((1, 2, 3)), x, torch.randn_like(x))
    assert gp.item() == pytest.approx((math.sqrt(3072) - 1) ** 2, rel=1e-6)   # not (sqrt 3 - 1)^2
    D2 = lambda t: t[:2].sum() + 3 * t[2:].sum()                   # noqa: E731  slopes 1 and 3
    gp2 = wgan_gp.gradient_penalty(lambda t: D2(t).expand(1), x, torch.randn_like(x))
    n = math.sqrt(3072)
    assert gp2.item() == pytest.approx(((n - 1) ** 2 + (3 * n - 1) ** 2) / 2, rel=1e-6)


def test_eps_is_drawn_per_sample_broadcast_over_pixels_and_pairs_by_index():
    seen = {}

    def D(x_hat):
        seen["x"] = x_hat.detach()
        return x_hat.flatten(1).sum(1)
    torch.manual_seed(0)
    real = torch.arange(1.0, 17.0).view(16, 1, 1, 1).expand(16, 3, 4, 4)
    wgan_gp.gradient_penalty(D, real, -real)
    eps = ((seen["x"] / real + 1) / 2).flatten(1)                   # x_hat = eps x + (1 - eps) x~
    assert (eps.max(1).values - eps.min(1).values).max() < 1e-6    # one eps per sample
    assert eps[:, 0].unique().numel() == 16 and (eps >= 0).all() and (eps <= 1).all()


def test_penalty_trains_the_critic_through_double_backprop():
    D = wgan_gp.ResNetCritic32(dim=8)
    x = torch.randn(3, 3, 32, 32)
    wgan_gp.gradient_penalty(D, x, torch.randn_like(x)).backward()
    assert sum(p.grad.abs().sum() for p in D.parameters() if p.grad is not None) > 0


def test_loss_signs():
    real, fake = torch.ones(6), -torch.ones(6)
    assert wgan_gp.critic_loss(real, fake, "wgan-gp").item() == -2.0
    assert wgan_gp.generator_loss(fake, "wgan-gp").item() == 1.0
    assert wgan_gp.critic_loss(torch.zeros(2), torch.zeros(2), "dcgan").item() == pytest.approx(
        math.log(2))                                  # halved, as gan_cifar.py's disc_cost /= 2
    assert wgan_gp.generator_loss(torch.zeros(2), "dcgan").item() == pytest.approx(math.log(2))


# ---- architectures (checklist 2, 6, 8, 9, 10, 15, 18) ----
ARCHS = [("resnet", 32), ("dcgan", 32), ("resnet64", 64), ("dcgan64", 64), ("mlp", 0)]


def small(arch, *flags):
    toy = ["--dataset", "8gaussians"] if arch == "mlp" else []
    return wgan_gp.build_models(args_for("--arch", arch, "--dim-g", "4", "--dim-d", "4", *toy,
                                         *flags), 3, 10)


@pytest.mark.parametrize("arch,size", ARCHS)
def test_no_critic_is_batch_coupled_and_none_has_an_output_nonlinearity(arch, size):
    G, D = small(arch)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in D.modules())
    x = torch.randn(6, 2) if arch == "mlp" else torch.randn(6, 3, size, size)
    assert torch.allclose(D(x)[0][:2], D(x[:2])[0], atol=1e-5)
    last = [m for m in D.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.bias.fill_(0.25)
        v1 = D(x)[0]
        last.weight.mul_(1e3)
    v = D(x)[0]                                     # the score is affine in the last layer:
    assert v.shape == (6,) and torch.allclose(v - 0.25, 1e3 * (v1 - 0.25), rtol=1e-3, atol=1e-4)
    assert (v - 0.25).abs().max() > 1               # no sigmoid / tanh on the output
    out = G(torch.randn(3, 2 if arch == "mlp" else 128))
    assert out.shape == ((3, 2) if arch == "mlp" else (3, 3, size, size))
    if arch != "mlp":                                               # tanh output
        assert out.abs().max() <= 1 and out.min() < 0 < out.max()


def test_64x64_critics_use_layer_norm_over_chw_and_baselines_use_bn():
    for arch, n in (("resnet64", 8), ("dcgan64", 3)):
        assert sum(isinstance(m, wgan_gp.LayerNormCHW) for m in small(arch)[1].modules()) == n
    assert not any(isinstance(m, wgan_gp.LayerNormCHW) for m in small("dcgan")[1].modules())
    bns = [m for m in small("dcgan", "--mode", "wgan")[1].modules()
           if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 2                                            # Discriminator.BN2, BN3
    ln = wgan_gp.LayerNormCHW(3)
    with torch.no_grad():
        ln.weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
    y = ln(torch.randn(2, 3, 4, 4) * 5 + 2) / torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1)
    assert torch.allclose(y.mean((1, 2, 3)), torch.zeros(2), atol=1e-5)   # joint (C, H, W) stats
    assert torch.allclose(y.var((1, 2, 3), unbiased=False), torch.ones(2), atol=1e-3)
    assert not torch.allclose(y.mean((2, 3)), torch.zeros(2, 3), atol=1e-2)  # not per channel


def test_official_cifar_resnet_parameter_counts():
    # App. F with 128 channels: G 264,192 (Linear) + 3 x 312,192 (up blocks incl. BN) + 256 (BN)
    # + 3,459 (conv); D 151,680 + 311,680 + 2 x 295,168 + 129
    G, D = wgan_gp.build_models(args_for(), 3, 10)
    assert sum(p.numel() for p in G.parameters()) == 1_204_483
    assert sum(p.numel() for p in D.parameters()) == 1_053_825
    assert [b.down for b in D.blocks] == [True, False, False]
    assert isinstance(D.blocks[1].sc, nn.Identity) and D.fc.out_features == 1
    assert not any(m.track_running_stats for m in G.modules() if isinstance(m, nn.BatchNorm2d))
    z = torch.randn(4, 128)
    h = G.fc(z).view(4, 128, 4, 4)
    for b in G.blocks:
        h = b(h)
    assert torch.allclose(G(z), torch.tanh(G.out(F.relu(G.bn(h)))), atol=1e-6)
    assert all(b.c1.bias is not None for b in G.blocks)             # 64x64: no bias before a norm
    assert all(b.c1.bias is None for b in small("resnet64")[0].blocks)


def up2(t):
    return t.repeat_interleave(2, 2).repeat_interleave(2, 3)        # nearest neighbour


def pool2(t):
    return t.unflatten(3, (-1, 2)).unflatten(2, (-1, 2)).mean((3, 5))   # 2x2 mean


def test_generator_block_is_preactivation_with_nearest_upsampling_at_the_first_conv():
    b, x = wgan_gp.GBlock(3, 2), torch.randn(4, 3, 4, 4)
    want = b.c2(F.relu(b.n2(b.c1(up2(F.relu(b.n1(x))))))) + b.sc(up2(x))
    assert torch.allclose(b(x.clone()), want, atol=1e-5)


def test_critic_blocks_mean_pool_after_the_second_conv_and_the_head_mean_pools():
    for b in (wgan_gp.DBlock(2, 3, down=True, layer_norm=True), wgan_gp.DBlock(3, 3, down=False)):
        x = torch.randn(2, b.c1.in_channels, 8, 8)
        h = b.c2(F.relu(b.n2(b.c1(F.relu(b.n1(x))))))              # reference first: x intact
        want = pool2(h) + pool2(b.sc(x)) if b.down else h + x
        assert torch.allclose(b(x.clone()), want, atol=1e-5)
    D = wgan_gp.ResNetCritic32(dim=4, n_classes=10)
    x = torch.randn(2, 3, 32, 32)
    h = pool2(D.b1c2(F.relu(D.b1c1(x)))) + D.b1sc(pool2(x))        # optimized first block
    h = F.relu(D.blocks(h)).mean((2, 3))                            # global MEAN pool
    score, logits = D(x)
    assert torch.allclose(score, D.fc(h).squeeze(1), atol=1e-5) and torch.allclose(logits, D.ac(h))


def test_toy_networks_widths_and_init():
    G, D = wgan_gp.build_models(args_for("--dataset", "8gaussians"), 2, 1)
    for net, d_in, d_out in ((G, 2, 2), (D, 2, 1)):
        lin = [m for m in net.modules() if isinstance(m, nn.Linear)]
        assert [(m.in_features, m.out_features) for m in lin] == [
            (d_in, 512), (512, 512), (512, 512), (512, d_out)]
        assert sum(isinstance(m, nn.ReLU) for m in net.modules()) == 3
        for m in lin:
            std = math.sqrt(2 / m.in_features) if m is not lin[-1] else math.sqrt(2 / (512 + d_out))
            a = std * math.sqrt(3)                          # U(-a, a) has std a / sqrt 3
            assert m.weight.abs().max() <= a * (1 + 1e-6) and m.weight.abs().max() > 0.9 * a
            assert m.weight.std().item() == pytest.approx(std, rel=0.1)
            assert not m.bias.any()


def test_dcgan_nets_follow_gan_cifar_and_gan_64x64():
    G, D = wgan_gp.build_models(args_for("--arch", "dcgan"), 3, 10)
    convs = [m for m in D.modules() if isinstance(m, nn.Conv2d)]
    deconvs = [m for m in G.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert all(m.kernel_size == (5, 5) and m.stride == (2, 2) for m in convs + deconvs)
    assert [m.out_channels for m in convs] == [128, 256, 512] and len(deconvs) == 3
    assert {m.negative_slope for m in D.modules() if isinstance(m, nn.LeakyReLU)} == {0.2}
    assert isinstance(G.bn0, nn.BatchNorm1d) and G.bn0.num_features == 8192   # BN per unit
    c = convs[1]                                    # tflib He: fan_out divided by stride^2
    std = math.sqrt(4 / (128 * 25 + 256 * 25 / 4))
    assert c.weight.std().item() == pytest.approx(std, rel=0.02) and not c.bias.any()
    d = deconvs[0]                                  # deconv: fan_in divided by stride^2
    std = math.sqrt(4 / (512 * 25 / 4 + 256 * 25))
    assert d.weight.std().item() == pytest.approx(std, rel=0.02)
    G64, D64 = wgan_gp.build_models(args_for("--arch", "dcgan64"), 3, 10)
    assert isinstance(G64.bn0, nn.BatchNorm2d) and G64.bn0.num_features == 512   # per channel
    for m in list(G64.modules()) + list(D64.modules()):
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):          # U with std 0.02
            assert m.weight.abs().max() <= 0.02 * math.sqrt(3) + 1e-7
            assert m.weight.std().item() == pytest.approx(0.02, rel=0.1)
    out = wgan_gp.build_models(args_for("--arch", "resnet64"), 3, 10)[0].out     # He at 64x64
    assert out.weight.std().item() == pytest.approx(math.sqrt(4 / (64 * 9 + 3 * 9)), rel=0.05)


# ---- conditional (checklist 13) ----
def test_conditional_generator_depends_on_the_label():
    G = wgan_gp.ResNetGenerator(16, (8, 8, 8, 8), 3, n_classes=10)
    assert sum(isinstance(m, wgan_gp.ConditionalBatchNorm2d) for m in G.modules()) == 6
    assert isinstance(G.bn, nn.BatchNorm2d)                         # output BN unconditional
    z, a, b = torch.randn(4, 16), torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6, 7])
    assert torch.allclose(G(z, a), G(z, b))                         # init: scale 1, shift 0
    for m in G.modules():
        if isinstance(m, wgan_gp.ConditionalBatchNorm2d):
            torch.nn.init.normal_(m.gamma.weight, 1, 0.5)           # as after training
    assert not torch.allclose(G(z, a), G(z, b))


def test_ac_terms_use_real_labels_in_the_critic_and_uniform_labels_in_G(monkeypatch):
    args = args_for("--conditional", "--dim-g", "4", "--dim-d", "4", "--n-critic", "2",
                    "--batch-size", "4", "--g-batch-size", "64")
    assert (args.ac_weight_d, args.ac_weight_g) == (1.0, 0.1)       # official ACGAN_SCALE(_G)
    G, D = wgan_gp.build_models(args, 3, 10)
    calls, ce, ys = [], F.cross_entropy, []
    monkeypatch.setattr(F, "cross_entropy", lambda lg, y: calls.append((y.clone(), len(lg), lg))
                        or ce(lg, y))
    G.register_forward_pre_hook(lambda m, a: ys.append(a[1].clone()))
    reals = [(torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])),
             (torch.randn(4, 3, 32, 32), torch.tensor([5, 6, 7, 8]))]
    logits_real = D(reals[0][0])[1].detach()                        # the critic before its step
    out = wgan_gp.train_step(G, D, torch.optim.Adam(G.parameters()),
                             torch.optim.Adam(D.parameters()), iter(reals), args, 10, OFF, ONE)
    assert [c[0].tolist() for c in calls[:2]] == [[1, 2, 3, 4], [5, 6, 7, 8]] and len(calls) == 3
    assert torch.allclose(calls[0][2].detach(), logits_real, atol=1e-6)   # real samples' logits
    y_g, n, _ = calls[2]                                            # the G step: 64 fresh labels
    assert n == 64 and y_g.unique().numel() >= 5 and 0 <= y_g.min() and y_g.max() < 10
    assert [y.tolist() for y in ys] == [[1, 2, 3, 4], [5, 6, 7, 8], y_g.tolist()]
    assert 0 <= out["ac_acc_real"] <= 1


# ---- toys (checklist 14, 16) ----
def test_toy_data_match_the_official_generators():
    torch.manual_seed(0)
    x = wgan_gp.toy_batch("8gaussians", 4096, "cpu")
    c, std = wgan_gp.toy_centres("8gaussians")
    assert torch.allclose(c.norm(dim=1), torch.full((8,), 2 / 1.414))
    d = torch.cdist(x, c).min(1).values
    assert (d ** 2).mean().sqrt().item() == pytest.approx(math.sqrt(2) * 0.02 / 1.414, rel=0.1)
    assert x.std(0) == pytest.approx(torch.ones(2), abs=0.05)
    g25 = wgan_gp.ToyGrid25(0, "cpu")
    c25, _ = wgan_gp.toy_centres("25gaussians")
    d25 = torch.cdist(g25.data, c25).min(1)
    assert g25.data.shape == (100_000, 2) and d25.indices.bincount().tolist() == [4000] * 25
    assert (d25.values ** 2).mean().sqrt().item() == pytest.approx(
        math.sqrt(2) * 0.05 / 2.828, rel=0.05)
    assert g25.data.std(0) == pytest.approx(torch.ones(2), abs=0.03)
    assert torch.equal(g25.batch(390, 256), g25.batch(0, 256))      # 100000 // 256 = 390 batches
    assert not torch.equal(g25.batch(1, 256), g25.batch(0, 256))    # shuffled once
    s = wgan_gp.toy_batch("swissroll", 20000, "cpu")
    assert torch.isfinite(s).all()
    assert s.std(0) == pytest.approx(torch.tensor([0.88, 0.93]), abs=0.05)
    modes, hq = wgan_gp.mode_coverage(s, "swissroll")               # noise 0.25 / 7.5
    assert modes == 25 and hq > 0.97


def test_real_stream_serves_one_fresh_batch_per_critic_step_from_the_resume_point():
    args = args_for("--dataset", "25gaussians", "--batch-size", "256")
    data = wgan_gp.ToyGrid25(0, "cpu")
    stream = wgan_gp.real_stream(args, data, 7, ONE)
    assert [torch.equal(next(stream)[0], data.batch(k, 256)) for k in (7, 8, 9)] == [True] * 3
    torch.manual_seed(0)
    a = next(wgan_gp.real_stream(args_for("--dataset", "8gaussians"), None, 0, ONE))[0]
    torch.manual_seed(0)
    assert torch.equal(a, wgan_gp.toy_batch("8gaussians", 256, "cpu"))   # the training RNG


def test_mode_coverage_counts_modes_and_quality():
    c, std = wgan_gp.toy_centres("8gaussians")
    on_5 = c[:5].repeat(100, 1) + std * torch.randn(500, 2) * 0.5
    assert wgan_gp.mode_coverage(on_5, "8gaussians") == (5, 1.0)
    assert wgan_gp.mode_coverage(torch.zeros(100, 2), "8gaussians") == (0, 0.0)
    torch.manual_seed(0)
    modes, hq = wgan_gp.mode_coverage(wgan_gp.toy_batch("8gaussians", 2500, "cpu"), "8gaussians")
    assert modes == 8 and hq > 0.98


def test_fixed_generator_trains_only_the_critic_on_real_plus_unit_noise(tmp_path):
    args = args_for("--dataset", "8gaussians", "--fixed-generator", "--batch-size", "256",
                    "--n-critic", "1", "--dim-g", "8", "--dim-d", "8")
    G, D = wgan_gp.build_models(args, 2, 1)
    seen = []
    D.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    x = torch.randn(256, 2)
    out = wgan_gp.train_step(G, D, torch.optim.Adam(G.parameters()),
                             torch.optim.Adam(D.parameters()), iter([(x, None)]), args, 1, OFF, ONE)
    assert "loss_G" not in out and (seen[1] - x).std().item() == pytest.approx(1, abs=0.08)
    m = run(tmp_path, "--fixed-generator", "--dataset", "swissroll", "--mode", "wgan",
            "--sample-every", "3", base=TOY)
    assert "loss_G" not in m and (tmp_path / "samples" / "0000003.png").exists()
    torch.manual_seed(0)                            # main seeds 0 and builds G first: G's init
    G0 = wgan_gp.ToyMLP(2, 2, 16)
    s = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert all(torch.equal(s["G"][k], v) for k, v in G0.state_dict().items())   # G never moved


# ---- --mode wgan (checklist 17) ----
def test_weight_clipping_mode_uses_tf_rmsprop_and_clips_every_critic_parameter(tmp_path):
    run(tmp_path, "--mode", "wgan", "--arch", "dcgan")
    s = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert max(v.abs().max().item() for v in s["D"].values()) <= 0.01 + 1e-7   # [-c, c]
    for o in ("opt_G", "opt_D"):
        group = s[o]["param_groups"][0]
        assert (group["lr"], group["alpha"], group["eps"]) == (5e-5, 0.9, 1e-10)
        assert all("square_avg" in st and "exp_avg" not in st for st in s[o]["state"].values())
    opt = wgan_gp.make_optimizers(nn.Linear(2, 1), nn.Linear(2, 1), args_for("--mode", "wgan"))[1]
    p = opt.param_groups[0]["params"][0]
    p.grad = torch.full_like(p, 1e-3)
    before = p.detach().clone()
    opt.step()                                      # TF1: mean square starts at 1, a tiny step
    assert torch.allclose(before - p.detach(), torch.full_like(p, 5e-5 * 1e-3 / math.sqrt(0.9)),
                          rtol=1e-3)


def test_wgan_gp_mode_uses_adam_with_the_derived_betas(tmp_path):
    run(tmp_path)
    s = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    for o in ("opt_G", "opt_D"):
        assert s[o]["param_groups"][0]["betas"] == (0.0, 0.9)
        assert all("exp_avg" in st for st in s[o]["state"].values())


# ---- data, schedule and samples (checklist 11, 19, 20) ----
def test_schedule_decays_linearly_over_generator_iterations(tmp_path, monkeypatch):
    seen, real = [], wgan_gp.train_step
    monkeypatch.setattr(wgan_gp, "train_step", lambda G, D, oG, oD, *a: seen.append(
        (oG.param_groups[0]["lr"], oD.param_groups[0]["lr"])) or real(G, D, oG, oD, *a))
    run(tmp_path, "--steps", "4")
    assert [lr for pair in seen for lr in pair] == pytest.approx(
        [2e-4 * (1 - k / 4) for k in range(4) for _ in "GD"])       # both nets, before step k+1
    logged = [r["lr"] for r in rows(tmp_path)]                     # after step k
    assert logged == pytest.approx([2e-4 * (1 - k / 4) for k in (1, 2, 3, 4)])


def test_dequantisation_matches_the_official_resnet_data():
    torch.manual_seed(0)
    pixel = torch.arange(256.0).repeat(16).view(1, 4, 32, 32)
    x = wgan_gp.dequantize(pixel / 127.5 - 1, torch.rand(pixel.shape))
    base = 2 * (pixel / 256 - 0.5)
    assert ((x - base) >= 0).all() and ((x - base) < 1 / 128).all()
    assert x.min() >= -1 and x.max() < 1
    assert (x - base).std().item() == pytest.approx(1 / 128 / math.sqrt(12), rel=0.15)


def test_export_quantises_like_the_official_inception_score_code(tmp_path):
    v = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.0])
    x = v.view(5, 1, 1, 1).expand(5, 3, 2, 2)
    sizes = []

    class Fixed(nn.Module):
        def forward(self, z, y=None):
            sizes.append(len(z))
            return x.repeat(20, 1, 1, 1)[: len(z)]
    for arch, scale in (("resnet", 255.99 / 2), ("dcgan", 255 / 2)):
        args = args_for("--arch", arch, "--export-samples", "5")
        wgan_gp.export_samples(Fixed(), args, "cpu", 10, tmp_path / "s.npz")
        got = np.load(tmp_path / "s.npz")["images"]
        assert got.shape == (5, 2, 2, 3) and got.dtype == np.uint8
        assert got[:, 0, 0, 0].tolist() == [int((a + 1) * scale) for a in v.tolist()]
    assert sizes == [100, 100]                       # G runs on batches of 100 (official IS)


def test_toy_figure_has_title_strip_colour_key_and_both_point_sets(tmp_path):
    run(tmp_path, "--sample-every", "3", base=TOY)
    from PIL import Image
    img = np.asarray(Image.open(tmp_path / "samples" / "0000003.png").convert("RGB"))
    assert img.shape[0] > 384 and img.shape[1] >= 384                # plot + title strip
    colours = {tuple(c) for c in img[-384:].reshape(-1, 3)}          # in the plot itself
    assert common.REAL_RGB in colours and common.FAKE_RGB in colours


def test_load_generator_rebuilds_G_from_the_checkpoint_alone(tmp_path):
    run(tmp_path, "--conditional")
    G = wgan_gp.load_generator(str(tmp_path / "ckpt.pt"))
    s = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert all(torch.equal(G.state_dict()[k], v) for k, v in s["G"].items())
    x = G(torch.randn(10, G.z_dim), torch.arange(10) % 6)
    assert x.shape == (10, 3, 32, 32) and x.abs().max() <= 1


# ---- Inception Score and FID during training (fid.TrainingFID contract) ----
def test_fid_every_logs_is_and_fid_from_one_training_fid_built_at_start_up(
        tmp_path, monkeypatch, fid_recorder):
    sizes, real_sample = [], wgan_gp.sample
    monkeypatch.setattr(wgan_gp, "sample",
                        lambda G, n, *a: sizes.append(n) or real_sample(G, n, *a))
    run(tmp_path, "--fid-every", "2", "--fid-samples", "500", "--fid-ref-split", "test",
        "--log-every", "3", "--steps", "4")
    assert len(fid_recorder.built) == 1                             # once, at start-up
    built = fid_recorder.built[0]
    assert (built["dataset"], built["img_size"], built["n_samples"], built["ref_split"],
            built["ref_size"], built["class_labels"]) == ("shapes", 32, 500, "test", None, (None,))
    got = [(r["step"], r.get("fid"), r.get("is"), r.get("is_std")) for r in rows(tmp_path)]
    assert got == [(2, 11.0, 1.1, 0.1), (3, None, None, None), (4, 12.0, 1.2, 0.1)]
    assert all(c["shape"] == (3, 3, 32, 32) and -1 <= c["lo"] and c["hi"] <= 1
               for c in fid_recorder.calls)
    assert sizes == [100, 100]                      # G on batches of 100 (official IS code)

    def broken(*a, **k):
        raise common.UserError("no Inception weights")
    monkeypatch.setattr(fid_recorder, "TrainingFID", broken)
    with pytest.raises(common.UserError, match="Inception"):
        run(tmp_path / "new", "--fid-every", "2")
    assert not (tmp_path / "new").exists()                          # nothing written
    monkeypatch.setitem(sys.modules, "fid", None)                   # a copy without fid.py
    with pytest.raises(common.UserError, match="needs fid.py"):
        run(tmp_path / "new", "--fid-every", "2")


# ---- runs ----
def test_smoke_writes_artifacts_and_finite_metrics(tmp_path):
    m = run(tmp_path)
    assert m["step"] == 2 and all(math.isfinite(v) for v in m.values())
    for f in ("ckpt.pt", "metrics.jsonl", "args.json", "curves.png", "reals.png",
              "samples/0000002.png"):
        assert (tmp_path / f).exists(), f
    assert [r["step"] for r in rows(tmp_path)] == [1, 2] and m["gp"] > 0 and "loss_G" in m


@pytest.mark.parametrize("base", [ARGV, TOY + ["--dataset", "25gaussians"], TEXT],
                         ids=["shapes", "toy", "text"])
def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path, monkeypatch, base):
    extra = ["--steps", "4", "--ckpt-every", "2"]
    run(tmp_path / "a", *extra, base=base)
    real_step, calls = wgan_gp.train_step, []

    def killed_in_the_fourth_step(*a, **k):        # step 3 is logged, its checkpoint never written
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_step(*a, **k)
    monkeypatch.setattr(wgan_gp, "train_step", killed_in_the_fourth_step)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", *extra, base=base)
    monkeypatch.undo()
    assert [r["step"] for r in rows(tmp_path / "b")] == [1, 2, 3]
    run(tmp_path / "b", *extra, "--resume", base=base)             # from the step-2 checkpoint
    assert rows(tmp_path / "b") == rows(tmp_path / "a")            # each step once, same values
    with pytest.raises(common.UserError, match="--resume"):
        run(tmp_path / "b", *extra, base=base)
    with pytest.raises(common.UserError, match="cannot change --dim-g"):
        run(tmp_path / "b", *extra, "--resume", "--dim-g", "24", base=base)


def test_sampling_never_touches_the_training_stream(tmp_path):
    runs = [(TOY, "--log-every", "1"), (TOY, "--log-every", "3"),       # fewer toy evaluations
            (TOY + ["--dataset", "swissroll"], "--log-every", "1"), (ARGV, "--log-every", "1")]
    for i, (base, *flags) in enumerate(runs):
        a, b = tmp_path / f"{i}a", tmp_path / f"{i}b"
        run(a, "--sample-every", "1", base=base)
        run(b, "--sample-every", "0", *flags, base=base)
        if flags[1] == "1":
            assert rows(a) == rows(b)                              # incl. modes and hq
        sa, sb = (torch.load(d / "ckpt.pt", weights_only=True) for d in (a, b))
        for net in ("G", "D"):
            assert all(torch.equal(sa[net][k], v) for k, v in sb[net].items())


def test_same_seed_same_metrics_other_seed_differs(tmp_path):
    a, _, c = run(tmp_path / "a"), run(tmp_path / "b"), run(tmp_path / "c", "--seed", "1")
    assert rows(tmp_path / "a") == rows(tmp_path / "b") and a["loss_D"] != c["loss_D"]


def test_a_new_lr_and_steps_on_resume_take_effect_and_export_keeps_args_json(tmp_path, capsys):
    run(tmp_path, "--lr", "2e-4")
    run(tmp_path, "--lr", "1e-4", "--steps", "4", "--resume")
    assert "--lr 0.0002 -> 0.0001 (takes effect)" in capsys.readouterr().out
    assert [r["lr"] for r in rows(tmp_path)] == pytest.approx(
        [2e-4 * (1 - 1 / 2), 0.0, 1e-4 * (1 - 3 / 4), 0.0])       # decay over the new --steps
    s = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert [g["lr"] for o in ("opt_G", "opt_D") for g in s[o]["param_groups"]] == [1e-4 / 4] * 2
    before = (tmp_path / "args.json").read_text()
    m = run(tmp_path, "--lr", "1e-4", "--steps", "4", "--resume", "--export-samples", "7")
    assert m["step"] == 4 and (tmp_path / "args.json").read_text() == before
    assert np.load(tmp_path / "samples_7.npz")["images"].shape == (7, 32, 32, 3)


def test_conditional_dcgan_and_64x64_configurations_run(tmp_path):
    m = run(tmp_path / "ac", "--conditional")
    assert 0 <= m["ac_acc_real"] <= 1
    assert math.isfinite(run(tmp_path / "dc", "--arch", "dcgan", "--mode", "wgan")["loss_D"])
    assert math.isfinite(run(tmp_path / "gan", "--arch", "dcgan", "--mode", "dcgan")["loss_G"])
    for arch in ("resnet64", "dcgan64"):
        m = run(tmp_path / arch, "--arch", arch, "--steps", "1", "--batch-size", "2",
                "--export-samples", "3")
        imgs = np.load(tmp_path / arch / "samples_3.npz")["images"]
        assert imgs.shape == (3, 64, 64, 3) and imgs.dtype == np.uint8 and m["step"] == 1
    for flags, msg in ((["--arch", "dcgan64", "--img-size", "32"], "generates 64x64 images"),
                       (["--dataset", "swissroll", "--arch", "resnet"], "toys use mlp"),
                       (["--fixed-generator"], "Fig. 1a"), (["--betas", "0.5", "1"], r"\[0, 1\)"),
                       (["--conditional", "--arch", "dcgan"], "--arch resnet"),
                       (["--dataset", "8gaussians", "--export-samples", "4"], "for images")):
        with pytest.raises(common.UserError, match=msg):
            args_for(*flags)


@pytest.mark.slow
def test_the_one_minute_toy_run_covers_the_8_modes(tmp_path):
    # The docstring's demo command. Its coverage jumps from 0 to 8 modes between 1000 and 1500
    # steps; with 2000 steps modes >= 7 and hq >= 0.2 held for seeds 0-2 under 1 and 2 threads
    # (measured trajectories: README), a margin for other CPUs' float paths.
    m = run(tmp_path, "--steps", "2000", "--dim-g", "128", "--dim-d", "128", "--lam", "0.1",
            "--batch-size", "256", "--log-every", "2000", base=TOY)
    assert m["modes"] >= 7 and m["hq"] >= 0.2


# ---- Sec. 5.5: the character-level language model (official gan_language.py) ----
def test_text_defaults_are_gan_language_and_text_needs_the_lang_nets():
    r = args_for("--dataset", "billion-word")
    assert (r.arch, r.n_critic, r.lam, r.lr, r.betas, r.batch_size, r.g_batch_size, r.steps,
            r.z_dim, r.dim_g, r.dim_d, r.seq_len, r.max_vocab, r.max_examples, r.js_samples,
            r.lr_decay) == ("lang", 10, 10.0, 1e-4, [0.5, 0.9], 64, 64, 200_000, 128, 512, 512,
                            32, 2048, 10_000_000, 640, False)
    g = args_for("--dataset", "shapes-text", "--mode", "dcgan")     # the untuned standard GAN
    assert (g.arch, g.n_critic, g.lr, g.betas) == ("lang", 1, 2e-4, [0.5, 0.999])
    assert args_for("--dataset", "text:x.txt").arch == "lang"
    for bad in (["--dataset", "cifar10", "--arch", "lang"], ["--dataset", "billion-word",
                "--arch", "resnet"], ["--dataset", "shapes-text", "--fid-every", "10"]):
        with pytest.raises(common.UserError):
            args_for(*bad)


def test_text_nets_shapes_parameters_init_and_softmax_rows():
    args = args_for("--dataset", "billion-word")
    V = 97
    G, D = wgan_gp.build_models(args, V, 1)
    conv = 5 * 512 * 512 + 512
    assert sum(p.numel() for p in G.parameters()) == (128 + 1) * 32 * 512 + 10 * conv + 513 * V
    assert sum(p.numel() for p in D.parameters()) == (V + 1) * 512 + 10 * conv + 32 * 512 + 1
    for w in (G.blocks[0].c1.weight, G.blocks[4].c2.weight, D.blocks[2].c2.weight):
        assert w.abs().max() <= math.sqrt(3 * 4 / (2 * 512 * 5)) < 1.01 * w.abs().max()  # He
    assert G.fc.weight.abs().max() <= math.sqrt(3 * 2 / (128 + 32 * 512))     # Glorot
    torch.manual_seed(0)
    p = G(torch.randn(3, 128))
    assert p.shape == (3, 32, V) and (p >= 0).all()
    assert torch.allclose(p.sum(2), torch.ones(3, 32), atol=1e-5)  # a distribution per position
    assert p.max() < 0.9                                            # not sampled / one-hot
    assert D(p)[0].shape == (3,) and D(F.one_hot(p.argmax(2), V).float())[1] is None


def test_text_residual_block_is_relu_conv5_relu_conv5_scaled_by_0_3():
    G, _ = wgan_gp.build_models(args_for("--dataset", "shapes-text", "--dim-g", "6"), 11, 1)
    assert len(G.blocks) == 5 and G.out.kernel_size == (1,)
    b, x = G.blocks[2], torch.randn(2, 6, 32)
    ref = x + 0.3 * F.conv1d(F.relu(F.conv1d(F.relu(x), b.c1.weight, b.c1.bias, padding=2)),
                             b.c2.weight, b.c2.bias, padding=2)
    assert b.c1.kernel_size == b.c2.kernel_size == (5,)
    assert torch.allclose(b(x), ref, atol=1e-6)


def test_js_divergence_in_bits_self_zero_disjoint_one_per_n():
    a = [tuple("abcabcab"), tuple("aab`````")]
    b = [tuple("xyzxyzxy"), tuple("zzyqqqqq")]                      # no shared n-gram at all
    for n in range(1, 5):
        pa, pb = wgan_gp.ngram_counts(a, n), wgan_gp.ngram_counts(b, n)
        assert sum(pa.values()) == 2 * (8 - n + 1)                  # every position's n-gram
        assert wgan_gp.js_divergence(pa, pa) == pytest.approx(0, abs=1e-12)
        assert wgan_gp.js_divergence(pa, pb) == pytest.approx(1)   # 1 bit (log 2 nats)
    p, q = {("a",): 1}, {("a",): 1, ("b",): 1}                      # by hand, M = (.75, .25)
    kl = math.log(1 / .75) + .5 * math.log(.5 / .75) + .5 * math.log(.5 / .25)
    assert wgan_gp.js_divergence(p, q) == pytest.approx(kl / 2 / math.log(2))


def test_tiny_text_run_logs_js_of_the_evaluation_samples_and_writes_samples(tmp_path):
    m = run(tmp_path, base=TEXT)
    assert m["step"] == 2 and all(math.isfinite(v) for v in m.values()) and m["gp"] > 0
    for f in ("samples/0000001.txt", "samples/0000002.txt", "samples.txt", "reals.txt"):
        assert (tmp_path / f).exists(), f
    lines = (tmp_path / "samples.txt").read_text("latin-1").splitlines()
    assert len(lines) == 16
    reals = (tmp_path / "reals.txt").read_text().splitlines()
    assert all(len(s) == 32 for s in reals) and reals[0].startswith("a ")   # captions, padded
    args = args_for(*TEXT)
    data = wgan_gp.TextData(args)
    G = wgan_gp.load_generator(str(tmp_path / "ckpt.pt"))
    assert G.vocab == data.vocab and G.vocab[0] == "unk"
    fake = wgan_gp.text_samples(G, args, "cpu", G.vocab, 16)
    assert "\n".join("".join(t) for t in fake) == "\n".join(lines)
    for n in range(1, 5):             # the logged js_n: these samples vs every real line
        ref = wgan_gp.js_divergence(wgan_gp.ngram_counts(fake, n),
                                    wgan_gp.ngram_counts(data.lines, n))
        assert m[f"js{n}"] == pytest.approx(ref, abs=1e-9)


def test_text_critic_sees_one_hot_reals_of_the_shuffled_stream():
    args = args_for(*TEXT)
    data = wgan_gp.TextData(args)
    x, y = next(wgan_gp.real_stream(args, data, 0, ONE))
    assert y is None and x.shape == (8, 32, len(data.vocab))
    assert set(x.unique().tolist()) == {0.0, 1.0} and (x.sum(2) == 1).all()
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(0))[:8]
    assert torch.equal(x.argmax(2), data.codes[perm])


def test_billion_word_loader_reads_the_released_layout(tmp_path):
    with pytest.raises(common.UserError, match="statmt.org/lm-benchmark"):
        wgan_gp.main(["--dataset", "billion-word", "--data-root", str(tmp_path), "--device", "cpu",
                      "--out-dir",
                      str(tmp_path / "run")])
    d = tmp_path / wgan_gp.BW_DIR
    d.mkdir()
    long = "The quick brown fox jumps over the lazy dog again ."
    (d / "news.en-00001-of-00100").write_bytes(f"{long}\nzz z\n".encode())
    (d / "news.en-00002-of-00100").write_bytes("caf\u00e9 q\nnever read\n".encode())
    bw = ["--dataset", "billion-word", "--data-root", str(tmp_path), "--max-examples", "3",
          "--batch-size", "2"]
    args = args_for(*bw)
    assert wgan_gp.read_lines(args) == [long, "zz z", "caf\u00c3\u00a9 q"]  # bytes, file order
    data = wgan_gp.TextData(args)
    assert len(data.lines) == 3 and all(len(t) == 32 for t in data.lines)
    toks = sorted(data.lines, key=lambda t: t[0])
    assert [t[:32] for t in toks if t[0] == "T"] == [tuple(long[:32])]        # cut at 32
    assert toks[-1][:5] == tuple("zz z`") and toks[-1][4:] == ("`",) * 28    # padded with '`'
    assert data.vocab[:3] == ["unk", "`", " "] and "unk" not in sum(data.lines, ())
    small = wgan_gp.TextData(args_for(*bw, "--max-vocab", "3"))   # 'unk' + the 2 most common
    assert small.vocab == ["unk", "`", " "] and small.codes.max() == 2
    assert [t for t in small.lines if t[0] != "unk"] == [] and small.lines[0][-1] == "`"
    with pytest.raises(common.UserError, match="no such file"):
        wgan_gp.main(["--dataset", f"text:{tmp_path}/none.txt", "--device", "cpu", "--out-dir",
                      str(tmp_path / "r")])
    f = tmp_path / "plain.txt"
    f.write_text("one line\nanother\n")
    assert wgan_gp.read_lines(args_for("--dataset", f"text:{f}")) == ["one line", "another"]


def test_text_standard_gan_baseline_runs_on_the_same_nets(tmp_path):
    m = run(tmp_path / "g", "--mode", "dcgan", base=TEXT)
    assert "js4" in m and math.isfinite(m["loss_D"])
    a = torch.load(tmp_path / "g" / "ckpt.pt", weights_only=True)
    run(tmp_path / "w", base=TEXT)
    b = torch.load(tmp_path / "w" / "ckpt.pt", weights_only=True)
    for net in ("G", "D"):
        assert {k: v.shape for k, v in a[net].items()} == {k: v.shape for k, v in b[net].items()}
    assert a["opt_D"]["param_groups"][0]["betas"] == (0.5, 0.999)
