"""pix2pixhd.py: the card's Sec. 8 list (boundary map, one-hot, shapes and parameter counts at full
size, loss identities, instance pooling, count_include_pad, lr schedule, frozen VGG), the data
layouts, and tiny CPU runs through main(): the global stage, the local stage started from it with
the optimizer swap, resume across the swap, K-means feature sampling, the semantic-consistency
score with a user segmenter, FID wiring, --amp bf16."""
import contextlib
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from PIL import Image
from torch.utils.data import default_collate

import common
import pix2pixhd as P
from host_sync import trap_host_syncs
from tiny_args import TINY

ONE = common.Dist("cpu")                            # one process: no torchrun

# the tiny architecture shared by the global run and the local run built on it
ARCH = ["--dataset", "shapes", "--device", "cpu", "--ndf", "4", "--n-downsample-global", "1",
        "--n-blocks-global", "1", "--n-blocks-local", "1", "--n-layers-D", "1", "--num-D", "2",
        "--no-vgg", "--instance-feat", "--nef", "4", "--n-downsample-E", "1", "--num-workers", "0",
        "--log-every", "1", "--sample-every", "0", "--ckpt-every", "50", "--deterministic",
        "--max-dataset-size", "1"]
GLOBAL = ARCH + ["--stage", "global", "--size", "16x16", "--ngf", "8", "--epochs", "4",
                 "--niter-decay", "2"]
LOCAL = ARCH + ["--stage", "local", "--size", "32x32", "--ngf", "4", "--niter-fix-global", "1",
                "--niter-decay", "2"]


def rows(d):
    return [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]


def untimed(rs):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rs]


def ckpt(d):
    return torch.load(d / "ckpt.pt", weights_only=True)


@pytest.fixture(scope="module")
def global_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("global") / "run"
    P.main(GLOBAL + ["--out-dir", str(d)])
    return d


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """A random-weight VGG19 in torchvision's key layout (the ImageNet file cannot be had here)."""
    with torch.device("meta"):
        features = torchvision.models.vgg19().features[:30]
    features = features.to_empty(device="cpu")
    torch.manual_seed(0)
    for m in features:
        if isinstance(m, nn.Conv2d):
            m.reset_parameters()
    path = tmp_path_factory.mktemp("vgg") / "vgg19-random.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return path


# ---- defaults (card Sec. 2.5) ----
def test_defaults_per_stage_are_the_papers():
    g = P.parse_args(["--dataset", "shapes"])
    loc = P.parse_args(["--dataset", "shapes", "--stage", "local"])
    assert (g.size, g.ngf, g.epochs, g.niter_decay, g.niter_fix_global) == ([512, 1024], 64, 200,
                                                                            100, 0)
    assert (loc.size, loc.ngf, loc.epochs, loc.niter_decay, loc.niter_fix_global) == (
        [1024, 2048], 32, 100, 50, 10)
    for a in (g, loc):
        assert (a.lr, a.betas, a.batch_size, a.num_D, a.n_layers_D, a.ndf) == (
            2e-4, [0.5, 0.999], 1, 3, 3, 64)
        assert (a.n_downsample_global, a.n_blocks_global, a.n_blocks_local) == (4, 9, 3)
        assert (a.lambda_feat, a.n_clusters, a.feat_num, a.nef, a.n_downsample_E) == (
            10.0, 10, 3, 16, 4)
        assert a.lsgan and a.gan_feat and a.vgg and a.instance and a.label_nc == 7
    cs = P.parse_args([])
    assert cs.dataset == "cityscapes" and cs.label_nc == 35 and cs.instance
    ade = P.parse_args(["--dataset", "ade20k"])
    assert ade.label_nc == 151 and not ade.instance and ade.size == [512, 512]
    for bad in (["--size", "500x1000"], ["--stage", "local", "--size", "512x1000"],
                ["--niter-fix-global", "2"], ["--epochs", "4", "--niter-decay", "5"]):
        with pytest.raises(SystemExit):
            P.parse_args(["--dataset", "shapes", *bad])


# ---- inputs (Sec. 3.1, 3.3) ----
def test_boundary_map_hand_case_and_constant_map():
    inst = torch.tensor([[1, 1, 2], [1, 1, 2], [3, 3, 3]]).view(1, 1, 3, 3)
    want = torch.tensor([[0, 1, 1], [1, 1, 1], [1, 1, 1]]).float().view(1, 1, 3, 3)
    assert torch.equal(P.boundary_map(inst), want)
    assert P.boundary_map(torch.full((2, 1, 5, 4), 7)).abs().sum() == 0
    # the input main builds: one-hot channels, then this boundary map
    label = torch.zeros(1, 1, 3, 3, dtype=torch.long)
    b = P.prepare({"label": label, "inst": inst, "image": torch.zeros(1, 3, 3, 3)},
                  P.parse_args(["--dataset", "shapes", "--size", "16x16",
                                "--n-downsample-global", "1"]), "cpu")
    assert b["s"].shape == (1, 8, 3, 3) and torch.equal(b["s"][:, -1:], want)


