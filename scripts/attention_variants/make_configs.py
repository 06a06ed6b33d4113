"""Write a copy of the selective-attention kernels with more autotune configs, for an A/B of
tile shapes and register caps on the GPU (`scripts/gpu_profile.py --attn NAME=PATH` prints every
config's time): cheaper than a rebuild, and the current configs stay in the list, so the
autotuner's pick in the copy is the best of old and new.

    python scripts/attention_variants/make_configs.py OUT [--src PATH] \
        [--fwd "BM,BN,w,s[,maxnreg];..."] [--dq ...] [--dkdv ...]

--src: the module to copy (default: kernels/selective_attention_triton.py; another variant's
output works too, e.g. the TMA one).
"""
import argparse
import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "kernels" / "selective_attention_triton.py"
LISTS = dict(fwd="_FWD_CONFIGS", dq="_DQ_CONFIGS", dkdv="_DKDV_CONFIGS")


def parse(spec: str) -> list[tuple[int, ...]]:
    out = []
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        c = tuple(int(x) for x in item.split(","))
        if len(c) not in (4, 5):
            raise SystemExit(f"make_configs: config {item!r} is not BM,BN,warps,stages[,maxnreg]")
        out.append(c)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--src", default=str(SRC))
    for k in LISTS:
        ap.add_argument(f"--{k}", default="", help=f"configs appended to {LISTS[k]}")
    args = ap.parse_args()
    text = Path(args.src).read_text()
    for key, name in LISTS.items():
        extra = parse(getattr(args, key))
        if not extra:
            continue
        # the list literal may span lines: `_X_CONFIGS = [...]` up to the closing bracket
        m = re.search(rf"^{name} = \[(.*?)\]\n", text, flags=re.S | re.M)
        if m is None:
            sys.exit(f"make_configs: no `{name} = [...]` in {args.src}")
        body = m.group(1).rstrip().rstrip(",") + ", " + ", ".join(map(str, extra))
        text = text[:m.start()] + f"{name} = [{body}]\n" + text[m.end():]
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
