"""Gradient-norm-regularized GAN: Gradient descent GAN optimization is locally stable.
Nagarajan, Kolter. NIPS 2017. arXiv:1706.04156
Official code: locuslab/gradient_regularized_gan (gaussian-toy-regularized.py; TF 1.1, Keras 1.2)

Paper -> code  (Sec. 2, 3 checked; later section and equation numbers unverified: cited by name)
  Sec. 2     V = E f(D(x)) + E f(-D(G(z))), f concave ....... f_concave(), game_value()
  Sec. 2     gradient descent: D ascends V, G descends V .... train_step()
  Sec. 3     GAN stable, WGAN limit cycles (card 2.6) ....... toy_game(), toy_run()
  reg. sec.  G descends V + eta ||grad_{theta_D} V||^2 ...... gradient_norm_penalty(), player_grads
  exp. sec.  streamlines of the uniform/quadratic toy ....... streamline_figure()
  exp. sec.  8 Gaussians, official MLPs ..................... sample_mog8(), MLPGenerator/-Discr.
  exp. sec.  image run [unverified: stacked MNIST, DCGAN] ... StackedMNIST, DCGANGenerator/-Discr.
  ours       mode metrics (8 Gaussians; 1000 digit triples) . mog8_modes(), digit_modes()
Deviations (each one also tagged in the code; grep DEVIATION|PAPER-VS-CODE)
  1. PAPER-VS-CODE  Analysis: simultaneous plain gradient steps; official code: alternating D and
     G steps on fresh batches, with Adam (the default; the analysis: --update simultaneous
     --optimizer sgd).
  2. DEVIATION  torch Adam adds eps after bias correction, Keras 1.2 before (immaterial at 1e-8).
  3. DEVIATION  V, ||grad_D V||, ||grad_G V|| are logged every --log-every steps on the G-step
     batch, not every iteration on a third fresh batch (official).
  4. DEVIATION  The image setting (stacked MNIST, DCGAN, eta, lr, steps) is ours [unverified].
  5. DEVIATION  No unrolled-GAN baseline (official gaussian-toy-unrolled.py); --eta 0 is the one.
  6. DEVIATION  Mode metrics are ours (Metz et al. / VEEGAN practice); the paper shows figures.
--dataset: mog8 (default), stacked_mnist, mnist, cifar10, shapes, folder:<path> (resized to
--img-size 28 or 32). --steps counts G iterations (each: --d-steps D steps, then one G step).
Run
  python gd_stable.py                                    # 8 Gaussians, eta 0.5 (official setting)
  python gd_stable.py --eta 0                            # unregularized baseline, same RNG stream
  python gd_stable.py --dataset stacked_mnist            # image run (ours): modes of 1000, KL
  python gd_stable.py --dataset stacked_mnist --eta 0 --d-width 16   # Metz et al.'s 1/4-width D
  python gd_stable.py --streamlines --steps 1 --device cpu   # out_dir/streamlines.png
  python gd_stable.py --dataset mnist --fid-every 5000   # FID, IS via fid.py (not stacked_mnist)
  python gd_stable.py --dataset mnist --resume --export-samples 10000   # samples of a finished run
  G = gd_stable.load_generator("runs/gd_stable-mog8-s0/ckpt.pt", "cpu")   # eval mode, as sampled
  x = G(torch.randn(16, G.config["z_dim"]))       # mog8: (16, 2) points; images: (16, C, H, W)
Paper reports: figures only (8-Gaussian coverage, image samples, streamlines). Ours: README.
"""

import argparse
import itertools
import math
import os
import random

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import common

DATASETS = ("mog8", "stacked_mnist", "mnist", "cifar10", "shapes", "folder:<path>")
MUTABLE = ("steps", "lr", "eval_every", "mode_samples", "streamlines")   # take effect on --resume


