"""Worker processes on one journal storage: exactly N trials between them, and a worker killed
with SIGKILL mid-trial leaves a study that resumes with no completed trial lost."""
import os
import signal
import subprocess
import time

from sweep_helpers import env, load, run, sweep_cmd, write_space


def _complete_trials_are_whole(study, space):
    for t in study.trials:
        if t.state.name == "COMPLETE":
            run_dir = space.folder / "runs" / f"trial-{t.number:04d}"
            assert (run_dir / "checkpoints").is_dir() and (run_dir / "metrics.jsonl").exists()
            assert t.user_attrs["metrics"]["val_loss"] == t.values[0]


def test_two_commands_share_one_journal_exactly(tmp_path):
    """`--workers 2` (two spawned processes) and a second command on the same storage: 3 workers."""
    n = 6
    # trials of ~1-2 s (60 steps), not the default 3 steps: with instant trials the first worker
    # to finish importing torch can take all six before the others start (seen on 2 cores)
    path = write_space(tmp_path, trials=n, training={"steps": 60})
    procs = [subprocess.Popen(sweep_cmd(path, *extra), cwd=tmp_path, env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for extra in (["--workers", "2"], [])]
    outs = [p.communicate(timeout=150)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    study, space = load(path)
    trials = study.trials
    assert len(trials) == n, outs                                  # no extra trial
    assert sorted(t.number for t in trials) == list(range(n))      # none lost, none twice
    assert all(t.state.name == "COMPLETE" for t in trials), [(t.number, t.state.name) for t in trials]
    assert sorted(p.name for p in (space.folder / "runs").iterdir()) == [f"trial-{i:04d}" for i in range(n)]
    workers = {t.user_attrs["worker"]["pid"] for t in trials}
    assert len(workers) >= 2, outs                                 # the work was shared
    _complete_trials_are_whole(study, space)


def test_sigkill_mid_trial_then_resume(tmp_path):
    n = 3
    path = write_space(tmp_path, trials=n, training={"steps": 60})
    proc = subprocess.Popen(sweep_cmd(path), cwd=tmp_path, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    journal = tmp_path / "sweeps" / "t" / "journal.log"
    victim, deadline = None, time.time() + 120
    try:
        while victim is None and time.time() < deadline and proc.poll() is None:
            time.sleep(0.3)
            if not journal.exists():
                continue
            study, _ = load(path)
            states = [t.state.name for t in study.trials]
            running = [t for t in study.trials if t.state.name == "RUNNING" and "worker" in t.user_attrs]
            if "COMPLETE" in states and running:
                victim = running[0]
                before = {t.number: t.values for t in study.trials if t.state.name == "COMPLETE"}
                os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert victim is not None, "never caught a trial mid-run: " + (proc.stdout.read() if proc.stdout else "")
    study, _ = load(path)
    assert study.trials[victim.number].state.name == "RUNNING"  # left behind by the dead worker

    r = run(sweep_cmd(path), cwd=tmp_path, timeout=150)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"[trial {victim.number}] stale: worker pid {proc.pid} died mid-trial" in r.stdout
    study, space = load(path)
    by_number = {t.number: t for t in study.trials}
    for number, values in before.items():                       # no completed trial lost
        assert by_number[number].state.name == "COMPLETE" and by_number[number].values == values
    stale = by_number[victim.number]
    assert stale.state.name == "FAIL" and "stale" in stale.user_attrs["fail_reason"]
    retry = [t for t in study.trials if t.user_attrs.get("retry_of") == victim.number]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE" and retry[0].params == victim.params
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == n
    assert not [t for t in study.trials if t.state.name in ("RUNNING", "WAITING")]
    _complete_trials_are_whole(study, space)
