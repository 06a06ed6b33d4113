"""Write the K/V-by-TMA variant of the selective-attention kernels to PATH, for an A/B beside
the current module (`scripts/gpu_profile.py --sections attention --attn tma=PATH`).

    python scripts/attention_variants/make_kv_tma.py /tmp/sat_tma.py

The forward's and dq's K/V tiles come from host `TensorDescriptor`s over (b, L, hkv, d) in
(1, BLOCK_N, 1, HEAD_DIM) boxes (a per-config pre-hook sets the box): TMA copies, zero rows past
L, so no load masks and no per-element address arithmetic. Each edit names the text it
replaces and stops with an error if the kernel no longer has it: then redo the edit by hand.
Only Python is needed (no `patch` on the GPU machine).
"""
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "kernels" / "selective_attention_triton.py"

EDITS = [
    ("import triton\nimport triton.language as tl\n",
     "import triton\nimport triton.language as tl\nfrom triton.tools.tensor_descriptor import TensorDescriptor\n", 1),
    ("def _tuner_bench(fn, quantiles):", '''def _kv_block_shape(nargs):
    """The K/V descriptors load (1, BLOCK_N, 1, HEAD_DIM) boxes: set per config before a launch."""
    for name in ("desc_k", "desc_v"):
        nargs[name].block_shape = [1, nargs["BLOCK_N"], 1, nargs["HEAD_DIM"]]


def _with_kv_hook(configs):
    for c in configs:
        c.pre_hook = _kv_block_shape
    return configs


def _kv_descriptors(k, v):
    """TMA descriptors over K and V (b, L, hkv, d); block shapes are set per config."""
    return tuple(TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 16, 1, t.shape[-1]]) for t in (k, v))


def _tuner_bench(fn, quantiles):''', 1),
    ("@_autotune(_configs(_FWD_CONFIGS, _INTERP_BLOCKS))", "@_autotune(_with_kv_hook(_configs(_FWD_CONFIGS, _INTERP_BLOCKS)))", 1),
    ("@_autotune(_configs(_DQ_CONFIGS, _INTERP_BLOCKS))", "@_autotune(_with_kv_hook(_configs(_DQ_CONFIGS, _INTERP_BLOCKS)))", 1),
    ("def _score_tile(q, pos_m, k_base, v_base, kvm_base, stride_kl, stride_vl, start_n, L, window, qk_scale,",
     "def _score_tile(q, pos_m, desc_k, desc_v, b, hk, kvm_base, start_n, L, window, qk_scale,", 1),
    ('''    offs_d = tl.arange(0, HEAD_DIM)
    cols = start_n + tl.arange(0, BLOCK_N)  # (BN,) key positions
    k_ptrs = k_base + _wide(cols, OFF64)[:, None] * stride_kl + offs_d[None, :]
    v_ptrs = v_base + _wide(cols, OFF64)[:, None] * stride_vl + offs_d[None, :]
    if MASK >= _DIAGONAL:  # the last block may run past L; window-edge keys lie before p_first
        col_ok = cols < L
        k = tl.load(k_ptrs, mask=col_ok[:, None], other=0.0)  # (BN, D)
        v = tl.load(v_ptrs, mask=col_ok[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)''', '''    cols = start_n + tl.arange(0, BLOCK_N)  # (BN,) key positions
    # TMA boxes; rows past L come back as zeros, so no load masks and no address arithmetic
    k = desc_k.load([b, start_n, hk, 0]).reshape(BLOCK_N, HEAD_DIM)  # (BN, D)
    v = desc_v.load([b, start_n, hk, 0]).reshape(BLOCK_N, HEAD_DIM)
    col_ok = cols < L''', 1),
    ("def _fwd_inner(acc, m_i, l_i, q, pos_m, k_base, v_base, kvm_base, stride_kl, stride_vl,",
     "def _fwd_inner(acc, m_i, l_i, q, pos_m, desc_k, desc_v, b, hk, kvm_base,", 1),
    ("def _dq_inner(dq, q, do, lse, delta, pos_m, k_base, v_base, kvm_base, stride_kl, stride_vl,",
     "def _dq_inner(dq, q, do, lse, delta, pos_m, desc_k, desc_v, b, hk, kvm_base,", 1),
    ("        k, v, qk = _score_tile(q, pos_m, k_base, v_base, kvm_base, stride_kl, stride_vl, start_n,",
     "        k, v, qk = _score_tile(q, pos_m, desc_k, desc_v, b, hk, kvm_base, start_n,", 2),
    ("_fwd_inner(acc, m_i, l_i, q, pos_m, k_base, v_base, kvm_base, skl, svl,",
     "_fwd_inner(acc, m_i, l_i, q, pos_m, desc_k, desc_v, b, hk, kvm_base,", 4),
    ("_dq_inner(dq, q, do, lse, delta, pos_m, k_base, v_base, kvm_base, skl, svl,",
     "_dq_inner(dq, q, do, lse, delta, pos_m, desc_k, desc_v, b, hk, kvm_base,", 4),
    ("def _sel_attn_fwd(Q, K, V, O, LSE, SEL_POS, RANK, KVM,",
     "def _sel_attn_fwd(Q, K, V, O, LSE, SEL_POS, RANK, KVM, desc_k, desc_v,", 1),
    ("def _sel_attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, SEL_POS, RANK, KVM,",
     "def _sel_attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, SEL_POS, RANK, KVM, desc_k, desc_v,", 1),
    ("            _sel_attn_fwd[grid](\n                q, k, v, o, lse, sel_pos, rank, kvm,",
     "            _sel_attn_fwd[grid](\n                q, k, v, o, lse, sel_pos, rank, kvm, *_kv_descriptors(k, v),", 1),
    ("        _sel_attn_bwd_dq[grid_q](\n            q, k, v, do, dq, lse, delta, sel_pos, rank, kvm,",
     "        _sel_attn_bwd_dq[grid_q](\n            q, k, v, do, dq, lse, delta, sel_pos, rank, kvm, *_kv_descriptors(k, v),", 1),
    ("    k_base = K + b64 * skb + hk * skh\n    v_base = V + b64 * svb + hk * svh\n", "", 2),
]


def main(out: str) -> None:
    text = SRC.read_text()
    for old, new, count in EDITS:
        found = text.count(old)
        if found != count:
            sys.exit(f"make_kv_tma: expected {count} of {old.splitlines()[0]!r} in {SRC}, found {found}")
        text = text.replace(old, new)
    Path(out).write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/sat_tma.py")
