"""The Optuna study behind `hybridlab sweep`: storage, sampler, worker processes, stale trials.

Storage: a journal file by default (<out_dir>/<study>/journal.log; several processes on one
machine), `--storage PATH` for another journal file, or an RDB URL (postgresql://... for several
machines; sqlite:/// for one process at a time).

`trials` is a total over every worker and every resume: a worker asks for a new trial only while
fewer than `trials` are finished or running. The count and the ask happen under one lock (a file
lock next to a journal, a PostgreSQL advisory lock), so N trials are exactly N.

Killed workers: a journal has no heartbeat, so under the same lock a worker marks RUNNING trials
whose process is gone (same host, pid dead or reused) as FAIL and queues their parameters again
once. RDB storages use Optuna's heartbeat with RetryHeartbeatStaleTrialCallback instead.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import warnings
import zlib
from pathlib import Path

import optuna
from optuna.trial import TrialState

from .space import SearchSpace

MAX_RETRY = 1  # a point whose worker died twice is left FAIL: it may be what kills the worker
HEARTBEAT_S, GRACE_S = 20, 60


def make_sampler(cfg: dict, seed_offset: int = 0):
    kw = {k: v for k, v in cfg.items() if k != "type"}
    kw["seed"] = kw.get("seed", 0) + seed_offset
    cls = {"tpe": optuna.samplers.TPESampler, "nsga2": optuna.samplers.NSGAIISampler,
           "random": optuna.samplers.RandomSampler}[cfg["type"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return cls(**kw)


# --------------------------------------------------------------------------- storage and lock


def storage_spec(space: SearchSpace, url: str | None) -> str:
    return url or str(space.folder / "journal.log")


def is_rdb(spec: str) -> bool:
    return "://" in spec


RDB_SCHEMES = ("postgresql", "sqlite")  # the RDB storages the workers and tests are built for


def redact(spec: str) -> str:
    """The storage URL as it may be printed: the password, if any, replaced by ***."""
    if not is_rdb(spec):
        return spec
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(spec)
    if parts.password is None:
        return spec
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def check_storage(spec: str) -> None:
    from hybridlab.errors import UserError

    scheme = spec.split("://", 1)[0].split("+", 1)[0] if is_rdb(spec) else None
    if scheme is not None and scheme not in RDB_SCHEMES:
        raise UserError(f"--storage {redact(spec)}: {scheme}:// is not supported; use a journal file "
                        "path (one machine), sqlite:///FILE (one process) or postgresql://... (many machines)")


def _driver_url(spec: str) -> str:
    """SQLAlchemy 2.1 reads postgresql:// as psycopg 3; we ship psycopg2-binary ([postgres] extra)."""
    if not spec.startswith("postgresql://"):
        return spec
    import importlib.util

    from hybridlab.errors import UserError

    if importlib.util.find_spec("psycopg") is not None:
        return spec
    if importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + spec[len("postgresql://"):]
    raise UserError("PostgreSQL storage needs a driver: pip install psycopg2-binary (or psycopg)")


def _password(spec: str) -> str | None:
    from urllib.parse import urlsplit

    return urlsplit(spec).password


def open_storage(spec: str):
    if is_rdb(spec):
        from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

        from hybridlab.errors import UserError

        check_storage(spec)
        url = _driver_url(spec)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                return RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                                  heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY))
            except Exception as e:  # wrong password, host down, no such database: one line, no secret
                reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
                password = _password(spec)
                if password:
                    reason = reason.replace(password, "***")
                raise UserError(f"cannot open storage {redact(spec)}: {reason}") from None
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    Path(spec).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(spec))


class AskLock:
    """Held from 'how many trials are there?' until the new trial is claimed."""

    def __init__(self, spec: str, storage, study_name: str):
        self.spec, self.storage, self.key = spec, storage, zlib.crc32(study_name.encode())
        self._held = None

    def acquire(self) -> None:
        if self.spec.startswith("postgresql"):
            from sqlalchemy import text

            rdb = getattr(self.storage, "_backend", self.storage)  # Optuna wraps RDBStorage in a cache
            conn = rdb.engine.connect()
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
            self._held = ("pg", conn)
        elif not is_rdb(self.spec):
            import fcntl

            f = open(self.spec + ".ask-lock", "a")  # not ".lock": the journal's own symlink lock
            fcntl.flock(f, fcntl.LOCK_EX)
            self._held = ("file", f)

    def release(self) -> None:
        held, self._held = self._held, None
        if held is None:
            return
        kind, obj = held
        if kind == "pg":
            from sqlalchemy import text

            obj.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
            obj.close()
        else:
            obj.close()  # closing the file drops the flock


# --------------------------------------------------------------------------- counting and stale trials


def retried_numbers(trials) -> set[int]:
    out = set()
    for t in trials:
        out.update(n for n in (t.user_attrs.get("retry_of"), t.system_attrs.get("failed_trial")) if n is not None)
        out.update(t.system_attrs.get("retry_history", []))
    return out


def used(trials) -> int:
    """Trials that count towards the total: finished or running, but not a FAIL that was retried."""
    retried = retried_numbers(trials)
    return sum(1 for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
               or (t.state == TrialState.FAIL and t.number not in retried))


def _proc_stat(pid: int):
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], fields[19]  # state, start time in clock ticks since boot


def worker_identity() -> dict:
    stat = _proc_stat(os.getpid())
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": stat[1] if stat else None}


