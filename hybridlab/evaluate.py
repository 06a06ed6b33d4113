"""Evaluation: perplexity against context length, and `hybridlab eval`, which adds validation
(hybridlab/validation.py), the inference cost (hybridlab/benchmarks/inference.py), the blocks'
own diagnostics and the selection page."""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

# inference_cost is measured by `hybridlab eval`, `bench model` and sweeps; it lives with the
# benchmarks and is re-exported here for callers that import it from evaluate.
from .benchmarks.inference import inference_cost, inference_table, is_oom, parse_lengths  # noqa: F401


@torch.no_grad()
def perplexity_vs_context(model, dataset, train_len: int, factors=(1, 2, 4, 8, 16, 32, 64),
                          n_sequences: int = 2, device=None, amp=None, time_budget_s: float = 300.0,
                          chunk: int | None = None) -> list[dict]:
    """Perplexity (and, for recall tasks, answer accuracy) of held-out sequences 1x ... 64x the
    training length, fed in chunks through the decoding caches, so memory is bounded by the
    chunk as far as the architecture allows (full attention's cache still grows).

    ppl: over all scored tokens of the sequence; ppl_tail: over its last `train_len` positions,
    the ones with the longest context. Stops at the first length out of memory or time.
    """
    model.eval()
    device = device or next(model.parameters()).device
    chunk = chunk or train_len
    rows, t_start = [], time.perf_counter()
    for f in factors:
        L = train_len * f
        try:
            inputs, targets = (t.to(device) for t in dataset.long_examples(L, n_sequences))  # (n, L)
            nll = torch.zeros(n_sequences, L, device=device)
            hits = torch.zeros(n_sequences, L, dtype=torch.bool, device=device)
            caches = model.allocate_cache(n_sequences, L)
            for s in range(0, L, chunk):
                e = min(s + chunk, L)
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    logits = model.prefill(inputs[:, s:e], caches, all_logits=True)
                tgt = targets[:, s:e]
                nll[:, s:e] = F.cross_entropy(logits.float().transpose(1, 2), tgt, reduction="none",
                                              ignore_index=-100)
                hits[:, s:e] = logits.argmax(-1) == tgt
                if time.perf_counter() - t_start > time_budget_s:
                    raise TimeoutError
        except TimeoutError:
            rows.append({"factor": f, "context": L, "stopped": "time budget"})
            break
        except RuntimeError as e:
            if not is_oom(e):
                raise
            rows.append({"factor": f, "context": L, "stopped": "out of memory"})
            break
        mask = targets != -100
        tail = torch.zeros_like(mask)
        tail[:, -train_len:] = True
        row = {"factor": f, "context": L,
               "ppl": math.exp(nll[mask].mean().item()),
               "ppl_tail": math.exp(nll[mask & tail].mean().item()) if (mask & tail).any() else math.nan}
        if dataset.kind == "task":
            row["acc"] = hits[mask].float().mean().item()
        rows.append(row)
    return rows


