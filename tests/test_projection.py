"""projection.py: smoke, resume, determinism, and the paper invariants of the card's section 8."""
import json
import math

import pytest
import torch
import torch.nn as nn

import projection
from tiny_args import TINY

ARGV = TINY["projection.py"]


def _run(tmp_path, name, *extra):
    return projection.main(ARGV + ["--out-dir", str(tmp_path / name), *extra])


def _logged_steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


# ---- runs through main() ----------------------------------------------------------------------
def test_smoke_resume_equals_uninterrupted_and_determinism(tmp_path):
    # --decay-start 4: the lr schedule is the same whether a run is told --steps 2 or --steps 4
    a = _run(tmp_path, "a", "--steps", "2", "--decay-start", "4")
    out = tmp_path / "a"
    assert a["step"] == 2 and all(math.isfinite(v) for v in a.values())
    for f in ("ckpt.pt", "metrics.jsonl", "args.json", "reals.png", "samples/0000002.png",
              "samples_12.npz", "morph.png"):
        assert (out / f).exists(), f
    assert json.loads((out / "args.json").read_text())["num_classes"] == 6
    exported = __import__("numpy").load(out / "samples_12.npz")
    assert exported["images"].shape == (12, 32, 32, 3) and exported["images"].dtype.name == "uint8"
    assert exported["labels"].tolist() == [i % 6 for i in range(12)]
    with pytest.raises(FileExistsError):                               # no silent overwrite
        _run(tmp_path, "a", "--steps", "2", "--decay-start", "4")

    resumed = _run(tmp_path, "a", "--steps", "4", "--decay-start", "4", "--resume")
    assert _logged_steps(out / "metrics.jsonl") == [1, 2, 3, 4]         # each step logged once
    straight = _run(tmp_path, "b", "--steps", "4", "--decay-start", "4")
    for k in ("loss_D", "loss_G", "d_real", "d_fake"):
        assert resumed[k] == pytest.approx(straight[k], rel=1e-5, abs=1e-6), k
    sa = torch.load(out / "ckpt.pt", weights_only=True)
    sb = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    for net in ("G", "D"):                                             # weights, BN stats, SN u vectors
        for k, v in sa[net].items():
            torch.testing.assert_close(v, sb[net][k], rtol=1e-5, atol=1e-6, msg=f"{net}.{k}")
    # determinism: the uninterrupted run logged the same step-1 and step-2 numbers as run a
    timing = ("it_s", "eta_s")
    first = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][:2]
    second = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()][:2]
    assert [{k: v for k, v in m.items() if k not in timing} for m in first] == [
        {k: v for k, v in m.items() if k not in timing} for m in second]


def test_concat_baseline_runs(tmp_path):
    m = _run(tmp_path, "concat", "--steps", "1", "--disc", "concat", "--export-samples", "0")
    assert m["step"] == 1 and math.isfinite(m["loss_D"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_no_silent_cpu_fallback(tmp_path):
    with pytest.raises(RuntimeError, match="pass --device cpu"):
        _run(tmp_path, "cuda", "--device", "cuda")


# ---- projection discriminator (Eq. 3) -----------------------------------------------------------
def _tiny_D(K=5, **kw):
    torch.manual_seed(0)
    return projection.ProjectionDiscriminator(K, ch=8, img_size=32, **kw)


def test_projection_term_is_the_inner_product():
    D, x = _tiny_D(), torch.randn(4, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 4])
    D.eval()                                                           # freeze u: V_SN fixed below
    with torch.no_grad():
        v_sn, phi = D.embed.weight, D.phi(x, y)
        # psi's SN weight cannot be zeroed (0/0), so subtract psi(phi) instead of setting it to 0
        torch.testing.assert_close(D(x, y) - D.psi(phi), (v_sn[y] * phi).sum(1, keepdim=True))
        c1, c2 = torch.full((4,), 1), torch.full((4,), 3)              # D(x,c1) - D(x,c2) = <V[c1]-V[c2], phi>
        torch.testing.assert_close(D(x, c1) - D(x, c2), ((v_sn[c1] - v_sn[c2]) * phi).sum(1, keepdim=True))
        assert D(x, y).shape == (4, 1)
        assert not torch.allclose(D(x, y), D(x, y.flip(0)))           # label permutation moves the logit
        D.embed = nn.Embedding(5, 8).requires_grad_(False)             # V = 0: the label no longer matters
        D.embed.weight.zero_()
        out = [D(x, torch.full((4,), c)) for c in range(5)]
    assert all(torch.equal(o, out[0]) for o in out)


def test_phi_is_a_sum_pool_of_relu():
    h = torch.full((2, 3, 4, 5), 0.5)
    torch.testing.assert_close(projection.sum_pool(h), torch.full((2, 3), 0.5 * 4 * 5))
    assert projection.sum_pool(-h).abs().sum() == 0                    # ReLU before pooling


def test_spectral_norm_on_every_D_weight_and_none_in_G():
    D = _tiny_D()
    G = projection.Generator(5, z_dim=8, ch=8)
    layers = [m for m in D.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding))]
    assert len(layers) == 3 + 3 + 2 + 2 + 1 + 1 and all(hasattr(m, "parametrizations") for m in layers)
    assert not any(hasattr(m, "parametrizations") for m in G.modules())
    # V (K x C): after warm-up its top singular value is 1 and u has length K (rows = classes)
    D.train()
    for _ in range(50):
        _ = D.embed.weight                                         # one power iteration
    assert D.embed.parametrizations.weight[0]._u.shape == (5,)
    with torch.no_grad():
        assert abs(torch.linalg.matrix_norm(D.embed.weight, ord=2).item() - 1) < 1e-3


