"""Evaluation: validation loss/perplexity, recall accuracy, perplexity against context length,
and inference cost (prefill tokens/s, decode ms/token, peak memory, cache bytes)."""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F


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


class _select_override:
    """Replaces each SAL's `infer_select` within the context by `wrap(sal, current rule)`, and
    puts back exactly what was there (the class's method, or an override already in place)."""

    def __init__(self, sals):
        self.sals = sals
        self._saved: list = []

    def wrap(self, sal, select):
        raise NotImplementedError

    def __enter__(self):
        self._saved = [sal.__dict__.get("infer_select") for sal in self.sals]
        for sal in self.sals:
            sal.infer_select = self.wrap(sal, sal.infer_select)
        return self

    def __exit__(self, *exc):
        for sal, saved in zip(self.sals, self._saved):
            if saved is None:
                del sal.infer_select  # back to the class's method
            else:
                sal.infer_select = saved


class record_selection(_select_override):
    """Within this context each SAL keeps its last inference selection (B, L) in
    `masks[scope]`, whatever rule (or override, such as `sals_off`'s) makes it."""

    def __init__(self, model):
        from .blocks.sal import SALBlock

        pairs = zip(getattr(model, "scopes", ()), getattr(model, "layers", ()))
        self.scopes = {layer: scope for scope, layer in pairs if isinstance(layer, SALBlock)}
        self.masks: dict[str, torch.Tensor] = {}
        super().__init__(list(self.scopes))

    def wrap(self, sal, select):
        def recorded(s):
            self.masks[self.scopes[sal]] = m = select(s)
            return m
        return recorded


@torch.no_grad()
def group_metrics(model, batches, device, amp=None) -> dict:
    """loss/acc over the answer positions; acc_first over each sequence's first answer only
    (in recall tasks that query every key once, later answers can be had by elimination, as
    the one value not yet asked for; the first cannot: chance there is 1 / pairs);
    `selected`: each SAL's share of tokens selected by its inference rule ({"layers.6.sal":
    share}, averaged over sequences); and `answers_selected`: the share of the answer positions
    (the tokens whose next token is scored: in recall tasks the queried keys) that each SAL
    selects. Beside `selected` it shows whether the gate spends its budget where the task needs
    attention."""
    loss, hits, count, rows, first_hits, firsts = 0.0, 0, 0, 0, 0, 0
    selected: dict[str, float] = {}
    answers_selected: dict[str, int] = {}
    with record_selection(model) as rec:
        for inputs, targets in batches:
            inputs, targets = inputs.to(device), targets.to(device)
            rec.masks.clear()
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                out = model(inputs)
            l, h, c, fh, fc = _loss_and_hits(out.logits, targets)
            loss, hits, count = loss + l, hits + h, count + c
            first_hits, firsts = first_hits + fh, firsts + fc
            rows += inputs.shape[0]
            for key, value in out.metrics.items():
                if key.endswith("/selected_frac"):
                    scope = key[: -len("/selected_frac")]
                    selected[scope] = selected.get(scope, 0.0) + value.item() * inputs.shape[0]
            answer = targets != -100
            for scope, m in rec.masks.items():
                picked = (m.bool() & answer).sum().item()
                answers_selected[scope] = answers_selected.get(scope, 0) + picked
    count, rows = max(count, 1), max(rows, 1)
    return {"loss": loss / count, "acc": hits / count, "acc_first": first_hits / max(firsts, 1),
            "tokens": count, "selected": {k: v / rows for k, v in selected.items()},
            "answers_selected": {k: v / count for k, v in answers_selected.items()}}


class sals_off(_select_override):
    """Within this context every SAL of `model` selects no token at inference (its attention
    does nothing): the accuracy it leaves shows how much the model relies on its SALs."""

    def __init__(self, model):
        from .blocks.sal import SALBlock

        super().__init__([m for m in model.modules() if isinstance(m, SALBlock)])

    def wrap(self, sal, select):
        return lambda s: torch.zeros(s.shape[:-1], dtype=torch.bool, device=s.device)