def alive(worker: dict) -> bool:
    pid = worker["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = _proc_stat(pid)
    if stat is None:
        return not Path("/proc").is_dir()  # no /proc: trust kill(0)
    state, start = stat
    return state not in ("Z", "X") and (worker.get("start") in (None, start))


def recover_stale(study, log=print) -> list[int]:
    """Journal storages: FAIL the RUNNING trials of dead workers on this host, queue them again.
    Runs under the ask lock, so a RUNNING trial with no worker yet was orphaned mid-ask."""
    host, out = socket.gethostname(), []
    storage = study._storage
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker")
        if worker and (worker["host"] != host or alive(worker)):
            continue
        retries = t.user_attrs.get("retries", 0)
        requeue = retries < MAX_RETRY
        who = f"pid {worker['pid']}" if worker else "an unknown process"
        reason = f"stale: worker {who} died mid-trial" + ("; its parameters are queued again" if requeue else "")
        try:
            storage.set_trial_user_attr(t._trial_id, "fail_reason", reason)
            storage.set_trial_user_attr(t._trial_id, "retried", requeue)
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # it finished meanwhile
        if requeue:
            study.enqueue_trial(dict(t.params), user_attrs={"retry_of": t.number, "retries": retries + 1})
        log(f"[trial {t.number}] {reason}")
        out.append(t.number)
    return out


# --------------------------------------------------------------------------- study and workers


def _space_digest(space: SearchSpace) -> str:
    return json.dumps({"objectives": [[o.metric, o.direction] for o in space.objectives],
                       "parameters": {p.path: [p.type, p.low, p.high, p.log, p.step, list(p.choices)]
                                      for p in space.params}}, sort_keys=True)


def open_study(space: SearchSpace, spec: str, create: bool, seed_offset: int = 0):
    from hybridlab.errors import UserError

    storage = open_storage(spec)
    sampler = make_sampler(space.sampler, seed_offset)
    if create:
        study = optuna.create_study(study_name=space.study, storage=storage, sampler=sampler,
                                    directions=space.directions, load_if_exists=True)
        digest = study.user_attrs.get("space")
        if digest is None:
            study.set_user_attr("space", _space_digest(space))
        elif digest != _space_digest(space):
            raise UserError(f"study {space.study!r} in {redact(spec)} was started with other objectives or parameters; "
                            f"resume it with the same search space, or give this one another study name")
    else:
        study = optuna.load_study(study_name=space.study, storage=storage, sampler=sampler)
    return study


def work(space: SearchSpace, spec: str, worker_index: int = 0, deadline: float | None = None,
         log=print) -> int:
    """One worker: ask, train, tell until the study has `space.trials` trials or time is up."""
    from .objective import Objective

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own one-line messages instead
    study = open_study(space, spec, create=False)
    # different streams per worker and per resume, so random start-up points are not repeated
    study.sampler = make_sampler(space.sampler, 7919 * len(study.get_trials(deepcopy=False)) + worker_index)
    lock = AskLock(spec, study._storage, space.study)
    identity = worker_identity()

    def claim(trial):
        trial.set_user_attr("worker", identity)
        lock.release()

    objective = Objective(space, on_start=claim, log=log)
    ran = 0
    while deadline is None or time.time() < deadline:
        lock.acquire()
        try:
            trials = study.get_trials(deepcopy=False)
            if not is_rdb(spec) and any(t.state == TrialState.RUNNING for t in trials):
                if recover_stale(study, log):
                    trials = study.get_trials(deepcopy=False)
            if used(trials) >= space.trials:
                break
            study.optimize(objective, n_trials=1)
            ran += 1
        finally:
            lock.release()
    return ran


def worker_gpu(index: int, gpus: int) -> str:
    """The one GPU worker `index` sees (CUDA_VISIBLE_DEVICES): the (index % gpus)-th of those the
    sweep itself sees, so a sweep started with CUDA_VISIBLE_DEVICES=2,3 uses GPUs 2 and 3."""
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    ids = (visible or [str(i) for i in range(gpus)])[:gpus]
    return ids[index % len(ids)]


def _worker_entry(space_path: str, overrides: dict, spec: str, index: int, deadline, gpus: int, threads: int):
    """A spawned worker process: pin a GPU (one per worker) or a share of the CPU cores."""
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = worker_gpu(index, gpus)
    import torch

    torch.set_num_threads(threads)
    from .space import load_space

    space = load_space(space_path)
    for key, value in overrides.items():
        setattr(space, key, value)
    try:
        work(space, spec, index, deadline, log=lambda msg: print(f"[worker {index}] {msg}", flush=True))
    except KeyboardInterrupt:
        pass


def run_workers(space: SearchSpace, space_path: str, overrides: dict, spec: str, workers: int,
                deadline: float | None, threads: int | None) -> None:
    import multiprocessing as mp

    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    if workers == 1:
        if not gpus:
            torch.set_num_threads(threads)
        work(space, spec, 0, deadline)
        return
    ctx = mp.get_context("spawn")  # a fresh interpreter: no forked CUDA or torch thread state
    procs = [ctx.Process(target=_worker_entry, args=(space_path, overrides, spec, i, deadline, gpus, threads))
             for i in range(workers)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        for p in procs:  # the workers got the same SIGINT; let them checkpoint and record it
            p.join(timeout=60)
        raise
    bad = [p.exitcode for p in procs if p.exitcode]
    if bad:
        from hybridlab.errors import UserError

        raise UserError(f"{len(bad)} of {workers} worker(s) failed (exit codes {bad}; their messages are above); "
                        f"run the same command again to resume")


@contextlib.contextmanager
def quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield
