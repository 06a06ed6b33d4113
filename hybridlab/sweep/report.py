"""Sweep results: the Pareto front as a Markdown table, a PNG plot and a self-contained HTML page,
and the best trial's normalised architecture YAML, ready for `hybridlab train`.

Everything is read back from the study (params, objective values, the metrics each trial logged
as user attributes), so `--report` works on a finished, running or interrupted study alike.
"""
from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import yaml
from optuna.trial import TrialState

from .space import SearchSpace


def rows(study, space: SearchSpace) -> list[dict]:
    out = []
    for t in study.get_trials(deepcopy=False):
        metrics = dict(t.user_attrs.get("metrics", {}))
        if t.values is not None:
            metrics.update({o.metric: v for o, v in zip(space.objectives, t.values)})
        feasible = all(v <= 0 for v in t.constraints.values())
        out.append({"trial": t.number, "state": t.state.name, "params": dict(t.params), "metrics": metrics,
                    "feasible": feasible, "reason": t.user_attrs.get("fail_reason", ""),
                    "pattern": t.user_attrs.get("pattern", ""), "run_dir": t.user_attrs.get("run_dir", "")})
    return out


def _dominates(a: list[float], b: list[float]) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto(all_rows: list[dict], space: SearchSpace) -> list[dict]:
    """Complete, feasible trials that no other such trial beats on every objective."""
    sign = [1 if o.direction == "minimize" else -1 for o in space.objectives]
    done = [r for r in all_rows if r["state"] == "COMPLETE" and r["feasible"]]
    keyed = [(r, [s * r["metrics"][o.metric] for s, o in zip(sign, space.objectives)]) for r in done]
    front = [r for r, v in keyed if not any(_dominates(w, v) for _, w in keyed)]
    first = space.objectives[0]
    return sorted(front, key=lambda r: r["metrics"][first.metric] * (1 if first.direction == "minimize" else -1))


def best(front: list[dict], space: SearchSpace) -> dict | None:
    if not front:
        return None
    obj = next(o for o in space.objectives if o.metric == space.best)
    pick = min if obj.direction == "minimize" else max
    return pick(front, key=lambda r: r["metrics"][obj.metric])


def fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return "-" if v is None else str(v)


def markdown(front: list[dict], all_rows: list[dict], space: SearchSpace) -> str:
    params = [p.path for p in space.params]
    objs = [f"{o.metric} ({'min' if o.direction == 'minimize' else 'max'})" for o in space.objectives]
    lines = ["| trial | pattern | " + " | ".join(params + objs) + " |", "|---|---|" + "---|" * (len(params) + len(objs))]
    for r in front:
        cells = [fmt(r["params"].get(p)) for p in params] + [fmt(r["metrics"].get(o.metric)) for o in space.objectives]
        lines.append(f"| {r['trial']} | {r['pattern']} | " + " | ".join(cells) + " |")
    counts = {}
    for r in all_rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    summary = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
    head = f"Pareto front of study {space.study}: {len(front)} of {len(all_rows)} trials ({summary or 'none yet'})"
    notes = [f"- trial {r['trial']} {r['state'].lower()}: {r['reason']}" for r in all_rows
             if r["state"] in ("FAIL", "PRUNED") and r["reason"]]
    return "\n".join([head, "", *lines] + (["", "Failed or pruned:", *notes] if notes else []))


