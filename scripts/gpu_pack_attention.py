"""Packed-documents attention on the H200: what `_doc_bounds` costs (its scans against a
scatter-reduce form giving the same bounds), and a row of 32 packed documents against the same
row unpacked and against the 32 documents as separate rows (the speed packing should reach).

    source scripts/gpu_env.sh; cd /tmp; python -P $ROOT/scripts/gpu_pack_attention.py
"""
import torch
import triton

from hybridlab.kernels import selective_attention_triton as sat


def bounds_scatter(seq_idx, L):
    """The same (doc_start, doc_end) as `_doc_bounds`, from run indices and scatter_reduce."""
    seq = seq_idx.to(torch.int32)
    first = torch.ones_like(seq, dtype=torch.bool)
    first[:, 1:] = seq[:, 1:] != seq[:, :-1]
    run = (first.to(torch.int32).cumsum(1) - 1).long()  # (b, L) run index within the row
    pos = torch.arange(L, device=seq.device, dtype=torch.int32).expand_as(seq)
    lo = torch.full_like(seq, L).scatter_reduce_(1, run, pos, "amin")
    hi = torch.zeros_like(seq).scatter_reduce_(1, run, pos, "amax")
    return lo.gather(1, run), hi.gather(1, run) + 1


def main():
    dev, b, L, docs, hq, d = "cuda", 2, 8192, 32, 12, 64
    seq = torch.arange(L, device=dev).div(L // docs, rounding_mode="floor").int()[None].repeat(b, 1)
    a, c = sat._doc_bounds(seq, L), bounds_scatter(seq, L)
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])
    bench = triton.testing.do_bench
    print(f"_doc_bounds {bench(lambda: sat._doc_bounds(seq, L)) * 1e3:.1f} us, "
          f"scatter form {bench(lambda: bounds_scatter(seq, L)) * 1e3:.1f} us")
    q, k, v = (torch.randn(b, L, hq, d, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)

    def alone(t):  # (b, L, h, d) -> (b * docs, L / docs, h, d): each document its own row
        return t.reshape(b * docs, L // docs, hq, d)
    cases = {"row, unpacked": lambda: sat.selective_attention(q, k, v),
             f"row, {docs} packed documents": lambda: sat.selective_attention(q, k, v, seq_idx=seq),
             f"{docs} documents as rows": lambda: sat.selective_attention(alone(q), alone(k), alone(v))}
    for name, f in cases.items():
        fwd = bench(f)
        grad_out = do.reshape(f().shape)
        fb = bench(lambda: torch.autograd.grad(f(), (q, k, v), grad_out))
        print(f"{name}: fwd {fwd:.3f} ms, fwd+bwd {fb:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
