"""Run a grid of MQAR training runs in parallel on one machine and print one comparison table.

    python -P scripts/mqar_grid.py experiments/grids/mqar-01-sal-curricula.yaml --out OUT
                                   [--jobs 8] [--deadline S] [--device auto|cpu|cuda] [--check]

Grids live in experiments/grids/ (mqar-smoke.yaml is a 20-step CPU run); what each asked and
found is in docs/measurements/README.md.

Grid file: a list of settings, each a shared `training:` mapping (suite syntax, hybridlab/suite.py)
and variants. Each variant names an architecture YAML (relative to experiments/) and optional
`defaults:` (block overrides, e.g. {sal: {...}}) and `training:` overrides; a setting's own
`defaults:` apply under every variant's.

    settings:
      - name: easy
        training: {data: {task: mqar, num_kv_pairs: 4, vocab_size: 64}, seq_len: 32, steps: 3000}
        variants:
          - {name: mamba2, arch: mamba2-tiny.yaml}
          - {name: sal-a, arch: taipan-tiny.yaml, defaults: {sal: {capacity_start: 1.0, ...}}}

Every (setting, variant) becomes a one-run suite OUT/<setting>/<variant>.yaml, trained by
`python -P -m hybridlab train` in its own process (log OUT/<setting>/<variant>.log, run folder
OUT/<setting>/<variant>/). Running the same command again skips finished runs and resumes cut
ones (the suite's own behaviour). At --deadline the running jobs get SIGINT (the trainer
checkpoints at the next step boundary and exits), then SIGKILL after GRACE_S; their last eval
is still reported, marked "cut". Results: OUT/summary.json, OUT/summary.md, stdout, and
OUT/results.tgz (suites, logs, metrics.jsonl; no checkpoints) to copy off a machine that returns
only a few files (unpack it into docs/measurements/<folder>/ to commit it: the record is plain
files, never an archive).

"SAL off" is val/acc_off: the held-out accuracy with every block that can be turned off (the
SALs: selecting nothing) off; runs logged before that key was named read val/acc_sal_off.
"answers sel." is val/answer_selected_frac: the share of answer positions (the queried keys) the
SALs select, beside "val share", the share of all tokens.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from hybridlab.suite import _merge  # the suites' own deep merge: grids layer settings the same way

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = REPO / "experiments"
GRACE_S = 15.0        # SIGINT -> SIGKILL: a checkpoint of a tiny model takes well under a second
HEARTBEAT_S = 60.0    # how often to print the running jobs' last logged step


def load_jobs(grid_path: Path, out: Path, device: str) -> list[dict]:
    """Write one suite per (setting, variant) under `out`; -> job dicts."""
    grid = yaml.safe_load(grid_path.read_text())
    jobs = []
    for setting in grid["settings"]:
        sname = setting["name"]
        for var in setting["variants"]:
            arch = Path(var["arch"])
            arch = arch if arch.is_absolute() else EXPERIMENTS / arch  # suites resolve relative paths
            training = _merge(setting.get("training") or {}, var.get("training") or {})
            if device != "auto":
                training["device"] = device  # suite mode ignores `train --device`: set it here
            run = {"arch": str(arch.resolve()), "name": var["name"]}
            defaults = _merge(setting.get("defaults") or {}, var.get("defaults") or {})
            if defaults:
                run["defaults"] = defaults
            suite = {"suite": sname, "runs_dir": str(out), "training": training, "runs": [run],
                     "compare": ["params", "val/acc", "val/selected_frac", "val/loss"]}
            path = out / sname / f"{var['name']}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(suite, sort_keys=False, default_flow_style=None, width=1000))
            jobs.append({"setting": sname, "variant": var["name"], "suite": path,
                         "log": path.with_suffix(".log"), "run_dir": out / sname / var["name"],
                         "training": training, "sal": (var.get("defaults") or {}).get("sal", {})})
    return jobs


def check(jobs: list[dict]) -> None:
    """Parse every generated suite as `hybridlab train` would (arch, blocks, training, data)."""
    from hybridlab.data import make_dataset
    from hybridlab.errors import ConfigError, UserError
    from hybridlab.suite import plan
    from hybridlab.train_config import parse_training

    bad = 0
    for job in jobs:
        try:
            [(name, arch, base)] = plan(str(job["suite"]))
            cfg, data = parse_training(arch["training"], None, str(job["suite"]))
            ds = make_dataset(data, cfg.seq_len, path="training.data", base_dir=base)
            if ds.vocab_size > arch["vocab_size"]:
                raise UserError(f"{job['suite']}: the data uses {ds.vocab_size} token ids, "
                                f"the model's vocab_size is {arch['vocab_size']}")
        except (ConfigError, UserError) as e:
            print(f"BAD {job['setting']}/{job['variant']}: {e}")
            bad += 1
            continue
        print(f"ok  {job['setting']}/{name}: {arch['name']} "
              f"steps {cfg.total_steps()} B{cfg.batch_size} L{cfg.seq_len} sal {job['sal'] or '-'}")
    if bad:
        raise SystemExit(f"{bad} of {len(jobs)} runs do not parse; nothing launched")


def job_cost(job: dict) -> tuple:
    t = job["training"]
    return (t.get("steps") or 0, (t.get("steps") or 0) * t.get("batch_size", 1) * t.get("seq_len", 1))


def last_step(run_dir: Path) -> int | None:
    """The last logged step (cheap: reads the file's tail)."""
    path = run_dir / "metrics.jsonl"
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 4096))
            lines = f.read().decode(errors="replace").splitlines()
        return json.loads(lines[-1])["step"]
    except (OSError, ValueError, IndexError, KeyError):
        return None


