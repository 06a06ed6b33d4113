"""Validation: loss and perplexity on the held-out set; in tasks, answer accuracy per difficulty
group; what each block reports about itself (hybridlab/diagnostics.py); and the held-out set
again with every block that can be turned off, off (hybridlab/probes.py)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .diagnostics import block_reports
from .probes import RecordBlocks, blocks_off, scoped_blocks


def _loss_and_hits(logits, targets):
    """Summed CE and correct argmax over positions with a target (targets != -100), and the
    same for each sequence's first target only: (ce, hits, count, first hits, first count)."""
    mask = targets != -100
    flat_logits = logits.float().flatten(0, 1)
    ce = F.cross_entropy(flat_logits, targets.flatten(), ignore_index=-100, reduction="sum")
    correct = (logits.argmax(-1) == targets) & mask
    has = mask.any(dim=1)
    first = mask.int().argmax(dim=1)  # (B,) first target position (0 where none: masked by `has`)
    first_hits = (correct.gather(1, first[:, None])[:, 0] & has).sum()
    return ce.item(), correct.sum().item(), mask.sum().item(), first_hits.item(), has.sum().item()


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


@torch.no_grad()
def group_metrics(model, batches, device, amp=None, recording: RecordBlocks | None = None) -> dict:
    """loss/acc over the answer positions; acc_first over each sequence's first answer only
    (in recall tasks that query every key once, later answers can be had by elimination, as
    the one value not yet asked for; the first cannot: chance there is 1 / pairs). With
    `recording` (entered), what the blocks decided per token is collected batch by batch."""
    loss, hits, count, first_hits, firsts = 0.0, 0, 0, 0, 0
    for inputs, targets, *packed in batches:  # packed: (seq_idx,) for packed documents
        inputs, targets = inputs.to(device), targets.to(device)
        seq_idx = packed[0].to(device) if packed else None
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = model(inputs, seq_idx=seq_idx)
        if recording is not None:
            recording.collect(targets)
        l, h, c, fh, fc = _loss_and_hits(out.logits, targets)
        loss, hits, count = loss + l, hits + h, count + c
        first_hits, firsts = first_hits + fh, firsts + fc
    count = max(count, 1)
    return {"loss": loss / count, "acc": hits / count, "acc_first": first_hits / max(firsts, 1),
            "tokens": count}


def heldout(dataset, batch_size: int, max_batches: int, packed: bool = False):
    """The held-out batches; with `packed` (documents packed as in training), with seq_idx."""
    if packed and hasattr(dataset, "eval_batches_packed"):
        return dataset.eval_batches_packed(batch_size, max_batches)
    return dataset.eval_batches(batch_size, max_batches)


@torch.no_grad()
def ablation_metrics(model, dataset, batch_size: int, max_batches: int, device, amp=None,
                     each: bool = False, packed: bool = False) -> dict:
    """The held-out set again with every block that can be turned off (Block.ablate), off:
    val/loss_off, val/ppl_off and, in tasks, val/acc_off, val/acc_first_off (at the training
    difficulty: the set of val/loss). {} when no block can be turned off. `each`: also each such
    block off alone, as blocks/<scope>/<name>_off (a shared block under its first scope)."""
    task = dataset.kind == "task"

    def run(only=None) -> dict | None:
        with blocks_off(model, only) as off:
            if not off:
                return None
            g = group_metrics(model, heldout(dataset, batch_size, max_batches, packed), device, amp)
        m = {"loss_off": g["loss"], "ppl_off": perplexity(g["loss"])}
        if task:
            m.update(acc_off=g["acc"], acc_first_off=g["acc_first"])
        return m

    every = run()
    if every is None:
        return {}
    out = {f"val/{k}": v for k, v in every.items()}
    if each:
        found = []
        for block, scopes in scoped_blocks(model):
            alone = run(block)
            if alone is not None:
                found.append((scopes[0], alone))
        for scope, alone in found:  # one such block: it alone is "every", already measured
            out.update({f"blocks/{scope}/{k}": v for k, v in (alone if len(found) > 1 else every).items()})
    return out


