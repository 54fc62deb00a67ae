"""Tiny but real flags per script: small widths, resolutions, batches and step counts that still
reach every branch (sampling, checkpointing, resume). Used by the in-process tests and by
tests/test_standalone.py, which runs each script alone in a temp folder."""

TINY = {
    # One entry per training script. No --out-dir here: the tests add their own. fid.py has its
    # own standalone test in tests/test_fid.py.
    "wgan_gp.py": ["--dataset", "shapes", "--device", "cpu", "--dim-g", "8", "--dim-d", "8",
                   "--batch-size", "4", "--n-critic", "2", "--steps", "2", "--num-workers", "0",
                   "--log-every", "1", "--sample-every", "1", "--ckpt-every", "1",
                   "--deterministic"],
    "sngan.py": ["--dataset", "shapes", "--device", "cpu", "--steps", "2", "--g-ch", "16",
                 "--d-ch", "16", "--batch-size", "8", "--num-workers", "0", "--log-every", "1",
                 "--sigma-every", "2", "--sample-every", "2", "--ckpt-every", "1",
                 "--deterministic"],
    "projection.py": ["--dataset", "shapes", "--device", "cpu", "--steps", "2", "--g-ch", "16",
                      "--d-ch", "16", "--batch-size", "8", "--g-batch-size", "16", "--n-dis", "2",
                      "--num-workers", "0", "--log-every", "1", "--sample-every", "1",
                      "--ckpt-every", "1", "--deterministic", "--export-samples", "12", "--morph",
                      "0", "1"],
    "gd_stable.py": ["--device", "cpu", "--deterministic", "--batch-size", "64", "--steps", "3",
                     "--g-width", "16", "--d-width", "16", "--z-dim", "8", "--log-every", "1",
                     "--sample-every", "2", "--ckpt-every", "2", "--mode-samples", "200"],
    # dp_gan: q = 1 (one step an epoch, so --epochs counts the logged steps); private, hence
    # --spend-more-epsilon: the plumbing tests extend a finished run with --resume --epochs n+1
    "dp_gan.py": ["--device", "cpu", "--n-train", "64", "--n-test", "32", "--batch-size", "64",
                  "--epochs", "2", "--width", "0.0625", "--tstr-samples", "64", "--clf-steps", "20",
                  "--select-picks", "2", "--log-every", "2", "--sample-every", "2", "--ckpt-every",
                  "3", "--deterministic", "--spend-more-epsilon"],
    "avb.py": ["--dataset", "shapes", "--device", "cpu", "--steps", "2", "--batch-size", "8",
               "--g-width", "4", "--d-width", "16", "--adv-feat", "32", "--z-dim", "4",
               "--eps-dim", "8", "--eps-nbasis", "2", "--val-size", "16", "--num-workers", "0",
               "--log-every", "1", "--sample-every", "2", "--ckpt-every", "2", "--deterministic"],
    # progan: 4 iterations of 250 per kimg: 4x4 stabilize (2), 8x8 fade-in (alpha 0.5),
    # 8x8 stabilize
    "progan.py": ["--dataset", "shapes", "--device", "cpu", "--resolution", "8", "--fmap-base",
                  "16", "--fmap-max", "8", "--z-dim", "8", "--batch-size", "250",
                  "--stabilize-kimg", "0.25", "--fade-kimg", "0.5", "--kimg", "1",
                  "--num-workers", "0", "--log-every", "1", "--sample-every", "2",
                  "--ckpt-every", "2", "--export-samples", "8", "--deterministic"],
    "pix2pixhd.py": ["--dataset", "shapes", "--device", "cpu", "--stage", "local", "--size",
                     "16x16", "--ngf", "4", "--ndf", "4", "--n-downsample-global", "1",
                     "--n-blocks-global", "1", "--n-blocks-local", "1", "--n-layers-D", "1",
                     "--num-D", "2", "--no-vgg", "--instance-feat", "--nef", "4",
                     "--n-downsample-E", "1", "--epochs", "2", "--niter-decay", "1",
                     "--niter-fix-global", "1", "--max-dataset-size", "1", "--sample-features",
                     "2", "--seg-every", "2", "--seg-steps", "5", "--seg-images", "2",
                     "--export-samples", "2", "--num-workers", "0", "--log-every", "1",
                     "--sample-every", "2", "--ckpt-every", "1", "--deterministic"],
    # stackganpp: 4 items in batches of 4, so one step an epoch (--epochs counts the steps)
    "stackganpp.py": ["--dataset", "shapes", "--device", "cpu", "--base-size", "8", "--gf-dim",
                      "4", "--df-dim", "4", "--cond-dim", "8", "--batch-size", "4",
                      "--max-dataset-size", "4", "--epochs", "2", "--num-workers", "0",
                      "--log-every", "1", "--sample-every", "2", "--ckpt-every", "1",
                      "--deterministic"],
}

# What the run-plumbing tests (tests/test_run_plumbing.py, tests/test_standalone.py) need to know
# of each script; a script joins those tests by adding its entry:
#   length   the flag that sets the length of training (--steps, --epochs, --kimg)
#   shape    a flag and value that changes a tensor shape (refused on --resume)
#   nan      flags that make a run diverge within `total` steps (e.g. an absurd --lr)
#   folder   whether --dataset folder:<path> is accepted
#   total    the length used by the SIGTERM / kill -9 test (long enough to be killed mid-run)
#   kill_at  the progress-line prefix after which the process gets SIGTERM (5 of `total`)
SPEC = {
    "sngan.py": dict(length="--steps", shape=("--g-ch", "24"), nan=["--lr", "1e30"], folder=True,
                     total=12, kill_at="step 5/"),
    "wgan_gp.py": dict(length="--steps", shape=("--dim-g", "16"), nan=["--lr", "1e30"],
                       folder=True, total=12, kill_at="step 5/"),
    # progan counts kimg (a float step); 250-image batches keep every kimg value exact in binary
    "progan.py": dict(length="--kimg", shape=("--fmap-max", "4"), nan=["--lr", "1e30"], folder=True,
                      total=5, kill_at="kimg 1/"),
    "projection.py": dict(length="--steps", shape=("--d-ch", "24"), nan=["--lr", "1e30"],
                          folder=True, total=12, kill_at="step 5/"),
    "gd_stable.py": dict(length="--steps", shape=("--g-width", "24"), nan=["--lr", "1e10"],
                         folder=True, total=40, kill_at="step 5/"),
    # one training pair per epoch (--max-dataset-size 1, batch 1): step = epoch, as these tests
    # assume of the length flag
    "pix2pixhd.py": dict(length="--epochs", shape=("--ngf", "6"), nan=["--lr", "1e30"],
                         folder=False, total=12, kill_at="step 5/"),
    "avb.py": dict(length="--steps", shape=("--z-dim", "6"), nan=["--lr", "1e30"], folder=True,
                   total=12, kill_at="step 5/"),
    "dp_gan.py": dict(length="--epochs", shape=("--width", "0.125"), nan=["--lr", "1e30"],
                      folder=False, total=12, kill_at="step 5/"),
    # one step an epoch (TINY: --max-dataset-size 4 = --batch-size): step = epoch
    "stackganpp.py": dict(length="--epochs", shape=("--gf-dim", "8"), nan=["--lr", "1e30"],
                          folder=True, total=12, kill_at="step 5/"),
}

# The torchrun test (tests/test_torchrun.py: one `torchrun --nproc_per_node 2` launch of
# tests/dist_driver.py, gloo on CPU, for every script here). A script joins by adding its entry:
#   argv    tiny flags (its TINY entry, usually) with a global --batch-size divisible by 2
#   length  the flag that sets the length of training; the driver appends `length steps`
#   steps   k: the test compares the checkpoints after k steps
#   stop    the step where the interrupted 2-process run stops (saved, then --resume to k)
#   exact   True when the configuration is BN-free or per-sample independent: the 2-process
#           parameters must equal a 1-process run with the global batch. False where BatchNorm
#           sees the per-rank batch (no flag removes it): the test then checks that both ranks hold
#           the same parameters instead.
DIST = {
    # BatchNorm in every G and D block (no BN-free flag): exact=False
    "stackganpp.py": dict(argv=TINY["stackganpp.py"], length="--epochs", steps=2, stop=1,
                          exact=False),
    # BatchNorm in G (CBN in projection), none in D; no flag removes it: exact=False
    # --no-lr-decay: the linear schedule depends on --steps itself, which the resume changes
    "sngan.py": dict(argv=TINY["sngan.py"] + ["--no-lr-decay"], length="--steps", steps=2, stop=1,
                     exact=False),
    "projection.py": dict(argv=TINY["projection.py"], length="--steps", steps=2, stop=1,
                          exact=False),
    # the same with G's BNs replaced by Identity in the test (tests/<script>_bnfree.py): exact
    "sngan_bnfree.py": dict(argv=TINY["sngan.py"] + ["--no-lr-decay"], length="--steps", steps=2,
                            stop=1, exact=True),
    "projection_bnfree.py": dict(argv=TINY["projection.py"], length="--steps", steps=2, stop=1,
                                 exact=True),
    # progan: no BN; a minibatch-stddev group of 1 makes every sample independent (the default,
    # the whole minibatch, sees each rank's share); mirrored, so the flips' shards are compared
    # too; logged once a kimg (4 iterations of 250), the step that the test counts
    "progan.py": dict(argv=TINY["progan.py"] + ["--mbstd-group-size", "1", "--mirror",
                                                "--log-every", "4"],
                      length="--kimg", steps=2, stop=1, exact=True),
    # pix2pixhd: instance norm and E's pooling are per image, so 2 x batch 1 is batch 2 in math;
    # but the conv biases before instance norm have a zero gradient, and Adam turns the fp32
    # rounding noise of their gradients into lr-sized steps (3e-4 after 2 steps by hand, above the
    # test's 1e-4 x scale + 1e-6; every other parameter agreed to 1e-6): exact=False. Scored
    # every step, so the stopped run's end (step == total) logs what the uninterrupted one logs
    # there
    "pix2pixhd.py": dict(argv=TINY["pix2pixhd.py"] + ["--max-dataset-size", "2",
                                                      "--batch-size", "2", "--seg-every", "1"],
                         length="--epochs", steps=2, stop=1, exact=False),
    # wgan_gp: the toy MLPs have no BN and the GP is per sample: exact (GP double backward
    # included); the ResNet (tests/wgan_gp_resnet.py: the script itself) has BN in G: exact=False
    "wgan_gp.py": dict(argv=["--dataset", "8gaussians", "--device", "cpu", "--dim-g", "8",
                             "--batch-size", "8", "--n-critic", "2", "--log-every", "1",
                             "--sample-every", "2", "--ckpt-every", "1", "--deterministic"],
                       length="--steps", steps=2, stop=1, exact=True),
    "wgan_gp_resnet.py": dict(argv=TINY["wgan_gp.py"], length="--steps", steps=2, stop=1,
                              exact=False),
}