# ==== Args ====
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                formatter_class=common.HelpFormatter)
    g = p.add_argument_group("paper").add_argument
    g("--dataset", default="mog8", help=f"one of {', '.join(DATASETS)} [exp. sec.; ours]")
    # DEVIATION: no unrolled-GAN baseline (official gaussian-toy-unrolled.py); --eta 0 is it
    g("--eta", type=common.nonnegative_float, default=0.5,
      help="regularizer weight; 0 = unregularized [official regularizer_weight]")
    g("--loss", default="gan", choices=["gan", "wgan"], help="f(t) = -log(1 + e^-t) or t [Sec. 2]")
    g("--g-objective", default="minimax", choices=["minimax", "nonsat"],
      help="G minimizes V (analysed, official) or -E f(D(G(z))) [Sec. 2; official]")
    g("--update", default="alternating", choices=["alternating", "simultaneous"],
      help="D steps then G step (official), or simultaneous steps (analysis) [official; Sec. 2]")
    g("--optimizer", default="adam", choices=["adam", "sgd"], help="[official; Sec. 2: plain GD]")
    g("--lr", type=common.positive_float, help="mog8 1e-4, images 2e-4 [official; DCGAN]")
    g("--betas", type=common.unit_float, nargs=2, default=(0.5, 0.999),
      help="Adam betas [official beta1; Keras default beta2]")
    g("--adam-eps", type=common.positive_float, default=1e-8, help="Adam epsilon [official]")
    g("--batch-size", type=common.positive_int, help="mog8 512, images 64 [official; DCGAN]")
    g("--steps", type=common.positive_int, help="G iterations; mog8 100001, images 50000 "
      "[official max_iter; ours]")
    g("--d-steps", type=common.positive_int, default=1,
      help="D steps per G step, a fresh batch each (alternating only) [official]")
    g("--z-dim", type=common.positive_int, help="mog8 256, images 100 [official z_dim; DCGAN]")
    g("--g-width", type=common.positive_int, help="mog8: hidden units, 128; images: channels of "
      "G's last hidden layer, 64 [official n_hidden; ours: DCGAN]")
    g("--d-width", type=common.positive_int, help="mog8: hidden units, 128; images: channels of "
      "D's first conv, 64 (Metz et al.: 16, 32) [official n_hidden; ours: DCGAN]")
    g("--img-size", type=int, choices=[28, 32], help="28 for (stacked) MNIST and shapes, 32 for "
      "cifar10 and folder:<path> [ours]")
    g("--d-clip", type=common.nonnegative_float, default=0.0, help="clip D weights to [-c, c] "
      "after each D step, 0 = off [ours: WGAN on data has no Lipschitz bound]")
    e = p.add_argument_group("eval").add_argument
    e("--eval-every", type=common.nonnegative_int, help="mode metrics every K steps and at the "
      "end, 0 = off; mog8 1000, (stacked_)mnist 5000, others 0 [ours]")
    e("--mode-samples", type=common.positive_int, help="mog8 2500, images 26000 [ours: VEEGAN]")
    e("--classifier-steps", type=common.positive_int, default=3000,
      help="Adam steps (batch 128) of the MNIST classifier for the mode metric [ours]")
    e("--streamlines", action="store_true", help="write out_dir/streamlines.png [exp. sec.]")
    e("--export-samples", type=common.nonnegative_int, default=0, help="out_dir/samples_N.npz at "
      "the end: images uint8 NHWC, mog8 points (N, 2); 0 = off [run]")
    e("--fid-every", type=common.nonnegative_int, default=0,
      help="FID and IS via fid.py every K steps and at the end, 0 = off [run]")
    e("--fid-samples", type=common.positive_int, default=10_000, help="images per FID [run]")
    e("--fid-weights", help="Inception weight file for fid.py [run]")
    r = p.add_argument_group("run").add_argument
    r("--data-root", default="data", help="torchvision dataset folder [run]")
    r("--out-dir", help="default runs/gd_stable-<dataset>-s<seed>[-<hash of other flags>] [run]")
    r("--seed", type=common.nonnegative_int, default=0, help="seeds Python, numpy, torch [run]")
    r("--device", default="cuda", help="cuda or cpu; never falls back [run]")
    r("--num-workers", type=common.nonnegative_int, default=4, help="DataLoader workers [run]")
    r("--log-every", type=common.positive_int, default=100, help="log every K steps [run]")
    r("--sample-every", type=common.nonnegative_int, default=1000, help="figure every K steps, 0 "
      "= off [official viz_every]")
    r("--ckpt-every", type=common.positive_int, default=10_000, help="checkpoint every K [run]")
    r("--resume", action="store_true", help="continue from out_dir/ckpt.pt [run]")
    r("--deterministic", action="store_true", help="deterministic kernels; on CUDA sets "
      "CUBLAS_WORKSPACE_CONFIG=:4096:8 [run]")
    r("--amp", default="off", choices=["off", "bf16"], help="bf16 autocast of forwards [run]")
    args = p.parse_args(argv)

    if args.out_dir is None:
        args.out_dir = common.default_out_dir("gd_stable", args, vars(p.parse_args([])))
    toy, mnist_like = args.dataset == "mog8", args.dataset in ("stacked_mnist", "mnist")
    size = {"stacked_mnist": 28, "mnist": 28, "cifar10": 32}.get(args.dataset)  # the data's side
    side = 28 if mnist_like or args.dataset == "shapes" else 32      # default --img-size, images
    # card Sec. 2.7: flag -> (mog8: official, images: ours / DCGAN)
    for k, (mog8, images) in dict(
            lr=(1e-4, 2e-4), batch_size=(512, 64), steps=(100_001, 50_000), z_dim=(256, 100),
            g_width=(128, 64), d_width=(128, 64), mode_samples=(2500, 26_000),
            eval_every=(1000, 5000 if mnist_like else 0),
            img_size=(None, side)).items():
        if getattr(args, k) is None:
            setattr(args, k, mog8 if toy else images)
    for bad, message in (
            (not (args.dataset in DATASETS[:-1] or args.dataset.startswith("folder:")),
             f"unknown dataset {args.dataset!r}; valid: {', '.join(DATASETS)}"),
            (max(args.betas) >= 1, f"--betas must be < 1, got {args.betas}"),
            (size and args.img_size != size, f"--dataset {args.dataset} needs --img-size {size}"),
            (args.eval_every and not (toy or mnist_like), "mode metrics exist for mog8 and "
             f"(stacked_)mnist, not {args.dataset}: pass --eval-every 0"),
            (args.fid_every and args.dataset in ("mog8", "stacked_mnist"), "--fid-every needs a "
             "set common.load_dataset loads; for stacked_mnist score --export-samples with fid.py"),
            (args.d_steps > 1 and args.update == "simultaneous", "--d-steps: alternating only")):
        if bad:
            p.error(message)
    return args