def test_one_hot_sums_to_one_and_refuses_out_of_range_labels():
    label = torch.randint(0, 35, (2, 1, 8, 16))
    s = P.one_hot_labels(label, 35)
    assert s.shape == (2, 35, 8, 16) and torch.equal(s.sum(1), torch.ones(2, 8, 16))
    assert torch.equal(s.argmax(1, keepdim=True), label)
    for bad in (35, -1):
        with pytest.raises(common.UserError, match=f"label value {bad} outside"):
            P.one_hot_labels(label.clone().fill_(bad), 35)


def write_pairs(root, split, n=2, h=20, w=40, label_max=5, bad=None):
    """The official pix2pixHD layout: <root>/<split>_label, _inst, _img."""
    rng = np.random.default_rng(0)
    for k in ("label", "inst", "img"):
        (root / f"{split}_{k}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        label = rng.integers(0, label_max, (h, w)).astype(np.uint8)
        if bad is not None and i == n - 1:
            label[3, 4] = bad
        Image.fromarray(label).save(root / f"{split}_label" / f"{i:03d}.png")
        Image.fromarray(rng.integers(0, 2 ** 15, (h, w)).astype(np.uint16)).save(
            root / f"{split}_inst" / f"{i:03d}.png")
        Image.fromarray(rng.integers(0, 255, (h, w, 3)).astype(np.uint8)).save(
            root / f"{split}_img" / f"{i:03d}.jpg")


def test_a_label_outside_the_range_names_the_file_and_value_before_any_scatter(tmp_path):
    write_pairs(tmp_path / "data", "train", bad=40)
    with pytest.raises(common.UserError, match=r"001\.png: label value 40 outside \[0, 35\)"):
        P.main(["--dataset", f"pix2pixhd:{tmp_path / 'data'}", "--device", "cpu", "--size",
                "16x32", "--ngf", "4", "--ndf", "4", "--n-downsample-global", "1",
                "--n-blocks-global", "1", "--n-layers-D", "1", "--no-vgg", "--num-workers", "0",
                "--out-dir", str(tmp_path / "run")])


# ---- data layouts and transforms (checklist: nearest / bicubic, shared flip) ----
def test_layouts_resize_labels_nearest_and_images_bicubic(tmp_path):
    write_pairs(tmp_path / "p", "train")
    cs = tmp_path / "cityscapes"                     # torchvision's Cityscapes layout
    for split in ("train", "val"):
        (cs / "leftImg8bit" / split / "aachen").mkdir(parents=True)
        (cs / "gtFine" / split / "aachen").mkdir(parents=True)
        stem = "aachen_000000_000019"
        Image.fromarray(np.full((20, 40, 3), 9, np.uint8)).save(
            cs / "leftImg8bit" / split / "aachen" / f"{stem}_leftImg8bit.png")
        Image.fromarray(np.full((20, 40), 26, np.uint8)).save(
            cs / "gtFine" / split / "aachen" / f"{stem}_gtFine_labelIds.png")
        Image.fromarray(np.full((20, 40), 26001, np.uint16)).save(
            cs / "gtFine" / split / "aachen" / f"{stem}_gtFine_instanceIds.png")
    ade = tmp_path / "ADEChallengeData2016"
    for sub in ("images/training", "annotations/training", "images/validation",
                "annotations/validation"):
        (ade / sub).mkdir(parents=True)
        ext = ".jpg" if sub.startswith("images") else ".png"
        arr = np.full((20, 40, 3) if ext == ".jpg" else (20, 40), 150, np.uint8)
        Image.fromarray(arr).save(ade / sub / f"ADE_0001{ext}")
    for name, label_nc in ((f"pix2pixhd:{tmp_path / 'p'}", 35), ("cityscapes", 35),
                           ("ade20k", 151)):
        args = P.parse_args(["--dataset", name, "--data-root", str(tmp_path), "--size", "16x32",
                             "--n-downsample-global", "1"])
        assert args.label_nc == label_nc and args.instance == (name != "ade20k")
        item = P.load_pairs(args)[0]
        assert item["label"].shape == item["inst"].shape == (1, 16, 32)
        assert item["image"].shape == (3, 16, 32)
    assert int(P.load_pairs(args, train=False)[0]["label"].max()) == 150
    files = P.load_pairs(P.parse_args(["--dataset", f"pix2pixhd:{tmp_path / 'p'}", "--size",
                                       "16x32", "--n-downsample-global", "1"]))
    item, (lf, inf_, imf) = files[0], files.files[0]
    label, inst, img = (np.array(Image.open(f)) for f in (lf, inf_, imf))
    assert set(item["label"].unique().tolist()) <= set(np.unique(label).tolist())   # nearest
    assert set(item["inst"].unique().tolist()) <= set(np.unique(inst).tolist())
    bicubic = np.array(Image.open(imf).convert("RGB").resize((32, 16), Image.BICUBIC))
    assert torch.allclose(item["image"], torch.from_numpy(bicubic).permute(2, 0, 1).float()
                          / 127.5 - 1, atol=1e-6)
    nearest = np.array(Image.fromarray(inst).resize((32, 16), Image.NEAREST))
    assert np.array_equal(item["inst"][0].numpy(), nearest)


def test_one_flip_is_shared_by_label_instance_map_and_image():
    torch.manual_seed(0)
    label = torch.arange(8).repeat(4, 1, 1, 1).view(4, 1, 1, 8).expand(4, 1, 3, 8)
    batch = {"label": label, "inst": label * 10, "image": label.float().expand(4, 3, 3, 8)}
    flipped = [P.flip_batch(batch, ONE) for _ in range(4)]
    seen = set()
    for f in flipped:
        assert torch.equal(f["inst"], f["label"] * 10)
        assert torch.equal(f["image"], f["label"].float().expand(4, 3, 3, 8))
        seen |= {bool(f["label"][i, 0, 0, 0] == 7) for i in range(4)}
    assert seen == {True, False}                       # some flipped, some not


def test_under_torchrun_each_process_flips_its_rows_of_the_global_draw():
    """Issue 19: every process draws the global batch's flips and keeps its share's rows."""
    label = torch.arange(8).repeat(8, 1, 1, 1).view(8, 1, 1, 8) + 10 * torch.arange(8).view(
        8, 1, 1, 1)
    batch = {"label": label, "inst": label, "image": label.float().expand(8, 3, 1, 8)}
    torch.manual_seed(0)
    full = P.flip_batch(batch, ONE)
    for rank in (0, 1):
        dist = common.Dist.__new__(common.Dist)
        dist.rank, dist.world_size = rank, 2
        torch.manual_seed(0)
        share = P.flip_batch({k: v[4 * rank:4 * rank + 4] for k, v in batch.items()}, dist)
        assert all(torch.equal(share[k], full[k][4 * rank:4 * rank + 4]) for k in batch)
    assert 0 < sum(bool(full["label"][i, 0, 0, 0] % 10 == 7) for i in range(8)) < 8


# ---- architecture at full size (meta device: shapes and counts without memory) ----
def test_shapes_and_parameter_counts_at_full_size():
    with torch.device("meta"):
        G1 = P.GlobalGenerator(36)
        G = P.LocalEnhancer(36)
        E = P.Encoder(3, 3, 16, 4)
        D3, D2 = P.MultiscaleDiscriminator(39, num_D=3), P.MultiscaleDiscriminator(39, num_D=2)
        count = lambda ps: sum(p.numel() for p in ps)   # noqa: E731
        assert count(G1.parameters()) == 182_546_755            # card Sec. 2.4
        assert count(G.local_parameters()) == 319_715
        assert count(E.parameters()) == 788_803
        assert count(D3.scales[0].parameters()) == 2_801_601
        assert count(D3.parameters()) == 8_404_803 and count(D2.parameters()) == 5_603_202
        assert G1(torch.empty(1, 36, 512, 1024)).shape == (1, 3, 512, 1024)
        assert G(torch.empty(1, 36, 1024, 2048)).shape == (1, 3, 1024, 2048)
        out = D3(torch.empty(1, 39, 512, 1024))
        assert [len(o) for o in out] == [5, 5, 5]                # n_layers_D + 2 outputs
        assert [tuple(o[-1].shape[-2:]) for o in out] == [(67, 131), (35, 67), (19, 35)]
        assert [o[i].shape[1] for o in out[:1] for i in range(5)] == [64, 128, 256, 512, 1]
    norms = [m for net in (G1, G, E, D3) for m in net.modules() if "Norm" in type(m).__name__]
    assert norms and all(isinstance(m, nn.InstanceNorm2d) and not m.affine and
                         not m.track_running_stats for m in norms)
    first = D3.scales[0].blocks[0]                  # C64 without norm; last conv: no norm
    assert not any(isinstance(m, nn.InstanceNorm2d) for m in first)
    assert not any(isinstance(m, nn.InstanceNorm2d) for m in D3.scales[0].blocks[-1])
    assert isinstance(G1.features[0], nn.ReflectionPad2d) and isinstance(G1.head[-1], nn.Tanh)
    assert isinstance(G.G1.head, nn.Identity) and isinstance(G.back[-1][-1], nn.Tanh)
    slopes = {m.negative_slope for m in D3.modules() if isinstance(m, nn.LeakyReLU)}
    assert slopes == {0.2} and sum(isinstance(m, nn.LeakyReLU) for m in D3.modules()) == 12


def test_local_enhancer_sums_G2_front_and_G1_features():
    torch.manual_seed(0)
    G = P.LocalEnhancer(5, ngf=4, n_down_global=1, n_blocks_global=1, n_blocks_local=1)
    s = torch.randn(1, 5, 16, 16)
    want = G.back(G.front(s) + G.G1.features(G.downsample(s)))
    assert torch.allclose(G(s), want)
    nn.init.zeros_(G.front[4].weight)                            # G2's d64 silent: G1 alone
    nn.init.zeros_(G.front[4].bias)
    assert torch.allclose(G(s), G.back(G.G1.features(G.downsample(s))))


def test_residual_block_is_identity_plus_block_without_a_relu_after():
    torch.manual_seed(0)
    rb = P.ResnetBlock(4)
    x = torch.full((1, 4, 6, 6), -5.0) + torch.randn(1, 4, 6, 6)
    assert torch.allclose(rb(x), x + rb.block(x)) and (rb(x) < 0).float().mean() > 0.5


def test_g_optimizer_holds_G2_and_E_while_G1_is_fixed_then_all():
    G = P.LocalEnhancer(5, ngf=4, n_down_global=1, n_blocks_global=1, n_blocks_local=1)
    E = P.Encoder(3, 3, 4, 1)
    fixed = {id(p) for p in P.g_params(G, E, True)}
    assert fixed == {id(p) for p in G.local_parameters()} | {id(p) for p in E.parameters()}
    assert not fixed & {id(p) for p in G.G1.parameters()}
    assert {id(p) for p in P.g_params(G, E, False)} == {
        id(p) for net in (G, E) for p in net.parameters()}


def test_generators_keep_the_size_and_the_range_and_init_is_n_0_002():
    torch.manual_seed(0)
    G = P.LocalEnhancer(5, ngf=4, n_down_global=1, n_blocks_global=1, n_blocks_local=1)
    x = G(torch.randn(1, 5, 16, 24) * 10)
    assert x.shape == (1, 3, 16, 24) and x.abs().max() <= 1
    w = torch.cat([m.weight.flatten() for m in G.modules() if isinstance(m, nn.Conv2d)])
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002


# ---- losses (Sec. 3.2, Sec. 4) ----
def fake_preds(value, num_D=2, n_layers=3):
    return [[torch.full((1, 4, 3, 3), float(value)) for _ in range(n_layers + 2)]
            for _ in range(num_D)]


def test_lsgan_and_feature_matching_identities():
    real, fake = fake_preds(1.0), fake_preds(0.0)
    assert P.d_loss(real, fake)[0] == 0                           # D outputs 1 real / 0 fake
    assert P.d_loss(fake, fake)[0] == pytest.approx(0.5 * 2)      # 0 everywhere: 0.5 num_D
    assert P.d_loss(fake_preds(0.0, num_D=3), fake_preds(0.0, num_D=3))[0] == pytest.approx(1.5)
    g = [P.gan_loss(fake_preds(v), True) for v in (0.0, 0.5, 0.9)]
    assert g[0] > g[1] > g[2]                                     # D(fake) -> 1 lowers L_G_GAN
    assert P.feature_matching_loss(real, real) == 0
    # |diff| = 1 in all 4 intermediate layers of 2 scales: 8 terms of 10 / 2 * 4 / 4 = 5
    assert P.feature_matching_loss(real, fake) == pytest.approx(40.0)
    # n_layers_D 1: 2 intermediate layers of weight 10 / 2 * 4 / 2 = 10 each
    assert P.feature_matching_loss(fake_preds(1, 2, 1), fake_preds(0, 2, 1)) == pytest.approx(40)


def test_vgg_loss_layers_weights_and_frozen_net(vgg_file):
    vgg = P.VGG19Features(str(vgg_file), "cpu")
    assert [len(s) for s in vgg.slices] == [2, 5, 5, 9, 9]        # features[0:2] .. [21:30]
    assert all(isinstance(s[-1], nn.ReLU) for s in vgg.slices)    # relu1_1 .. relu5_1
    assert not any(p.requires_grad for p in vgg.parameters()) and not vgg.training
    torch.manual_seed(0)
    x, y = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    assert P.vgg_loss(vgg, x, x) == 0
    fx, fy = vgg(x), vgg(y)
    want = 10 * sum(w * (a - b).abs().mean() for w, a, b in zip(
        (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1), fx, fy))
    assert P.vgg_loss(vgg, x, y) == pytest.approx(want.item(), rel=1e-5)


def test_missing_vgg_weights_name_the_file_and_no_vgg(tmp_path):
    argv = GLOBAL + ["--vgg", "--vgg-weights", str(tmp_path / "none.pth"),
                     "--out-dir", str(tmp_path / "run")]
    with pytest.raises(common.UserError, match=r"none\.pth.*--no-vgg"):
        P.main(argv)
    assert not (tmp_path / "run").exists()


# ---- instance encoder (Sec. 3.4) ----
def test_instance_pooling_matches_a_brute_force_loop_and_is_constant_per_instance():
    torch.manual_seed(0)
    inst = torch.zeros(2, 1, 6, 8, dtype=torch.long)
    inst[0, 0, :3, :4], inst[0, 0, 3:, :2], inst[0, 0, 4:, 5:] = 1, 2, 1000  # 4 instances
    inst[1, 0, 2:, :] = 5
    feat = torch.randn(2, 3, 6, 8)
    seg, n = P.instance_segments(inst)
    pooled = P.instance_average_pool(feat, seg, n)
    brute = feat.clone()
    for b in range(2):
        for i in inst[b].unique():
            m = inst[b, 0] == i
            for c in range(3):
                brute[b, c][m] = feat[b, c][m].mean()
    assert n == 6 and torch.allclose(pooled, brute, atol=1e-6)
    E = P.Encoder(3, 3, 4, 1)
    out = E(torch.randn(2, 3, 6, 8), seg, n)
    for b in range(2):
        for i in inst[b].unique():
            m = inst[b, 0] == i
            v = out[b][:, m]
            assert torch.allclose(v, v[:, :1].expand_as(v))


def test_multiscale_downsampling_excludes_the_padding_at_borders():
    x = torch.full((1, 2, 9, 12), 3.7)
    D = P.MultiscaleDiscriminator(2, ndf=4, n_layers=1, num_D=2)
    G = P.LocalEnhancer(2, ngf=2, n_down_global=1, n_blocks_global=1, n_blocks_local=1)
    for down in (D.downsample, G.downsample):
        y = down(x)
        assert y.shape == (1, 2, 5, 6) and torch.allclose(y, torch.full_like(y, 3.7))


def test_kmeans_per_class_with_the_cap_and_sampling_one_centre_per_instance():
    args = P.parse_args(["--dataset", "shapes", "--instance-feat", "--n-clusters", "2",
                         "--size", "32x32", "--n-downsample-E", "1", "--n-downsample-global",
                         "1"])
    rng = torch.Generator().manual_seed(0)
    a = torch.randn(20, 3, generator=rng) * 0.01 + torch.tensor([1.0, 0, 0])
    b = torch.randn(20, 3, generator=rng) * 0.01 + torch.tensor([0, 1.0, 0])
    feats = torch.cat([a, b, torch.ones(1, 3)])
    classes = torch.tensor([3] * 40 + [5])
    centres, counts = P.kmeans(feats, classes, args)
    assert counts.tolist() == [0, 0, 0, 2, 0, 1, 0]                 # min(points, K) per class
    got = sorted(centres[3, :2].round(decimals=1).tolist())
    assert got == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    inst = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    inst[..., :4, :4], inst[..., 4:, 4:], inst[..., :4, 4:] = 1, 2, 3
    label = torch.where(inst > 0, 3, 0)
    seg, n = P.instance_segments(inst)
    b = {"seg": seg, "n_seg": n, "label": label, "s": torch.zeros(1)}
    f = P.sample_features(b, centres, counts, torch.Generator().manual_seed(1))
    for i in (1, 2, 3):
        v = f[0][:, inst[0, 0] == i]
        assert torch.equal(v, v[:, :1].expand_as(v))                  # one value per instance
        assert any(torch.equal(v[:, 0], c) for c in centres[3, :2])   # a centre of its class
    assert f[0][:, inst[0, 0] == 0].abs().sum() == 0                  # class 0 has no centres
    draws = {tuple(P.sample_features(b, centres, counts, torch.Generator().manual_seed(s))
                   [0, :, 0, 0].tolist()) for s in range(8)}
    assert len(draws) == 2


def test_encode_features_reads_the_median_pixel_and_filters_small_instances():
    seg = torch.tensor([[0, 0, 1, 1], [0, 2, 1, 1]]).view(1, 2, 4)
    label = torch.tensor([[4, 4, 6, 6], [4, 5, 6, 6]]).view(1, 1, 2, 4)
    area, median, cls = P.segment_stats(seg, 3, label)
    assert area.tolist() == [3, 4, 1] and median.tolist() == [1, 6, 5]   # idx[num // 2]
    assert cls.tolist() == [4, 6, 5]
    # a 16x16 pair: instance 1 of 8 pixels (> 16*16/64 = 4), instance 2 of 4 pixels (dropped)
    args = P.parse_args(["--dataset", "shapes", "--size", "16x16", "--instance-feat",
                         "--n-downsample-E", "1", "--n-downsample-global", "1"])
    inst = torch.zeros(1, 16, 16, dtype=torch.long)
    inst[0, 0, :8], inst[0, 5, :4] = 1, 2
    item = {"label": torch.where(inst > 0, 3, 0), "inst": inst,
            "image": torch.linspace(-1, 1, 768).view(3, 16, 16)}
    feats, classes = P.encode_features(lambda x, seg, n: P.instance_average_pool(x, seg, n),
                                       [item], args, "cpu")
    assert classes.tolist() == [0, 3]
    x = item["image"]
    assert torch.allclose(feats[1], x[:, 0, :8].mean(1)) and torch.allclose(
        feats[0], x[:, inst[0] == 0].mean(1))


# ---- lr schedule (App. A, official update_learning_rate) ----
def test_lr_schedule_official_rule(global_run):
    args = P.parse_args(["--dataset", "shapes", "--epochs", "4", "--niter-decay", "2"])
    lr0 = args.lr
    assert [P.lr_at(e, args) for e in range(1, 6)] == [lr0, lr0, lr0, lr0 / 2, 0.0]
    assert [r["lr"] for r in rows(global_run)] == [lr0, lr0, lr0, lr0 / 2]   # one pair / epoch
    for opt in ("opt_G", "opt_D"):
        group = ckpt(global_run)[opt]["param_groups"][0]
        assert group["lr"] == lr0 / 2 and tuple(group["betas"]) == (0.5, 0.999)


# ---- train step (Sec. 2.3) ----
def test_train_step_moves_G_E_D_never_VGG_and_does_not_accumulate_grads(vgg_file):
    args = P.parse_args(GLOBAL)
    torch.manual_seed(0)
    G, D, E = P.build_nets(args)
    vgg = P.VGG19Features(str(vgg_file), "cpu")
    v0 = [p.clone() for p in vgg.parameters()]
    batch = P.prepare(default_collate([P.load_pairs(args)[0]]), args, "cpu")
    snap = lambda net: [p.detach().clone() for p in net.parameters()]   # noqa: E731
    g0, d0, e0 = snap(G), snap(D), snap(E)
    opt_G = torch.optim.Adam(P.g_params(G, E, False), lr=1e-3, betas=(0.5, 0.999))
    opt_D = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.5, 0.999))
    args.vgg = True
    out = P.train_step(G, D, E, vgg, opt_G, opt_D, batch, args, ONE, contextlib.nullcontext)
    assert out["loss_vgg"] > 0 and out["loss_fm"] > 0 and out["loss_G_GAN"] > 0
    assert out["loss_G"] == pytest.approx((out["loss_G_GAN"] + out["loss_fm"] + out["loss_vgg"])
                                          .item())
    assert out["loss_D"] == pytest.approx(0.5 * (out["loss_D_real"] + out["loss_D_fake"]).item())
    for before, net in ((g0, G), (d0, D), (e0, E)):
        assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(v0, vgg.parameters()))
    assert all(p.grad is None for p in vgg.parameters())
    # lr 0: the same batch twice gives the same grads (zeroed before each backward)
    for opt in (opt_G, opt_D):
        for gr in opt.param_groups:
            gr["lr"] = 0.0
    grads = []
    for _ in range(2):
        P.train_step(G, D, E, vgg, opt_G, opt_D, batch, args, ONE, contextlib.nullcontext)
        grads.append([p.grad.clone() for p in list(D.parameters()) + list(G.parameters())])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


