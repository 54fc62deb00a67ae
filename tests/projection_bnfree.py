"""projection.py with G's BatchNorms (CBN's BN0 and the final BN) replaced by Identity while main()
runs: the BN-free configuration of the exact torchrun check (tests/tiny_args.DIST, exact=True). No
flag of projection.py removes BN, so this test-side variant is the one place where 2 processes x
B/2 must equal 1 process x B (in float64, so that fp32 rounding of the summed gradients,
which Adam turns into lr-sized steps, does not hide the math); the rest is the script's code."""
from unittest import mock

import torch
import torch.nn as nn

import projection


def main(argv=None):
    with mock.patch.object(nn, "BatchNorm2d", lambda *a, **k: nn.Identity()):   # G's only BN
        torch.set_default_dtype(torch.float64)   # nets, z and the dequantized reals
        try:
            return projection.main(argv)
        finally:
            torch.set_default_dtype(torch.float32)
