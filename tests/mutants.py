"""Mutation check: every paper fact a test guards must fail that test when it is broken.

    python tests/mutants.py                 # every mutant of every script
    python tests/mutants.py sngan.py -j 2   # one script's mutants, two at a time
    python tests/mutants.py --list          # what is here, per script

Each mutant is (file, old text, new text, test file, what it breaks): the old text must occur
exactly once in the file. The runner copies the project into a scratch folder, applies the one
edit there, runs `pytest -x -q <test file>` on the copy, and reports `killed` (the tests fail) or
`SURVIVED` (they pass). It exits 1 if any mutant survived or did not apply. Not part of the
default pytest run (it is not a test_*.py file): it takes minutes per script.

Each script keeps its own block below, one or more mutants per checklist item of its paper card.
"""
import argparse
import concurrent.futures
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MUTANTS = {
    # ---- common.py: the run plumbing every script relies on ----
    "common.py": [
        ("common.py", 'if r.get("step", 0) <= step]', 'if True]', "tests/test_common.py",
         "metrics.jsonl not trimmed to the checkpoint's step on resume"),
        ("common.py", "        bad = _nonfinite(state)\n", "        bad = []\n",
         "tests/test_common.py", "a NaN state overwrites the last good checkpoint"),
        ("common.py", 'positive_int = _flag_type(int, lambda v: v > 0,',
         'positive_int = _flag_type(int, lambda v: v >= 0,', "tests/test_common.py",
         "an explicit 0 accepted as a count"),
    ],
    # ---- sngan.py ----
    "sngan.py": [
        # issue 12: survivors of the first review
        ("sngan.py", "h = self.c2(F.relu(self.c1(F.relu(x))))",
         "h = self.c2(F.relu(self.c1(F.relu(x, inplace=True))))", "tests/test_sngan.py",
         "pitfall 7: in-place ReLU on the D block input (the shortcut sees relu(x))"),
        ("sngan.py", "    G.eval()\n    x = torch.cat(", "    G.train()\n    x = torch.cat(",
         "tests/test_sngan.py", "checklist 18: samples, exports and FID drawn in train mode"),
        ("sngan.py", "self.c1 = sn(glorot_(nn.Conv2d(c_in, c_in, 3, padding=1), math.sqrt(2)))",
         "self.c1 = sn(glorot_(nn.Conv2d(c_in, c_in, 3, padding=1), 1.0))", "tests/test_sngan.py",
         "checklist 13: D block 3x3 conv init gain 1 instead of sqrt(2)"),
        ("sngan.py", "self.fc = sn(glorot_(nn.Linear(ch, 1, bias=False), 1.0))",
         "self.fc = sn(glorot_(nn.Linear(ch, 1, bias=False), math.sqrt(2)))",
         "tests/test_sngan.py", "checklist 13: D final linear init gain sqrt(2)"),
        ("sngan.py", "self.l1 = glorot_(nn.Linear(z_dim, self.bottom ** 2 * ch), 1.0)",
         "self.l1 = glorot_(nn.Linear(z_dim, self.bottom ** 2 * ch), math.sqrt(2))",
         "tests/test_sngan.py", "checklist 13: G input linear init gain sqrt(2)"),
        ("sngan.py", "self.c2 = glorot_(nn.Conv2d(c_out, c_out, 3, padding=1), math.sqrt(2))",
         "self.c2 = glorot_(nn.Conv2d(c_out, c_out, 3, padding=1), 1.0)", "tests/test_sngan.py",
         "checklist 13: G block second conv init gain 1"),
        ("sngan.py", "        nn.init.zeros_(layer.bias)\n",
         "        nn.init.normal_(layer.bias)\n",
         "tests/test_sngan.py", "checklist 13: non-zero biases"),
        ("sngan.py", "return torch.rand(n, z_dim, device=device, generator=generator) * 2 - 1",
         "return torch.rand(n, z_dim, device=device, generator=generator)", "tests/test_sngan.py",
         "checklist 8: --z-dist uniform draws U[0, 1]"),
        ("sngan.py", '    if dist == "normal":', '    if dist != "normal":', "tests/test_sngan.py",
         "checklist 8: --z-dist swapped"),
        ("sngan.py", "type=common.nonnegative_float, default=0.1,",
         "type=common.nonnegative_float, default=0.2,", "tests/test_sngan.py",
         "checklist 14: Tab. 3 leaky slope 0.1 replaced by Chainer's 0.2"),
        ("sngan.py", "layers += [conv, nn.LeakyReLU(slope)]", "layers += [conv, nn.LeakyReLU(0.2)]",
         "tests/test_sngan.py", "checklist 14: --lrelu-slope ignored"),
        # checklist 1: SN on every D layer, none in G
        ("sngan.py",
         "self.c_sc = sn(glorot_(nn.Conv2d(c_in, c_out, 1), 1.0)) if learn_sc else None",
         "self.c_sc = glorot_(nn.Conv2d(c_in, c_out, 1), 1.0) if learn_sc else None",
         "tests/test_sngan.py", "checklist 1: D 1x1 shortcut conv without SN"),
        ("sngan.py", "conv = sn(normal_init_(nn.Conv2d(a, b, k, stride=s, padding=1)))",
         "conv = normal_init_(nn.Conv2d(a, b, k, stride=s, padding=1))", "tests/test_sngan.py",
         "checklist 1: CNN D convs without SN"),
        # checklist 2: reshape (d_out, d_in*kh*kw)
        ("sngan.py", "w_mat = w.reshape(w.shape[0], -1)       # (d_out",
         "w_mat = w.reshape(w.shape[0], -1)[:, :1]       # (d_out", "tests/test_sngan.py",
         "checklist 2: power iteration on part of the reshaped kernel"),
        # checklist 3: persistent, checkpointed, N(0, I) u
        ("sngan.py", "                    module.weight_u.copy_(u)\n", "", "tests/test_sngan.py",
         "checklist 3: u never written back (not recycled)"),
        ('sngan.py', 'module.register_buffer("weight_u", u)',
         'module.register_buffer("weight_u", u, persistent=False)', "tests/test_sngan.py",
         "checklist 3: u not in the state_dict / checkpoint"),
        ("sngan.py", "u = _l2normalize(torch.randn(w.shape[0],",
         "u = _l2normalize(torch.rand(w.shape[0],",
         "tests/test_sngan.py", "checklist 3: u initialised from U[0, 1], not N(0, I)"),
        # checklist 4: one iteration per training forward, eps 1e-12
        ("sngan.py", "for _ in range(self.n_power_iterations):",
         "for _ in range(self.n_power_iterations + 1):", "tests/test_sngan.py",
         "checklist 4: two power iterations per forward"),
        ("sngan.py", "def spectral_norm(module, n_power_iterations=1, eps=1e-12,",
         "def spectral_norm(module, n_power_iterations=1, eps=1e-4,", "tests/test_sngan.py",
         "checklist 4: eps 1e-4"),
        ("sngan.py", "module.weight = self.normalized_weight(module, update=module.training)",
         "module.weight = self.normalized_weight(module, update=True)", "tests/test_sngan.py",
         "checklist 4/18: u advanced in eval mode"),
        # checklist 5: sigma = u^T W v, differentiated in W
        ("sngan.py", "sigma = torch.dot(u, w_mat @ v)", "sigma = torch.dot(u, w_mat @ v).detach()",
         "tests/test_sngan.py", "checklist 5 / pitfall 2: sigma detached"),
        # checklist 6-7: losses and their dispatch in train_step
        ("sngan.py", "return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()",
         "return F.relu(1 - d_real).mean() + F.relu(1 - d_fake).mean()", "tests/test_sngan.py",
         "checklist 6: hinge fake term with the wrong sign"),
        ("sngan.py", 'loss_D = (hinge_loss_D if args.loss == "hinge" else standard_loss_D)',
         'loss_D = (hinge_loss_D if args.loss != "hinge" else standard_loss_D)',
         "tests/test_sngan.py", "checklist 6-7: --loss dispatched to the other D loss"),
        ("sngan.py", "return F.softplus(-d_fake).mean()", "return -F.softplus(d_fake).mean()",
         "tests/test_sngan.py", "checklist 7: saturating G loss"),
        # checklist 9-12: nets and blocks
        ("sngan.py", "return torch.tanh(self.c_out(F.relu(self.b_out(h))))",
         "return torch.tanh(self.c_out(self.b_out(h)))", "tests/test_sngan.py",
         "checklist 9: no ReLU before G's output conv"),
        ("sngan.py", "h = F.relu(self.bn0(self.l0(z))).view(", "h = F.relu(self.l0(z)).view(",
         "tests/test_sngan.py", "checklist 14: CNN G without BN after the dense layer"),
        ("sngan.py", "return self.fc(h.sum(dim=(2, 3)))", "return self.fc(h.mean(dim=(2, 3)))",
         "tests/test_sngan.py", "checklist 10 / pitfall 9: mean instead of sum pooling"),
        ("sngan.py", "h = F.relu(self.blocks(x))", "h = self.blocks(x)", "tests/test_sngan.py",
         "checklist 10: no ReLU before the sum pool"),
        ("sngan.py", "DBlock(ch, ch, True, sn),", "DBlock(ch, ch, False, sn),",
         "tests/test_sngan.py", "checklist 10: no downsampling in the second D block"),
        ("sngan.py", "return F.avg_pool2d(self.c2(F.relu(self.c1(x))), 2)",
         "return F.avg_pool2d(self.c2(F.relu(self.c1(F.relu(x)))), 2)", "tests/test_sngan.py",
         "checklist 11: a ReLU on the image in the optimized block"),
        ("sngan.py", "learn_sc = c_in != c_out or downsample", "learn_sc = True",
         "tests/test_sngan.py", "checklist 11: a learnable shortcut where the official one is x"),
        ("sngan.py", 'mode="nearest")  # official', 'mode="bilinear")  # official',
         "tests/test_sngan.py", "checklist 12 / pitfall 8: bilinear upsampling"),
        ("sngan.py", "h, sc = F.avg_pool2d(h, 2), F.avg_pool2d(sc, 2)",
         "h, sc = F.max_pool2d(h, 2), F.avg_pool2d(sc, 2)", "tests/test_sngan.py",
         "checklist 12: max instead of average pooling"),
        ("sngan.py", "nn.init.normal_(m.weight, 0.0, 0.02)", "nn.init.normal_(m.weight, 0.0, 0.05)",
         "tests/test_sngan.py", "checklist 14: CNN init std 0.05"),
        ("sngan.py", "kernels = [(3, 1), (4, 2), (3, 1), (4, 2), (3, 1), (4, 2), (3, 1)]",
         "kernels = [(3, 1), (4, 2), (3, 1), (4, 2), (3, 1), (3, 1), (3, 1)]",
         "tests/test_sngan.py", "checklist 14: a CNN D layer without stride 2"),
        # checklist 15-17: settings, defaults, schedule, counts
        ("sngan.py", '"C": (2e-4, 0.5, 0.999, 1)', '"C": (2e-4, 0.5, 0.9, 1)',
         "tests/test_sngan.py", "checklist 15: Tab. 1 setting C beta2"),
        ("sngan.py", "    if args.n_dis is None:\n        args.n_dis = n_dis\n",
         "    if args.n_dis is None:\n        args.n_dis = 5\n", "tests/test_sngan.py",
         "checklist 15: n_dis not taken from the setting"),
        ("sngan.py",
         "opt_D = torch.optim.Adam(D.parameters(), lr=args.lr, betas=tuple(args.betas))",
         "opt_D = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(0.0, 0.9))",
         "tests/test_sngan.py", "checklist 15: opt_D betas hard-wired"),
        ("sngan.py", "        for opt in (opt_G, opt_D):\n", "        for opt in (opt_D,):\n",
         "tests/test_sngan.py", "checklist 16: G's lr never decayed"),
        ("sngan.py", "z = sample_z(args.g_batch_size, args.z_dim",
         "z = sample_z(args.batch_size, args.z_dim",
         "tests/test_sngan.py", "checklist 16: G batch = D batch"),
        ("sngan.py", "return max(0.0, 1.0 - step / args.steps) if args.lr_decay else 1.0",
         "return max(0.0, 1.0 - step / args.steps / 2) if args.lr_decay else 1.0",
         "tests/test_sngan.py", "checklist 16: decay to lr/2, not 0"),
        ("sngan.py", "start_step=step * args.n_dis,", "start_step=step,", "tests/test_sngan.py",
         "checklist 17: resumed data stream counted in G iterations, not D batches"),
        ("sngan.py", "    for _ in range(args.n_dis):", "    for _ in range(args.n_dis - 1):",
         "tests/test_sngan.py", "checklist 17: one D step too few per iteration"),
        # checklist 19: STL-10
        ("sngan.py", 'args.img_size = 48 if args.dataset == "stl10" else 32', "args.img_size = 32",
         "tests/test_sngan.py", "checklist 19: STL-10 at 32x32"),
        # checklist 20: the evaluation protocol
        ("sngan.py", "type=nonneg, default=10_000,", "type=nonneg, default=0,",
         "tests/test_sngan.py", "checklist 20: FID against the whole split, not 10K real"),
        ("sngan.py", "    return ev(sample_fn)\n", '    return {"fid": ev(sample_fn)["fid"]}\n',
         "tests/test_sngan.py", "issue 12: IS not logged next to FID"),
        ("sngan.py", "gen = torch.Generator(device=device).manual_seed(args.seed + 2)",
         "gen = None", "tests/test_sngan.py",
         "sampling for FID draws from the training RNG stream"),
        ("sngan.py", "    return (x * 127.5 + 127.5).clamp(0, 255).to(torch.uint8)",
         "    return common.quantize(x).permute(0, 3, 1, 2)", "tests/test_sngan.py",
         "export rounded, not truncated as official evaluation.py"),
    ],
    # ---- projection.py ----
    "projection.py": [
    ],
    # ---- wgan_gp.py ----
    "wgan_gp.py": [
    ],
    # ---- gd_stable.py ----
    "gd_stable.py": [
    ],
    # ---- dp_gan.py ----
    "dp_gan.py": [
    ],
    # ---- avb.py ----
    "avb.py": [
    ],
    # ---- fid.py ----
    "fid.py": [
    ],
    # ---- progan.py ----
    "progan.py": [
    ],
    # ---- pix2pixhd.py ----
    "pix2pixhd.py": [
    ],
    # ---- stackganpp.py ----
    "stackganpp.py": [
    ],
}


