"""projection.py: the card's fidelity checklist through the functions a run uses (build_models,
train_step, main): the projection D, CBN in G, SN everywhere in D, hinge loss with matching labels,
init, schedule, sampling mode and the IS / FID / intra-FID wiring."""
import json
import math
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

import common
import projection
from host_sync import trap_host_syncs
from tiny_args import TINY

ARGV = TINY["projection.py"]


def _run(tmp_path, name, *extra):
    return projection.main(ARGV + ["--out-dir", str(tmp_path / name), *extra])


def _rows(path, drop=()):
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time_s" and k not in drop} for r in rows]


def _args(*argv, K=6):
    """The args main builds its nets from (parse_args + what load_data adds)."""
    args = projection.parse_args(["--g-ch", "8", "--d-ch", "8", "--z-dim", "8", *argv])
    args.num_classes, args.img_channels = K, 3
    return args


def _nets(*argv, K=6):
    torch.manual_seed(0)
    return projection.build_models(_args(*argv, K=K))


def _original(layer):
    return layer.parametrizations.weight.original


# ---- runs through main() (checklist 12-14, 16, 17) -----------------------------------------------
def test_smoke_resume_equals_uninterrupted_and_determinism(tmp_path):
    # --decay-start 4: the lr schedule is the same whether a run is told --steps 2 or --steps 4
    a = _run(tmp_path, "a", "--steps", "2", "--decay-start", "4")
    out = tmp_path / "a"
    assert a["step"] == 2 and all(math.isfinite(v) for v in a.values())
    for f in ("ckpt.pt", "metrics.jsonl", "args.json", "reals.png", "curves.png",
              "samples/0000002.png", "samples_12.npz", "morph.png"):
        assert (out / f).exists(), f
    assert json.loads((out / "args.json").read_text())["num_classes"] == 6
    with pytest.raises(common.UserError, match="exists: pass --resume"):   # no silent overwrite
        _run(tmp_path, "a", "--steps", "2", "--decay-start", "4")
    resumed = _run(tmp_path, "a", "--steps", "4", "--decay-start", "4", "--resume")
    assert [r["step"] for r in _rows(out)] == [1, 2, 3, 4]              # each step logged once
    straight = _run(tmp_path, "b", "--steps", "4", "--decay-start", "4")
    assert _rows(out) == _rows(tmp_path / "b")                          # same values, bit for bit
    assert {k: v for k, v in resumed.items() if k != "time_s"} == {
        k: v for k, v in straight.items() if k != "time_s"}
    sa = torch.load(out / "ckpt.pt", weights_only=True)
    sb = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    for net in ("G", "D"):                                      # weights, BN stats, SN u vectors
        for k, v in sa[net].items():
            assert torch.equal(v, sb[net][k]), f"{net}.{k}"


def test_lr_schedule_betas_and_update_counts_reach_the_optimizers(tmp_path):
    quick = ["--export-samples", "0", "--sample-every", "0", "--ckpt-every", "10"]
    _run(tmp_path, "s", "--steps", "3", "--decay-start", "1", "--lr", "1e-4", "--betas", "0.5",
         "0.99", *quick)
    rows = _rows(tmp_path / "s")
    lrs = [projection.linear_decay_lr(t, 1e-4, 1, 3) for t in range(3)]   # lr of steps 1..3
    assert [r["lr"] for r in rows] == lrs == [1e-4, 1e-4, 5e-5]
    state = torch.load(tmp_path / "s" / "ckpt.pt", weights_only=True)
    for opt, n_updates in (("opt_G", 3), ("opt_D", 3 * 2)):      # TINY: --n-dis 2
        group = state[opt]["param_groups"][0]
        assert group["lr"] == 5e-5 and tuple(group["betas"]) == (0.5, 0.99), opt
        assert all(s["step"] == n_updates for s in state[opt]["state"].values()), opt
    _run(tmp_path, "s", "--steps", "4", "--decay-start", "1", "--lr", "2e-4", "--betas", "0.5",
         "0.99", *quick, "--resume")              # a new --lr takes effect
    state = torch.load(tmp_path / "s" / "ckpt.pt", weights_only=True)
    assert state["opt_D"]["param_groups"][0]["lr"] == projection.linear_decay_lr(3, 2e-4, 1, 4)
    with pytest.raises(common.UserError, match="cannot change --betas"):
        _run(tmp_path, "s", "--steps", "5", "--decay-start", "1", "--resume")