def plot(front: list[dict], all_rows: list[dict], space: SearchSpace, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objs = space.objectives
    done = [r for r in all_rows if r["state"] == "COMPLETE"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    on_front = {r["trial"] for r in front}
    if len(objs) == 1:  # one objective: its value against the trial number
        xs, ykey, xlabel = (lambda r: r["trial"]), objs[0].metric, "trial"
    else:
        xs, ykey, xlabel = (lambda r: r["metrics"][objs[1].metric]), objs[0].metric, objs[1].metric
    for group, style, label in ((lambda r: r["trial"] not in on_front and r["feasible"], dict(c="0.6", marker="o"), "dominated"),
                                (lambda r: not r["feasible"], dict(c="tab:orange", marker="x"), "infeasible"),
                                (lambda r: r["trial"] in on_front, dict(c="tab:red", marker="o"), "Pareto front")):
        sel = [r for r in done if group(r)]
        if sel:
            ax.scatter([xs(r) for r in sel], [r["metrics"][ykey] for r in sel], label=label, **style)
    if len(objs) > 1 and len(front) > 1:
        pts = sorted((xs(r), r["metrics"][ykey]) for r in front)
        ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", c="tab:red", lw=0.8, alpha=0.6)
    for r in done:
        ax.annotate(str(r["trial"]), (xs(r), r["metrics"][ykey]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ykey)
    ax.set_title(f"{space.study}: {len(done)} complete trials")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def html_page(md_front: str, all_rows: list[dict], space: SearchSpace, png: Path, path: Path) -> Path:
    """One file, no scripts or network: the plot inlined as base64, the tables as HTML."""
    img = base64.b64encode(png.read_bytes()).decode()
    params = [p.path for p in space.params]
    metrics = [o.metric for o in space.objectives]
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["trial", "state", "pattern", *params, *metrics, "note"])
    body = []
    for r in all_rows:
        cells = [r["trial"], r["state"].lower(), r["pattern"], *[fmt(r["params"].get(p)) for p in params],
                 *[fmt(r["metrics"].get(m)) for m in metrics],
                 r["reason"] or ("" if r["feasible"] else "infeasible")]
        body.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(space.study)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 6px;font-size:13px}}</style>
</head><body><h1>Sweep {html.escape(space.study)}</h1>
<img alt="Pareto front" src="data:image/png;base64,{img}">
<h2>Pareto front</h2><pre>{html.escape(md_front)}</pre>
<h2>All trials</h2><table><tr>{head}</tr>{''.join(body)}</table></body></html>"""
    path.write_text(page)
    return path


def best_yaml(row: dict, space: SearchSpace, path: Path) -> Path:
    """The best trial as an architecture YAML with its training section: `hybridlab train` it."""
    values = {p.path: row["params"][p.path] for p in space.params}
    arch, training = space.build(values, name=f"{space.base_dict['name']}-{space.study}-best")
    training = {k: v for k, v in training.items() if k not in ("runs_dir", "run_name")}
    data = training.get("data")
    if isinstance(data, dict):  # relative data paths were relative to the base YAML
        for key in ("text", "tokens", "path"):
            if isinstance(data.get(key), str) and not Path(data[key]).is_absolute():
                data = {**data, key: str((space.base_dir / data[key]).resolve())}
        training["data"] = data
    shown = ", ".join(f"{m} {fmt(row['metrics'].get(m))}" for m in [o.metric for o in space.objectives])
    header = (f"# best trial {row['trial']} of sweep {space.study} (by {space.best}; Pareto front in pareto.md): {shown}\n"
              f"# parameters: {', '.join(f'{k}={v}' for k, v in values.items())}\n")
    body = yaml.safe_dump({**arch.to_dict(), "training": training}, sort_keys=False, default_flow_style=None, width=1000)
    path.write_text(header + body)
    return path


def write_report(study, space: SearchSpace, folder: Path | None = None) -> dict:
    folder = Path(folder or space.folder)
    folder.mkdir(parents=True, exist_ok=True)
    all_rows = rows(study, space)
    front = pareto(all_rows, space)
    md = markdown(front, all_rows, space)
    (folder / "pareto.md").write_text(md + "\n")
    out = {"markdown": md, "pareto": front, "rows": all_rows, "md_path": folder / "pareto.md"}
    if any(r["state"] == "COMPLETE" for r in all_rows):
        out["png"] = plot(front, all_rows, space, folder / "pareto.png")
        out["html"] = html_page(md, all_rows, space, out["png"], folder / "pareto.html")
    top = best(front, space)
    if top is not None:
        out["best"] = top
        out["best_yaml"] = best_yaml(top, space, folder / "best.yaml")
    return out


def count_states(study) -> dict:
    out = {s.name.lower(): 0 for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING)}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name.lower()] = out.get(t.state.name.lower(), 0) + 1
    return out