@torch.no_grad()
def validation_metrics(model, dataset, batch_size: int, max_batches: int, device, amp=None) -> dict:
    """val/loss and val/ppl on the held-out set; for synthetic tasks also accuracy on the
    answer positions per difficulty group (val/acc/<group>) and their mean (val/acc)."""
    was_training = model.training
    model.eval()
    main = group_metrics(model, dataset.eval_batches(batch_size, max_batches), device, amp)
    # (for tasks, eval_batches is also one of eval_groups: evaluated twice, cheap at these sizes)
    out = {"val/loss": main["loss"], "val/ppl": math.exp(min(main["loss"], 50.0))}
    # Each SAL's selected share under its inference rule, next to the training-time
    # blocks/<scope>/selected_frac; val/selected_frac is their mean (absent without SALs).
    for scope, share in main["selected"].items():
        out[f"blocks/{scope}/eval_selected_frac"] = share
    if main["selected"]:
        out["val/selected_frac"] = sum(main["selected"].values()) / len(main["selected"])
    if dataset.kind == "task":  # answers exist only in tasks; text scores every position
        for scope, share in main["answers_selected"].items():
            out[f"blocks/{scope}/eval_answer_selected_frac"] = share
        if main["answers_selected"]:
            out["val/answer_selected_frac"] = (sum(main["answers_selected"].values())
                                               / len(main["answers_selected"]))
        accs, firsts = {}, {}
        for name, make in dataset.eval_groups().items():
            g = group_metrics(model, make(batch_size, max_batches), device, amp)
            accs[name], firsts[name] = g["acc"], g["acc_first"]
            out[f"val/acc/{name}"] = accs[name]
            out[f"val/acc_first/{name}"] = firsts[name]
        out["val/acc"] = sum(accs.values()) / max(len(accs), 1)
        out["val/acc_first"] = sum(firsts.values()) / max(len(firsts), 1)
        with sals_off(model) as off:
            if off.sals:  # the held-out set again with every SAL selecting nothing
                g = group_metrics(model, dataset.eval_batches(batch_size, max_batches), device, amp)
                out["val/acc_sal_off"] = g["acc"]
    model.train(was_training)
    return out


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


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


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def inference_cost(model, contexts, batch: int = 1, decode_steps: int = 16, device=None,
                   amp=None, chunk: int = 4096, time_budget_s: float = 300.0,
                   cuda_graph: bool = False) -> list[dict]:
    """Prefill tokens/s, decode ms/token after `context` tokens, peak memory, cache bytes.
    `cuda_graph`: decode through a captured CUDA graph (hybridlab/decode.py)."""
    from .model import cache_bytes

    model.eval()
    device = device or next(model.parameters()).device
    vocab = model.arch.vocab_size
    rows, t_start = [], time.perf_counter()
    for ctx in contexts:
        if time.perf_counter() - t_start > time_budget_s:
            rows.append({"context": ctx, "stopped": "time budget"})
            break
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            caches = model.allocate_cache(batch, ctx + decode_steps + 4)
            idx = torch.randint(0, vocab, (batch, ctx), device=device)
            _sync(device)
            t0 = time.perf_counter()
            for s in range(0, ctx, chunk):
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    logits = model.prefill(idx[:, s:s + chunk], caches)
            _sync(device)
            prefill_s = time.perf_counter() - t0
            tok = logits.argmax(-1)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                if cuda_graph:
                    from .decode import GraphedDecoder

                    step = GraphedDecoder(model, caches, batch)
                else:
                    def step(t):
                        return model.step(t, caches)
                step(tok)  # warm-up
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(decode_steps):
                    tok = step(tok).argmax(-1)
                _sync(device)
            decode_ms = 1e3 * (time.perf_counter() - t0) / decode_steps
        except RuntimeError as e:
            if not is_oom(e):
                raise
            rows.append({"context": ctx, "stopped": "out of memory"})
            break
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
        rows.append({"context": ctx, "prefill_tokens_per_s": batch * ctx / prefill_s,
                     "decode_ms_per_token": decode_ms, "cache_bytes": cache_bytes(caches),
                     "peak_memory_bytes": peak})
    return rows


def inference_table(rows: list[dict]) -> list[str]:
    """The rows of `inference_cost` as a printable table."""
    lines = [f"{'context':>9} {'decode ms/token':>16} {'prefill tok/s':>14} {'cache':>12} {'peak mem':>10}"]
    for r in rows:
        if "stopped" in r:
            lines.append(f"{r['context']:>9} stopped: {r['stopped']}")
            continue
        peak = f"{r['peak_memory_bytes'] / 2**30:.2f} GiB" if r["peak_memory_bytes"] else "-"
        lines.append(f"{r['context']:>9} {r['decode_ms_per_token']:>16.2f} {r['prefill_tokens_per_s']:>14.0f} "
                     f"{r['cache_bytes'] / 2**20:>8.2f} MiB {peak:>10}")
    return lines