def test_grid_export_and_load_generator_sample_in_eval_mode(tmp_path):
    _run(tmp_path, "e", "--steps", "2", "--morph", "0", "5")
    out = tmp_path / "e"
    G = projection.load_generator(out / "ckpt.pt")
    assert not G.training                                       # BN running averages
    state = torch.load(out / "ckpt.pt", weights_only=True)
    fixed_z, y = state["fixed_z"], torch.arange(6).repeat_interleave(8)   # a row per class
    with torch.no_grad():
        x = G(fixed_z.repeat(6, 1), y)
    grid = torchvision.utils.make_grid(x, nrow=8, padding=2, normalize=True, value_range=(-1, 1))
    want = np.asarray(torchvision.transforms.functional.to_pil_image(grid))
    png = np.asarray(Image.open(out / "samples" / "0000002.png").convert("RGB"))
    assert png.shape[1] == want.shape[1] >= 256 and np.array_equal(png[-want.shape[0]:], want)
    exported = np.load(out / "samples_12.npz")
    labels = torch.arange(12) % 6
    assert exported["labels"].tolist() == labels.tolist()
    z = torch.randn(12, 128, generator=torch.Generator().manual_seed(2))   # seed + 2
    with torch.no_grad():
        x = G(z, labels)
    official = np.clip(x.numpy() * 127.5 + 127.5, 0, 255).astype(np.uint8)   # evaluation.py
    assert exported["images"].dtype == np.uint8
    assert np.array_equal(exported["images"], official.transpose(0, 2, 3, 1))
    with torch.no_grad():
        assert not torch.allclose(G.train()(z, labels), x, atol=1e-3)   # train mode differs
    args_json = (out / "args.json").read_bytes()
    _run(tmp_path, "e", "--steps", "2", "--morph", "0", "5", "--resume", "--export-samples", "7")
    assert (out / "samples_7.npz").exists() and (out / "args.json").read_bytes() == args_json


class FakeTrainingFID:
    """fid.TrainingFID's contract (/work/prompts/plumbing.md): records what projection passes."""
    made = []

    def __init__(self, dataset, data_root, img_size, device, n_samples, weights=None,
                 ref_split="train", ref_size=None, cache_dir=None, class_labels=(None,)):
        self.kw = dict(dataset=dataset, img_size=img_size, n_samples=n_samples, weights=weights,
                       ref_split=ref_split, ref_size=ref_size, class_labels=class_labels)
        self.calls = []
        FakeTrainingFID.made.append(self)

    def __call__(self, sample_fn, class_label=None, n_samples=None):
        n = n_samples or self.kw["n_samples"]
        x = torch.cat([sample_fn(min(50, n - i)) for i in range(0, n, 50)])
        self.calls.append((class_label, x))
        c = -1 if class_label is None else class_label
        return {"fid": 50.0 + c, "is": 2.0, "is_std": 0.5}


def test_fid_every_logs_is_fid_and_intra_fid_over_every_class(tmp_path, monkeypatch):
    FakeTrainingFID.made = []
    monkeypatch.setitem(sys.modules, "fid", types.SimpleNamespace(TrainingFID=FakeTrainingFID))
    quick = ["--export-samples", "0", "--sample-every", "0", "--ckpt-every", "10"]
    m = _run(tmp_path, "fid", "--steps", "2", "--fid-every", "2", "--fid-samples", "11",
             "--intra-fid-samples", "10", *quick)
    (ev,) = FakeTrainingFID.made                                # one Inception for the run
    assert ev.kw == dict(dataset="shapes", img_size=32, n_samples=11, weights=None,
                         ref_split="train", ref_size=None, class_labels=(None, 0, 1, 2, 3, 4, 5))
    assert [c for c, _ in ev.calls] == [None, 0, 1, 2, 3, 4, 5]
    assert [len(x) for _, x in ev.calls] == [11] + [10] * 6
    assert (m["fid"], m["is"], m["is_std"]) == (49.0, 2.0, 0.5)
    assert m["intra_fid"] == np.mean([50.0 + c for c in range(6)])   # the mean over classes
    G = projection.load_generator(tmp_path / "fid" / "ckpt.pt")
    gen = torch.Generator().manual_seed(3)                      # seed + 3, re-seeded per eval
    y = torch.randint(0, 6, (11,), generator=gen)
    z = torch.randn(11, 128, generator=gen)
    with torch.no_grad():
        want = projection.to_uint8(G(z, y)).float() / 127.5 - 1
        assert torch.equal(ev.calls[0][1], want)               # eval mode, quantised as exported
        z = torch.randn(10, 128, generator=gen)
        want = projection.to_uint8(G(z, torch.zeros(10, dtype=torch.long))).float() / 127.5 - 1
    assert torch.equal(ev.calls[1][1], want)                    # class 0's samples are class 0
    plain = _run(tmp_path, "plain", "--steps", "2", *quick)              # training stream untouched
    evals = ("fid", "is", "is_std", "intra_fid")
    assert _rows(tmp_path / "fid", evals) == _rows(tmp_path / "plain")
    FakeTrainingFID.made = []
    _run(tmp_path, "nointra", "--steps", "1", "--fid-every", "1", "--fid-samples", "10",
         "--intra-fid-samples", "0", "--fid-ref-size", "10000", *quick)   # SN-GAN's 10K real
    assert (FakeTrainingFID.made[0].kw["class_labels"], FakeTrainingFID.made[0].kw["ref_size"]) == (
        (None,), 10_000)
    monkeypatch.setitem(sys.modules, "fid", None)               # a copy without fid.py
    with pytest.raises(common.UserError, match="--fid-every needs fid.py"):
        _run(tmp_path, "nofid", "--fid-every", "2")
    assert plain["step"] == 2 and not (tmp_path / "nofid").exists()


def test_fake_training_fid_has_the_signature_of_the_real_one():
    import inspect

    import fid
    if not hasattr(fid, "TrainingFID"):
        pytest.skip("fid.TrainingFID not in fid.py yet")
    for name in ("__init__", "__call__"):
        ours = inspect.signature(getattr(FakeTrainingFID, name)).parameters
        assert list(ours) == list(inspect.signature(getattr(fid.TrainingFID, name)).parameters)


def test_concat_baseline_runs_and_errors_are_one_line(tmp_path):
    m = _run(tmp_path, "concat", "--steps", "1", "--disc", "concat", "--export-samples", "0",
             "--sample-every", "0")
    assert m["step"] == 1 and math.isfinite(m["loss_D"])
    with pytest.raises(common.UserError, match="--morph classes must be < 6"):
        _run(tmp_path, "morph", "--morph", "0", "6")
    if not torch.cuda.is_available():
        with pytest.raises(common.UserError, match="pass --device cpu"):
            _run(tmp_path, "cuda", "--device", "cuda")


# ---- projection discriminator (Eq. 3; checklist 1-3) ---------------------------------------------
def test_projection_term_is_the_inner_product():
    D, x = _nets(K=5)[1], torch.randn(4, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 4])
    D.eval()                                                    # freeze u: V_SN fixed below
    with torch.no_grad():
        v_sn, phi = D.embed.weight, D.phi(x, y)
        # psi's SN weight cannot be zeroed (0/0), so subtract psi(phi) instead of setting it to 0
        torch.testing.assert_close(D(x, y) - D.psi(phi), (v_sn[y] * phi).sum(1, keepdim=True))
        c1, c2 = torch.full((4,), 1), torch.full((4,), 3)       # D(x,c1) - D(x,c2) = <V1-V3, phi>
        torch.testing.assert_close(D(x, c1) - D(x, c2),
                                   ((v_sn[c1] - v_sn[c2]) * phi).sum(1, keepdim=True))
        assert D(x, y).shape == (4, 1)
        assert not torch.allclose(D(x, y), D(x, y.flip(0)))     # label permutation moves the logit
        D.embed = nn.Embedding(5, 8).requires_grad_(False)       # V = 0: the label is ignored
        D.embed.weight.zero_()
        out = [D(x, torch.full((4,), c)) for c in range(5)]
    assert all(torch.equal(o, out[0]) for o in out)