# ==== Data ====
_ANGLES = torch.arange(8, dtype=torch.float64) * 2 * math.pi / 8   # 2 pi k / 8 [official]
MOG8_CENTERS = (2.0 * torch.stack([_ANGLES.sin(), _ANGLES.cos()], 1)).float()  # (8, 2): r = 2


def sample_mog8(n, device, std=0.02, generator=None):
    """Equal-weight mixture, std 0.02 [official sample_mog]; the global RNG unless given one."""
    k = torch.randint(8, (n,), device=device, generator=generator)
    noise = torch.randn(n, 2, device=device, generator=generator)
    return MOG8_CENTERS.to(device)[k] + std * noise


class StackedMNIST(torch.utils.data.Dataset):
    """Three independent MNIST digits as R, G, B; y = 100 d_R + 10 d_G + d_B (1000 modes) [card]."""

    def __init__(self, mnist, seed):
        self.images, self.labels = mnist.data, mnist.targets           # (N, 28, 28) uint8, (N,)
        g = torch.Generator().manual_seed(seed)                         # indices from the run seed
        self.idx = torch.randint(len(self.images), (len(self.images), 3), generator=g)  # (N, 3)

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, i):
        j = self.idx[i]                                                 # (3,) MNIST indices
        x = self.images[j].float().div(127.5).sub(1.0)                  # (3, 28, 28) in [-1, 1]
        return x, int((self.labels[j] * torch.tensor([100, 10, 1])).sum())


def build_data(args, device, step):
    """(reals for the figures, draw): draw() -> (x_real, z) is a fresh batch per player step, and
    an image stream started at `step` gives the batches an uninterrupted run would. The first
    images are read now, so a bad file fails at start-up."""
    ds, batches = None, None
    if args.dataset == "stacked_mnist":
        ds = StackedMNIST(common.load_dataset("mnist", args.data_root), args.seed)
    elif args.dataset != "mog8":
        ds = common.load_dataset(args.dataset, args.data_root, args.img_size)
    if ds is None:
        reals = sample_mog8(512, "cpu", generator=torch.Generator().manual_seed(args.seed))
    else:
        reals = torch.stack([ds[i][0] for i in range(min(64, len(ds)))])
        per_step = 1 if args.update == "simultaneous" else args.d_steps + 1   # batches per step
        batches = common.infinite_batches(ds, args.batch_size, args.seed, step * per_step,
                                          args.num_workers)
        if len(ds) < args.batch_size:
            raise common.UserError(f"{args.dataset}: {len(ds)} items < --batch-size "
                                   f"{args.batch_size}")

    def draw():
        x = sample_mog8(args.batch_size, device) if ds is None else next(batches)[0].to(device)
        return x, torch.randn(len(x), args.z_dim, device=device)
    return reals, draw


# ==== Models ====
def orthogonal_init(m, gain=0.8):
    """Orthogonal weights (gain 0.8), zero biases on every FC layer [official slim arg_scope]."""
    if isinstance(m, nn.Linear):
        nn.init.orthogonal_(m.weight, gain=gain)
        nn.init.zeros_(m.bias)


class MLPGenerator(nn.Sequential):
    """z (256) -> 128 ReLU -> 128 ReLU -> 2 [official generator, n_layer=2]."""

    def __init__(self, z_dim=256, width=128):
        super().__init__(nn.Linear(z_dim, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 2))
        self.config = dict(arch="mlp", z_dim=z_dim, width=width)     # for load_generator
        self.apply(orthogonal_init)


class MLPDiscriminator(nn.Sequential):
    """x / 4 -> 128 ReLU -> 1 logit, unbounded [official discriminator, n_layer=1]."""

    def __init__(self, width=128):
        super().__init__(nn.Linear(2, width), nn.ReLU(), nn.Linear(width, 1))
        self.apply(orthogonal_init)

    def forward(self, x):
        return super().forward(x / 4.0)                                # official tf.divide(x, 4.0)


# DEVIATION / UNSPECIFIED: no image architecture in the paper text we could check nor in the
# official repo: the card's DCGAN, channels in units of the base width (default 64).
# image size -> (start size, G channels / width, D channels / width)
DCGAN = {28: (7, (2, 1), (1, 2)), 32: (4, (8, 4, 2), (1, 2, 4))}


