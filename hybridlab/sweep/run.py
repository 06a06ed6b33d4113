"""`hybridlab sweep SPACE.yaml`: validate the space, open (or resume) the study, run the workers,
print the Pareto front. Running the same command again resumes: same study name, same storage."""
from __future__ import annotations

import time
from pathlib import Path

from .space import load_space


def run_sweep(space_path: str, storage: str | None = None, workers: int | None = None,
              trials: int | None = None, timeout: float | None = None, threads: int | None = None,
              report_only: bool = False) -> dict:
    from hybridlab.errors import UserError

    from .report import count_states, write_report
    from .study import check_storage, is_rdb, open_study, quiet_optuna, redact, run_workers, storage_spec, used

    space = load_space(space_path)  # every ConfigError surfaces here, before any trial
    overrides = {k: v for k, v in (("trials", trials), ("timeout", timeout), ("workers", workers),
                                   ("threads", threads)) if v is not None}
    for key, value in overrides.items():
        if value <= 0:
            raise UserError(f"--{key} must be > 0, got {value}")
        setattr(space, key, value)
    spec = storage_spec(space, storage)
    if spec.startswith("sqlite") and space.workers > 1:
        raise UserError("SQLite storage is for one process at a time; use the default journal file "
                        "(several processes on one machine) or postgresql:// (several machines)")
    check_storage(spec)  # an unsupported URL fails before anything is written
    if report_only and not is_rdb(spec) and not Path(spec).exists():
        raise UserError(f"no study {space.study!r} in {spec} yet: run the sweep first")
    created = [p for p in (space.folder, *space.folder.parents) if not p.exists()]
    space.folder.mkdir(parents=True, exist_ok=True)
    with quiet_optuna():
        try:
            study = open_study(space, spec, create=not report_only)
        except (KeyError, UserError) as e:
            for folder in created:  # the storage said no: leave no empty folders behind
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
            if isinstance(e, UserError):
                raise
            raise UserError(f"no study {space.study!r} in {redact(spec)} yet: run the sweep first") from None
        if not report_only:
            before = count_states(study)
            where = redact(spec) if is_rdb(spec) else f"journal {spec}"
            print(f"sweep {space.study}: {space.trials} trials on {space.workers} worker(s), storage {where}; "
                  f"runs in {space.folder / 'runs'}"
                  + (f"; resuming ({before['complete']} complete, {before['fail']} failed, "
                     f"{before['pruned']} pruned)" if sum(before.values()) - before["waiting"] else ""))
            t0 = time.time()
            deadline = t0 + space.timeout if space.timeout else None
            try:
                if used(study.get_trials(deepcopy=False)) < space.trials or before["running"]:
                    run_workers(space, space_path, overrides, spec, space.workers, deadline, space.threads)
            except UserError:
                write_report(study, space)  # what finished is kept and reported; the error follows
                raise
            print(f"sweep {space.study}: finished in {time.time() - t0:.0f} s")
        out = write_report(study, space)
    print(out["markdown"])
    for key in ("png", "html", "best_yaml"):
        if key in out:
            print(f"wrote {out[key]}")
    if "best" in out:
        print(f"train the best trial ({out['best']['trial']}) at full length: hybridlab train {out['best_yaml']}")
    return out