def test_phi_is_the_sum_pool_of_relu_inside_D():
    D = _nets()[1].eval()
    for value, pooled in ((0.5, 0.5 * 8 * 8), (-0.5, 0.0)):    # 8x8 last map, ReLU first
        hook = D.blocks[-1].register_forward_hook(lambda m, i, o: torch.full_like(o, value))
        seen = []
        pre = D.psi.register_forward_pre_hook(lambda m, i: seen.append(i[0]))
        D(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
        hook.remove(), pre.remove()
        torch.testing.assert_close(seen[0], torch.full((2, 8), pooled))


def test_spectral_norm_on_every_D_weight_and_none_in_G():
    G, D = _nets(K=5)
    layers = [m for m in D.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding))]
    assert len(layers) == 3 + 3 + 2 + 2 + 1 + 1
    assert all(hasattr(m, "parametrizations") for m in layers)
    assert not any(hasattr(m, "parametrizations") for m in G.modules())
    sd = D.state_dict()
    assert sum(k.endswith("._u") for k in sd) == len(layers)     # u persists in the checkpoint
    u0 = D.blocks[1].c1.parametrizations.weight[0]._u.clone()
    D.train()(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    assert not torch.equal(u0, D.blocks[1].c1.parametrizations.weight[0]._u)
    # V (K x C): after warm-up its top singular value is 1 and u has length K (rows = classes)
    for _ in range(50):
        _ = D.embed.weight                                      # one power iteration
    assert D.embed.parametrizations.weight[0]._u.shape == (5,)
    with torch.no_grad():
        assert abs(torch.linalg.matrix_norm(D.embed.weight, ord=2).item() - 1) < 1e-3
        assert abs(torch.linalg.matrix_norm(D.psi.weight, ord=2).item() - 1) < 1e-3


def test_concat_D_is_not_a_projection():
    D, x = _nets("--disc", "concat", "--concat-dim", "4")[1], torch.randn(3, 3, 32, 32)
    assert D.blocks[3].c1.in_channels == 8 + 4                  # label joins after block 3
    zeros, ones = torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.long)
    with torch.no_grad():
        assert D(x, zeros).shape == (3, 1) and not torch.allclose(D(x, zeros), D(x, ones))


def test_d_blocks_follow_the_official_code_and_never_overwrite_their_input():
    torch.manual_seed(0)
    pool = F.avg_pool2d
    for c_out, down in ((6, True), (4, False)):
        blk = projection.DBlock(4, c_out, down).eval()
        x = torch.randn(2, 4, 8, 8)
        x0 = x.clone()
        with torch.no_grad():
            out = blk(x)
            w1, w2 = blk.c1.weight, blk.c2.weight
            h = F.conv2d(F.relu(F.conv2d(F.relu(x0), w1, blk.c1.bias, padding=1)), w2,
                         blk.c2.bias, padding=1)                  # pool after the second conv
            s = x0 if blk.c_sc is None else F.conv2d(x0, blk.c_sc.weight, blk.c_sc.bias)
            ref = pool(h, 2) + pool(s, 2) if down else h + s      # the shortcut sees x
        assert torch.equal(x, x0) and torch.allclose(out, ref, atol=1e-5)
        assert blk.c1.out_channels == 4 and (blk.c_sc is None) == (not down and c_out == 4)
    opt = projection.OptimizedBlock(3, 4).eval()
    x3 = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        h = F.relu(F.conv2d(x3, opt.c1.weight, opt.c1.bias, padding=1))   # no ReLU on the image
        ref = pool(F.conv2d(h, opt.c2.weight, opt.c2.bias, padding=1), 2) + F.conv2d(
            pool(x3, 2), opt.c_sc.weight, opt.c_sc.bias)
        assert torch.allclose(opt(x3), ref, atol=1e-5)


# ---- generator and conditional batch norm (checklist 4, 5, 10) ----------------------------------
def test_conditional_batch_norm():
    torch.manual_seed(0)
    cbn = projection.ConditionalBatchNorm2d(3, 4)
    assert not cbn.bn.affine and list(cbn.bn.parameters()) == []   # BN0 without its own affine
    bn = nn.BatchNorm2d(3, eps=2e-5, affine=False)
    x, y = torch.randn(8, 3, 5, 5), torch.tensor([0, 1, 2, 3, 2, 1, 0, 3])
    torch.testing.assert_close(cbn(x, y), bn(x))                # gamma = 1, beta = 0 at init
    assert torch.equal(cbn.gamma.weight, torch.ones(4, 3))
    assert torch.equal(cbn.beta.weight, torch.zeros(4, 3))
    base = cbn(x, y).detach()
    with torch.no_grad():
        cbn.gamma.weight[2] = torch.tensor([2.0, 3.0, 4.0])
        cbn.beta.weight[2] = 0.5
    changed = (cbn(x, y) - base).flatten(1).abs().amax(1) > 0
    assert changed.tolist() == (y == 2).tolist()                # per sample, only class 2
    torch.testing.assert_close(cbn(x, y)[2],
                               base[2] * torch.tensor([2.0, 3.0, 4.0])[:, None, None] + 0.5)
    cbn.eval()                                                  # eval: running statistics
    rm, rv = cbn.bn.running_mean, cbn.bn.running_var
    norm = (x - rm[:, None, None]) / torch.sqrt(rv[:, None, None] + 2e-5)
    torch.testing.assert_close(cbn(x, torch.zeros(8, dtype=torch.long)), norm)
    one_hot = torch.eye(4)[y]                                   # class weights = labels
    torch.testing.assert_close(cbn(x, one_hot), cbn(x, y))