def parse_lengths(text: str) -> list[int]:
    """'1K,8K,1M' -> [1024, 8192, 1048576]."""
    from .errors import UserError

    out = []
    for part in text.split(","):
        part = part.strip().upper()
        mult = {"K": 1024, "M": 1024 ** 2}.get(part[-1:], 1)
        try:
            out.append(int(part[:-1] if mult > 1 else part) * mult)
        except ValueError:
            raise UserError(f"bad length {part!r}: use numbers like 1024, 8K, 1M") from None
    return out


def run_eval(path: str, out_dir: str | None = None, batches: int = 20, max_factor: int = 64,
             contexts: str = "1K,4K,16K", device: str | None = None, time_budget_s: float = 300.0,
             arch_path: str | None = None) -> dict:
    """`hybridlab eval CHECKPOINT`: everything above, printed, saved as JSON/PNG and in TensorBoard."""
    import json
    from pathlib import Path

    from hybridlab.data import make_dataset

    from .load import load_checkpoint
    from .plots import plot_ppl_vs_context
    from .tracking import Tracker

    lo = load_checkpoint(path, device, arch_path)
    model, cfg = lo.model, lo.cfg
    dev = next(model.parameters()).device
    amp = torch.bfloat16 if dev.type == "cuda" else None
    dataset = make_dataset(lo.data_spec, cfg.seq_len, path="training.data", base_dir=lo.base_dir)
    train_len = dataset.seq_len
    print(f"{lo.ckpt}: {lo.arch.name}, step {lo.step}, {model.num_params():,} parameters, on {dev}")

    results: dict = {"checkpoint": str(lo.ckpt), "step": lo.step}
    val = validation_metrics(model, dataset, cfg.batch_size, batches, dev, amp)
    results["validation"] = val
    print(f"validation: loss {val['val/loss']:.4f}, perplexity {val['val/ppl']:.3f}")
    for key, value in val.items():
        if key.endswith("/eval_selected_frac"):
            print(f"  selected share {key[7:-19]:<14} {value:.3f}")
    for key, value in val.items():
        if key.startswith("val/acc/"):
            first = val.get("val/acc_first/" + key[8:])
            tail = f"  (first answer of each sequence: {first:.3f})" if first is not None else ""
            print(f"  recall accuracy {key[8:]:<14} {value:.3f}{tail}")
    if "val/acc_sal_off" in val:
        print(f"  recall accuracy with every SAL selecting nothing: {val['val/acc_sal_off']:.3f} "
              f"(held-out set at the training difficulty)")

    factors = tuple(f for f in (1, 2, 4, 8, 16, 32, 64) if f <= max_factor)
    curve = perplexity_vs_context(model, dataset, train_len, factors, device=dev, amp=amp,
                                  time_budget_s=time_budget_s)
    results["ppl_vs_context"] = curve
    print("perplexity against context length:")
    for r in curve:
        if "ppl" in r:
            acc = f", answer accuracy {r['acc']:.3f}" if "acc" in r else ""
            print(f"  {r['context']:>8} ({r['factor']:>2}x): {r['ppl']:.3f} (last {train_len}: {r['ppl_tail']:.3f}){acc}")
        else:
            print(f"  {r['context']:>8} ({r['factor']:>2}x): stopped, {r['stopped']}")

    cost = inference_cost(model, parse_lengths(contexts), device=dev, amp=amp, time_budget_s=time_budget_s)
    results["inference"] = cost
    print("inference (batch 1):")
    print("\n".join(inference_table(cost)))

    out = Path(out_dir) if out_dir else lo.run_dir / "eval" / f"step_{lo.step:07d}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(results, indent=1))
    png = None
    if any("ppl" in r for r in curve):
        png = plot_ppl_vs_context(curve, train_len, out / "ppl_vs_context.png", f"{lo.arch.name} @ step {lo.step}")
    tracker = Tracker(lo.run_dir)
    tracker.log(lo.step, {(f"eval/{k[4:]}" if k.startswith("val/") else k): v for k, v in val.items()})
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
    print(f"wrote {out / 'eval.json'}" + (f" and {png}" if png else ""))
    return results
