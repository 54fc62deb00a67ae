"""Issue 18's trap: a script's train_step that waits for the GPU fails the test, on the CPU.

What would wait for the GPU is a tensor read on the host: .item(), .tolist(), .numpy(), bool(),
float(), int(). trap_host_syncs(monkeypatch, module) replaces module.train_step with one that
runs the real step with those methods raising, except inside an optimizer's step(): torch's CPU
Adam reads its step counter there (fused on CUDA: no sync of ours to find there). Used by
tests/test_sngan.py, test_projection.py, test_progan.py and test_pix2pixhd.py; the mutants
"issue 18: a host sync (float of a loss) inside the train step" in tests/mutants.py prove it.
"""
import torch

SYNCS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__")


def trap_host_syncs(monkeypatch, module, prepare=lambda *a: a):
    """Wraps module.train_step (the optimizers among its arguments found by type). prepare(*args)
    runs before each step, outside the trap (hooks, reading the data), and returns the arguments
    to step with. Returns the list that collects train_step's outputs, one per call."""
    real, outs, in_opt, watched = module.train_step, [], [], set()

    def guard(original):
        def call(self, *a, **k):
            assert in_opt, f"host sync inside train_step: {original.__name__}"
            return original(self, *a, **k)
        return call

    def step(*a):
        a = prepare(*a)
        for opt in a:
            if isinstance(opt, torch.optim.Optimizer) and id(opt) not in watched:
                watched.add(id(opt))
                opt.register_step_pre_hook(lambda *_: in_opt.append(1))
                opt.register_step_post_hook(lambda *_: in_opt.pop())
        assert len(watched) >= 2, "train_step's optimizers not found among its arguments"
        with monkeypatch.context() as m:
            for name in SYNCS:
                m.setattr(torch.Tensor, name, guard(getattr(torch.Tensor, name)))
            outs.append(real(*a))
        return outs[-1]
    monkeypatch.setattr(module, "train_step", step)
    return outs
