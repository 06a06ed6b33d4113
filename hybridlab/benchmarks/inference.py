"""Inference cost of a model: prefill tokens/s, decode ms/token after a context, peak memory
and cache bytes, at several context lengths. Used by `hybridlab bench model`, `hybridlab eval`
and the sweep's measured objectives."""
from __future__ import annotations

import time

import torch


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def inference_cost(model, contexts, batch: int = 1, decode_steps: int = 16, device=None,
                   amp=None, chunk: int | None = None, time_budget_s: float = 300.0,
                   cuda_graph: bool = False) -> list[dict]:
    """Prefill tokens/s, decode ms/token after `context` tokens, peak memory, cache bytes.
    `chunk`: prefill pass length (None: the model's choice from free memory); `cuda_graph`:
    decode through a captured CUDA graph (hybridlab/decode.py). Each prefill is timed after
    an untimed one of the same shape, so compilation and autotuning are not counted."""
    from ..model import cache_bytes

    model.eval()
    device = device or next(model.parameters()).device
    vocab = model.arch.vocab_size
    rows, t_start = [], time.perf_counter()
    for ctx in contexts:
        if time.perf_counter() - t_start > time_budget_s:
            rows.append({"context": ctx, "stopped": "time budget"})
            break
        try:
            idx = torch.randint(0, vocab, (batch, ctx), device=device)
            passes = 2 if device.type == "cuda" else 1  # the first compiles and autotunes
            for _ in range(passes):
                caches = logits = None  # free the last pass's before measuring this one's peak
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                caches = model.allocate_cache(batch, ctx + decode_steps + 4)
                _sync(device)
                t0 = time.perf_counter()
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    logits = model.prefill_prompt(idx, caches, chunk)
                _sync(device)
                prefill_s = time.perf_counter() - t0
            tok = logits.argmax(-1)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                if cuda_graph:
                    from ..decode import GraphedDecoder

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
    from ..errors import UserError

    out = []
    for part in text.split(","):
        part = part.strip().upper()
        mult = {"K": 1024, "M": 1024 ** 2}.get(part[-1:], 1)
        try:
            out.append(int(part[:-1] if mult > 1 else part) * mult)
        except ValueError:
            raise UserError(f"bad length {part!r}: use numbers like 1024, 8K, 1M") from None
        if out[-1] < 1:
            raise UserError(f"bad length {part!r}: a context must be >= 1 token")
    return out
