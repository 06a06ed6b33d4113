"""`hybridlab build`: validate, normalise, report, run one forward, optionally save."""
from __future__ import annotations

import time
from pathlib import Path

from . import analysis
from .errors import UserError
from .graph import Arch, load_arch


def compress_pattern(pattern: str) -> str:
    """'MMMMMMSMMMMMMS' -> '(M*6 S)*2' style summary for the header (best effort)."""
    n = len(pattern)
    for period in range(1, n // 2 + 1):
        if n % period == 0 and pattern[:period] * (n // period) == pattern:
            unit = _runs(pattern[:period])
            if n // period == 1:
                return unit
            return f"{unit}*{n // period}" if period == 1 else f"({unit})*{n // period}"
    return _runs(pattern)


def _runs(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        j = i
        while j < len(s) and s[j] == s[i]:
            j += 1
        out.append(s[i] if j - i == 1 else f"{s[i]}*{j - i}")
        i = j
    return " ".join(out)


def layer_table(arch: Arch) -> list[str]:
    d = arch.d_model
    rows = [f"{'#':>3}  {'block':<10} {'settings':<36} {'params':>10}"]
    for i, layer in enumerate(arch.layers):
        params = "shared" if layer.share else analysis.human(layer.config.num_params(d))
        label = layer.block + (f" ({layer.name})" if layer.name else "") + (f" -> {layer.share}" if layer.share else "")
        rows.append(f"{i:>3}  {label:<10} {layer.config.describe():<36} {params:>10}")
    return rows


def report(arch: Arch, seq_len: int) -> list[str]:
    lines = [f"{arch.name}: d_model {arch.d_model}, vocab {arch.vocab_size}, "
             f"{'tied' if arch.tie_embeddings else 'untied'} head, {len(arch.layers)} layers "
             f"{compress_pattern(arch.pattern())}", ""]
    lines += layer_table(arch)
    by_block = analysis.params_by_block(arch)
    total = sum(by_block.values())
    lines += ["", "parameters by block type:"]
    for name, n in by_block.items():
        lines.append(f"  {name:<12} {n:>14,}  {100 * n / total:5.1f}%")
    lines.append(f"  {'total':<12} {total:>14,}  ({analysis.human(total)})")
    lines += ["", f"forward FLOPs per token at L={seq_len}: {analysis.human(analysis.flops_per_token(arch, seq_len))}"
                  f"  (training ~3x: {analysis.human(3 * analysis.flops_per_token(arch, seq_len))})",
              "inference state per sequence (bf16 caches, fp32 SSM state):"]
    for label, L in (("4K", 4096), ("128K", 131072), ("1M", 1048576)):
        lines.append(f"  {label:>5} tokens: {analysis.human_bytes(analysis.state_bytes(arch, L))}")
    return lines


def check_training(arch_path: str) -> None:
    """The YAML's `training:` section, checked as `hybridlab train` would (a bad one fails here)."""
    import yaml

    from .train_config import parse_training

    raw = yaml.safe_load(Path(arch_path).read_text())  # load_arch read it already: valid YAML
    parse_training(raw.get("training"), None, arch_path)


def build(arch_path: str, out: str | None = None, seq_len: int = 4096, forward: bool = True,
          device: str | None = None) -> int:
    if seq_len < 1:
        raise UserError(f"--seq-len must be >= 1, got {seq_len}")
    if out and Path(out).exists() and not Path(out).is_dir():  # before any work is done
        raise UserError(f"--out {out}: is a file; give a folder for arch.yaml and the weights")
    arch = load_arch(arch_path)
    check_training(arch_path)
    print("\n".join(report(arch, seq_len)))
    if not (forward or out):
        return 0

    import torch

    from .model import HybridLM

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    model = HybridLM(arch).to(device)
    built_s = time.perf_counter() - t0
    n = model.num_params()
    expected = analysis.num_params(arch)
    if n != expected:  # the analytic count is what sweeps trust: it must match the real module
        raise RuntimeError(f"built model has {n:,} parameters, the analytic count says {expected:,}")
    print(f"\nbuilt on {device} in {built_s:.1f}s: {n:,} parameters")
    if forward:
        L = min(64, seq_len)
        idx = torch.randint(0, arch.vocab_size, (1, L + 1), device=device)
        model.eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            res = model(idx[:, :-1], idx[:, 1:])
        ms = 1e3 * (time.perf_counter() - t0)
        print(f"forward (1 x {L} tokens): logits {tuple(res.logits.shape)}, loss {res.ce_loss.item():.3f} "
              f"(uniform: {torch.log(torch.tensor(float(arch.vocab_size))).item():.3f}), {ms:.0f} ms")
        if not torch.isfinite(res.logits).all():
            raise RuntimeError("the test forward produced non-finite logits")
    if out:
        from safetensors.torch import save_model

        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "arch.yaml").write_text(arch.to_yaml())
        save_model(model.cpu(), str(out_dir / "model.safetensors"), metadata={"arch_hash": arch.arch_hash()})
        print(f"wrote {out_dir / 'arch.yaml'} and {out_dir / 'model.safetensors'}")
    return 0
