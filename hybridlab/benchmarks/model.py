"""`hybridlab bench model`: training throughput, model FLOPs utilisation and peak memory at a
batch and length; decode ms/token and cache bytes against context length."""
from __future__ import annotations

import json
import time

import torch

from ..analysis import flops_per_token
from ..graph import load_arch
from .inference import inference_cost, inference_table, is_oom, parse_lengths

H200_BF16_TFLOPS = 712.0  # bf16 8192^3 matmul measured on the lent H200 (docs/measurements/)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_throughput(model, batch: int, seq_len: int, steps: int, device, amp, vocab: int | None = None,
                     loss_fn=None, compile: bool = False) -> dict:
    """Training tokens/s and peak memory: AdamW, autocast, 2 untimed warm-up steps. `loss_fn(idx)`
    (idx (B, L+1) token ids) -> the loss; default: a HybridLM's own (another library's model, an
    anchor, gives its own with `vocab`). `compile`: the model through torch.compile, as the
    `compile: true` training option runs it (the warm-up steps pay the compilation)."""
    vocab = vocab or model.arch.vocab_size
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    model.train()
    idx = torch.randint(0, vocab, (batch, seq_len + 1), device=device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if loss_fn is None:
        forward = torch.compile(model) if compile else model

        def loss_fn(idx):
            return forward(idx[:, :-1], idx[:, 1:], return_logits=False).loss

    def one_step():
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = loss_fn(idx)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        for _ in range(2):  # warm-up: kernel compilation, allocator
            one_step()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            one_step()
        _sync(device)
    except RuntimeError as e:
        if not is_oom(e):
            raise
        return {"stopped": "out of memory"}
    dt = (time.perf_counter() - t0) / steps
    out = {"step_ms": 1e3 * dt, "tokens_per_s": batch * seq_len / dt}
    if device.type == "cuda":
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    return out


def bench_model(arch_path: str, batch: int = 8, seq_len: int = 4096, contexts: str = "1K,8K,32K,128K,1M",
                steps: int = 10, json_path: str | None = None, device: str | None = None,
                time_budget_s: float = 300.0, cuda_graph: bool = False, anchors: bool = True,
                compile: bool = False) -> dict:
    """`anchors`: also time the tools a researcher would pick instead (benchmarks/anchors.py),
    when installed, in the same run, and print the side-by-side table. `compile`: time training
    both eagerly and through torch.compile (the decode rows stay eager/CUDA-graph)."""
    from ..model import HybridLM

    arch = load_arch(arch_path)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp = torch.bfloat16 if dev.type == "cuda" else None
    torch.manual_seed(0)
    model = HybridLM(arch).to(dev)
    n = model.num_params()
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"{arch.name}: {n / 1e6:.1f}M parameters on {name}")
    result = {"arch": arch.name, "params": n, "device": name, "batch": batch, "seq_len": seq_len}

    for compiled in (False, True) if compile else (False,):
        tr = train_throughput(model, batch, seq_len, steps, dev, amp, compile=compiled)
        result["train_compiled" if compiled else "train"] = tr
        label = f"train B{batch} L{seq_len}{' compiled' if compiled else ''}"
        if "stopped" in tr:
            print(f"{label}: {tr['stopped']}")
            continue
        line = f"{label}: {tr['tokens_per_s'] / 1e3:.1f}K tokens/s ({tr['step_ms']:.1f} ms/step)"
        if dev.type == "cuda":
            mfu = 6 * n * tr["tokens_per_s"] / (H200_BF16_TFLOPS * 1e12)
            analytic = 3 * flops_per_token(arch, seq_len) * tr["tokens_per_s"] / (H200_BF16_TFLOPS * 1e12)
            tr.update(mfu_6n=mfu, mfu_analytic=analytic)
            line += (f", MFU {100 * mfu:.1f}% (6·params·tokens/s over {H200_BF16_TFLOPS:.0f} TFLOP/s; "
                     f"{100 * analytic:.1f}% counting attention and SSD FLOPs), "
                     f"peak {tr['peak_memory_bytes'] / 2**30:.1f} GiB")
        print(line)
        model.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    rows = inference_cost(model, parse_lengths(contexts), device=dev, amp=amp, time_budget_s=time_budget_s,
                          cuda_graph=cuda_graph and dev.type == "cuda")
    result["decode"] = rows
    print("\n".join(inference_table(rows)))
    if anchors:
        from .anchors import anchors_for, time_anchor

        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        found, skipped = anchors_for(arch)
        for line in skipped:
            print(f"anchor skipped: {line}")
        result["anchors"] = [time_anchor(a, batch, seq_len, steps, [r["context"] for r in rows if "stopped" not in r],
                                         dev, amp) for a in found]
        if result["anchors"]:
            print("\n".join(side_by_side(result)))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
    return result


def side_by_side(result: dict) -> list[str]:
    """Ours against each anchor, same run: training tokens/s, prefill tokens/s and decode
    ms/token per context, with ratios (> 1: ours is faster)."""
    def fmt(x, unit):
        return "-" if x is None else f"{x / 1e3:.1f}K" if unit == "tok/s" else f"{x:.2f}"

    def by_ctx(rows):
        return {r["context"]: r for r in rows if "stopped" not in r}

    ours_train = result["train"].get("tokens_per_s")
    ours_dec = by_ctx(result["decode"])
    lines = [f"\n{'work':<28} {'hybridlab':>10} " + " ".join(f"{a['name']:>22} {'ratio':>6}" for a in result["anchors"])]

    def row(label, ours, theirs, unit, higher_better):
        cells = []
        for t in theirs:
            ratio = (ours / t if higher_better else t / ours) if ours and t else None
            cells.append(f"{fmt(t, unit):>22} {('%.2fx' % ratio) if ratio else '-':>6}")
        lines.append(f"{label:<28} {fmt(ours, unit):>10} " + " ".join(cells))

    row(f"train tok/s B{result['batch']} L{result['seq_len']}", ours_train,
        [a["train"].get("tokens_per_s") for a in result["anchors"]], "tok/s", True)
    for ctx, r in ours_dec.items():
        theirs = [by_ctx(a["decode"]).get(ctx, {}) for a in result["anchors"]]
        row(f"prefill tok/s, {ctx} tokens", r["prefill_tokens_per_s"],
            [t.get("prefill_tokens_per_s") for t in theirs], "tok/s", True)
        row(f"decode ms/token at {ctx}", r["decode_ms_per_token"],
            [t.get("decode_ms_per_token") for t in theirs], "ms", False)
    return lines
