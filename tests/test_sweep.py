"""A sweep in this process: failed trials keep their reason while the others complete; the
report, the Pareto files, best.yaml and `hybridlab report` read back what the trials logged."""
import json
import math

import pytest
import yaml

from hybridlab.sweep import objective
from hybridlab.sweep.run import run_sweep
from sweep_helpers import load, write_space


def _trial_number(run) -> int:
    return int(run.run_dir.name.split("-")[1])


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """Trial 0 diverges for real (lr 1e6, enqueued), 1 raises, 2 returns a NaN loss, 3-4 complete."""
    tmp_path = tmp_path_factory.mktemp("sweep")
    path = write_space(tmp_path, trials=5, parameters={
        "sal.period": {"type": "int", "low": 1, "high": 3},
        "sal.capacity": {"type": "float", "low": 0.1, "high": 0.5},
        "training.lr": [3.0e-3, 1.0e+6]})
    real = objective._train

    def fake(run, warn=None):
        n = _trial_number(run)
        if n == 1:
            raise RuntimeError("boom from the test")
        summary = real(run, warn)
        if n == 2:
            summary["val/loss"] = math.nan
        return summary

    mp = pytest.MonkeyPatch()
    mp.setattr(objective, "_train", fake)
    try:
        from hybridlab.sweep.study import open_study, storage_spec
        from hybridlab.sweep.space import load_space

        space = load_space(path)
        study = open_study(space, storage_spec(space, None), create=True)
        study.enqueue_trial({"sal.period": 1, "sal.capacity": 0.3, "training.lr": 1.0e6})
        for n in range(4):
            study.enqueue_trial({"training.lr": 3.0e-3})
        out = run_sweep(str(path))
    finally:
        mp.undo()
    study, space = load(path)
    return path, study, space, out


def test_failures_recorded_and_others_complete(swept):
    _, study, space, _ = swept
    trials = {t.number: t for t in study.trials}
    assert [trials[n].state.name for n in range(5)] == ["FAIL", "FAIL", "FAIL", "COMPLETE", "COMPLETE"]
    assert trials[0].user_attrs["fail_reason"].startswith("diverged: loss became")
    assert trials[1].user_attrs["fail_reason"] == "RuntimeError: boom from the test"
    assert "boom from the test" in (space.folder / "runs" / "trial-0001" / "error.txt").read_text()
    assert trials[2].user_attrs["fail_reason"] == "objective val_loss is nan"
    for n in (3, 4):
        assert all(math.isfinite(v) for v in trials[n].values)


def test_report_reads_back_what_trials_logged(swept):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from hybridlab.report import report

    path, study, space, out = swept
    for t in study.trials:
        if t.state.name != "COMPLETE":
            continue
        run_dir = space.folder / "runs" / f"trial-{t.number:04d}"
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        logged_val = [r["val/loss"] for r in rows if "val/loss" in r][-1]
        assert t.values[0] == pytest.approx(logged_val) == pytest.approx(t.user_attrs["metrics"]["val_loss"])
        assert t.values[1] == json.loads((run_dir / "meta.json").read_text())["params"]
        scalars = {}
        for ev in run_dir.glob("events.out.tfevents*"):
            acc = EventAccumulator(str(ev), size_guidance={"scalars": 0})
            acc.Reload()
            scalars.update({tag: acc.Scalars(tag)[-1].value for tag in acc.Tags()["scalars"]})
        assert scalars["sweep/val_loss"] == pytest.approx(logged_val, rel=1e-6)
        assert scalars["hparam/val_loss"] == pytest.approx(logged_val, rel=1e-6)
        table = report(str(space.folder / "runs"))
        line = next(line for line in table.splitlines() if line.startswith(f"| trial-{t.number:04d} "))
        assert f"{logged_val:.4g}" in line

    # the sweep's own report: every complete trial on the front (or dominated), reasons listed
    md = (space.folder / "pareto.md").read_text()
    assert out["markdown"].strip() == md.strip()
    assert "trial 1 fail: RuntimeError: boom from the test" in md
    front = {r["trial"] for r in out["pareto"]}
    assert front and front <= {3, 4}
    html = (space.folder / "pareto.html").read_text()
    assert "data:image/png;base64," in html and "http" not in html.replace("<!doctype html>", "")
    assert (space.folder / "pareto.png").stat().st_size > 1000

    # best.yaml is a trainable architecture with its training section
    from hybridlab.graph import load_arch
    from hybridlab.train_config import parse_training

    best = space.folder / "best.yaml"
    arch = load_arch(best)
    cfg, data = parse_training(yaml.safe_load(best.read_text())["training"])
    assert arch.pattern() == out["best"]["pattern"] and cfg.steps == 3 and data == "default"


def test_rerun_resumes_without_redoing_trials(swept, capsys):
    path, study, _, _ = swept
    run_sweep(str(path))  # the same command again: already 5 trials, nothing runs
    assert len(load(path)[0].trials) == 5
    run_sweep(str(path), trials=6)  # a larger total: exactly one more
    study, _ = load(path)
    assert len(study.trials) == 6 and study.trials[5].state.name == "COMPLETE"
    assert "resuming" in capsys.readouterr().out

    from hybridlab.cli import main

    assert main(["sweep", str(path), "--report"]) == 0  # read-only: no new trial
    out = capsys.readouterr().out
    assert "Pareto front of study t: " in out and "of 6 trials" in out and len(load(path)[0].trials) == 6
    assert main(["report", str(path.parent / "sweeps" / "t" / "runs"), "--sort", "val/loss"]) == 0
    assert "| trial-0005 |" in capsys.readouterr().out
