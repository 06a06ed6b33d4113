"""PNG plots (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path


def plot_ppl_vs_context(rows: list[dict], train_len: int, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if "ppl" in r]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot([r["context"] for r in done], [r["ppl"] for r in done], "o-", label="all tokens")
    ax.plot([r["context"] for r in done], [r["ppl_tail"] for r in done], "s--", label=f"last {train_len} tokens")
    ax.axvline(train_len, color="grey", lw=0.8, ls=":", label="training length")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