def dcgan_init(m):
    """N(0, 0.02) conv/linear weights, BN weight N(1, 0.02), zero biases (DCGAN convention)."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.BatchNorm2d)):
        nn.init.normal_(m.weight, 1.0 if isinstance(m, nn.BatchNorm2d) else 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class DCGANGenerator(nn.Module):
    """z -> Linear -> BN ReLU (c0 x s0 x s0) -> [ConvT 4x4 s2, BN, ReLU]* -> ConvT 4x4 s2, tanh."""

    def __init__(self, z_dim=100, channels=3, img_size=28, width=64):
        super().__init__()
        self.config = dict(arch="dcgan", z_dim=z_dim, channels=channels, img_size=img_size,
                           width=width)                                # for load_generator
        s0, ch = DCGAN[img_size][0], [k * width for k in DCGAN[img_size][1]]
        self.shape = (ch[0], s0, s0)
        self.fc = nn.Linear(z_dim, ch[0] * s0 * s0, bias=False)        # = ConvT 4x4 s1 on 1x1
        layers = [nn.BatchNorm2d(ch[0]), nn.ReLU()]
        for a, b in zip(ch, ch[1:]):
            layers += [nn.ConvTranspose2d(a, b, 4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(b), nn.ReLU()]
        layers += [nn.ConvTranspose2d(ch[-1], channels, 4, stride=2, padding=1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.apply(dcgan_init)

    def forward(self, z):
        return self.net(self.fc(z).view(-1, *self.shape))   # (B, c0, s0, s0) -> (B, C, H, W)


class DCGANDiscriminator(nn.Module):
    """[Conv 4x4 s2 (BN from the second on), LeakyReLU 0.2]* -> flatten -> Linear -> 1 logit."""

    def __init__(self, channels=3, img_size=28, width=64):
        super().__init__()
        ch = [k * width for k in DCGAN[img_size][2]]
        layers = []
        for i, (a, b) in enumerate(zip([channels] + ch, ch)):
            layers.append(nn.Conv2d(a, b, 4, stride=2, padding=1, bias=i == 0))
            layers += [nn.BatchNorm2d(b), nn.LeakyReLU(0.2)] if i > 0 else [nn.LeakyReLU(0.2)]
        self.net = nn.Sequential(*layers, nn.Flatten())                # (B, c * s * s)
        self.fc = nn.Linear(ch[-1] * (img_size // 2 ** len(ch)) ** 2, 1)
        self.apply(dcgan_init)

    def forward(self, x):
        return self.fc(self.net(x))


class Monomial(nn.Module):
    """c * u^k in float64: the toys' D_psi(x) = psi x, D_w(x) = w x^2, G_a(z) = a z [card 2.6]."""

    def __init__(self, c, k=1):
        super().__init__()
        self.c, self.k = nn.Parameter(torch.as_tensor(c, dtype=torch.float64).clone()), k

    def forward(self, u):                                              # (B, 1) -> (B, N games)
        return self.c * u ** self.k


def build_models(args, channels, device):
    """G, D, opt_G, opt_D: the same optimizer settings for both players [official]."""
    if args.dataset == "mog8":
        G, D = MLPGenerator(args.z_dim, args.g_width), MLPDiscriminator(args.d_width)
    else:
        G = DCGANGenerator(args.z_dim, channels, args.img_size, args.g_width)
        D = DCGANDiscriminator(channels, args.img_size, args.d_width)
    G, D = G.to(device), D.to(device)
    # DEVIATION: torch Adam's eps placement differs from Keras 1.2's (immaterial at 1e-8)
    opts = [torch.optim.SGD(m.parameters(), lr=args.lr) if args.optimizer == "sgd" else
            torch.optim.Adam(m.parameters(), lr=args.lr, betas=tuple(args.betas), eps=args.adam_eps)
            for m in (G, D)]
    return G, D, *opts


def load_generator(ckpt_path, device="cpu"):
    """G rebuilt from a gd_stable ckpt.pt alone, in eval mode (as sample() draws; UNSPECIFIED)."""
    state = common.load_checkpoint(ckpt_path, device)
    config = dict(state["G_config"])
    G = (MLPGenerator if config.pop("arch") == "mlp" else DCGANGenerator)(**config)
    G.load_state_dict(state["G"])
    return G.to(device).eval()


# ==== Losses ====
def f_concave(t, loss):
    """f(t) = -log(1 + e^-t) = log sigmoid(t) (GAN: f''(0) = -1/4 < 0), or t (WGAN) [Sec. 2]."""
    return -F.softplus(-t) if loss == "gan" else t


def expect(v, weights=None):
    """E over dim 0 (batch mean, or quadrature with `weights`), summed over games (dims > 0)."""
    if weights is None:
        return v.mean(0).sum()
    return (weights.view(-1, *[1] * (v.dim() - 1)) * v).sum(0).sum()


def game_value(d_real, d_fake, *, loss, weights=None):
    """V(theta_G, theta_D) = E_x f(D(x)) + E_z f(-D(G(z))) [Sec. 2; official
    V = -(BCE(real, 1) + BCE(fake, 0))]."""
    return expect(f_concave(d_real, loss), weights) + expect(f_concave(-d_fake, loss), weights)


def gradient_norm_penalty(V, d_params):
    """R = ||grad_{theta_D} V||^2: one global squared norm over all D tensors (pitfall 5),
    differentiable in theta_G [reg. sec.; official square(global_norm(gradients(V, disc_vars)))]."""
    grads = torch.autograd.grad(V, d_params, create_graph=True)    # pitfall 4: keep the graph
    return sum(g.pow(2).sum() for g in grads)


