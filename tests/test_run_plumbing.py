"""The run plumbing of common.py, through every training script's own main (issue: a run never
loses, corrupts or silently misleads).

One table of bad inputs runs against each script: each gets its one-line message (a UserError or
an argparse usage error) and leaves every file of an existing run as it was. A line cut off by a
kill does not block --resume, and a forced divergence stops at the first non-finite value with
the last good checkpoint kept. (SIGTERM and kill -9 then --resume: tests/test_standalone.py, in
the same subprocess that proves the script runs alone.) What differs per script: tiny_args.SPEC.
"""
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import common
from tiny_args import SPEC, TINY

ROOT = Path(__file__).resolve().parent.parent

SCRIPTS = [s for s in SPEC if (ROOT / s).exists() and TINY.get(s)]


def _module(script):
    import importlib
    return importlib.import_module(script[:-3])


def _argv(script, out, *extra):
    """TINY flags with `extra` overriding any flag it repeats (argparse keeps the last one)."""
    return [*TINY[script], "--out-dir", str(out), *extra]


def _snapshot(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(d).rglob("*")) if p.is_file()}


def _rows(d):
    return [json.loads(line) for line in (Path(d) / "metrics.jsonl").read_text().splitlines()]


def _untimed(rows):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished tiny run per script, copied by every case that needs an existing run."""
    made = {}

    def get(script):
        if script not in made:
            d = tmp_path_factory.mktemp(script[:-3]) / "run"
            _module(script).main(_argv(script, d))
            made[script] = d
        return made[script]
    return get


def _bad_inputs(script, tmp):
    """(name, argv-extra, needs an existing run, what to do to it, expected message regex)."""
    spec = SPEC[script]
    length = spec["length"]
    empty = tmp / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images")
    broken = tmp / "broken"
    broken.mkdir()
    for i in range(16):
        (broken / f"{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    cases = [
        ("zero length", [length, "0"], None, "expected an integer > 0"),
        ("negative batch", ["--batch-size", "-1"], None, "expected an integer > 0"),
        ("NaN lr", ["--lr", "nan"], None, "expected a finite number > 0"),
        ("zero log interval", ["--log-every", "0"], None, "expected an integer > 0"),
        ("zero checkpoint interval", ["--ckpt-every", "0"], None, "expected an integer > 0"),
        ("existing run without --resume", [], "as is", "exists: pass --resume"),
        ("stale metrics file", [], "drop ckpt", "left from an earlier run"),
        ("truncated checkpoint", ["--resume"], "truncate ckpt", "truncated or corrupt"),
        ("empty checkpoint", ["--resume"], "empty ckpt", "is empty"),
        ("foreign checkpoint", ["--resume"], "foreign ckpt", "not a checkpoint of"),
        ("malicious pickle", ["--resume"], "pickle ckpt", "refusing to load"),
        ("changed shape flag", ["--resume", *spec["shape"]], "as is",
         f"cannot change {spec['shape'][0]}"),
        ("resume without a checkpoint", ["--resume"], None, "does not exist"),
    ]
    if spec["folder"]:
        cases += [
            ("unknown dataset", ["--dataset", "no-such-set"], None, "unknown dataset"),
            ("empty folder", ["--dataset", f"folder:{empty}"], None, "no images"),
            ("corrupt image", ["--dataset", f"folder:{broken}"], None, "cannot read image"),
        ]
    return cases


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _damage(run_dir, how, script):
    ckpt = run_dir / "ckpt.pt"
    if how == "drop ckpt":
        ckpt.unlink()
    elif how == "truncate ckpt":
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    elif how == "empty ckpt":
        ckpt.write_bytes(b"")
    elif how == "foreign ckpt":
        state = torch.load(ckpt, weights_only=True)
        torch.save({**state, "script": "someone_else"}, ckpt)
    elif how == "pickle ckpt":
        torch.save({"script": script[:-3], "evil": _Evil()}, ckpt)


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_inputs_get_one_message_and_change_no_file(script, tmp_path, finished, capsys):
    main = _module(script).main
    for name, extra, damage, message in _bad_inputs(script, tmp_path):
        out = tmp_path / name.replace(" ", "_")
        if damage:
            shutil.copytree(finished(script), out)
            _damage(out, damage, script)
        before = _snapshot(out) if out.exists() else None
        with pytest.raises((common.UserError, SystemExit)) as e:
            main(_argv(script, out, *extra))
        text = str(e.value) if e.type is not SystemExit else capsys.readouterr().err
        if e.type is SystemExit:
            assert e.value.code == 2, (name, e.value.code)
            text = text.strip().splitlines()[-1]          # argparse: usage, then one error line
        else:
            assert "\n" not in common._first_line(e.value), name
        assert __import__("re").search(message, text), (name, text)
        after = _snapshot(out) if out.exists() else None
        assert after == before or (before is None and not any(after or {})), name


@pytest.mark.parametrize("script", SCRIPTS)
def test_cut_off_metrics_line_does_not_block_resume(script, tmp_path, finished):
    out = tmp_path / "run"
    shutil.copytree(finished(script), out)
    rows = _rows(out)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 99, "loss')                      # what a kill mid-write leaves
    spec = SPEC[script]
    n = int(TINY[script][TINY[script].index(spec["length"]) + 1])
    m = _module(script).main(_argv(script, out, "--resume", spec["length"], str(n + 1)))
    assert m["step"] == n + 1
    after = _rows(out)                                      # every line parses again
    assert _untimed(after[: len(rows)]) == _untimed(rows) and after[-1]["step"] == n + 1


@pytest.mark.parametrize("script", SCRIPTS)
def test_divergence_stops_at_the_first_non_finite_value_and_keeps_the_checkpoint(script, tmp_path):
    spec = SPEC[script]
    out = tmp_path / "run"
    argv = _argv(script, out, spec["length"], str(spec["total"]), "--log-every", "1",
                 "--ckpt-every", "1", *spec["nan"])
    with pytest.raises(common.NonFiniteError, match="NaN|nan|inf") as e:
        _module(script).main(argv)
    rows = _rows(out)                                       # strict JSON: NaN is written as null
    assert any(v is None for v in rows[-1].values()) or "hold NaN" in str(e.value), rows[-1]
    if (out / "ckpt.pt").exists():                          # the last good state, never NaN
        state = torch.load(out / "ckpt.pt", weights_only=True)
        assert not common._nonfinite(state) and state["step"] < spec["total"]