def run_all(jobs: list[dict], n_jobs: int, deadline: float | None, t0: float) -> None:
    """Run the jobs, at most n_jobs at once, slowest first; stop them all `deadline` s after t0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # Many small processes share the machine: autotuning would compile every kernel config in
    # each of them and time it under contention (noise); take each kernel's first config.
    env.setdefault("HYBRIDLAB_AUTOTUNE", "0")
    pending = sorted(jobs, key=job_cost, reverse=True)
    running: dict[int, dict] = {}
    stop_at = None  # when SIGINT went out
    interrupted = []

    def on_signal(signum, frame):  # our own Ctrl-C / SIGTERM: stop as at the deadline
        interrupted.append(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    next_beat = t0 + HEARTBEAT_S
    try:
        while pending or running:
            now = time.monotonic()
            if stop_at is None and (interrupted or (deadline is not None and now - t0 >= deadline)):
                stop_at = now
                print(f"[{now - t0:6.0f}s] {'interrupted' if interrupted else 'deadline'}: "
                      f"SIGINT to {len(running)} running, {len(pending)} not started", flush=True)
                for job in running.values():
                    job["cut"] = True
                    job["proc"].send_signal(signal.SIGINT)
                for job in pending:
                    job["status"] = "not started"
                pending = []
            if stop_at is not None and now - stop_at > GRACE_S:
                for job in running.values():
                    if job["proc"].poll() is None:
                        job["proc"].kill()
                        job["killed"] = True
            while pending and len(running) < n_jobs:
                job = pending.pop(0)
                job["log_file"] = open(job["log"], "ab")
                # cwd: the run's folder parent, so nothing lands in the caller's directory; -P: the
                # repo root must not shadow the installed package (on the GPU box, gpu_env.sh).
                # Own session: a terminal Ctrl-C reaches only this launcher, which forwards one SIGINT.
                job["proc"] = subprocess.Popen(
                    [sys.executable, "-P", "-m", "hybridlab", "train", str(job["suite"])],
                    cwd=job["suite"].parent, env=env, stdout=job["log_file"], stderr=subprocess.STDOUT,
                    start_new_session=True)
                job["t_start"] = time.monotonic()
                running[job["proc"].pid] = job
                print(f"[{job['t_start'] - t0:6.0f}s] start {job['setting']}/{job['variant']} "
                      f"({job['training'].get('steps')} steps)", flush=True)
            for pid, job in list(running.items()):
                rc = job["proc"].poll()
                if rc is None:
                    continue
                job["wall_s"], job["rc"] = time.monotonic() - job["t_start"], rc
                job["log_file"].close()
                del running[pid]
                print(f"[{time.monotonic() - t0:6.0f}s] end   {job['setting']}/{job['variant']} rc {rc} "
                      f"after {job['wall_s']:.0f}s, step {saved_step(job['run_dir'])}", flush=True)
            if running and time.monotonic() >= next_beat:
                next_beat += HEARTBEAT_S
                steps = ", ".join(f"{j['setting']}/{j['variant']} {last_step(j['run_dir'])}" for j in running.values())
                print(f"[{time.monotonic() - t0:6.0f}s] steps: {steps}", flush=True)
            time.sleep(0.5)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for job in running.values():  # only on an exception in this loop: leave no orphans
            job["proc"].kill()


def read_metrics(run_dir: Path) -> list[dict]:
    out = []
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:  # a line cut by SIGKILL
            pass
    return out


def saved_step(run_dir: Path) -> int | None:
    steps = [int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step_*") if p.name[5:].isdigit()]
    return max(steps) if steps else None


def summarize(job: dict) -> dict:
    run_dir, t = job["run_dir"], job["training"]
    records = read_metrics(run_dir)
    evals = [r for r in records if "val/loss" in r]
    trains = [r for r in records if "train/loss" in r]
    finished = (run_dir / "summary.json").exists()
    if "status" in job:
        status = job["status"]  # not started
    elif finished and job.get("rc") == 0:
        status = "done"
    elif job.get("cut"):
        status = "cut (killed)" if job.get("killed") else "cut"
    else:
        status = "failed"
    row = {"setting": job["setting"], "variant": job["variant"], "status": status,
           "rc": job.get("rc"), "wall_s": job.get("wall_s"), "run_dir": str(run_dir), "sal": job["sal"]}
    try:
        row["params"] = json.loads((run_dir / "meta.json").read_text())["params"]
    except (OSError, ValueError, KeyError):
        row["params"] = None
    logged = max((r["step"] for r in records), default=None)
    row["steps"] = max([s for s in (logged, saved_step(run_dir)) if s is not None], default=0)
    row["steps_total"] = t.get("steps")
    if trains:
        last = trains[-1]
        shares = [v for k, v in last.items() if k.startswith("blocks/") and k.endswith("/selected_frac")]
        row["train_share"] = sum(shares) / len(shares) if shares else None
        tok_s = last.get("train/tokens_per_s")
        row["steps_per_s"] = tok_s / (t["batch_size"] * t["seq_len"]) if tok_s and "batch_size" in t and "seq_len" in t else None
    if evals:
        last = evals[-1]
        row["eval_step"] = last["step"]
        row["eval"] = {k: v for k, v in last.items() if k.startswith("val/")}
        best = max((e for e in evals if "val/acc" in e), key=lambda e: e["val/acc"], default=None)
        if best:
            row["best"] = {"val/acc": best["val/acc"], "step": best["step"],
                           "val/selected_frac": best.get("val/selected_frac")}
    if status == "failed" or (status.startswith("cut") and not evals):
        try:
            row["log_tail"] = job["log"].read_text(errors="replace").splitlines()[-15:]
        except OSError:
            row["log_tail"] = []
    return row


def fmt(v, digits=3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def table(rows: list[dict]) -> str:
    kv = sorted({k for r in rows for k in r.get("eval", {}) if k.startswith("val/acc/")},
                key=lambda k: (k.rsplit("=", 1)[0], int(k.rsplit("=", 1)[1]) if k.rsplit("=", 1)[1].isdigit() else 0))
    head = ["setting", "variant", "status", "params", "steps", "wall s", "step/s", "eval@", "val/acc",
            *[k[len("val/acc/"):] for k in kv], "first answer", "SAL off", "val share", "answers sel.",
            "train share", "val/loss",
            "best acc (step, share)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        e, b = r.get("eval", {}), r.get("best")
        best = f"{b['val/acc']:.3f} ({b['step']}, {fmt(b['val/selected_frac'], 2)})" if b else "-"
        cells = [r["setting"], r["variant"], r["status"], fmt(r["params"]), f"{r['steps']}/{r['steps_total']}",
                 fmt(r["wall_s"], 0), fmt(r.get("steps_per_s"), 1), fmt(r.get("eval_step")),
                 fmt(e.get("val/acc")), *[fmt(e.get(k)) for k in kv], fmt(e.get("val/acc_first")),
                 fmt(e.get("val/acc_off", e.get("val/acc_sal_off"))),
                 fmt(e.get("val/selected_frac")), fmt(e.get("val/answer_selected_frac")),
                 fmt(r.get("train_share")), fmt(e.get("val/loss")), best]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pack(jobs: list[dict], path: Path) -> None:
    """Suites, logs and metrics (no checkpoints, no event files) in one small archive: the GPU
    box returns only a few files from $OUT."""
    import tarfile

    with tarfile.open(path, "w:gz") as tar:
        for job in jobs:
            files = [job["suite"], job["log"]] + [job["run_dir"] / f for f in
                                                  ("metrics.jsonl", "meta.json", "summary.json", "config.yaml")]
            for f in files:
                if f.exists():
                    tar.add(f, arcname=str(f.relative_to(path.parent)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("grid", help="grid YAML, e.g. experiments/grids/mqar-smoke.yaml")
    p.add_argument("--out", required=True, help="results folder (suites, logs, run folders, summary)")
    p.add_argument("--jobs", type=int, default=8, help="runs at once (default 8)")
    p.add_argument("--deadline", type=float, help="seconds from start after which running jobs are stopped")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--check", action="store_true", help="only write and parse the suites")
    args = p.parse_args(argv)
    t0 = time.monotonic()  # the deadline counts from here: it is the whole call's budget
    out = Path(args.out).resolve()
    jobs = load_jobs(Path(args.grid), out, args.device)
    check(jobs)  # fail before launching anything
    if args.check:
        return 0
    run_all(jobs, args.jobs, args.deadline, t0)
    rows = [summarize(j) for j in jobs]
    text = table(rows)
    for r in rows:
        if r.get("log_tail") is not None:
            text += f"\n\n{r['setting']}/{r['variant']} ({r['status']}, rc {r['rc']}), log tail:\n    " + \
                    "\n    ".join(r["log_tail"])
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    (out / "summary.md").write_text(text + "\n")
    pack(jobs, out / "results.tgz")
    print(f"\n{len(rows)} runs in {time.monotonic() - t0:.0f}s; {out}/summary.json\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