def test_concat_D_is_not_a_projection():
    D, x = _tiny_D(disc="concat", concat_dim=4), torch.randn(3, 3, 32, 32)
    assert D.blocks[3].c1.in_channels == 8 + 4                         # label joins after block 3
    with torch.no_grad():
        assert D(x, torch.zeros(3, dtype=torch.long)).shape == (3, 1)
        assert not torch.allclose(D(x, torch.zeros(3, dtype=torch.long)), D(x, torch.ones(3, dtype=torch.long)))


# ---- conditional batch norm in G ---------------------------------------------------------------
def test_conditional_batch_norm():
    torch.manual_seed(0)
    cbn = projection.ConditionalBatchNorm2d(3, 4)
    bn = nn.BatchNorm2d(3, eps=2e-5, affine=False)
    x, y = torch.randn(8, 3, 5, 5), torch.tensor([0, 1, 2, 3, 2, 1, 0, 3])
    torch.testing.assert_close(cbn(x, y), bn(x))                       # gamma = 1, beta = 0 at init
    base = cbn(x, y).detach()
    with torch.no_grad():
        cbn.gamma.weight[2] = torch.tensor([2.0, 3.0, 4.0])
        cbn.beta.weight[2] = 0.5
    changed = (cbn(x, y) - base).flatten(1).abs().amax(1) > 0
    assert changed.tolist() == (y == 2).tolist()                       # per sample, only class 2
    torch.testing.assert_close(cbn(x, y)[2], base[2] * torch.tensor([2.0, 3.0, 4.0])[:, None, None] + 0.5)
    cbn.eval()                                                         # eval: running statistics
    rm, rv = cbn.bn.running_mean, cbn.bn.running_var
    norm = (x - rm[:, None, None]) / torch.sqrt(rv[:, None, None] + 2e-5)
    torch.testing.assert_close(cbn(x, torch.zeros(8, dtype=torch.long)), norm)
    one_hot = torch.eye(4)[y]                                          # class weights = labels
    torch.testing.assert_close(cbn(x, one_hot), cbn(x, y))


def test_labels_reach_every_G_block_and_shapes():
    torch.manual_seed(0)
    G = projection.Generator(100, z_dim=16, ch=8)                      # the K = 100 (CIFAR-100) path
    cbns = [m for m in G.modules() if isinstance(m, projection.ConditionalBatchNorm2d)]
    assert len(cbns) == 2 * 3 and isinstance(G.bn, nn.BatchNorm2d) and G.bn.affine  # last BN plain
    z = torch.randn(4, 16)
    x = G(z, torch.zeros(4, dtype=torch.long))
    assert x.shape == (4, 3, 32, 32) and x.abs().max() <= 1
    with torch.no_grad():
        for m in cbns:
            m.gamma.weight.normal_(1, 0.5)
    G.eval()
    assert not torch.allclose(G(z, torch.zeros(4, dtype=torch.long)), G(z, torch.ones(4, dtype=torch.long)))


def test_32px_architecture():
    G = projection.Generator(10, z_dim=8, ch=8)                        # official resnet_32.py
    D = projection.ProjectionDiscriminator(100, ch=4)                  # official snresnet_32.py, K = 100
    assert G.linear.out_features == 8 * 4 * 4 and [b.c2.out_channels for b in G.blocks] == [8, 8, 8]
    assert [b.c2.out_channels for b in D.blocks] == [4, 4, 4, 4]
    assert [getattr(b, "down", True) for b in D.blocks] == [True, True, False, False]
    assert D.psi.bias is None and D.embed.weight.shape == (100, 4)
    x = torch.randn(3, 3, 32, 32)
    assert D.blocks[1](D.blocks[0](x)).shape == (3, 4, 8, 8) and D(x, torch.tensor([0, 50, 99])).shape == (3, 1)


def test_128px_architecture():
    G = projection.Generator(7, z_dim=8, ch=2, img_size=128)
    D = projection.ProjectionDiscriminator(7, ch=2, img_size=128)
    assert [b.c2.out_channels for b in G.blocks] == [32, 16, 8, 4, 2]  # 16ch -> ch, 5 up-blocks
    assert [b.c2.out_channels for b in D.blocks] == [2, 4, 8, 16, 32, 32]
    assert D.psi.bias is not None and D.embed.weight.shape == (7, 32)
    y = torch.arange(2)
    x = G(torch.randn(2, 8), y)
    assert x.shape == (2, 3, 128, 128) and D(x, y).shape == (2, 1)