# ---- the two stages through main ----
def test_local_stage_from_the_global_run_swaps_the_optimizer_and_resumes(global_run, tmp_path):
    g_state = ckpt(global_run)
    argv = LOCAL + ["--load-global", str(global_run / "ckpt.pt")]
    ref = tmp_path / "ref"
    P.main(argv + ["--epochs", "3", "--out-dir", str(ref)])
    run = tmp_path / "run"
    P.main(argv + ["--epochs", "1", "--niter-decay", "0", "--out-dir", str(run)])  # G2, E only
    s1 = ckpt(run)
    g1 = {k[len("G1."):]: v for k, v in s1["G"].items() if k.startswith("G1.")}
    assert g1 and all(torch.equal(v, g_state["G"][k]) for k, v in g1.items())   # loaded, fixed
    assert not torch.equal(s1["E"]["model.1.weight"], g_state["E"]["model.1.weight"])
    n_all = len(list(P.load_generator(run / "ckpt.pt", "cpu").parameters())) + len(s1["E"])
    assert len(s1["opt_G"]["param_groups"][0]["params"]) == n_all   # swapped at the epoch end
    P.main(argv + ["--epochs", "3", "--out-dir", str(run), "--resume"])
    s3 = ckpt(run)
    assert untimed(rows(run)) == untimed(rows(ref))                 # exact resume across it
    assert [r["g1_fixed"] for r in rows(run)] == [1, 0, 0]
    assert all(not torch.equal(s3["G"]["G1." + k], v) for k, v in g1.items()
               if k.endswith("weight") and v.dim() == 4)            # G1 fine-tuned after
    assert len(s3["opt_G"]["state"]) == n_all                        # Adam moments for all
    # epochs 3, niter_decay 2: epoch 3 runs at lr/2 -> the decay reaches the new optimizer
    assert s3["opt_G"]["param_groups"][0]["lr"] == pytest.approx(1e-4)
    assert [r["lr"] for r in rows(run)] == pytest.approx([2e-4, 2e-4, 1e-4])


