"""selection.html: which tokens each block marked (a SAL: selected) in a few held-out sequences,
one section per layer position, the block's score (a SAL: P(select)) on hover. The marks come
from the blocks' record hook (hybridlab/probes.py); this module runs the model and renders."""
from __future__ import annotations

import html
from pathlib import Path

import torch

from hybridlab.blocks.base import TokenRecord

from .errors import UserError
from .probes import RecordBlocks

STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 70em; }
.seq { font-family: monospace; white-space: pre-wrap; word-break: break-all; line-height: 1.6;
       border: 1px solid #ddd; padding: 0.6em; margin: 0.6em 0; }
.t.on { background: #ffc94d; }
.t.ans { text-decoration: underline; text-decoration-thickness: 2px; }
.note { color: #555; }
"""


@torch.no_grad()
def record_sequences(model, dataset, n: int, device, amp=None):
    """The first `n` held-out sequences through the model with every block recording:
    (inputs (n, L), {scope: TokenRecord}), on the CPU."""
    was_training = model.training
    model.eval()
    inputs, targets = next(iter(dataset.eval_batches(n, 1)))  # (n, L) each
    with RecordBlocks(model, answers=dataset.kind == "task") as recording:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            model(inputs.to(device))
        recording.collect(targets.to(device))
    model.train(was_training)
    return inputs, recording.records


def token_texts(dataset, ids: list[int]) -> tuple[list[str], bool]:
    """Each token as text (byte-level or tokenizer text), or as its id (tasks, or token files
    without a tokenizer): (texts, as_ids)."""
    if dataset.kind != "task":
        try:
            return [dataset.decode([i]) for i in ids], False
        except UserError:
            pass
    return [str(i) for i in ids], True


def render(title: str, tokens: list[list[str]], as_ids: bool, records: dict[str, TokenRecord]) -> str:
    """The page: per scope, each sequence's tokens (tokens[i], as shown) with the marked ones
    highlighted, the score in each token's title, answer positions underlined where recorded."""
    esc = html.escape
    sep = " " if as_ids else ""  # ids need a gap; text tokens carry their own spaces
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1>"]
    if not records:
        parts.append("<p>No block in this model records per-token decisions.</p>")
    for scope, record in records.items():
        mask, score = record.masks[0], record.scores[0]  # (N, L): one batch of sequences
        answers = record.answers[0] if record.answers is not None else None
        note = (f"{esc(record.mark)}: {record.share():.3f} of the tokens of these sequences "
                f"(highlighted); {esc(record.score_name)} on hover")
        if answers is not None:
            note += (f"; answer positions underlined, {record.answer_share():.3f} of them "
                     f"{esc(record.mark)}")
        parts.append(f"<section id='{esc(scope, quote=True)}'><h2>{esc(scope)}</h2>"
                     f"<p class='note'>{note}</p>")
        for i, seq in enumerate(tokens):
            spans = []
            for j, text in enumerate(seq):
                answer = answers is not None and answers[i, j]
                cls = "t" + (" on" if mask[i, j] else "") + (" ans" if answer else "")
                hover = f"{record.score_name} {score[i, j].item():.3f}, position {j}"
                spans.append(f"<span class='{cls}' title='{esc(hover, quote=True)}'>{esc(text)}</span>")
            shown = f" (first {len(seq)} of {mask.shape[1]} positions)" if len(seq) < mask.shape[1] else ""
            parts.append(f"<p class='note'>sequence {i}{shown}</p><div class='seq'>{sep.join(spans)}</div>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_selection_page(path: Path, model, dataset, device, amp=None, n_sequences: int = 4,
                         max_tokens: int = 512, title: str = "selection") -> Path:
    """Record `n_sequences` held-out sequences and write the page (the first `max_tokens`
    positions of each) to `path`."""
    inputs, records = record_sequences(model, dataset, n_sequences, device, amp)
    shown = [token_texts(dataset, row[:max_tokens].tolist()) for row in inputs]
    as_ids = any(ids for _, ids in shown)
    page = render(title, [texts for texts, _ in shown], as_ids, records)
    Path(path).write_text(page, encoding="utf-8")
    return Path(path)