def run_eval(path: str, out_dir: str | None = None, batches: int = 20, max_factor: int = 64,
             contexts: str = "1K,4K,16K", device: str | None = None, time_budget_s: float = 300.0,
             arch_path: str | None = None) -> dict:
    """`hybridlab eval CHECKPOINT`: everything above, printed, saved as JSON/PNG and in TensorBoard."""
    import json
    from pathlib import Path

    from hybridlab.data import make_dataset

    from .diagnostics import block_lines, block_results, last_training_block_metrics, print_warnings
    from .load import load_checkpoint
    from .plots import plot_ppl_vs_context
    from .selection_view import write_selection_page
    from .tracking import Tracker
    from .validation import validate, validation_lines

    lo = load_checkpoint(path, device, arch_path)
    model, cfg = lo.model, lo.cfg
    dev = next(model.parameters()).device
    amp = torch.bfloat16 if dev.type == "cuda" else None
    dataset = make_dataset(lo.data_spec, cfg.seq_len, path="training.data", base_dir=lo.base_dir)
    train_len = dataset.seq_len
    print(f"{lo.ckpt}: {lo.arch.name}, step {lo.step}, {model.num_params():,} parameters, on {dev}")

    results: dict = {"checkpoint": str(lo.ckpt), "step": lo.step}
    # each phase says what it is about to do first: on a CPU the whole command takes minutes
    print(f"validating on {batches} batches of {cfg.batch_size} (every block on, then off where "
          "a block can be turned off) ...", flush=True)
    v = validate(model, dataset, cfg.batch_size, batches, dev, amp, each_off=True, packed=cfg.pack_documents)
    val = results["validation"] = v.scalars
    trained_step, trained = last_training_block_metrics(lo.run_dir, lo.step, model.scopes)
    results["blocks"] = block_results(model.scopes, val, v.histograms, trained, trained_step)
    results["warnings"] = v.warnings
    print("\n".join(validation_lines(v)))
    lines = block_lines(results["blocks"])
    if lines:
        print("blocks:\n" + "\n".join(lines))
    print_warnings(v.warnings)

    factors = tuple(f for f in (1, 2, 4, 8, 16, 32, 64) if f <= max_factor)
    print(f"perplexity against context length ({train_len} to {train_len * factors[-1]} tokens, "
          f"at most {time_budget_s:.0f} s) ...", flush=True)
    curve = perplexity_vs_context(model, dataset, train_len, factors, device=dev, amp=amp,
                                  time_budget_s=time_budget_s)
    results["ppl_vs_context"] = curve
    for r in curve:
        if "ppl" in r:
            acc = f", answer accuracy {r['acc']:.3f}" if "acc" in r else ""
            print(f"  {r['context']:>8} ({r['factor']:>2}x): {r['ppl']:.3f} (last {train_len}: {r['ppl_tail']:.3f}){acc}")
        else:
            print(f"  {r['context']:>8} ({r['factor']:>2}x): stopped, {r['stopped']}")

    print(f"inference cost at {contexts} tokens of context (batch 1) ...", flush=True)
    cost = inference_cost(model, parse_lengths(contexts), device=dev, amp=amp, time_budget_s=time_budget_s)
    results["inference"] = cost
    print("\n".join(inference_table(cost)))

    out = Path(out_dir) if out_dir else lo.run_dir / "eval" / f"step_{lo.step:07d}"
    out.mkdir(parents=True, exist_ok=True)
    page = write_selection_page(out / "selection.html", model, dataset, dev, amp,
                                title=f"{lo.arch.name} @ step {lo.step}: the tokens each block marks")
    results["selection_page"] = page.name
    (out / "eval.json").write_text(json.dumps(results, indent=1))
    png = None
    if any("ppl" in r for r in curve):
        png = plot_ppl_vs_context(curve, train_len, out / "ppl_vs_context.png", f"{lo.arch.name} @ step {lo.step}")
    tracker = Tracker(lo.run_dir)
    tracker.log(lo.step, {(f"eval/{k[4:]}" if k.startswith("val/") else k): x for k, x in val.items()})
    for tag, values in v.histograms.items():
        tracker.histogram(tag, values, lo.step)
    for r in curve:
        if "ppl" in r:
            tracker.writer.add_scalar("eval/ppl_vs_context", r["ppl"], r["context"])
            tracker.writer.add_scalar("eval/ppl_tail_vs_context", r["ppl_tail"], r["context"])
            if "acc" in r:
                tracker.writer.add_scalar("eval/acc_vs_context", r["acc"], r["context"])
    for r in cost:
        if "decode_ms_per_token" in r:
            tracker.writer.add_scalar("eval/decode_ms_per_token_vs_context", r["decode_ms_per_token"], r["context"])
            tracker.writer.add_scalar("eval/cache_bytes_vs_context", r["cache_bytes"], r["context"])
    if png:
        tracker.image("eval/ppl_vs_context", png, lo.step)
    tracker.close()
    print(f"wrote {out / 'eval.json'}, {page}" + (f" and {png}" if png else ""))
    return results