def test_load_global_moves_D_scales_by_resolution_and_checks_the_flags(global_run):
    args = P.parse_args(LOCAL + ["--num-D", "3", "--load-global", str(global_run)])
    G, D, E = P.build_nets(args)
    P.load_global_run(G, D, E, args, "cpu")
    g_state = ckpt(global_run)
    for k in (0, 1):
        for n, v in D.scales[k + 1].state_dict().items():
            assert torch.equal(v, g_state["D"][f"scales.{k}.{n}"])
    bad = P.parse_args(LOCAL + ["--ngf", "8", "--load-global", str(global_run)])
    with pytest.raises(common.UserError, match=r"--ngf 8 there \(needs 16\)"):
        P.load_global_run(*P.build_nets(bad), bad, "cpu")


def test_tiny_run_kmeans_sampling_changes_the_output_and_exports(tmp_path):
    out = tmp_path / "run"
    m = P.main(TINY["pix2pixhd.py"] + ["--out-dir", str(out), "--max-dataset-size", "4",
                                       "--epochs", "1"])
    assert m["step"] == 4 and 0 <= m["seg_acc"] <= 1 and 0 <= m["seg_miou"] <= 1
    state = ckpt(out)
    assert (state["n_centres"] > 1).any() and (out / "multimodal.png").exists()
    x = np.load(out / "samples_2.npz")["images"]
    assert x.shape == (2, 16, 16, 3) and x.dtype == np.uint8
    G = P.load_generator(out / "ckpt.pt", "cpu")
    E = P.Encoder(3, 3, 4, 1)
    E.load_state_dict(state["E"])
    args = P.parse_args(TINY["pix2pixhd.py"])
    val = P.load_pairs(args, train=False)
    cents = (state["centres"], state["n_centres"])
    outs = []
    for i in range(3):
        b = P.val_batch(val, i, args, "cpu")
        draw = [P.generate(G, E, b, cents, torch.Generator().manual_seed(s)) for s in (0, 1, 0)]
        assert torch.equal(draw[0], draw[2])
        outs.append((draw[0] - draw[1]).abs().max())
    assert max(outs) > 1e-4