def test_labels_reach_every_cbn_of_G_and_only_through_cbn():
    G = _nets(K=100)[0].eval()                                  # the K = 100 (CIFAR-100) path
    cbns = [m for m in G.modules() if isinstance(m, projection.ConditionalBatchNorm2d)]
    assert len(cbns) == 2 * 3 and isinstance(G.bn, nn.BatchNorm2d) and G.bn.affine  # plain last BN
    z, y = torch.randn(2, 8), torch.tensor([0, 1])
    with torch.no_grad():
        x = G(z, y)
        assert x.shape == (2, 3, 32, 32) and x.abs().max() <= 1
        assert torch.equal(G(z, y), G(z, torch.tensor([0, 2])))  # CBN at init: y has no effect
        for m in cbns:                                           # each CBN conditions G alone
            m.gamma.weight[1] += 0.5
            moved = (G(z, y) - x).flatten(1).abs().amax(1)
            m.gamma.weight[1] -= 0.5
            assert moved[0] == 0 and moved[1] > 1e-4
        torch.testing.assert_close(G(z, y), x)


def test_g_block_and_head_follow_the_official_code():
    torch.manual_seed(0)
    g = projection.GBlock(4, 4, 3).eval()
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([0, 2])
    up = lambda t: t.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)   # noqa: E731 nearest
    with torch.no_grad():
        ref = g.c2(F.relu(g.b2(g.c1(up(F.relu(g.b1(x, y)))), y))) + g.c_sc(up(x))
        assert torch.allclose(g(x, y), ref, atol=1e-5)
        G = _nets()[0].eval()
        z = torch.randn(2, 8)
        h = G.linear(z).view(2, 8, 4, 4)                          # no norm or activation here
        for b in G.blocks:
            h = b(h, y)
        ref = torch.tanh(F.conv2d(F.relu(G.bn(h)), G.conv_out.weight, G.conv_out.bias, padding=1))
        assert torch.allclose(G(z, y), ref, atol=1e-5)


def test_32px_architecture():
    G, D = _nets(K=100)                                         # official resnet_32.py, snresnet_32
    assert G.linear.out_features == 8 * 4 * 4 and [b.c2.out_channels for b in G.blocks] == [8] * 3
    assert [b.c2.out_channels for b in D.blocks] == [8, 8, 8, 8]
    assert isinstance(D.blocks[0], projection.OptimizedBlock)
    assert [b.down for b in D.blocks[1:]] == [True, False, False]
    assert D.psi.bias is None and D.embed.weight.shape == (100, 8)
    x = torch.randn(3, 3, 32, 32)
    assert D.blocks[1](D.blocks[0](x)).shape == (3, 8, 8, 8)
    assert D(x, torch.tensor([0, 50, 99])).shape == (3, 1)


def test_128px_architecture():
    torch.manual_seed(0)
    args = projection.parse_args(["--dataset", "folder:/x", "--g-ch", "2", "--d-ch", "2",
                                  "--z-dim", "8"])
    args.num_classes, args.img_channels = 7, 3
    G, D = projection.build_models(args)
    assert args.img_size == 128 and G.linear.out_features == 32 * 4 * 4
    assert [b.c2.out_channels for b in G.blocks] == [32, 16, 8, 4, 2]   # 16ch -> ch, 5 up-blocks
    assert [b.c2.out_channels for b in D.blocks] == [2, 4, 8, 16, 32, 32]
    assert [b.down for b in D.blocks[1:]] == [True, True, True, True, False]
    assert D.psi.bias is not None and D.embed.weight.shape == (7, 32)
    y = torch.arange(2)
    x = G(torch.randn(2, 8), y)
    assert x.shape == (2, 3, 128, 128) and D(x, y).shape == (2, 1)