def _copy_project(dst):
    for p in ROOT.iterdir():
        if p.suffix in (".py", ".ini", ".toml") and p.is_file():
            shutil.copy(p, dst / p.name)
    shutil.copytree(ROOT / "tests", dst / "tests",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def run_one(mutant, timeout):
    """Applies one mutant in a scratch copy and runs its test file: 'killed' or 'SURVIVED'."""
    file, old, new, test, what = mutant
    with tempfile.TemporaryDirectory(prefix="mutant-") as d:
        d = Path(d)
        _copy_project(d)
        src = (d / file).read_text()
        if src.count(old) != 1:
            return f"NOT APPLIED ({src.count(old)} matches)", 0.0
        (d / file).write_text(src.replace(old, new))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        t = time.time()
        try:
            r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                test], cwd=d, env=env, capture_output=True, text=True,
                               timeout=timeout)
            status = "SURVIVED" if r.returncode == 0 else "killed"
        except subprocess.TimeoutExpired:
            status = "killed (timeout)"
        return status, time.time() - t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("scripts", nargs="*", help="scripts whose mutants to run (default: all)")
    p.add_argument("-j", "--jobs", type=int, default=1, help="mutants run at the same time")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per mutant")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = p.parse_args(argv)
    names = args.scripts or list(MUTANTS)
    unknown = [n for n in names if n not in MUTANTS]
    if unknown:
        p.error(f"no mutants for {unknown}; known: {', '.join(MUTANTS)}")
    todo = [(n, m) for n in names for m in MUTANTS[n]]
    if args.list:
        for n in names:
            print(f"{n}: {len(MUTANTS[n])} mutants")
            for m in MUTANTS[n]:
                print(f"  - {m[4]}  [{m[3]}]")
        return 0
    results = []
    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = {pool.submit(run_one, m, args.timeout): (n, m) for n, m in todo}
        for f in concurrent.futures.as_completed(futures):
            n, m = futures[f]
            status, dt = f.result()
            results.append((n, m, status))
            print(f"{status:<18} {dt:6.0f}s  {n}: {m[4]}", flush=True)
    bad = [r for r in results if not r[2].startswith("killed")]
    print(f"\n{len(results) - len(bad)} of {len(results)} mutants killed"
          + (f"; {len(bad)} not killed:" if bad else ""))
    for n, m, status in bad:
        print(f"  {status}: {n}: {m[4]}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