def test_user_segmenter_file_scores_generated_and_real_images(tmp_path):
    class Background(nn.Module):       # predicts class 0 everywhere
        def forward(self, x):
            return torch.cat([torch.ones_like(x[:, :1]), torch.zeros_like(x[:, :1]).expand(
                -1, 6, -1, -1)], 1)
    path = tmp_path / "seg.pt2"
    torch.export.save(torch.export.export(Background(), (torch.zeros(1, 3, 16, 16),)), path)
    args = P.parse_args(TINY["pix2pixhd.py"])
    val = P.load_pairs(args, train=False)
    labels = torch.stack([val[i]["label"] for i in range(2)])
    frac = (labels == 0).float().mean().item()
    m = P.main(TINY["pix2pixhd.py"] + ["--out-dir", str(tmp_path / "run"), "--seg-model",
                                       str(path), "--sample-features", "0"])
    assert m["seg_acc"] == pytest.approx(frac) == pytest.approx(m["seg_acc_real"])
    inter = (labels == 0).sum().item()
    present = len(labels.unique())
    assert m["seg_miou"] == pytest.approx(inter / labels.numel() / present)


def test_segmentation_scores_hand_cases():
    emap = torch.tensor(P.CITYSCAPES_TRAIN_ID)
    label = torch.tensor([[7, 7, 8, 0]]).view(1, 1, 1, 4)       # road, road, sidewalk, ignored

    class Fixed(nn.Module):
        def __init__(self, pred):
            super().__init__()
            self.pred = pred

        def forward(self, x):
            return nn.functional.one_hot(self.pred, 19).permute(0, 3, 1, 2).float()
    perfect = Fixed(torch.tensor([[[0, 0, 1, 5]]]))
    x = torch.zeros(1, 3, 1, 4)
    assert P.segmentation_scores(perfect, [(x, label)], emap, 19) == (1.0, 1.0)
    roads = Fixed(torch.tensor([[[0, 0, 0, 0]]]))
    acc, miou = P.segmentation_scores(roads, [(x, label)], emap, 19)
    assert acc == pytest.approx(2 / 3) and miou == pytest.approx((2 / 3 + 0) / 2)