# ==== Train step ====
def game_scores(G, D, x_real, z, *, amp=False, grad_G=True):
    """(D(x), D(G(z))): real and fake in separate D passes (UNSPECIFIED; pitfall 9: BN)."""
    with torch.autocast(x_real.device.type, dtype=torch.bfloat16, enabled=amp):
        with torch.set_grad_enabled(grad_G):
            x_fake = G(z)
        d_real, d_fake = D(x_real), D(x_fake)
    return (d_real.float(), d_fake.float()) if amp else (d_real, d_fake)


def player_grads(G, D, x_real, z, *, eta, loss="gan", g_objective="minimax", weights=None,
                 amp=False, with_d=False, diagnostics=False):
    """At one point (theta_D, theta_G), on one batch: grad_G (V + eta R), which G descends, and
    (with_d) grad_D V, which D ascends; plus V and the logged norms [Sec. 2; reg. sec.]."""
    d_params, g_params = list(D.parameters()), list(G.parameters())
    d_real, d_fake = game_scores(G, D, x_real, z, amp=amp)   # real term in V and R (pitfall 3)
    V = game_value(d_real, d_fake, loss=loss, weights=weights)
    # minimax: G minimizes V itself (analysed, official); nonsat: -E f(D(G(z))), by flag only
    obj = V if g_objective == "minimax" else -expect(f_concave(d_fake, loss), weights)
    R = gradient_norm_penalty(V, d_params) if eta > 0 or diagnostics else None
    # reg. sec., the regularized update: theta_G <- theta_G - alpha grad_G (V + eta ||grad_D V||^2)
    loss_G = obj + eta * R if eta > 0 else obj                     # eta = 0: the plain G step
    g_G = torch.autograd.grad(loss_G, g_params, retain_graph=with_d or diagnostics)
    # autograd.grad, not backward: the G step never leaves a gradient on D (checklist 5)
    g_D = torch.autograd.grad(V, d_params, retain_graph=diagnostics) if with_d else None
    out = {"V": V.detach(), "loss_G": loss_G.detach()}
    if diagnostics:                                        # official ||grad_D V||, ||grad_G V||
        g_V = g_G if loss_G is V else torch.autograd.grad(V, g_params)
        grad_G = torch.sqrt(sum(g.pow(2).sum() for g in g_V))
        out.update(R=R.detach(), grad_D=R.detach().sqrt(), grad_G=grad_G)
    return g_G, g_D, out


def descend(opt, net, grads, clip=0.0):
    """One optimizer step along -grads; clip > 0 then clamps every weight to [-clip, clip]."""
    for p, g in zip(net.parameters(), grads):
        p.grad = g.detach()
    opt.step()
    with torch.no_grad():
        for p in net.parameters() if clip > 0 else []:             # --d-clip (WGAN weight clip)
            p.clamp_(-clip, clip)


def train_step(G, D, opt_G, opt_D, batches_D, batch_G, *, eta, loss="gan", g_objective="minimax",
               update="alternating", weights=None, amp=False, d_clip=0.0, diagnostics=False):
    """One G iteration [Sec. 2; reg. sec.]:
        theta_D <- theta_D + alpha grad_D V                           (no regularizer on D)
        theta_G <- theta_G - alpha grad_G (V + eta ||grad_D V||^2)
    simultaneous (the analysis): both gradients at one point on batches_D[0], then both steps;
    alternating (official): one D step per batch in batches_D, then the G step on batch_G."""
    kw = dict(eta=eta, loss=loss, g_objective=g_objective, weights=weights, amp=amp)
    if update == "simultaneous":
        g_G, g_D, out = player_grads(G, D, *batches_D[0], with_d=True, diagnostics=diagnostics,
                                     **kw)
        descend(opt_D, D, [-g for g in g_D], clip=d_clip)          # ascent on V
        descend(opt_G, G, g_G)
        return {**out, "loss_D": -out["V"]}
    for x_real, z in batches_D:             # PAPER-VS-CODE: official alternating, fresh batches
        d_real, d_fake = game_scores(G, D, x_real, z, amp=amp, grad_G=False)
        loss_D = -game_value(d_real, d_fake, loss=loss, weights=weights)  # -V; eta absent
        descend(opt_D, D, torch.autograd.grad(loss_D, list(D.parameters())), clip=d_clip)
    g_G, _, out = player_grads(G, D, *batch_G, diagnostics=diagnostics, **kw)
    descend(opt_G, G, g_G)
    return {**out, "loss_D": loss_D.detach()}


def toy_game(toy, d0, g0):
    """(D, G, x, z, weights) of a card 2.6 toy, float64. "dirac": p_data = delta_0, z = 1,
    G = delta_theta, D_psi(x) = psi x. "uniform" (the streamline system, exp. sec.): x, z ~
    U[-1, 1], D_w(x) = w x^2, G_a(z) = a z, E by 64-point Gauss-Legendre (exact to degree 127)."""
    if toy == "dirac":
        one = torch.ones(1, 1, dtype=torch.float64)
        return Monomial(d0), Monomial(g0), 0 * one, one, None
    x, w = np.polynomial.legendre.leggauss(64)
    x = torch.tensor(x).view(-1, 1)                                # (64, 1) nodes
    return Monomial(d0, k=2), Monomial(g0), x, x, torch.tensor(w / 2)