@dataclass
class Validation:
    scalars: dict[str, float]  # val/..., blocks/<scope>/...: what train and eval log
    histograms: dict[str, torch.Tensor] = field(default_factory=dict)  # blocks/<scope>/<name>
    warnings: list[str] = field(default_factory=list)  # the blocks' own, one line each
    heldout: dict = field(default_factory=dict)  # group_metrics of the held-out set (every block on)


@torch.no_grad()
def validate(model, dataset, batch_size: int, max_batches: int, device, amp=None,
             each_off: bool = False, packed: bool = False) -> Validation:
    """val/loss and val/ppl on the held-out set; for synthetic tasks also accuracy on the
    answer positions per difficulty group (val/acc/<group>) and their mean (val/acc); what each
    block reports of what it recorded there (e.g. blocks/<scope>/eval_selected_frac and its mean
    val/selected_frac); and the ablation probe (`ablation_metrics`, each block alone too with
    `each_off`). `packed`: packed documents see only themselves, as in training."""
    was_training = model.training
    model.eval()
    task = dataset.kind == "task"  # answers exist only in tasks; text scores every position
    with RecordBlocks(model, answers=task) as recording:
        main = group_metrics(model, heldout(dataset, batch_size, max_batches, packed), device, amp, recording)
    # (for tasks, eval_batches is also one of eval_groups: evaluated twice, cheap at these sizes)
    out = {"val/loss": main["loss"], "val/ppl": perplexity(main["loss"])}
    diagnostics = block_reports(model, recording.records)
    out.update(diagnostics.scalars)
    if task:
        accs, firsts = {}, {}
        for name, make in dataset.eval_groups().items():
            g = group_metrics(model, make(batch_size, max_batches), device, amp)
            accs[name], firsts[name] = g["acc"], g["acc_first"]
            out[f"val/acc/{name}"] = accs[name]
            out[f"val/acc_first/{name}"] = firsts[name]
        out["val/acc"] = sum(accs.values()) / max(len(accs), 1)
        out["val/acc_first"] = sum(firsts.values()) / max(len(firsts), 1)
    out.update(ablation_metrics(model, dataset, batch_size, max_batches, device, amp, each_off, packed))
    model.train(was_training)
    return Validation(out, diagnostics.histograms, diagnostics.warnings, main)


def validation_metrics(model, dataset, batch_size: int, max_batches: int, device, amp=None) -> dict:
    """The scalars of `validate`."""
    return validate(model, dataset, batch_size, max_batches, device, amp).scalars


def validation_lines(v: Validation) -> list[str]:
    """`validate`'s main results for people: loss, accuracy per group, and the ablation probe
    beside the same held-out set with every block on."""
    s = v.scalars
    # the number of scored tokens says which held-out set this is: training validates on
    # `eval_batches`, `hybridlab eval` on --batches, so their figures differ by that sample
    tokens = v.heldout.get("tokens")
    on = f" over {tokens:,} held-out tokens" if tokens else ""
    lines = [f"validation: loss {s['val/loss']:.4f}, perplexity {s['val/ppl']:.3f}{on}"]
    for key, value in s.items():
        if key.startswith("val/acc/"):
            first = s.get("val/acc_first/" + key[8:])
            tail = f"  (first answer of each sequence: {first:.3f})" if first is not None else ""
            lines.append(f"  recall accuracy {key[8:]:<14} {value:.3f}{tail}")
    if "val/loss_off" in s:
        on = v.heldout
        line = (f"  with every block that can be turned off, off: loss {s['val/loss_off']:.4f} "
                f"(on: {on['loss']:.4f}), perplexity {s['val/ppl_off']:.3f} (on: {s['val/ppl']:.3f})")
        if "val/acc_off" in s:
            line += (f", recall accuracy {s['val/acc_off']:.3f} (on: {on['acc']:.3f}), first answer "
                     f"{s['val/acc_first_off']:.3f} (on: {on['acc_first']:.3f}); held-out set at the "
                     f"training difficulty")
        lines.append(line)
    return lines
