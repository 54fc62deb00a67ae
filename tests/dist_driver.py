"""Driver of tests/test_torchrun.py: `torchrun --standalone --nproc_per_node 2 tests/dist_driver.py
OUT [SCRIPT ...]` imports each script of tiny_args.DIST once and calls its main() several times in
the same two processes (so `import torch` is paid once), all in OUT/<script>/:

  single/   rank 0 alone with WORLD_SIZE=1 (rank 1 waits): k steps, global batch
  full/     both ranks: k steps
  part/     both ranks, k steps, but rank 1 alone gets a stop request at its first save at or
            after step `stop` (what SIGTERM does under common.cli), so both save and stop; then
            --resume to k
  rank1-full.pt, rank1-part.pt   rank 1's last state passed to common.Run.save (never a file
            rank 1 writes inside main: the driver writes them after main returned)
  report.json   per run: what rank 1 wrote under OUT while main ran (an audit hook sees every
            open for writing, mkdir, rename, replace and remove) and how much it printed

The test reads those files and asserts; this file only runs things."""
import contextlib
import copy
import importlib
import io
import json
import os
import signal
import sys

import torch
import torch.distributed as tdist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import common  # noqa: E402
from tiny_args import DIST  # noqa: E402

WRITES, AUDIT = [], {"on": False, "root": ""}
_WRITE_EVENTS = {"os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "os.truncate",
                 "os.symlink", "os.link", "shutil.copyfile", "shutil.move", "shutil.rmtree"}


def _audit(event, args):
    if not AUDIT["on"] or not (event == "open" or event in _WRITE_EVENTS):
        return
    if event == "open":
        path, mode, flags = args
        writing = (mode is not None and any(c in mode for c in "wax+")) or (
            mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if not writing:
            return
    else:
        path = args[0]
    if isinstance(path, (str, bytes, os.PathLike)):
        path = os.path.abspath(os.fsdecode(path))
        if path.startswith(AUDIT["root"]):
            WRITES.append(f"{event} {os.path.relpath(path, AUDIT['root'])}")


def main():
    out = os.path.abspath(sys.argv[1])
    scripts = sys.argv[2:] or list(DIST)
    torch.set_num_threads(1)
    tdist.init_process_group("gloo")
    rank = tdist.get_rank()
    AUDIT["root"] = out
    sys.addaudithook(_audit)
    saved, arm = {}, {"at": None}
    real_save = common.Run.save

    def save(self, step, state):   # keeps this rank's last state (rank 1's is never written)
        saved["state"] = copy.deepcopy({"script": self.script, "step": step, **state})
        if arm["at"] is not None and step >= arm["at"] and rank == 1 and not common._STOP:
            common._STOP.append(signal.SIGTERM)    # cli()'s handler, without its message
        return real_save(self, step, state)

    common.Run.save = save
    for script in scripts:
        spec = DIST[script]
        mod = importlib.import_module(script[:-3])
        d = os.path.join(out, script[:-3])
        argv = [*spec["argv"], "--seed", "0"]
        report = {}

        def call(name, steps, resume=False, world=True, stop=None):
            tdist.barrier()                     # the previous run's files are complete
            env = {} if world else {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}
            old = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            WRITES.clear()
            printed = io.StringIO()
            AUDIT["on"], arm["at"] = rank == 1, stop
            try:
                with contextlib.redirect_stdout(printed) if rank == 1 else \
                        contextlib.nullcontext():
                    mod.main([*argv, spec["length"], str(steps), "--out-dir",
                              os.path.join(d, name), *(["--resume"] if resume else [])])
            finally:
                AUDIT["on"], arm["at"] = False, None
                common._STOP.clear()
                for k, v in old.items():
                    if v is None:
                        os.environ.pop(k)
                    else:
                        os.environ[k] = v
            report.setdefault(name, {"writes": [], "printed": ""})
            report[name]["writes"] += WRITES
            report[name]["printed"] += printed.getvalue()

        if spec["exact"] and rank == 0:         # the reference of an exact configuration
            call("single", spec["steps"], world=False)
        elif spec["exact"]:
            tdist.barrier()                     # pairs with the single run's barrier
        call("full", spec["steps"])
        if rank == 1:
            torch.save(saved["state"], os.path.join(d, "rank1-full.pt"))
        call("part", spec["steps"], stop=spec["stop"])
        call("part", spec["steps"], resume=True)
        if rank == 1:
            torch.save(saved["state"], os.path.join(d, "rank1-part.pt"))
            with open(os.path.join(d, "report.json"), "w") as f:
                json.dump(report, f, indent=1)
        tdist.barrier()
    tdist.destroy_process_group()


if __name__ == "__main__":
    main()
