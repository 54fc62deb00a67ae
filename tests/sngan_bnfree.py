"""sngan.py with G's BatchNorms replaced by Identity while main() runs: the BN-free configuration
of the exact torchrun check (tests/tiny_args.DIST, exact=True). No flag of sngan.py removes BN
(every paper G has it), so this test-side variant is the one place where 2 processes x B/2 must
equal 1 process x B to float tolerance; everything else is the script's own code."""
from unittest import mock

import torch.nn as nn

import sngan


def main(argv=None):
    with mock.patch.object(sngan, "bn", lambda c: nn.Identity()):   # ResNet G's only BN maker
        return sngan.main(argv)
