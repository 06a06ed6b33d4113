"""Hostile or unlucky input: NaN settings, unbounded expansion, run names that escape runs_dir,
a run killed before its first checkpoint, a manifest that lists nothing, a full disk."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from hybridlab import checkpoint as ckpt_io
from hybridlab.config import ConfigError
from hybridlab.errors import UserError
from hybridlab.graph import parse_arch
from hybridlab.train import prepare, train
from hybridlab.train_config import parse_training
from tests.runs_helpers import TINY_ARCH, write_arch

ROOT = Path(__file__).parent.parent


def test_nan_and_inf_are_refused_with_their_path():
    with pytest.raises(ConfigError, match=r"defaults.sal.capacity: must be a finite number"):
        parse_arch({**TINY_ARCH, "defaults": {"sal": {"capacity": float("nan")}}})
    with pytest.raises(ConfigError, match=r"norm_eps: must be a finite number"):
        parse_arch({**TINY_ARCH, "norm_eps": float("nan")})
    with pytest.raises(ConfigError, match=r"training.lr: must be a finite number"):
        parse_training({"lr": float("nan")}, None, "x.yaml")
    with pytest.raises(ConfigError, match=r"temperature: must be a finite number"):
        parse_arch({**TINY_ARCH, "defaults": {"sal": {"temperature": float("inf")}}})


@pytest.mark.parametrize("layers, where", [
    ("M*999999999999", "pattern"),
    ("(((M*1000)*1000)*1000)", "pattern"),
    ([{"repeat": 1000, "body": [{"repeat": 1000, "body": [{"block": "mamba2", "repeat": 1000}]}]}],
     "layers[0]"),
    ([{"block": "mlp", "repeat": 100000}], "layers[0].repeat"),
])
def test_expansion_is_bounded_before_it_happens(layers, where):
    arch = {k: v for k, v in TINY_ARCH.items() if k != "pattern"}
    arch["pattern" if isinstance(layers, str) else "layers"] = layers
    with pytest.raises(ConfigError, match="more than 4096 layers") as e:
        parse_arch(arch)
    assert str(e.value).startswith(where)


def test_yaml_alias_bomb_and_deep_nesting_fail_cleanly():
    # each level repeats the one below 10 times through an alias: 10^9 layers if expanded
    levels = ["a0: &a0 [{block: mlp}]"]
    for i in range(1, 10):
        levels.append(f"a{i}: &a{i} [{{repeat: 10, body: *a{i - 1}}}]")
    text = "\n".join(levels) + "\nname: bomb\nd_model: 32\nvocab_size: 64\nlayers: *a9\n"
    data = yaml.safe_load(text)
    data = {k: v for k, v in data.items() if not k.startswith("a")}
    with pytest.raises(ConfigError, match="more than 4096 layers"):
        parse_arch(data)
    nested = [{"block": "mlp"}]
    for _ in range(40):
        nested = [{"body": nested}]
    with pytest.raises(ConfigError, match="nested deeper than 32"):
        parse_arch({**{k: v for k, v in TINY_ARCH.items() if k != "pattern"}, "layers": nested})
    with pytest.raises(ConfigError, match="nested deeper than 32"):
        parse_arch({**TINY_ARCH, "pattern": "(" * 40 + "M" + ")" * 40})


def test_a_model_too_large_to_allocate_is_refused_before_allocating():
    with pytest.raises(ConfigError, match=r"^d_model: the model would have .* parameters"):
        parse_arch({**TINY_ARCH, "d_model": 10**9, "defaults": {}})


@pytest.mark.parametrize("name", ["../escaped", "/tmp/abs-run", "a/b", "..", "."])
def test_run_names_cannot_leave_runs_dir(tmp_path, name):
    runs = tmp_path / "runs"
    with pytest.raises(ConfigError, match="training.run_name: must be a plain folder name"):
        prepare(str(write_arch(tmp_path, runs)), overrides={"run_name": name})
    assert not runs.exists() and not (tmp_path / "escaped").exists()


def test_cli_refuses_a_traversing_run_name_with_one_line(tmp_path):
    arch = write_arch(tmp_path, tmp_path / "runs")
    r = subprocess.run([sys.executable, "-m", "hybridlab", "train", str(arch), "--set", "run_name=../../x"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "run_name" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path.parent / "x").exists()


def test_sigkill_before_the_first_checkpoint_then_resume(tmp_path):
    """A run killed before it wrote any checkpoint is neither wedged nor lost: --resume starts
    it over from step 0 and finishes; a fresh start under the same name points to --resume."""
    runs = tmp_path / "runs"
    arch = write_arch(tmp_path, runs, steps=400, checkpoint_every=0, eval_every=0, run_name="k")
    cmd = [sys.executable, "-m", "hybridlab", "train", str(arch)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = runs / "k"
    deadline = time.time() + 120
    while not (run_dir / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (run_dir / "config.yaml").exists() and not ckpt_io.has_checkpoint(run_dir)
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    (run_dir / "checkpoints" / ".tmp-step_0000004-99999").mkdir()  # as if killed mid-write

    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "--resume" in again.stderr and "Traceback" not in again.stderr

    res = subprocess.run([sys.executable, "-m", "hybridlab", "train", "--resume", str(run_dir),
                          "--steps", "6"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "starting it over from step 0" in res.stdout
    assert ckpt_io.has_checkpoint(run_dir)
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[0] == 1  # one clean history, from the restart


def _checkpoint(tmp_path):
    run = prepare(str(write_arch(tmp_path, tmp_path / "runs", steps=2, eval_every=0)), overrides={"run_name": "c"})
    train(run, quiet=True)
    return ckpt_io.resolve(run.run_dir)


def test_a_manifest_listing_no_files_is_refused(tmp_path):
    ckpt = _checkpoint(tmp_path)
    ckpt_io.verify(ckpt)  # intact
    manifest = json.loads((ckpt / "manifest.json").read_text())
    (ckpt / "manifest.json").write_text(json.dumps({**manifest, "files": {}}))
    with pytest.raises(UserError, match="does not list model.safetensors"):
        ckpt_io.verify(ckpt)


def test_a_full_disk_leaves_no_half_written_checkpoint(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    root = tmp_path / "checkpoints"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(UserError, match="could not write checkpoint step_0000003: No space left"):
        ckpt_io.save_checkpoint(root, 3, model, {"step": 3}, "x: 1\n")
    assert list(root.iterdir()) == []


def test_report_step_is_the_training_step_not_an_eval_context(tmp_path):
    from hybridlab.report import read_scalars
    from hybridlab.tracking import Tracker

    tracker = Tracker(tmp_path)
    tracker.log(300, {"train/loss": 1.5, "val/loss": 1.6})
    tracker.writer.add_scalar("eval/ppl_vs_context", 4.2, 16384)  # as `hybridlab eval` logs it
    tracker.close()
    scalars, step = read_scalars(tmp_path)
    assert step == 300 and scalars["eval/ppl_vs_context"] == pytest.approx(4.2)


def _hl(*args, cwd):
    return subprocess.run([sys.executable, "-m", "hybridlab", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def _bad_arch(tmp_path, training):
    path = tmp_path / "a.yaml"
    path.write_text(yaml.safe_dump({**TINY_ARCH, "training": training}))
    return path


@pytest.mark.parametrize("args, expected", [
    (lambda p: ["train", str(_bad_arch(p, 5))], "training: must be a mapping"),
    (lambda p: ["build", str(_bad_arch(p, 5))], "training: must be a mapping"),
    (lambda p: ["build", str(_bad_arch(p, {"lr": float("nan")}))], "training.lr: must be a finite number"),
    (lambda p: ["build", str(_bad_arch(p, {})), "--out", str(p / "file")], "is a file"),
    (lambda p: ["train", "--resume", str(p / "runs" / "r")], "not a run's config"),
])
def test_bad_input_gets_one_line_and_exit_2(tmp_path, args, expected):
    (tmp_path / "file").write_text("x")
    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "config.yaml").write_text("")
    r = _hl(*args(tmp_path), cwd=ROOT)
    assert r.returncode == 2, r.stderr
    assert expected in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_sigkill_at_random_moments_then_cli_resume_equals_an_uninterrupted_run(tmp_path):
    import random

    from safetensors.torch import load_file

    from tests.runs_helpers import read_metrics

    runs = tmp_path / "runs"
    arch = write_arch(tmp_path, runs, steps=40, checkpoint_every=4, eval_every=0, log_every=1)
    ok = _hl("train", str(arch), "--run-name", "whole", cwd=ROOT)
    assert ok.returncode == 0, ok.stderr

    rng = random.Random(0)
    run_dir = runs / "cut"
    cmd = ["train", str(arch), "--run-name", "cut"]
    for kill in range(3):  # three SIGKILLs at random steps, each followed by a CLI --resume
        proc = subprocess.Popen([sys.executable, "-m", "hybridlab", *cmd], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = rng.randint(2, 12) + 12 * kill
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            metrics = run_dir / "metrics.jsonl"
            if metrics.exists() and max(read_metrics(run_dir), default=0) >= target:
                break
            time.sleep(0.01)
        proc.kill()
        proc.wait()
        cmd = ["train", "--resume", str(run_dir)]
    done = _hl(*cmd, cwd=ROOT)
    assert done.returncode == 0, done.stderr

    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps[:-1] == list(range(1, 41))  # one row per step: a resume drops the killed run's extra rows
    whole, cut = read_metrics(runs / "whole"), read_metrics(run_dir)
    assert sorted(cut) == sorted(whole)
    assert [cut[s]["train/loss"] for s in sorted(cut)] == [whole[s]["train/loss"] for s in sorted(whole)]
    a = load_file(str(ckpt_io.resolve(runs / "whole") / "model.safetensors"))
    b = load_file(str(ckpt_io.resolve(run_dir) / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_storage_urls_never_print_their_password():
    from hybridlab.sweep.study import redact

    assert redact("postgresql://ann:pw@db:5432/x") == "postgresql://ann:***@db:5432/x"
    assert redact("postgresql://ann@db/x") == "postgresql://ann@db/x"
    assert redact("runs/journal.log") == "runs/journal.log"


@pytest.mark.parametrize("url, expected", [
    ("mysql://ann:s3cret-pw@127.0.0.1:1/x", "mysql:// is not supported"),
    ("postgresql://ann:s3cret-pw@127.0.0.1:1/x", "cannot open storage postgresql://ann:***@127.0.0.1:1/x"),
])
def test_bad_storage_is_one_line_without_the_secret(tmp_path, url, expected):
    from tests.sweep_helpers import write_space

    r = _hl("sweep", str(write_space(tmp_path, trials=1)), "--storage", url, cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert expected in r.stderr and "Traceback" not in r.stderr
    assert "s3cret-pw" not in r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("study", ["../escaped", "/tmp/abs-study", "a/b"])
def test_a_study_name_cannot_leave_out_dir(tmp_path, study):
    from tests.sweep_helpers import write_space

    path = write_space(tmp_path, trials=1)
    data = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**data, "study": study}))
    r = _hl("sweep", str(path), cwd=tmp_path)
    assert r.returncode == 2 and "study: must be a plain folder name" in r.stderr, r.stderr
    assert not (tmp_path / "escaped").exists() and not Path("/tmp/abs-study").exists()


def test_yaml_nested_past_the_parser_is_one_line(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("name: x\nd_model: 32\nvocab_size: 64\nlayers: " + "[" * 3000 + "]" * 3000 + "\n")
    r = _hl("build", str(deep), cwd=ROOT)
    assert r.returncode == 2 and "nested too deeply" in r.stderr and "Traceback" not in r.stderr


def test_help_says_what_the_settings_are_and_where_results_go():
    train_help = _hl("train", "--help", cwd=ROOT).stdout
    for key in ("eval_batches", "checkpoint_every", "run_name", "--set KEY=VALUE"):
        assert key in train_help
    sweep_help = " ".join(_hl("sweep", "--help", cwd=ROOT).stdout.split())
    assert "<out_dir>/<study>/" in sweep_help and "runs/" in sweep_help


@pytest.mark.parametrize("argv, expected", [
    (["bench", "model", "A", "--batch", "0"], "--batch must be >= 1"),
    (["bench", "model", "A", "--seq-len", "-3"], "--seq-len must be >= 1"),
    (["bench", "model", "A", "--contexts", "abc"], "bad length 'ABC'"),
    (["train", "A", "--steps", "abc"], "argument --steps: invalid int value"),
    (["no-such-command"], "invalid choice"),
    (["build", "A", "--out", "FILE"], "is a file"),
])
def test_bad_arguments_fail_at_once_on_one_line(tmp_path, capsys, argv, expected):
    """Checked before any work (the bench used to train first, then fail on --contexts) and
    reported as one line, argparse's own errors included (no usage block)."""
    from hybridlab import cli

    (tmp_path / "FILE").write_text("x")
    arch = _bad_arch(tmp_path, {})
    argv = [str(arch) if a == "A" else str(tmp_path / "FILE") if a == "FILE" else a for a in argv]
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's exit
        rc = e.code
    err = capsys.readouterr()
    assert rc == 2
    assert expected in err.err and len(err.err.strip().splitlines()) == 1
    assert "parameters" not in err.out  # nothing built or measured before the error


@pytest.mark.parametrize("args", [["--storage", "foo://x"], ["--storage", "postgresql://u:pw@127.0.0.1:1/db"],
                                  ["--report"]])
def test_a_sweep_refused_by_its_storage_leaves_no_folder(tmp_path, capsys, args):
    from hybridlab import cli

    space = tmp_path / "space.yaml"
    space.write_text((ROOT / "search_spaces" / "sal.yaml").read_text())
    out_dir = tmp_path / "sweeps"
    raw = yaml.safe_load(space.read_text())
    raw["out_dir"] = str(out_dir)
    space.write_text(yaml.safe_dump(raw))
    assert cli.main(["sweep", str(space), *args]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not out_dir.exists()