def test_fid_every_builds_the_evaluator_at_start_up(tmp_path, fid_recorder):
    if not hasattr(fid_recorder, "TrainingFID"):
        pytest.skip("tests/fid_recorder.py predates the TrainingFID contract")
    m = P.main(GLOBAL + ["--out-dir", str(tmp_path / "run"), "--fid-every", "2",
                         "--fid-samples", "10"])
    assert [c["shape"] for c in fid_recorder.calls] == [(3, 3, 16, 16)] * 2
    assert fid_recorder.built[0]["dataset"] == "shapes" and m["fid"] == 12.0
    assert all(-1 <= c["lo"] and c["hi"] <= 1 for c in fid_recorder.calls)


def test_amp_bf16_cross_entropy_and_the_vgg_loss_run_through_main(tmp_path, vgg_file,
                                                                  monkeypatch):
    """Also issue 18: no host sync inside train_step, bf16 forwards, fp32 losses."""
    seen = []

    def prepare(G, *a):
        if not seen:                                # hook once: G's last conv
            G.head[1].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        return (G, *a)
    outs = trap_host_syncs(monkeypatch, P, prepare)
    m = P.main(GLOBAL + ["--out-dir", str(tmp_path / "run"), "--amp", "bf16", "--vgg",
                         "--vgg-weights", str(vgg_file), "--epochs", "2", "--niter-decay", "1",
                         "--no-lsgan", "--vgg-imagenet-norm"])
    assert m["step"] == 2 and m["loss_vgg"] > 0 and np.isfinite(m["loss_G"])
    assert len(outs) == 2 and seen[0] == torch.bfloat16                  # G's last conv
    assert [{v.dtype for v in out.values()} for out in outs] == [{torch.float32}] * 2
    assert len(outs[0]) >= 7                                            # step 1's 7 losses
    assert m["loss_G_GAN"] > 0
    preds = fake_preds(0.0)                     # logits 0: cross entropy log 2 per scale
    assert P.gan_loss(preds, True, lsgan=False) == pytest.approx(2 * np.log(2))


@pytest.mark.gpu
def test_2048x1024_local_enhancer_with_three_ds_fits_24_gb(vgg_file):
    """Sec. 4: G1 + G2 and three Ds at batch 1 on one 24 GB GPU (here: peak allocated)."""
    args = P.parse_args(["--dataset", "shapes", "--stage", "local"])
    torch.manual_seed(0)
    G, D, _ = P.build_nets(args)
    G, D = G.cuda(), D.cuda()
    vgg = P.VGG19Features(str(vgg_file), "cuda")
    opt_G = torch.optim.Adam(G.parameters(), lr=2e-4, fused=True)
    opt_D = torch.optim.Adam(D.parameters(), lr=2e-4, fused=True)
    inst = torch.zeros(1, 1, 1024, 2048, dtype=torch.long)
    inst[..., :512, :] = 1
    b = P.prepare({"label": inst % 35, "inst": inst, "image": torch.rand(1, 3, 1024, 2048)},
                  args, "cuda")
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        P.train_step(G, D, None, vgg, opt_G, opt_D, b, args, ONE, contextlib.nullcontext)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30
    print(f"peak {peak:.2f} GiB at 1024x2048, G1 + G2 + 3 Ds + VGG")
    assert peak < 24
