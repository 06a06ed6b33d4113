"""`hybridlab eval RUN --lm-eval TASKS`: lm-evaluation-harness tasks on a checkpoint, printed as
lm_eval's table, saved as JSON and logged to the run's TensorBoard as `lm_eval/<task>/<metric>`
at the checkpoint's step.

Task names are checked before the model loads. lm_eval indexes its ~14k bundled task YAMLs in
about half a minute, so tasks found in `--lm-eval-include` alone skip that index, and a name
written in none of the bundled files fails at once. Local tasks read local files only; a hub task
downloads its data set (Hugging Face datasets, into its usual cache) the first time.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from .config import suggest
from .errors import UserError


def task_names(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",")]
    if not all(names):
        raise UserError(f"--lm-eval {text!r}: give task names separated by commas, e.g. swde,fda")
    return names


# Files under lm_eval/tasks that define no task: code, docs, data.
_NOT_CONFIG = {".py", ".pyc", ".md", ".json", ".jsonl", ".tsv", ".csv", ".txt", ".jpg", ".png", ".sh", ".lark"}


def _bundled_task_text() -> str:
    """The text of every bundled task config (YAML, and the extension-less files they include):
    a few seconds, where lm_eval's index of them takes ~30 s."""
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    return "\n".join(p.read_text(errors="replace") for p in root.rglob("*")
                     if p.is_file() and p.suffix not in _NOT_CONFIG and "__pycache__" not in p.parts)


def task_manager(names: list[str], include: str | None = None):
    """A TaskManager that knows every name in `names` (task, group, tag or YAML file); an
    unknown name is a UserError naming it."""
    from lm_eval.tasks import TaskManager

    if include is not None and not Path(include).is_dir():
        raise UserError(f"--lm-eval-include {include}: not a folder")
    wanted = [n for n in names if not Path(n).is_file()]  # a YAML path is a task too
    if include is not None:
        local = TaskManager(include_path=include, include_defaults=False)
        if all(n in local.all_tasks for n in wanted):
            return local
        wanted = [n for n in wanted if n not in local.all_tasks]
    if not wanted:  # YAML paths only
        return TaskManager(include_defaults=False)
    text = _bundled_task_text()
    for name in wanted:
        if not re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w.-])", text):
            where = f" (nor in {include})" if include else ""
            raise UserError(f"--lm-eval: unknown task {name!r}: lm_eval has no task, group or tag "
                            f"of that name{where}")
    manager = TaskManager(include_path=include)
    for name in wanted:
        if name not in manager.all_tasks:
            raise UserError(f"--lm-eval: unknown task {name!r}{suggest(name, manager.all_tasks)}")
    return manager


def metric_scalars(results: dict) -> dict[str, float]:
    """lm_eval's {task: {"acc,none": x, "acc_stderr,none": s, ...}} -> {"lm_eval/task/acc": x};
    a metric under a filter other than "none" keeps it: lm_eval/task/exact_match/strict-match."""
    out = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if not filt or "_stderr" in metric or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            out[f"lm_eval/{task}/{metric}" + ("" if filt == "none" else f"/{filt}")] = float(value)
    return out


def run_lm_eval(path: str, tasks: str, limit: int | None = None, include: str | None = None,
                device: str | None = None, batch_size: int = 8, out_dir: str | None = None,
                arch_path: str | None = None, log_samples: bool = False) -> dict:
    """Run `tasks` (comma-separated) through lm_eval.simple_evaluate on the checkpoint at `path`."""
    try:
        import lm_eval
    except ImportError:
        raise UserError("--lm-eval needs lm-evaluation-harness: pip install 'hybridlab[eval]'") from None
    from lm_eval.utils import handle_non_serializable, make_table

    from .lm_eval_model import HybridLabLM
    from .tracking import Tracker

    names = task_names(tasks)
    manager = task_manager(names, include)
    lm = HybridLabLM(path=path, device=device, batch_size=batch_size, arch=arch_path)
    lo = lm.loaded
    print(f"{lo.ckpt}: {lo.arch.name}, step {lo.step}, on {lm.device}, max_length {lm.max_length}; "
          f"lm-evaluation-harness tasks {', '.join(names)}" + (f", {limit} examples each" if limit else ""),
          flush=True)
    results = lm_eval.simple_evaluate(model=lm, tasks=names, limit=limit, task_manager=manager,
                                      log_samples=log_samples)
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))

    scalars = metric_scalars(results["results"])
    tracker = Tracker(lo.run_dir)
    tracker.log(lo.step, scalars)
    tracker.close()
    out = Path(out_dir) if out_dir else lo.run_dir / "eval" / f"step_{lo.step:07d}"
    out.mkdir(parents=True, exist_ok=True)
    saved = {k: v for k, v in results.items() if k != "samples"}
    (out / "lm_eval.json").write_text(json.dumps(saved, indent=1, default=handle_non_serializable))
    print(f"wrote {out / 'lm_eval.json'}; TensorBoard: lm_eval/<task>/<metric> in {lo.run_dir} at step {lo.step}")
    return results