def toy_run(toy, loss, eta, lr, steps, d0, g0):
    """Simultaneous plain gradient steps through train_step; returns the final (D's c, G's c)."""
    D, G, x, z, q = toy_game(toy, d0, g0)
    opt_D, opt_G = torch.optim.SGD(D.parameters(), lr=lr), torch.optim.SGD(G.parameters(), lr=lr)
    for _ in range(steps):
        train_step(G, D, opt_G, opt_D, [(x, z)], None, eta=eta, loss=loss, update="simultaneous",
                   weights=q)
    return D.c.item(), G.c.item()


def uniform_quadratic_field(loss, eta, w, a):
    """(dw/dt, da/dt) = (grad_w V, -grad_a (V + eta R)) for N independent games (w, a: (N,))."""
    D, G, x, z, q = toy_game("uniform", w, a)
    g_G, g_D, _ = player_grads(G, D, x, z, eta=eta, loss=loss, weights=q, with_d=True)
    return g_D[0].detach(), -g_G[0].detach()


# ==== Eval ====
def _paint(img, pts, rgb, lo, hi, dot=1):
    """Paints points (N, 2) of [lo, hi] into img (S, S, 3) uint8, y up, as (2 dot + 1)^2 squares."""
    s = img.shape[0]
    col = ((pts[:, 0] - lo[0]) / (hi[0] - lo[0]) * (s - 1)).round().long()
    row = ((hi[1] - pts[:, 1]) / (hi[1] - lo[1]) * (s - 1)).round().long()
    for dr, dc in itertools.product(range(-dot, dot + 1), repeat=2):
        r, c = row + dr, col + dc
        ok = (r >= 0) & (r < s) & (c >= 0) & (c < s)
        img[r[ok], c[ok]] = torch.tensor(rgb, dtype=torch.uint8)


@torch.no_grad()
def streamline_figure(path, eta=0.5, size=256, grid=9, n_steps=150, dt=0.03):
    """Streamlines of the uniform/quadratic toy, w (D) across, a (G) up; panels GAN, GAN + eta R,
    WGAN, WGAN + eta R; lines darken along the flow; red: the equilibrium (0, 1) [exp. sec.]."""
    lo, hi = (-1.0, 0.0), (1.0, 2.0)                               # UNSPECIFIED: plotted region
    axes = [torch.linspace(lo[i], hi[i], grid + 2, dtype=torch.float64)[1:-1] for i in (0, 1)]
    w0, a0 = torch.meshgrid(*axes, indexing="ij")
    panels = []
    for loss, e in itertools.product(("gan", "wgan"), (0.0, eta)):
        img, w, a = torch.full((size, size, 3), 255, dtype=torch.uint8), w0.flatten(), a0.flatten()
        for t in range(n_steps):                                   # (N,) independent games
            with torch.enable_grad():
                dw, da = uniform_quadratic_field(loss, e, w, a)
            move = dt / (dw ** 2 + da ** 2).sqrt().clamp_min(1e-9)  # unit-speed streamlines
            w1, a1 = w + move * dw, a + move * da
            for s in (0.0, 0.33, 0.67):                            # segment points < 1 px apart
                pts = torch.stack([w + s * (w1 - w), a + s * (a1 - a)], 1)
                _paint(img, pts, (round(217 * (1 - t / n_steps)),) * 3, lo, hi, dot=0)
            w, a = w1, a1
        _paint(img, torch.tensor([[0.0, 1.0]]), (220, 30, 30), lo, hi, dot=2)
        img[:, -3:] = 128                                          # a grey gap between panels
        name = loss.upper() + (f" + eta R, eta {e:g}" if e else ", eta 0")
        panels.append(common.title_strip(img.permute(2, 0, 1), [name]))     # (3, H, W)
    lines = ["uniform/quadratic toy: x, z ~ U[-1, 1], D_w(x) = w x^2, G_a(z) = a z",
             f"w (D) in [{lo[0]:g}, {hi[0]:g}] across, a (G) in [{lo[1]:g}, {hi[1]:g}] up; "
             "lines grey -> black along the flow"]
    common.save_png(common.title_strip(torch.cat(panels, dim=2), lines,
                                       key=[("equilibrium (w, a) = (0, 1)", (220, 30, 30))]), path)


@torch.no_grad()
def mog8_modes(x, std=0.02, min_frac=0.01):
    """(modes covered of 8, high-quality fraction): high quality = within 3 std of the nearest
    centre; a mode is covered if it holds >= 1% of all samples as high-quality ones [DEVIATION:
    ours, card Sec. 4]."""
    dist, k = torch.cdist(x.float().cpu(), MOG8_CENTERS).min(1)   # (N,)
    hq = dist <= 3 * std
    counts = torch.bincount(k[hq], minlength=8)
    return int((counts >= min_frac * len(x)).sum()), hq.float().mean().item()


@torch.no_grad()
def digit_modes(x, classifier, chunk=1000):
    """(distinct digit tuples, KL(mode histogram || uniform over 10^C)) for images x (N, C, 28, 28)
    [DEVIATION: ours, card Sec. 4; stacked MNIST has C = 3, 1000 modes]."""
    n, c = x.shape[:2]
    dev = next(classifier.parameters()).device
    digits = torch.cat([classifier(x[i:i + chunk].to(dev).reshape(-1, 1, 28, 28)).argmax(1).cpu()
                        for i in range(0, n, chunk)]).view(n, c)  # (N, C)
    mode = (digits * 10 ** torch.arange(c - 1, -1, -1)).sum(1)
    p = torch.bincount(mode, minlength=10 ** c).double() / n
    kl = (p[p > 0] * (p[p > 0] * 10 ** c).log()).sum().item()
    return int((p > 0).sum()), kl


def mnist_classifier(seed=0):
    """Per-channel digit classifier for the mode metric, (B, 1, 28, 28) -> (B, 10) logits [ours]."""
    with torch.random.fork_rng(devices=[]):                # its init leaves the training RNG alone
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(),
                             nn.Linear(128, 10))


def train_classifier(train_set, test_set, steps, device, seed, batch=128):
    """Small CNN on MNIST (uint8 .data/.targets), own RNG; returns (model, test accuracy) [ours]."""
    clf = mnist_classifier(seed).to(device)
    g, opt = torch.Generator().manual_seed(seed), torch.optim.Adam(clf.parameters(), lr=1e-3)
    progress = common.Progress("MNIST classifier", steps, unit="step")
    for _ in range(steps):
        i = torch.randint(len(train_set.data), (batch,), generator=g)
        x = train_set.data[i].float().div(127.5).sub(1.0).unsqueeze(1)  # (B, 1, 28, 28), [-1, 1]
        loss = F.cross_entropy(clf(x.to(device)), train_set.targets[i].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        progress.update(1, loss=loss.item())
    with torch.no_grad():
        pred = torch.cat([clf(x.float().div(127.5).sub(1.0).unsqueeze(1).to(device)).argmax(1)
                          for x in test_set.data.split(1000)]).cpu()
    return clf.eval(), (pred == test_set.targets).float().mean().item()


def load_classifier(args, device, state, min_acc=0.98):
    """From the checkpoint, or trained here; >= 98% MNIST test accuracy required [card Sec. 4]."""
    clf = mnist_classifier().to(device)
    if state is not None and "classifier" in state:
        clf.load_state_dict(state["classifier"])
        return clf.eval()
    clf, acc = train_classifier(common.load_dataset("mnist", args.data_root),
                                common.load_dataset("mnist", args.data_root, train=False),
                                args.classifier_steps, device, args.seed)
    print(f"MNIST classifier: test accuracy {acc:.4f}", flush=True)
    if acc < min_acc:
        raise common.UserError(f"MNIST classifier test accuracy {acc:.4f} < {min_acc}: "
                               "raise --classifier-steps")
    return clf


@torch.no_grad()
def sample(G, z, device, chunk=2000):
    """G(z) in chunks, in eval mode (UNSPECIFIED: eval-mode BN statistics when sampling)."""
    G.eval()
    out = torch.cat([G(z[i:i + chunk].to(device)).float() for i in range(0, len(z), chunk)])
    G.train()                                                      # G always trains in train mode
    return out


class Evaluator:
    """The eval flags' metrics, built at start-up (classifier, FID weights and reference
    statistics); their z come from own generators, never from the training RNG stream."""

    def __init__(self, args, device, state):
        self.args, self.device, self.toy, self.fid = args, device, args.dataset == "mog8", None
        gen = torch.Generator().manual_seed(args.seed + 1)
        self.z = torch.randn(args.mode_samples, args.z_dim, generator=gen)  # the same at each eval
        self.classifier = None if self.toy or not args.eval_every else load_classifier(
            args, device, state)
        if args.fid_every:
            try:
                import fid  # evaluation only: a copy of this script without fid.py still trains
            except ImportError:
                raise common.UserError("--fid-every needs fid.py (the project's metric file) "
                                       "next to gd_stable.py") from None
            self.fid = fid.TrainingFID(args.dataset, args.data_root, args.img_size, device,
                                       args.fid_samples, weights=args.fid_weights)

    def due(self, step):                      # the metrics of `step`: every K steps and the last
        a = self.args
        return [k for k, every in (("modes", a.eval_every), ("fid", a.fid_every))
                if every and (step % every == 0 or step == a.steps)]

    def __call__(self, G, due):
        out = {}
        if "modes" in due:
            x = sample(G, self.z, self.device)
            names = ("modes", "hq") if self.toy else ("modes", "kl")
            out.update(zip(names, mog8_modes(x) if self.toy else digit_modes(x, self.classifier)))
        if "fid" in due:
            gen = torch.Generator().manual_seed(self.args.seed + 3)  # the same z at every FID
            out.update(self.fid(lambda n: sample(
                G, torch.randn(n, self.args.z_dim, generator=gen), self.device)))
        return out


def save_figure(args, step, reals, fake=None, lim=3.0, size=320):
    """reals.png (fake None) or samples/<step>.png: for mog8 a scatter of generated (green) over
    real (orange) points with a title strip; for images an 8x8 grid."""
    path = os.path.join(args.out_dir, *(["reals.png"] if fake is None else
                                        ["samples", f"{step:07d}.png"]))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if args.dataset != "mog8":
        return torchvision.utils.save_image(reals if fake is None else fake, path, nrow=8,
                                            normalize=True, value_range=(-1, 1))
    img = torch.full((size, size, 3), 255, dtype=torch.uint8)
    _paint(img, reals, common.REAL_RGB, (-lim, -lim), (lim, lim), dot=2)
    key = [("real", common.REAL_RGB)]
    head = f"gd_stable mog8 | real: 8 Gaussians, std 0.02, {len(reals)} points"
    if fake is not None:
        _paint(img, fake, common.FAKE_RGB, (-lim, -lim), (lim, lim), dot=1)
        key.append((f"generated: G(fixed z), {len(fake)} points", common.FAKE_RGB))
        head = f"gd_stable mog8 | step {step}/{args.steps} | eta {args.eta:g} | {args.loss} | " \
               f"{args.update}"
    lines = [head, f"x in [-{lim:g}, {lim:g}] across, y in [-{lim:g}, {lim:g}] up"]
    common.save_png(common.title_strip(img.permute(2, 0, 1), lines, key=key), path)


def export_samples(G, args, device, chunk=1000):
    """out_dir/samples_N.npz from its own RNG: "images" uint8 (N, H, W, C) quantised as save_image
    (common.quantize), or for mog8 "points" float32 (N, 2)."""
    z = torch.randn(args.export_samples, args.z_dim,
                    generator=torch.Generator().manual_seed(args.seed + 2))
    path = os.path.join(args.out_dir, f"samples_{args.export_samples}.npz")
    if args.dataset == "mog8":
        return np.savez(path, points=sample(G, z, device).numpy())
    np.savez(path, images=torch.cat([common.quantize(sample(G, zc, device))
                                     for zc in z.split(chunk)]).numpy())


# ==== Main ====
def main(argv=None):
    common.single_process("gd_stable")
    args = parse_args(argv)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = common.get_device(args.device)
    if args.deterministic and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = not args.deterministic
    torch.use_deterministic_algorithms(args.deterministic)
    run = common.Run(args, "gd_stable", total=args.steps, mutable=MUTABLE)

    state = run.load(device)
    step = 0 if state is None else state["step"]
    reals, draw = build_data(args, device, step)
    G, D, opt_G, opt_D = build_models(args, reals.shape[1], device)
    fixed_z = torch.randn(len(reals) if args.dataset == "mog8" else 64, args.z_dim,
                          generator=torch.Generator().manual_seed(args.seed))
    if state is not None:
        for obj, key in ((G, "G"), (D, "D"), (opt_G, "opt_G"), (opt_D, "opt_D")):
            obj.load_state_dict(state[key])
        for group in opt_G.param_groups + opt_D.param_groups:
            group["lr"] = args.lr                 # a new --lr on --resume takes effect (MUTABLE)
        fixed_z = state["fixed_z"].cpu()
    rng = state["rng"] if state is not None else common.rng_state()
    evaluator = Evaluator(args, device, state)     # a classifier, FID: not the training stream
    common.set_rng_state(rng)
    run.start(step, device, G=G, D=D)
    if step == 0:
        save_figure(args, 0, reals)
    if args.streamlines:                            # eta 0: the regularized panels at 0.5
        streamline_figure(os.path.join(args.out_dir, "streamlines.png"),
                          eta=args.eta if args.eta > 0 else 0.5)

    while step < args.steps and not run.stopping:
        batches_D = [draw() for _ in range(args.d_steps)]          # a fresh batch per D step
        batch_G = draw() if args.update == "alternating" else None  # and one for the G step
        due = evaluator.due(step + 1)
        log = bool(due) or (step + 1) % args.log_every == 0 or step + 1 == args.steps
        out = train_step(G, D, opt_G, opt_D, batches_D, batch_G, eta=args.eta, loss=args.loss,
                         g_objective=args.g_objective, update=args.update,
                         amp=args.amp == "bf16", d_clip=args.d_clip, diagnostics=log)
        step += 1
        if log:                                     # DEVIATION: diagnostics at log steps only
            run.log(step, {**out, **evaluator(G, due)})
        if args.sample_every and (step % args.sample_every == 0 or step == args.steps):
            save_figure(args, step, reals, sample(G, fixed_z, device))
        if step % args.ckpt_every == 0 or step == args.steps or run.stopping:
            clf = {"classifier": evaluator.classifier.state_dict()} if evaluator.classifier else {}
            run.save(step, {"G": G.state_dict(), "G_config": G.config, "D": D.state_dict(),
                            "opt_G": opt_G.state_dict(), "opt_D": opt_D.state_dict(),
                            "fixed_z": fixed_z, "rng": common.rng_state(), **clf})
    if args.export_samples and not run.stopping:
        export_samples(G, args, device)
    return run.finish(step, device)


if __name__ == "__main__":
    common.cli(main)