def test_glorot_init():
    torch.manual_seed(0)
    G = projection.Generator(3, z_dim=8, ch=64)
    for w, gain in ((G.blocks[0].c1.weight, math.sqrt(2)), (G.blocks[0].c_sc.weight, 1.0),
                    (G.linear.weight, 1.0), (G.conv_out.weight, 1.0)):
        fan_in, fan_out = w.shape[1] * w[0, 0].numel(), w.shape[0] * w[0, 0].numel()
        bound = gain * math.sqrt(6 / (fan_in + fan_out))
        assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
    assert G.blocks[0].c1.bias.abs().sum() == 0 and G.linear.bias.abs().sum() == 0
    D = projection.ProjectionDiscriminator(3, ch=64)                   # init is applied before SN
    for w, gain in ((D.blocks[1].c1.parametrizations.weight.original, math.sqrt(2)),
                    (D.blocks[1].c_sc.parametrizations.weight.original, 1.0)):
        fan_in, fan_out = w.shape[1] * w[0, 0].numel(), w.shape[0] * w[0, 0].numel()
        bound = gain * math.sqrt(6 / (fan_in + fan_out))
        assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound


# ---- losses, labels, schedule ------------------------------------------------------------------
def test_hinge_closed_forms():
    two = torch.full((5, 1), 2.0)
    assert projection.hinge_loss_D(two, -two) == 0
    assert projection.hinge_loss_D(torch.zeros(5, 1), torch.zeros(5, 1)) == 2
    d = torch.tensor([[0.5], [-1.5], [3.0]])
    assert projection.hinge_loss_G(d) == pytest.approx(-d.mean().item())
    assert projection.hinge_loss_D(d, d) == pytest.approx((0.5 + 2.5 + 0 + 1.5 + 0 + 4) / 3)


class _Recorder(nn.Module):
    """Wraps G or D and records the labels of every call."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, a, y):
        self.calls.append(y.clone())
        return self.net(a, y)


def test_train_step_labels_and_n_dis():
    torch.manual_seed(0)
    K = 4
    G = _Recorder(projection.Generator(K, z_dim=8, ch=8))
    D = _Recorder(_tiny_D(K))
    args = projection.parse_args(["--n-dis", "3", "--batch-size", "6", "--g-batch-size", "10", "--z-dim", "8"])
    reals = [(torch.rand(6, 3, 32, 32) * 2 - 1, torch.randint(0, K, (6,))) for _ in range(3)]
    opt_G, opt_D = (torch.optim.Adam(m.parameters(), lr=2e-4, betas=(0.0, 0.9)) for m in (G, D))
    projection.train_step(G, D, opt_G, opt_D, iter(reals), args, K, lambda: torch.autocast("cpu", enabled=False))
    assert len(G.calls) == 1 + 3 and len(D.calls) == 1 + 2 * 3          # 1 G update, then n_dis D updates
    assert G.calls[0].shape == (10,) and torch.equal(D.calls[0], G.calls[0])
    for i in range(3):
        assert torch.equal(D.calls[1 + 2 * i], reals[i][1])            # real pairs keep their labels
        assert torch.equal(D.calls[2 + 2 * i], G.calls[1 + i])         # fakes scored with their own y
    y = projection.sample_zy(4000, 2, K, "cpu")[1]
    counts = torch.bincount(y, minlength=K)
    assert counts.min() > 850 and counts.max() < 1150                  # uniform q(y) over all K


def test_linear_decay_schedule():
    lr = projection.linear_decay_lr
    assert [lr(t, 2e-4, 0, 50_000) for t in (0, 25_000, 50_000)] == pytest.approx([2e-4, 1e-4, 0])
    assert lr(400_000, 2e-4, 400_000, 450_000) == 2e-4                 # ImageNet: flat until 400K
    assert lr(425_000, 2e-4, 400_000, 450_000) == pytest.approx(1e-4)
    a = projection.derive_defaults(projection.parse_args(["--dataset", "folder:/x"]))
    b = projection.derive_defaults(projection.parse_args([]))
    assert (a.img_size, a.steps, a.decay_start, a.g_ch, a.d_ch) == (128, 450_000, 400_000, 64, 64)
    assert (b.img_size, b.steps, b.decay_start, b.g_ch, b.d_ch) == (32, 50_000, 0, 256, 128)
    assert (b.lr, tuple(b.betas), b.n_dis, b.batch_size, b.g_batch_size) == (2e-4, (0.0, 0.9), 5, 64, 128)


def test_dequantize_matches_official_formula():
    pixels = torch.arange(256.0)
    x = projection.dequantize(pixels / 127.5 - 1)
    assert ((x - (pixels / 128 - 1)) >= 0).all() and ((x - (pixels / 128 - 1)) < 1 / 128).all()
