"""fid.py's benchmark with pytorch-fid's own network beside ours (same weights, same batches, interleaved).

Not a test (pytest does not collect it) and not a runtime dependency: pytorch-fid is a dev-only extra.
    pip install pytorch-fid
    python tests/bench_pytorch_fid.py --weights pt_inception-2015-12-05-6726825d.pth --device cuda
Arguments are those of `python fid.py bench`."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fid  # noqa: E402
from pytorch_fid import inception as pf  # noqa: E402


def pytorch_fid_net(args):
    def build(model):
        # pytorch-fid loads its weights through this function; hand it ours so both nets are identical
        loader, pf.load_state_dict_from_url = pf.load_state_dict_from_url, lambda *a, **k: model.state_dict()
        try:
            theirs = pf.InceptionV3([3]).to(args.device).eval()
        finally:
            pf.load_state_dict_from_url = loader

        def extract(b):
            with fid.exact_fp32(), torch.no_grad():
                return theirs(b.to(args.device).float().div(255))[0].flatten(1).cpu().double().numpy()
        return {"pytorch_fid": extract}
    return build


if __name__ == "__main__":
    args = fid.parse_tool_args(["bench"] + sys.argv[1:])
    fid.bench(args, others=pytorch_fid_net(args))
