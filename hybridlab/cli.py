"""`hybridlab` command line. Heavy imports (torch) happen inside commands so --help is instant."""
from __future__ import annotations

import argparse
import sys


def _cmd_blocks(args) -> int:
    import dataclasses

    from hybridlab.blocks import REGISTRY

    for spec in REGISTRY.values():
        print(f"{spec.name} [{spec.code}]  {spec.summary}")
        for f in dataclasses.fields(spec.config_cls):
            meta = f.metadata
            if not f.init or "help" not in meta:
                continue
            default = f.default
            default = f"{default:.4g}" if isinstance(default, float) else repr(default) if isinstance(default, str) else default
            extra = ""
            if meta.get("choices"):
                extra = f" one of {'|'.join(meta['choices'])}."
            print(f"    {f.name:<16} = {str(default):<10} {meta['help']}.{extra}")
        print()
    return 0


def _cmd_build(args) -> int:
    from hybridlab.build import build

    return build(args.arch, out=args.out, seq_len=args.seq_len, forward=not args.no_forward,
                 device=args.device)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hybridlab", description="Hybrid SSM/attention language models from YAML graphs.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("blocks", help="list registered blocks with their settings, defaults and meanings")
    s.set_defaults(func=_cmd_blocks)

    s = sub.add_parser("build", help="validate an architecture YAML, print its layers, size and costs, run one forward")
    s.add_argument("arch", help="architecture YAML, e.g. experiments/taipan-190m.yaml")
    s.add_argument("--out", help="write the normalised YAML and initial weights (safetensors) here")
    s.add_argument("--seq-len", type=int, default=4096, help="length for FLOPs per token (default 4096)")
    s.add_argument("--no-forward", action="store_true", help="skip building weights and the test forward")
    s.add_argument("--device", default=None, help="device for the test forward (default: cuda if present)")
    s.set_defaults(func=_cmd_build)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from hybridlab.errors import ConfigError, UserError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, UserError) as e:
        print(f"hybridlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hybridlab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