def _assert_glorot(w, gain, name):
    fan_in, fan_out = w[0].numel(), w.shape[0] * (w[0, 0].numel() if w.dim() > 2 else 1)
    bound = gain * math.sqrt(6 / (fan_in + fan_out))            # GlorotUniform(gain)
    w = w.detach()
    assert 0.8 * bound < w.abs().max() <= bound * (1 + 1e-6), name
    assert abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 0.2, name


def test_glorot_init_of_every_layer_main_builds():
    torch.manual_seed(0)
    args = _args("--g-ch", "64", "--d-ch", "64", "--z-dim", "128", K=10)
    G, D = projection.build_models(args)
    root2 = math.sqrt(2)
    layers = [("G.linear", G.linear.weight, 1.0), ("G.conv_out", G.conv_out.weight, 1.0),
              ("psi", _original(D.psi), 1.0), ("V", _original(D.embed), 1.0)]
    for i, b in enumerate(G.blocks):
        layers += [(f"G{i}.c1", b.c1.weight, root2), (f"G{i}.c2", b.c2.weight, root2),
                   (f"G{i}.c_sc", b.c_sc.weight, 1.0)]
    for i, b in enumerate(D.blocks):
        layers += [(f"D{i}.c1", _original(b.c1), root2), (f"D{i}.c2", _original(b.c2), root2)]
        if b.c_sc is not None:
            layers.append((f"D{i}.c_sc", _original(b.c_sc), 1.0))
    assert len(layers) == 4 + 9 + 10
    for name, w, gain in layers:
        _assert_glorot(w, gain, name)
    biases = [m.bias for net in (G, D) for m in net.modules()
              if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None]
    assert len(biases) == 21 and all(b.abs().max() == 0 for b in biases)


# ---- losses, labels, data, schedule (checklist 6, 7, 12, 13, 17, 18) -----------------------------
def test_hinge_closed_forms():
    two = torch.full((5, 1), 2.0)
    assert projection.hinge_loss_D(two, -two) == 0
    assert projection.hinge_loss_D(torch.zeros(5, 1), torch.zeros(5, 1)) == 2
    d = torch.tensor([[0.5], [-1.5], [3.0]])
    assert projection.hinge_loss_G(d) == pytest.approx(-d.mean().item())
    assert projection.hinge_loss_D(d, d) == pytest.approx((0.5 + 2.5 + 0 + 1.5 + 0 + 4) / 3)


