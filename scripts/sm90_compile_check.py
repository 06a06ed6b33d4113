"""Compile the selective-attention kernels for sm_90 (H100/H200) on a machine without a GPU and
report what ptxas made of each autotune config: registers, stack (spills), shared memory, and
whether the key loop's loads were software-pipelined (cp.async copies). Triton ships ptxas and
cuobjdump in its wheel, so this runs on the CPU CI machine too (~5 s a config):

    python scripts/sm90_compile_check.py [--module PATH] [--kernels fwd,dq,dkdv] [--kv-mask]
        [--configs "64,64,4,3;64,64,4,3,128" | --picks]

Use it before spending device time: a config that spills, or a loop that lost its pipelining,
shows here. The launcher specialises pointers and strides divisible by 16 (`tt.divisibility`);
they are declared so here too: without that, Triton cannot prove 16-byte alignment and does
not pipeline the loads, and the figures would be for a different kernel. Lengths, windows and
head counts are `do_not_specialize` in the kernels and are left plain.

The figures come from this machine's Triton and ptxas, not necessarily the GPU machine's
(triton 3.7 here vs 3.6 on the H200: the dk/dv kernel at 32x64 showed 184 registers here and
255 in Nsight there). Trust them for "compiles / spills / pipelined", as a guide for counts.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

NOT_SPECIALISED = {"L", "H", "GROUP", "HKV", "window", "qk_scale", "scale"}
FLOATS = {"qk_scale", "scale"}
BF16 = "*bf16"
POINTERS = dict(Q=BF16, K=BF16, V=BF16, O=BF16, DO=BF16, DQ=BF16, DK=BF16, DV=BF16, LSE="*fp32",
                DELTA="*fp32", SEL_POS="*i32", RANK="*i32", KVM="*u8", DOC_START="*i32", DOC_END="*i32")
KERNELS = dict(fwd=("_sel_attn_fwd", "_FWD_CONFIGS"), dq=("_sel_attn_bwd_dq", "_DQ_CONFIGS"),
               dkdv=("_sel_attn_bwd_dkdv", "_DKDV_CONFIGS"))
# what the H200's autotuner picked for the masked path at the issue shape (2026-11-29, dk/dv re-tuned in the sixth session)
PICKS = dict(fwd=(64, 64, 4, 3, 128), dq=(64, 64, 4, 3), dkdv=(16, 64, 4, 3, 128))


def load(path):
    """The file as a module of hybridlab.kernels (a copy elsewhere too), so its relative imports
    (`from .launch import launch`) resolve."""
    importlib.import_module("hybridlab.kernels")
    spec = importlib.util.spec_from_file_location("hybridlab.kernels._sat_checked", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def compile_one(jit_fn, consts, num_warps, num_stages, maxnreg=None):
    names = jit_fn.arg_names
    box = f"[1,{consts.get('BLOCK_N')},1,{consts.get('HEAD_DIM')}]"  # K/V TMA boxes (variants)
    signature = {a: "constexpr" if a in consts else f"tensordesc<bf16{box}>" if a.startswith("desc_")
                 else POINTERS.get(a, "fp32" if a in FLOATS else "i32") for a in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(names)
             if a not in consts and a not in NOT_SPECIALISED and not a.startswith("desc_")}
    src = ASTSource(fn=jit_fn, signature=signature, constexprs=consts, attrs=attrs)
    opts = dict(num_warps=num_warps, num_stages=num_stages)
    if maxnreg:
        opts["maxnreg"] = maxnreg
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def resources(kernel):
    """(registers, stack bytes) from cuobjdump on the cubin."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (-1, -1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--module", default=os.path.join(os.path.dirname(__file__), "..", "kernels",
                                                     "selective_attention_triton.py"))
    ap.add_argument("--kernels", default="fwd,dq,dkdv")
    ap.add_argument("--kv-mask", action="store_true", help="the selected-only K/V variant")
    ap.add_argument("--dense", action="store_true", help="the dense (no q_mask) variant")
    ap.add_argument("--packed", action="store_true", help="the packed-documents (seq_idx) variant")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--configs", help="BM,BN,warps,stages[,maxnreg];... instead of the module's lists")
    ap.add_argument("--picks", action="store_true", help="only the configs the H200 picked (PICKS)")
    args = ap.parse_args()
    mod = load(args.module)
    consts = dict(HEAD_DIM=args.head_dim, DENSE=args.dense, HAS_KV_MASK=args.kv_mask,
                  HAS_SEQ=args.packed, DOT_FP32=False, OFF64=False)
    for key in args.kernels.split(","):
        fn_name, list_name = KERNELS[key]
        if args.picks:
            configs = [PICKS[key]]
        elif args.configs:
            configs = [tuple(int(x) for x in c.split(",")) for c in args.configs.split(";")]
        else:
            configs = getattr(mod, list_name)
        for c in configs:
            bm, bn, w, s = c[:4]
            cap = c[4] if len(c) > 4 else None
            label = f"{key:5s} {bm}x{bn} w{w} s{s}" + (f" cap{cap}" if cap else "")
            try:
                k = compile_one(getattr(mod, fn_name).fn, dict(consts, BLOCK_M=bm, BLOCK_N=bn), w, s, cap)
            except Exception as e:  # a config that does not compile is a finding, not a crash
                print(f"{label}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                continue
            regs, stack = resources(k)
            ir = k.asm["ttgir"]  # cp.async copies, or TMA copies for descriptor loads
            copies = ir.count("ttg.async_copy_global_to_local") + ir.count("async_tma_copy_global_to_local")
            print(f"{label}: {regs} registers, stack {stack} B{' (spills)' if stack else ''}, "
                  f"shared {k.metadata.shared} B, pipelined loads {copies}", flush=True)


if __name__ == "__main__":
    main()
