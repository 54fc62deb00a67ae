"""stackganpp.py against its card (shared/papers/stackganpp.md: section 7 checklist, section 8).

Training facts go through main() (tiny runs, their checkpoints and metrics) or through train_step
with stand-in discriminators whose outputs are known exactly; closed forms (KL, GLU, colour
statistics) are checked on the functions main uses. The official CUB layout is written here: a
CUB_200_2011 folder with its bounding boxes and Python-2-style (latin1) pickles."""
import json
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

import common
import stackganpp as sg
from tiny_args import TINY

TINY_ARGV = TINY["stackganpp.py"]


def _args(*extra):
    return sg.parse_args([*TINY_ARGV, "--out-dir", "unused", *extra])


def _rows(d):
    return [json.loads(line) for line in (Path(d) / "metrics.jsonl").read_text().splitlines()]


def _untimed(rows):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


def _ckpt(d):
    return torch.load(Path(d) / "ckpt.pt", weights_only=True)


def _main(out, *extra):
    return sg.main([*TINY_ARGV, "--out-dir", str(out), *extra])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny 3-stage runs through main(): text mode, 2 steps; text 1 step then --resume to 2;
    --cond none, 2 steps with an export."""
    root = tmp_path_factory.mktemp("stackganpp")
    _main(root / "text")
    _main(root / "text1", "--epochs", "1")
    shutil.copytree(root / "text1", root / "resumed")
    _main(root / "resumed", "--resume", "--epochs", "2")
    _main(root / "none", "--cond", "none", "--export-samples", "4")
    return root


# ---- card 2.7: the paper's configuration is the default ----
def test_defaults_are_the_official_configuration():
    a = sg.parse_args(["--dataset", "cub"])
    assert (a.cond, a.base_size, a.z_dim, a.cond_dim, a.gf_dim, a.df_dim, a.r_num) == (
        "text", 64, 100, 128, 64, 64, 2)
    assert (a.batch_size, a.lr, a.betas, a.kl_coeff, a.uncond_loss, a.color_coeff) == (
        24, 2e-4, [0.5, 0.999], 2.0, 1.0, 0.0)
    assert (a.color_lambdas, a.color_form, a.ema_decay, a.snapshot_reset_every, a.epochs) == (
        [1.0, 5.0], "code", 0.999, 0, 600)
    u = sg.parse_args(["--dataset", "lsun-church_outdoor"])
    assert (u.cond, u.color_coeff, u.epochs) == ("none", 50.0, 50)
    assert sg.parse_args(["--dataset", "lsun-bedroom"]).epochs == 5
    assert sg.parse_args(["--dataset", "folder:x"]).cond == "none"


# ---- checklist 1 / card 8.1, 8.2: KL, GLU, CA ----
def test_kl_closed_forms():
    z = torch.zeros(3, 8)
    assert sg.kl_loss(z, z).item() == 0
    assert sg.kl_loss(z + 1, z).item() == pytest.approx(0.5)           # x 2.0 -> 1.0
    lv = torch.full((3, 8), float(np.log(4.0)))
    assert sg.kl_loss(z, lv).item() == pytest.approx(0.5 * (4 - 1 - np.log(4.0)), rel=1e-6)
    mu, lv = torch.randn(5, 8), torch.randn(5, 8)
    per = 0.5 * (mu ** 2 + lv.exp() - 1 - lv)                            # KL per element
    assert sg.kl_loss(mu, lv).item() == pytest.approx(per.mean().item(), rel=1e-5)


def test_glu_and_ca_sample():
    a, b = torch.randn(4, 6, 2, 2), torch.randn(4, 6, 2, 2)
    assert torch.allclose(sg.GLU()(torch.cat([a, b], 1)), a * torch.sigmoid(b))
    G = sg.init_weights(sg.Generator(**_gkw(_args())))
    ca, nc = G.ca, 8
    assert ca.fc.in_features == 1024 and ca.fc.out_features == 4 * nc and ca.fc.bias is not None
    phi, eps = torch.randn(4, 1024), torch.randn(4, nc)
    c, mu, lv = ca(phi, eps)
    assert c.shape == mu.shape == lv.shape == (4, nc)
    h = ca.fc(phi)
    g = h[:, : 2 * nc] * torch.sigmoid(h[:, 2 * nc:])
    assert torch.allclose(mu, g[:, :nc]) and torch.allclose(lv, g[:, nc:])
    assert torch.allclose(c, mu + torch.exp(0.5 * lv) * eps)
    torch.manual_seed(3)
    c1 = ca(phi)[0]
    torch.manual_seed(3)
    assert torch.allclose(c1, mu + torch.exp(0.5 * lv) * torch.randn(4, nc))


def _gkw(args, text_dim=1024):
    return dict(z_dim=args.z_dim, gf_dim=args.gf_dim, base_size=args.base_size,
                cond_dim=args.cond_dim, r_num=args.r_num, text=args.cond == "text",
                text_dim=text_dim)


# ---- checklist 3-7 / card 8.3: shapes and full-size parameter counts ----
def _count(m):
    return sum(p.numel() for p in m.parameters())


def test_full_size_parameter_counts():
    with torch.device("meta"):
        G, Gu = sg.Generator(), sg.Generator(text=False)
        Ds = [cls() for cls in (sg.Discriminator64, sg.Discriminator128, sg.Discriminator256)]
        Du = [cls(cond_dim=0) for cls in (sg.Discriminator64, sg.Discriminator128,
                                          sg.Discriminator256)]
    assert _count(G) == 21_239_696 and _count(G.ca) == 524_800
    assert [_count(D) for D in Ds] == [5_723_906, 18_834_178, 71_269_122]
    assert _count(Gu) == 16_472_208
    assert [_count(D) for D in Du] == [2_765_569, 15_875_841, 68_310_785]
    assert G.f0.fc[0].in_features == 228 and G.f1.joint[0].in_channels == 192
    assert Gu.f1.joint[0].in_channels == 164 and Gu.f2.joint[0].in_channels == 132


def _built_g(*extra):
    """G as main builds it (build_nets on the tiny flags), in eval mode."""
    args = _args(*extra)
    return sg.build_nets(_gkw(args), args)[0].eval()


def test_tiny_output_shapes_ranges_and_layers():
    G = _built_g()
    z, phi = torch.randn(4, 100), torch.randn(4, 1024)
    with torch.no_grad():
        s, mu, lv = G(z, phi)
    assert [tuple(x.shape) for x in s] == [(4, 3, 8, 8), (4, 3, 16, 16), (4, 3, 32, 32)]
    assert all(x.abs().max() <= 1 for x in s) and mu.shape == lv.shape == (4, 8)
    ups = [m for m in G.modules() if isinstance(m, nn.Upsample)]
    assert len(ups) == 1 + 2 and all(m.mode == "nearest" and m.scale_factor == 2 for m in ups)
    assert all(m.bias is None for m in G.modules() if isinstance(m, nn.Conv2d))
    assert G.f0.fc[0].bias is None and isinstance(G.f0.fc[1], nn.BatchNorm1d)
    assert [h.conv.in_channels for h in G.heads] == [4, 2, 1]
    h = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.allclose(G.heads[0](h), torch.tanh(G.heads[0].conv(h)))
        res = G.f1.residual[0]
        assert torch.allclose(res(h), h + res.block(h), atol=1e-6)  # no activation after the sum
    args = _args()
    _, Ds = sg.build_nets(_gkw(args), args)
    for i, D in enumerate(Ds):
        x = torch.randn(4, 3, 8 * 2 ** i, 8 * 2 ** i)
        cond, uncond = D(x, torch.randn(4, 8))
        assert cond.shape == uncond.shape == (4,)
        convs = [m for m in D.modules() if isinstance(m, nn.Conv2d)]
        heads = {D.uncond_logits, D.cond_logits}
        assert all((m.bias is not None) == (m in heads) for m in convs)
        assert all(m.negative_slope == 0.2 for m in D.modules() if isinstance(m, nn.LeakyReLU))
        first = D.encode[0] if i == 0 else D.encode[0][0]
        after = (D.encode if i == 0 else D.encode[0])[1]
        assert first.kernel_size == (4, 4) and first.stride == (2, 2)
        assert isinstance(after, nn.LeakyReLU)                     # no BN on the first conv
        assert D.joint_conv[0].in_channels == 8 * 4 + 8 and D.joint_conv[0].out_channels == 32
        assert D.uncond_logits.kernel_size == (4, 4) and D.uncond_logits.stride == (4, 4)
        seen = []
        D.joint_conv.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        c = torch.randn(4, 8)
        D(x, c)                                # condition first, replicated over the 4 x 4 code
        assert torch.equal(seen[0][:, :8], c[:, :, None, None].expand(-1, -1, 4, 4))


# ---- checklist 15: init ----
def test_init_orthogonal_bn_gamma_n1_002():
    torch.manual_seed(0)
    args = _args("--gf-dim", "16", "--df-dim", "16")
    G, Ds = sg.build_nets(_gkw(args), args)
    gammas = []
    for net in (G, *Ds):
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                w = m.weight.detach().flatten(1)
                w = w if w.shape[0] <= w.shape[1] else w.T
                assert torch.allclose(w @ w.T, torch.eye(len(w)), atol=1e-4), m
            if isinstance(m, nn.Linear) and m.bias is not None:
                assert m.bias.abs().max() == 0
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                assert m.bias.abs().max() == 0
                gammas.append(m.weight.detach())
        for name in ("uncond_logits", "cond_logits"):
            head = getattr(net, name, None)
            if head is not None:
                assert head.bias.abs().max() > 0                   # torch's default bias kept
    g = torch.cat(gammas)
    assert len(g) > 1000 and abs(g.mean().item() - 1) < 0.003 and 0.015 < g.std().item() < 0.025


# ---- checklist 2 / card 8.6: conditioning path ----
def _capture(G):
    seen = {}
    for name, mod in (("f0", G.f0.fc), ("f1", G.f1.joint), ("f2", G.f2.joint)):
        mod.register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, a[0]))
    return seen


def test_same_c_condition_first_at_every_stage_and_text_changes_s0():
    G = _built_g()
    seen = _capture(G)
    z, phi, eps = torch.randn(4, 100), torch.randn(4, 1024), torch.randn(4, 8)
    with torch.no_grad():
        s, mu, lv = G(z, phi, eps)
        c = mu + torch.exp(0.5 * lv) * eps
        assert torch.allclose(seen["f0"], torch.cat([c, z], 1))
        for k, size in (("f1", 8), ("f2", 16)):
            assert seen[k].shape[1] == 8 + 4 // (1 + (k == "f2"))
            assert torch.allclose(seen[k][:, :8], c[:, :, None, None].expand(-1, -1, size, size))
        s2 = G(z, phi + torch.randn(4, 1024), eps)[0]
    assert (s2[0] - s[0]).abs().max() > 1e-3


def test_unconditional_branches_receive_z():
    G = _built_g("--cond", "none")
    assert G.ca is None and G.f1.joint[0].in_channels == 4 + 100
    seen = _capture(G)
    z = torch.randn(4, 100)
    with torch.no_grad():
        G(z)
    assert torch.equal(seen["f0"], z)
    for k, size in (("f1", 8), ("f2", 16)):
        assert torch.equal(seen[k][:, :100], z[:, :, None, None].expand(-1, -1, size, size))


# ---- checklist 8-13 / card 8.5: losses through train_step with known D outputs ----
class StubD(nn.Module):
    """Logit +30 / -30 by what it is shown: constant +0.5 images are real, constant -0.5 images
    wrong (cond 0, uncond 1 wanted), anything else a fake. Logs (self, c) per call."""

    def __init__(self, log, text, fake_logit=-30.0):
        super().__init__()
        self.w, self.log, self.text = nn.Parameter(torch.zeros(())), log, text
        self.fake_logit = fake_logit

    def forward(self, x, c=None):
        f = x.detach().flatten(1)
        const = f.max(1).values == f.min(1).values
        real, wrong = const & (f[:, 0] > 0), const & (f[:, 0] < 0)
        self.log.append((self, c))
        uncond = torch.where(real | wrong, 30.0, self.fake_logit) + self.w
        cond = torch.where(real, 30.0, torch.where(wrong, -30.0, self.fake_logit)) + self.w
        return (cond if self.text else None), uncond


def _stub_step(*extra, fake_logit=-30.0):
    args = _args(*extra)
    text = args.cond == "text"
    torch.manual_seed(0)
    G = sg.init_weights(sg.Generator(**_gkw(args)))
    log = []
    Ds = [StubD(log, text, fake_logit) for _ in range(3)]
    opt_G = torch.optim.Adam(G.parameters(), lr=args.lr, betas=tuple(args.betas))
    opt_Ds = [torch.optim.Adam(D.parameters(), lr=args.lr) for D in Ds]
    sizes = (8, 16, 32)
    batch = [torch.full((4, 3, s, s), 0.5) for s in sizes]
    phi = torch.randn(4, 1024)
    if text:
        batch += [torch.full((4, 3, s, s), -0.5) for s in sizes] + [phi]
    with torch.no_grad():
        mu = G.ca(phi)[1] if text else None
    out = sg.train_step(G, Ds, opt_G, opt_Ds, batch, args, common.Dist("cpu"))
    return out, G, Ds, opt_Ds, log, mu, args


def test_text_losses_targets_kl_and_the_mu_conditioning():
    out, G, Ds, opt_Ds, log, mu, args = _stub_step()
    for i in range(3):      # cond real 1 / wrong 0 / fake 0, uncond real 1 / wrong 1 / fake 0
        assert out[f"loss_D{i}"].item() < 1e-6
    assert out["loss_G_adv"].item() == pytest.approx(3 * 2 * 30, abs=1e-4)   # cond + uncond x 3
    assert args.kl_coeff == 2.0 and args.color_coeff == 0
    assert (out["loss_G"] - out["loss_G_adv"]).item() == pytest.approx(
        2.0 * out["kl"].item(), abs=1e-4)
    assert len(log) == 12
    assert [Ds.index(d) for d, _ in log] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 1, 2]
    for d, c in log[:9]:                         # D steps: mu, detached (not the sampled c)
        assert not c.requires_grad and torch.allclose(c, mu, atol=1e-6)
    assert all(c.requires_grad for _, c in log[9:])                   # G step: mu trains CA
    assert all(float(o.state[D.w]["step"]) == 1 for o, D in zip(opt_Ds, Ds))


def test_uncond_loss_zero_is_the_official_half_weighted_form():
    out = _stub_step("--uncond-loss", "0", fake_logit=0.0)[0]
    # cond(real) 1 + 0.5 (cond(wrong) 0 + cond(fake) 0): only the fake term, log 2, is not ~0
    assert all(out[f"loss_D{i}"].item() == pytest.approx(0.5 * np.log(2), abs=1e-6)
               for i in range(3))
    assert out["loss_G_adv"].item() == pytest.approx(3 * np.log(2), abs=2e-3)  # cond head only
    out = _stub_step(fake_logit=0.0)[0]                                # uncond_loss 1: both heads
    assert all(out[f"loss_D{i}"].item() == pytest.approx(2 * np.log(2), abs=1e-6)
               for i in range(3))


def test_unconditional_losses_and_colour_term_with_lower_scale_detached():
    out, G, Ds, _, log, _, args = _stub_step("--cond", "none")
    assert args.color_coeff == 50 and list(args.color_lambdas) == [1, 5]
    assert all(out[f"loss_D{i}"].item() < 1e-6 for i in range(3))
    assert out["loss_G_adv"].item() == pytest.approx(3 * 30, abs=1e-4)
    assert all(c is None for _, c in log)
    color = sum(out[f"color_mu_{s}"] + 5 * out[f"color_cov_{s}"] for s in (16, 32))
    assert color.item() > 0
    assert (out["loss_G"] - out["loss_G_adv"]).item() == pytest.approx(50 * color.item(),
                                                                        abs=1e-4)
    # this D passes no gradient to G, so G's gradient is the colour loss alone: s_0 is only
    # ever the detached lower scale, so its image head gets none; s_1's head gets some
    g0 = G.heads[0].conv.weight.grad
    assert g0 is None or g0.abs().max() == 0
    assert G.heads[1].conv.weight.grad.abs().max() > 0


# ---- checklist 11, 12 / card 8.4: colour statistics ----
def test_colour_statistics_and_the_detached_colour_loss():
    mu, cov = sg.mean_covariance(torch.full((2, 3, 4, 4), 0.3))
    assert torch.allclose(mu, torch.full((2, 3), 0.3)) and cov.abs().max() < 1e-7
    x = torch.zeros(1, 3, 4, 4)
    x[0, 0] = torch.tensor([[1, -1, 1, -1], [-1, 1, -1, 1]] * 2, dtype=torch.float32)
    mu, cov = sg.mean_covariance(x)                                   # normalised by N
    assert torch.allclose(mu, torch.zeros(1, 3)) and torch.allclose(cov[0], torch.diag(
        torch.tensor([1.0, 0, 0])))
    s0 = (torch.rand(2, 3, 8, 8) * 2 - 1).requires_grad_()
    s1 = F.interpolate(s0.detach(), scale_factor=2, mode="nearest").requires_grad_()
    assert sg.color_consistency_loss(s0, s1).item() < 1e-12          # 0 up to rounding
    shifted = s1 + torch.tensor([0.2, 0, 0])[:, None, None]
    loss = sg.color_consistency_loss(s0, shifted)
    assert loss.item() == pytest.approx(0.2 ** 2 / 3, rel=1e-4)       # MSE over the 3 means
    loss.backward()
    assert s0.grad is None or s0.grad.abs().max() == 0
    assert s1.grad.abs().max() > 0
    a, b = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    (ma, ca), (mb, cb) = sg.mean_covariance(a), sg.mean_covariance(b)
    want = ((mb - ma) ** 2).sum(1).mean() + 5 * ((cb - ca) ** 2).sum((1, 2)).mean()
    assert sg.color_consistency_loss(a, b, form="paper").item() == pytest.approx(want.item(),
                                                                                   rel=1e-5)


# ---- checklist 16, 17: data ----
class _Source:
    def __init__(self, images, n_captions=10):
        self.images, self.n, self.n_captions = images, len(images), n_captions

    def image(self, i):
        return self.images[i]

    def label(self, i):
        return i % 2

    def embeddings(self, i):
        return np.arange(self.n_captions, dtype=np.float32)[:, None] + 100 * i + np.zeros(
            (1, 4), np.float32)


def _pil(x):
    return Image.fromarray(((x + 1) / 2 * 255).round().byte().permute(1, 2, 0).numpy())


def test_one_random_crop_for_every_scale_flip_and_304_resize():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (38, 38, 3), dtype=np.uint8))
    data = sg.MultiScaleData(_Source([img] * 4), [8, 16, 32], 0, text=False)
    assert data.load == 38 and int(256 * sg.LOAD_RATIO) == 304
    full = TF.to_tensor(TF.resize(img, 38)) * 2 - 1
    crops, flips = set(), set()
    for step in range(24):
        x8, x16, x32 = data[(1, step, 0)]
        for s, x in ((8, x8), (16, x16)):                  # bilinear resizes of the same crop
            assert torch.allclose(x, TF.to_tensor(TF.resize(_pil(x32), s)) * 2 - 1, atol=1e-6)
        hits = [(y, xx, fl) for y in range(7) for xx in range(7) for fl in (False, True)
                if torch.allclose((lambda t: t.flip(-1) if fl else t)(
                    full[:, y:y + 32, xx:xx + 32]), x32, atol=1e-6)]
        assert len(hits) == 1
        crops.add(hits[0][:2])
        flips.add(hits[0][2])
    assert flips == {False, True} and len(crops) > 5


def test_wrong_image_one_redraw_and_a_random_caption_per_sample():
    imgs = [Image.new("RGB", (38, 38), (20 * i, 0, 0)) for i in range(10)]
    src = _Source(imgs)
    data = sg.MultiScaleData(src, [8, 16, 32], 0, text=True)
    same, ks = 0, set()
    n = 200
    for step in range(n):
        item = data[(step % 10, step, 0)]
        i, k, emb, wrong = item[8], item[7], item[6], item[5]
        w = int(round(((wrong[0, 0, 0].item() + 1) / 2 * 255) / 20))
        same += src.label(w) == src.label(i)
        ks.add(k)
        assert torch.equal(emb, torch.from_numpy(src.embeddings(i)[k]))
    assert 0.15 < same / n < 0.35        # 1/2 x 1/2 with one redraw; 1/2 without, 0 if forced
    assert len(ks) == 10


# ---- the official data layout (CUB) ----
class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 str (BINSTRING), as the official Python-2 pickles hold them."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj):
        n = len(obj)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + \
            struct.pack("<i", n)
        self.write(head + obj)
        self.memoize(obj)
    dispatch[bytes] = save_bytes


def _py2_dump(obj, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


def _cub(root, n=4, dim=32):
    cub = root / "birds" / "CUB_200_2011"
    keys = [f"00{1 + i // 2}.Bird_{i // 2}/Bird_{i:04d}" for i in range(n)]
    rng = np.random.default_rng(0)
    for i, k in enumerate(keys):
        (cub / "images" / k).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
            cub / "images" / f"{k}.jpg")
    (cub / "images.txt").write_text("".join(f"{i + 1} {k}.jpg\n" for i, k in enumerate(keys)))
    boxes = ["10.0 5.0 8.0 6.0", "40.0 30.0 8.0 9.0", "0 0 48 40", "20 10 10 10"]
    (cub / "bounding_boxes.txt").write_text("".join(f"{i + 1} {b}\n"
                                                    for i, b in enumerate(boxes)))
    emb = rng.standard_normal((n, 10, dim)).astype(np.float32)
    for split in ("train", "test"):
        d = root / "birds" / split
        _py2_dump([k.encode() for k in keys], d / "filenames.pickle")
        _py2_dump(emb, d / "char-CNN-RNN-embeddings.pickle")
        _py2_dump([1 + i // 2 for i in range(n)], d / "class_info.pickle")
    return emb


def test_cub_official_layout_python2_pickles_and_bbox_crop(tmp_path):
    emb = _cub(tmp_path / "data")
    path = tmp_path / "data" / "birds" / "train" / "char-CNN-RNN-embeddings.pickle"
    with pytest.raises(UnicodeDecodeError):          # a Python 2 pickle: needs latin1
        with open(path, "rb") as f:
            pickle.load(f)
    src = sg.PickleTextSource("cub", str(tmp_path / "data"), "train")
    assert np.array_equal(src.embeddings(2), emb[2]) and src.n_captions == 10
    assert [src.label(i) for i in range(4)] == [1, 1, 2, 2]
    # side 1.5 max(w, h) around the box centre, clipped to the 48 x 40 image
    assert [src.image(i).size for i in range(4)] == [(12, 12), (10, 12), (48, 40), (14, 14)]
    _main(tmp_path / "run", "--dataset", "cub", "--data-root", str(tmp_path / "data"),
          "--epochs", "1")
    assert np.isfinite(_rows(tmp_path / "run")[-1]["loss_G"])
    assert _ckpt(tmp_path / "run")["G_kwargs"]["text_dim"] == 32


def test_missing_embedding_pickle_is_one_line_naming_the_file(tmp_path):
    _cub(tmp_path / "data")
    path = tmp_path / "data" / "birds" / "train" / "char-CNN-RNN-embeddings.pickle"
    path.unlink()
    with pytest.raises(common.UserError) as e:
        _main(tmp_path / "run", "--dataset", "cub", "--data-root", str(tmp_path / "data"))
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_shapes_text_encoder_is_fixed_and_tells_captions_apart():
    W = sg.shapes_projection()
    assert W.shape[0] == 1024 and np.array_equal(W, sg.shapes_projection())
    src = sg.ShapesTextSource(4, 38, seed=0)
    e = src.embeddings(0)
    assert e.shape == (10, 1024) and np.array_equal(e, src.embeddings(0))
    a, b = "a red circle", "a blue circle"
    assert np.abs(sg.encode_caption(a, W) - sg.encode_caption(b, W)).max() > 1


# ---- card 8.8: both modes end to end ----
def test_tiny_runs_in_both_modes_step_all_three_ds_and_log_colour_statistics(runs):
    for mode in ("text", "none"):
        rows = _rows(runs / mode)
        assert [r["step"] for r in rows] == [1, 2]
        for r in rows:
            assert all(np.isfinite(v) for k, v in r.items() if isinstance(v, float)), r
            assert {"loss_D0", "loss_D1", "loss_D2", "loss_G", "color_mu_16", "color_cov_16",
                    "color_mu_32", "color_cov_32"} <= set(r)
            assert ("kl" in r) == (mode == "text")
        state = _ckpt(runs / mode)
        assert len(state["opt_D"]) == 3          # one Adam per D, each stepped every iteration
        for o in [*state["opt_D"], state["opt_G"]]:
            assert o["state"] and all(float(s["step"]) == 2 for s in o["state"].values())
            assert o["param_groups"][0]["lr"] == 2e-4
            assert tuple(o["param_groups"][0]["betas"]) == (0.5, 0.999)
        names = {p.name for p in (runs / mode / "samples").iterdir()}
        assert {"0000002_8.png", "0000002_16.png", "0000002_32.png"} <= names
    assert (runs / "text" / "reals.png").exists()


def test_resume_continues_exactly(runs):
    assert _untimed(_rows(runs / "resumed")) == _untimed(_rows(runs / "text"))
    a, b = _ckpt(runs / "resumed"), _ckpt(runs / "text")
    for key in ("G", "G_ema"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    for da, db in zip(a["D"], b["D"]):
        assert all(torch.equal(da[k], db[k]) for k in da)


# ---- checklist 14 / card 8.7: EMA ----
def test_ema_is_0999_old_plus_0001_new_per_step_and_live_g_stays_separate(runs):
    s1, s2 = _ckpt(runs / "text1"), _ckpt(runs / "resumed")
    G = sg.Generator(**s2["G_kwargs"])
    params = {n for n, _ in G.named_parameters()}
    assert params and params <= set(s2["G_ema"])
    moved = 0
    for n in s2["G_ema"]:
        if n in params:
            want = 0.999 * s1["G_ema"][n] + 0.001 * s2["G"][n]
            assert torch.allclose(s2["G_ema"][n], want, atol=1e-7), n
            moved += not torch.equal(s2["G_ema"][n], s2["G"][n])
        else:                            # BN running statistics: the live G's (official)
            assert torch.equal(s2["G_ema"][n], s2["G"][n]), n
    assert moved > 10                    # live G not reset to the EMA at a snapshot


def test_official_snapshot_reset_flag_copies_ema_into_live_g(tmp_path):
    _main(tmp_path / "r", "--cond", "none", "--epochs", "1", "--snapshot-reset-every", "1")
    s = _ckpt(tmp_path / "r")
    assert all(torch.equal(s["G"][k], s["G_ema"][k]) for k in s["G"])


def test_export_and_load_generator_use_the_ema_weights_in_eval_mode(runs):
    G = sg.load_generator(runs / "none" / "ckpt.pt")
    assert not G.training and not any(p.requires_grad for p in G.parameters())
    s = _ckpt(runs / "none")
    assert all(torch.equal(G.state_dict()[k], s["G_ema"][k]) for k in s["G_ema"])
    z = torch.randn(4, 100, generator=torch.Generator().manual_seed(0 + 6))
    with torch.no_grad():
        imgs = G(z)[0]
    npz = np.load(runs / "none" / "samples_4.npz")
    assert npz["images"].shape == (4, 32, 32, 3) and npz["images_8"].shape == (4, 8, 8, 3)
    for key, x in zip(("images_8", "images_16", "images"), imgs):
        assert np.array_equal(npz[key], common.quantize(x).numpy()), key


def test_fid_every_scores_every_branch(tmp_path, fid_recorder):
    _main(tmp_path / "f", "--epochs", "1", "--fid-every", "1", "--fid-samples", "10")
    assert fid_recorder.built[0]["img_size"] == 32
    assert [c["shape"] for c in fid_recorder.calls] == [(3, 3, s, s) for s in (8, 16, 32)]
    assert all(-1 <= c["lo"] and c["hi"] <= 1 for c in fid_recorder.calls)
    row = _rows(tmp_path / "f")[-1]
    assert {"fid", "is", "fid_8", "is_8", "fid_16", "is_16"} <= set(row)