class _Recorder(nn.Module):
    """Wraps G or D and records the inputs and outputs of every call."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, a, y):
        out = self.net(a, y)
        self.calls.append((a.detach().clone(), y.clone(), out.detach()))
        return out


def _recorded_step(*argv, K=4, reals=None):
    G, D = (_Recorder(m) for m in _nets(*argv, K=K))
    args = _args("--n-dis", "3", "--batch-size", "6", "--g-batch-size", "10", *argv, K=K)
    reals = reals or [(torch.rand(6, 3, 32, 32) * 2 - 1, torch.randint(0, K, (6,)))
                      for _ in range(3)]
    opt_G, opt_D = (torch.optim.Adam(m.parameters(), lr=2e-4, betas=(0.0, 0.9)) for m in (G, D))
    amp = lambda: torch.autocast("cpu", enabled=False)           # noqa: E731
    out = projection.train_step(G, D, opt_G, opt_D, iter(reals), args, common.Dist("cpu"), amp)
    return out, G.calls, D.calls, reals


def test_train_step_labels_losses_and_n_dis():
    K = 4
    out, g_calls, d_calls, reals = _recorded_step(K=K)
    assert len(g_calls) == 1 + 3 and len(d_calls) == 1 + 2 * 3   # 1 G update, then n_dis D updates
    assert g_calls[0][1].shape == (10,) and torch.equal(d_calls[0][1], g_calls[0][1])
    for i in range(3):
        assert torch.equal(d_calls[1 + 2 * i][1], reals[i][1])   # real pairs keep their labels
        assert torch.equal(d_calls[2 + 2 * i][1], g_calls[1 + i][1])   # fakes: their own y
        assert torch.equal(d_calls[2 + 2 * i][0], g_calls[1 + i][2])   # ... and G's images
    torch.testing.assert_close(out["loss_G"], -d_calls[0][2].mean())
    d_real, d_fake = d_calls[-2][2], d_calls[-1][2]
    torch.testing.assert_close(out["loss_D"], F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean())
    y = projection.sample_zy(4000, 2, K, "cpu")[1]
    counts = torch.bincount(y, minlength=K)
    assert counts.min() > 850 and counts.max() < 1150            # uniform q(y) over all K


def test_reals_are_dequantized_by_default_and_not_flipped():
    pixels = torch.randint(0, 256, (6, 3, 32, 32)).float()
    reals = [(pixels / 127.5 - 1, torch.zeros(6, dtype=torch.long))] * 3   # common.py's scaling
    seen = _recorded_step(reals=reals)[2][1][0]                  # D's first real batch
    assert (seen >= pixels / 128 - 1).all() and (seen < (pixels + 1) / 128 - 1 + 1e-6).all()
    assert not torch.equal(seen, pixels / 128 - 1)               # U(0, 1/128) noise added
    raw = _recorded_step("--no-dequantize", reals=reals)[2][1][0]
    assert torch.equal(raw, reals[0][0])


def test_linear_decay_schedule_and_defaults():
    lr = projection.linear_decay_lr
    assert [lr(t, 2e-4, 0, 50_000) for t in (0, 25_000, 50_000)] == pytest.approx([2e-4, 1e-4, 0])
    assert lr(400_000, 2e-4, 400_000, 450_000) == 2e-4           # ImageNet: flat until 400K
    assert lr(425_000, 2e-4, 400_000, 450_000) == pytest.approx(1e-4)
    a = projection.parse_args(["--dataset", "folder:/x"])
    b = projection.parse_args([])
    assert (a.img_size, a.steps, a.decay_start, a.g_ch, a.d_ch) == (128, 450_000, 400_000, 64, 64)
    assert (b.img_size, b.steps, b.decay_start, b.g_ch, b.d_ch) == (32, 50_000, 0, 256, 128)
    assert (b.lr, tuple(b.betas), b.n_dis, b.batch_size, b.g_batch_size, b.z_dim) == (
        2e-4, (0.0, 0.9), 5, 64, 128, 128)
    assert (b.dequantize, b.fid_samples, b.fid_ref_size, b.fid_ref_split,
            b.intra_fid_samples) == (True, 5000, 0, "train", 5000)
    c = vars(projection.parse_args(["--dataset", "cifar100"]))   # only the dataset (and K) change
    assert {k: v for k, v in c.items() if k not in ("dataset", "out_dir")} == {
        k: v for k, v in vars(b).items() if k not in ("dataset", "out_dir")}
    h = projection.parse_args(["--d-steps", "2", "--g-width", "32", "--d-width", "16"])
    assert (h.n_dis, h.g_ch, h.d_ch) == (2, 32, 16)              # house aliases


def test_dequantize_matches_official_formula():
    pixels = torch.arange(256.0)
    x = projection.dequantize(pixels / 127.5 - 1, torch.rand(256))
    assert ((x - (pixels / 128 - 1)) >= 0).all() and ((x - (pixels / 128 - 1)) < 1 / 128).all()
    exact = projection.dequantize(pixels / 127.5 - 1, torch.zeros(256))
    assert torch.equal(exact, pixels / 128 - 1)


# ---- speed (issue 18): same math, no host sync in the step, bf16 forwards with fp32 losses ----
def test_train_step_has_no_host_sync_and_amp_keeps_losses_fp32(tmp_path, monkeypatch):
    seen = []

    def prepare(G, D, opt_G, opt_D, batches, args, *rest):
        G.conv_out.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        reals = iter([next(batches) for _ in range(args.n_dis)])  # on CUDA: common's cache
        return (G, D, opt_G, opt_D, reals, args, *rest)
    outs = trap_host_syncs(monkeypatch, projection, prepare)
    m = _run(tmp_path, "amp", "--steps", "1", "--amp", "bf16", "--export-samples", "0")
    seen.extend(v.dtype for v in outs[-1].values())
    assert len(outs) == 1 and math.isfinite(m["loss_D"])
    assert seen[0] == torch.bfloat16                                 # G's convs in bf16
    assert seen[-4:] == [torch.float32] * 4                       # losses and D outputs fp32
