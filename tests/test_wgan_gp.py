"""wgan_gp.py: the card's §8 tests and every fidelity-checklist item a test can see (card §7)."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import wgan_gp
from tiny_args import TINY

ARGV = TINY["wgan_gp.py"]


def run(tmp_path, *extra):
    return wgan_gp.main(ARGV + ["--out-dir", str(tmp_path)] + list(extra))


def lines(path):
    return [json.loads(s) for s in path.read_text().splitlines()]


# ---- runs ----
def test_smoke_writes_artifacts_and_finite_metrics(tmp_path):
    m = run(tmp_path)
    assert m["step"] == 2 and all(math.isfinite(v) for v in m.values())
    for f in ("ckpt.pt", "metrics.jsonl", "args.json", "reals.png", "samples/0000002.png"):
        assert (tmp_path / f).exists(), f
    assert [r["step"] for r in lines(tmp_path / "metrics.jsonl")] == [1, 2]
    assert m["gp"] > 0 and "loss_G" in m


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    full = run(tmp_path / "a", "--steps", "4")
    real_step, calls = wgan_gp.train_step, []

    def killed_at_third_step(*a, **k):              # the process dies during G iteration 3
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(*a, **k)
    monkeypatch.setattr(wgan_gp, "train_step", killed_at_third_step)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", "--steps", "4")
    monkeypatch.undo()
    resumed = run(tmp_path / "b", "--steps", "4", "--resume")   # from the step-2 checkpoint
    assert resumed == pytest.approx({**full, "it_s": resumed["it_s"]}, rel=1e-6, abs=1e-7)
    assert [r["step"] for r in lines(tmp_path / "b" / "metrics.jsonl")] == [1, 2, 3, 4]   # logged once each
    with pytest.raises(FileExistsError, match="--resume"):
        run(tmp_path / "b", "--steps", "4")
    with pytest.raises(ValueError, match="--dim-g 8 \\(now 16\\)"):
        run(tmp_path / "b", "--steps", "5", "--resume", "--dim-g", "16")


def test_same_seed_same_metrics_other_seed_differs(tmp_path):
    a, b, c = run(tmp_path / "a"), run(tmp_path / "b"), run(tmp_path / "c", "--seed", "1")
    drop = lambda m: {k: v for k, v in m.items() if k != "it_s"}  # noqa: E731
    assert drop(a) == drop(b) and drop(a) != drop(c)


def test_conditional_dcgan_and_64x64_configurations_run(tmp_path):
    m = run(tmp_path / "ac", "--conditional")
    assert 0 <= m["ac_acc_real"] <= 1
    assert math.isfinite(run(tmp_path / "dc", "--arch", "dcgan", "--mode", "wgan")["loss_D"])
    assert math.isfinite(run(tmp_path / "gan", "--arch", "dcgan", "--mode", "dcgan")["loss_G"])
    m = run(tmp_path / "r64", "--arch", "resnet64", "--steps", "1", "--batch-size", "2", "--export-samples", "10")
    imgs = np.load(tmp_path / "r64" / "samples_10.npz")["images"]
    assert imgs.shape == (10, 64, 64, 3) and imgs.dtype == np.uint8 and m["step"] == 1
    with pytest.raises(ValueError, match="generates 64x64 images"):
        run(tmp_path / "bad", "--arch", "dcgan64", "--img-size", "32")


def test_schedule_decays_linearly_over_generator_iterations(tmp_path):
    rows = run(tmp_path, "--steps", "4") and lines(tmp_path / "metrics.jsonl")
    # TINY sets no --lr: resnet derives 2e-4 with linear decay [App. F code]; logged after step k
    assert [r["lr"] for r in rows] == pytest.approx([2e-4 * (1 - k / 4) for k in (1, 2, 3, 4)])
    args = json.loads((tmp_path / "args.json").read_text())
    assert args["betas"] == [0.0, 0.9] and args["g_batch_size"] == 2 * args["batch_size"]
    assert args["lam"] == 10 and args["n_critic"] == 2      # TINY overrides n_critic; default below


def test_paper_defaults_per_configuration():
    d = lambda *a: wgan_gp.derive_defaults(wgan_gp.parse_args(list(a)))  # noqa: E731
    r = d()
    assert (r.dataset, r.arch, r.n_critic, r.lam, r.lr, r.betas, r.steps, r.batch_size, r.g_batch_size,
            r.z_dim, r.dim_g, r.lr_decay, r.dequantize) == (
        "cifar10", "resnet", 5, 10.0, 2e-4, [0.0, 0.9], 100_000, 64, 128, 128, 128, True, True)
    t = d("--dataset", "8gaussians")
    assert (t.arch, t.batch_size, t.z_dim, t.dim_g, t.lr, t.betas, t.lr_decay) == (
        "mlp", 256, 2, 512, 1e-4, [0.5, 0.9], False)
    c = d("--arch", "dcgan")
    assert (c.lr, c.betas, c.steps, c.g_batch_size, c.lr_decay) == (1e-4, [0.5, 0.9], 200_000, 64, False)
    w = d("--arch", "dcgan", "--mode", "wgan")
    assert (w.lr, w.n_critic) == (5e-5, 5)
    assert d("--arch", "resnet64").img_size == 64 and d("--arch", "resnet64").betas == [0.5, 0.9]
    with pytest.raises(ValueError, match="toys use mlp"):
        d("--dataset", "swissroll", "--arch", "resnet")


# ---- gradient penalty (Eq. 3) ----
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
    D = lambda x: x.sum((1, 2, 3))                                         # noqa: E731  grad = ones
    x = torch.randn(4, 3, 32, 32)
    gp = wgan_gp.gradient_penalty(D, x, torch.randn_like(x))
    assert gp.item() == pytest.approx((math.sqrt(3072) - 1) ** 2, rel=1e-6)   # a dim-1 norm gives (sqrt 3 - 1)^2
    # per sample: a critic with different slopes for each sample's half of the batch
    D2 = lambda x: x[:2].flatten(1).sum(1).sum() * 1 + x[2:].flatten(1).sum(1).sum() * 3   # noqa: E731
    gp2 = wgan_gp.gradient_penalty(lambda t: D2(t).expand(1), x, torch.randn_like(x))
    assert gp2.item() == pytest.approx(((math.sqrt(3072) - 1) ** 2 + (3 * math.sqrt(3072) - 1) ** 2) / 2, rel=1e-6)


def test_eps_is_drawn_per_sample_and_broadcast_over_pixels():
    seen = {}

    def D(x_hat):
        seen["x"] = x_hat.detach()
        return x_hat.flatten(1).sum(1)
    torch.manual_seed(0)
    wgan_gp.gradient_penalty(D, torch.ones(16, 3, 4, 4), torch.zeros(16, 3, 4, 4))
    v = seen["x"]                                    # real = 1, fake = 0 -> x_hat = eps_i everywhere
    per_sample = v.flatten(1)
    assert (per_sample.max(1).values - per_sample.min(1).values).abs().max() < 1e-7   # constant within a sample
    assert per_sample[:, 0].unique().numel() == 16 and (v >= 0).all() and (v <= 1).all()


def test_penalty_trains_the_critic_through_double_backprop():
    D = wgan_gp.ResNetCritic32(dim=8)
    x = torch.randn(3, 3, 32, 32)
    wgan_gp.gradient_penalty(D, x, torch.randn_like(x)).backward()
    grads = [p.grad for p in D.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0


def test_loss_signs():
    real, fake = torch.ones(6), -torch.ones(6)
    assert wgan_gp.critic_loss(real, fake, "wgan-gp").item() == -2.0
    assert wgan_gp.generator_loss(fake, "wgan-gp").item() == 1.0
    d_gan = wgan_gp.critic_loss(torch.full((2,), 50.0), torch.full((2,), -50.0), "dcgan")   # Eq. (1) at a
    assert d_gan.item() == pytest.approx(0, abs=1e-6)                                       # perfect D


# ---- architectures ----
@pytest.mark.parametrize("arch,size", [("resnet", 32), ("dcgan", 32), ("resnet64", 64), ("dcgan64", 64), ("mlp", 0)])
def test_no_critic_is_batch_coupled(arch, size):
    args = wgan_gp.derive_defaults(wgan_gp.parse_args(
        ["--arch", arch, "--dim-g", "4", "--dim-d", "4"] + (["--dataset", "8gaussians"] if arch == "mlp" else [])))
    G, D = wgan_gp.build_models(args, 3, 10)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in D.modules())
    x = torch.randn(6, 2) if arch == "mlp" else torch.randn(6, 3, size, size)
    assert torch.allclose(D(x)[0][:2], D(x[:2])[0], atol=1e-5)
    out = G(torch.randn(3, args.z_dim))
    assert out.shape == ((3, 2) if arch == "mlp" else (3, 3, size, size))
    if arch != "mlp":
        assert out.abs().max() <= 1


def test_official_cifar_resnet_parameter_counts():
    # counts from the App. F tables with 128 channels: G 264,192 (Linear) + 3 x 312,192 (up blocks incl.
    # BN) + 256 (BN) + 3,459 (conv) ; D 151,680 + 311,680 + 2 x 295,168 + 129
    G, D = wgan_gp.ResNetGenerator(), wgan_gp.ResNetCritic32()
    assert sum(p.numel() for p in G.parameters()) == 1_204_483
    assert sum(p.numel() for p in D.parameters()) == 1_053_825
    assert G(torch.randn(2, 128)).shape == (2, 3, 32, 32)
    blocks = list(D.blocks)
    assert [b.down for b in blocks] == [True, False, False] and isinstance(blocks[1].sc, nn.Identity)


def test_generator_block_is_preactivation_with_nearest_upsampling_at_the_first_conv():
    b = wgan_gp.GBlock(2, 2)
    b.eval()
    calls = []
    for name in ("n1", "c1", "n2", "c2"):
        getattr(b, name).register_forward_hook(lambda m, i, o, n=name: calls.append((n, tuple(i[0].shape))))
    b(torch.randn(1, 2, 4, 4))
    assert calls == [("n1", (1, 2, 4, 4)), ("c1", (1, 2, 8, 8)), ("n2", (1, 2, 8, 8)), ("c2", (1, 2, 8, 8))]


def test_conditional_generator_depends_on_the_label():
    G = wgan_gp.ResNetGenerator(16, (8, 8, 8, 8), 3, n_classes=10)
    assert sum(isinstance(m, wgan_gp.ConditionalBatchNorm2d) for m in G.modules()) == 6
    assert isinstance(G.bn, nn.BatchNorm2d)                                 # output BN unconditional
    z = torch.randn(4, 16)
    assert torch.allclose(G(z, torch.tensor([0, 1, 2, 3])), G(z, torch.tensor([4, 5, 6, 7])))  # init: 1 and 0
    for m in G.modules():
        if isinstance(m, wgan_gp.ConditionalBatchNorm2d):
            torch.nn.init.normal_(m.gamma.weight, 1, 0.5)          # as after training
    assert not torch.allclose(G(z, torch.tensor([0, 1, 2, 3])), G(z, torch.tensor([4, 5, 6, 7])))


def test_layer_norm_normalises_over_chw_jointly():
    ln = wgan_gp.LayerNormCHW(3)
    y = ln(torch.randn(2, 3, 4, 4) * 5 + 2)
    assert torch.allclose(y.mean((1, 2, 3)), torch.zeros(2), atol=1e-5)
    assert torch.allclose(y.var((1, 2, 3), unbiased=False), torch.ones(2), atol=1e-3)
    assert not torch.allclose(y.mean((2, 3)), torch.zeros(2, 3), atol=1e-2)  # not per channel


# ---- Alg. 1 isolation ----
def test_critic_steps_do_not_touch_G_and_the_G_step_does_not_touch_the_critic():
    args = wgan_gp.derive_defaults(wgan_gp.parse_args(["--dataset", "8gaussians", "--dim-g", "8",
                                                       "--dim-d", "8", "--batch-size", "5"]))
    G, D = wgan_gp.build_models(args, 2, 1)
    g_hits, d_hits = [], []
    for p in G.parameters():
        p.register_hook(lambda g: g_hits.append(1))
    for p in D.parameters():
        p.register_hook(lambda g: d_hits.append(1))
    opt_G, opt_D = torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters())
    batches = iter([(torch.randn(5, 2), None)] * 10)
    wgan_gp.train_step(G, D, opt_G, opt_D, batches, args, 1, lambda: torch.autocast("cpu", enabled=False))
    n_g, n_d = len(list(G.parameters())), len(list(D.parameters()))
    assert len(g_hits) == n_g                       # G receives gradients once: its own step
    assert len(d_hits) == args.n_critic * n_d       # D once per critic step, never in the G step
    assert len(list(batches)) == 10 - args.n_critic  # a fresh real batch per critic step


# ---- toys (Sec. 3) ----
def test_toy_data_match_the_official_generators():
    torch.manual_seed(0)
    x = wgan_gp.toy_batch("8gaussians", 4096, "cpu")
    c, std = wgan_gp.toy_centres("8gaussians")
    assert torch.cdist(x, c).min(1).values.max() < 0.1
    assert torch.allclose(c.norm(dim=1), torch.full((8,), 2 / 1.414))
    assert x.std(0) == pytest.approx(torch.ones(2), abs=0.05)
    g25 = wgan_gp.ToyGrid25(0, "cpu")
    assert g25.data.shape == (100_000, 2) and g25.data.std(0) == pytest.approx(torch.ones(2), abs=0.03)
    c25, _ = wgan_gp.toy_centres("25gaussians")
    assert torch.cdist(g25.data[:5000], c25).argmin(1).unique().numel() == 25
    assert torch.equal(g25.batch(390, 256), g25.batch(0, 256))          # 100000 // 256 = 390 batches
    s = wgan_gp.toy_batch("swissroll", 20000, "cpu")
    assert torch.isfinite(s).all() and s.std(0) == pytest.approx(torch.tensor([0.88, 0.93]), abs=0.05)


def test_mode_coverage_counts_modes_and_quality():
    c, std = wgan_gp.toy_centres("8gaussians")
    on_5 = c[:5].repeat(100, 1) + std * torch.randn(500, 2) * 0.5
    assert wgan_gp.mode_coverage(on_5, "8gaussians") == (5, 1.0)
    assert wgan_gp.mode_coverage(torch.zeros(100, 2), "8gaussians") == (0, 0.0)


def test_fixed_generator_trains_only_the_critic_and_draws_the_surface(tmp_path):
    m = wgan_gp.main(["--dataset", "swissroll", "--device", "cpu", "--fixed-generator", "--dim-d", "16",
                      "--dim-g", "16", "--steps", "3", "--log-every", "3", "--sample-every", "3",
                      "--out-dir", str(tmp_path), "--mode", "wgan"])
    assert "loss_G" not in m and (tmp_path / "samples" / "0000003.png").exists()
    torch.manual_seed(0)                                # main seeds 0 and builds G first: G's init
    G0 = wgan_gp.MLPGenerator(2, 16)
    s = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert all(torch.equal(s["G"][k], v) for k, v in G0.state_dict().items())   # G never moved
    assert max(v.abs().max().item() for k, v in s["D"].items()) <= 0.01 + 1e-7   # clipped to [-c, c]


@pytest.mark.slow
def test_toy_run_covers_all_8_modes_on_cpu(tmp_path):
    # the README's one-minute command: the script's own coverage measure must reach 8 of 8 modes
    m = wgan_gp.main(["--dataset", "8gaussians", "--device", "cpu", "--steps", "2000", "--dim-g", "128",
                      "--dim-d", "128", "--lam", "0.1", "--log-every", "2000", "--sample-every", "0",
                      "--out-dir", str(tmp_path)])
    assert m["modes"] == 8 and m["hq"] > 0.3


def test_ac_terms_use_real_labels_in_the_critic_and_sampled_labels_in_G(monkeypatch):
    args = wgan_gp.derive_defaults(wgan_gp.parse_args(["--conditional", "--dim-g", "4", "--dim-d", "4",
                                                       "--n-critic", "2", "--batch-size", "4", "--g-batch-size", "6"]))
    assert (args.ac_weight_d, args.ac_weight_g) == (1.0, 0.1)            # official ACGAN_SCALE(_G)
    G, D = wgan_gp.build_models(args, 3, 10)
    calls, ce = [], torch.nn.functional.cross_entropy
    monkeypatch.setattr(torch.nn.functional, "cross_entropy",
                        lambda logits, y: calls.append(y.clone()) or ce(logits, y))
    reals = [(torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])),
             (torch.randn(4, 3, 32, 32), torch.tensor([5, 6, 7, 8]))]
    opt_G, opt_D = torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters())
    wgan_gp.train_step(G, D, opt_G, opt_D, iter(reals), args, 10, lambda: torch.autocast("cpu", enabled=False))
    # one CE per critic step, on the real batch's labels only (none for fakes), then one in the G step
    assert [c.tolist() for c in calls[:2]] == [[1, 2, 3, 4], [5, 6, 7, 8]] and len(calls) == 3
    assert calls[2].shape == (6,)


def test_critic_block_is_preactivation_with_mean_pool_after_the_second_conv():
    b = wgan_gp.DBlock(2, 3, down=True, layer_norm=True)
    calls = []
    for name in ("n1", "c1", "n2", "c2"):
        getattr(b, name).register_forward_hook(lambda m, i, o, n=name: calls.append((n, tuple(o.shape))))
    assert b(torch.randn(1, 2, 8, 8)).shape == (1, 3, 4, 4)
    # norm -> conv(in -> in) -> norm -> conv(in -> out), all at full resolution: the pool comes last
    assert calls == [("n1", (1, 2, 8, 8)), ("c1", (1, 2, 8, 8)), ("n2", (1, 2, 8, 8)), ("c2", (1, 3, 8, 8))]


def test_export_quantises_like_the_official_inception_score_code(tmp_path):
    x = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.0]).view(5, 1, 1, 1).expand(5, 3, 2, 2)

    class Fixed(nn.Module):
        def forward(self, z, y=None):
            return x[: z.size(0)]
    args = wgan_gp.derive_defaults(wgan_gp.parse_args(["--export-samples", "5"]))
    wgan_gp.export_samples(Fixed(), args, "cpu", 10, tmp_path / "s.npz")
    got = np.load(tmp_path / "s.npz")["images"]
    assert got.shape == (5, 2, 2, 3) and got.dtype == np.uint8
    assert got[:, 0, 0, 0].tolist() == [int((v + 1) * 255.99 / 2) for v in (-1.0, -0.5, 0.0, 0.999, 1.0)]
