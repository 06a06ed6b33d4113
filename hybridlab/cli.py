"""`hybridlab` command line. Heavy imports (torch) happen inside commands so --help is instant."""
from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path


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


def _training_keys() -> str:
    """The `training:` keys with their defaults and meanings, for `train --help`."""
    from hybridlab.train_config import TrainConfig

    lines = ["training settings (YAML `training:` section or --set KEY=VALUE):"]
    for f in TrainConfig.fields():
        lines.append(f"  {f.name:<18} {str(f.default):<10} {f.metadata['help']}")
    lines.append("  data               default    default | {task: mqar, ...} | {text: PATH} | {tokens: PATH} | "
                 "{prepared: DIR}")
    return "\n".join(lines)


def _cmd_build(args) -> int:
    from hybridlab.build import build

    return build(args.arch, out=args.out, seq_len=args.seq_len, forward=not args.no_forward,
                 device=_device(args.device))


def _overrides(args) -> dict:
    from hybridlab.train_config import parse_override

    out = dict(parse_override(item) for item in (args.set or []))
    for flag in ("steps", "lr", "batch_size", "seq_len", "seed", "run_name", "runs_dir", "device"):
        value = getattr(args, flag, None)
        if value is not None:
            out[flag] = value
    return out


def _is_suite(path: str) -> bool:
    import yaml

    try:
        data = yaml.safe_load(open(path))
    except (OSError, yaml.YAMLError):
        return False  # load_arch reports the problem
    return isinstance(data, dict) and "suite" in data


def _cmd_train(args) -> int:
    from hybridlab.train import prepare, train

    if args.arch and not args.resume and _is_suite(args.arch):
        from hybridlab.suite import run_suite

        run_suite(args.arch)
        return 0
    run = prepare(args.arch, resume=args.resume, overrides=_overrides(args))
    train(run)
    return 0


def _need(ok: bool, message: str) -> None:
    if not ok:
        from hybridlab.errors import UserError

        raise UserError(message)


def _device(text: str | None) -> str | None:
    """--device as torch reads it, checked here so a typo is one line, not a traceback."""
    if text is None:
        return None
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        _need(False, f"--device {text!r}: not a device; use cpu, cuda or cuda:N")
    _need(device.type != "cuda" or torch.cuda.is_available(), f"--device {text}: no CUDA device here")
    return text


def _cmd_eval(args) -> int:
    from hybridlab.evaluate import run_eval

    _need(args.batches >= 1, f"--batches must be >= 1, got {args.batches}")
    _need(args.max_factor >= 1, f"--max-factor must be >= 1, got {args.max_factor}")
    _need(args.time_budget > 0, f"--time-budget must be > 0, got {args.time_budget}")
    args.device = _device(args.device)
    if args.lm_eval is not None:
        from hybridlab.harness import run_lm_eval

        _need(args.lm_eval_limit is None or args.lm_eval_limit >= 1,
              f"--lm-eval-limit must be >= 1, got {args.lm_eval_limit}")
        _need(args.lm_eval_batch_size >= 1, f"--lm-eval-batch-size must be >= 1, got {args.lm_eval_batch_size}")
        run_lm_eval(args.checkpoint, args.lm_eval, limit=args.lm_eval_limit, include=args.lm_eval_include,
                    device=args.device, batch_size=args.lm_eval_batch_size, out_dir=args.out, arch_path=args.arch)
        return 0
    _need(args.lm_eval_limit is None and args.lm_eval_include is None,
          "--lm-eval-limit and --lm-eval-include go with --lm-eval TASKS")

    run_eval(args.checkpoint, out_dir=args.out, batches=args.batches, max_factor=args.max_factor,
             contexts=args.contexts, device=args.device, time_budget_s=args.time_budget, arch_path=args.arch)
    return 0


def _cmd_generate(args) -> int:
    import torch

    from hybridlab.data import make_dataset
    from hybridlab.errors import UserError
    from hybridlab.generate import TextStream, generate
    from hybridlab.load import load_checkpoint

    _need(args.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    _need(args.temperature >= 0, f"--temperature must be >= 0, got {args.temperature}")
    _need(args.top_k >= 0, f"--top-k must be >= 0 (0: off), got {args.top_k}")
    _need(0 < args.top_p <= 1, f"--top-p must be in (0, 1], got {args.top_p}")
    lo = load_checkpoint(args.checkpoint, _device(args.device))
    dataset = make_dataset(lo.data_spec, lo.cfg.seq_len, path="training.data", base_dir=lo.base_dir)
    ids = dataset.encode(args.prompt)
    if not ids:
        raise UserError("--prompt is empty")
    device = next(lo.model.parameters()).device
    prompt = torch.tensor([ids], device=device)
    sys.stdout.write(args.prompt)
    stream = TextStream(lambda new: dataset.decode(new))
    generate(lo.model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
             seed=args.seed, on_token=stream, cuda_graph=args.cuda_graph)
    sys.stdout.write("\n")
    return 0


def _cmd_bench(args) -> int:
    if args.what == "model":
        from hybridlab.benchmarks.model import bench_model

        from hybridlab.benchmarks.inference import parse_lengths

        _need(bool(args.arch), "bench model needs an architecture YAML")
        for flag in ("batch", "seq_len", "steps"):
            _need(getattr(args, flag) >= 1, f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
        _need(args.time_budget > 0, f"--time-budget must be > 0, got {args.time_budget}")
        parse_lengths(args.contexts)  # a bad --contexts fails now, not after the training bench
        bench_model(args.arch, batch=args.batch, seq_len=args.seq_len, contexts=args.contexts,
                    steps=args.steps, json_path=args.json, device=_device(args.device), time_budget_s=args.time_budget,
                    cuda_graph=args.cuda_graph, anchors=args.anchors, compile=args.compile)
        return 0
    from hybridlab.benchmarks.kernels import bench

    return bench(args.what, json_path=args.json)


def _cmd_sweep(args) -> int:
    from hybridlab.distributed import from_env
    from hybridlab.sweep.run import run_sweep

    _need(from_env() is None, "sweep: start it without torchrun; it runs one trial per GPU in workers of "
                              "its own (--workers)")
    run_sweep(args.space, storage=args.storage, workers=args.workers, trials=args.trials,
              timeout=args.timeout, threads=args.threads, report_only=args.report)
    return 0


def _cmd_report(args) -> int:
    from hybridlab.report import report

    columns = [c.strip() for c in args.columns.split(",")] if args.columns else None
    _need(not args.out or not Path(args.out).is_dir(), f"--out {args.out}: is a folder; give a file name")
    text = report(args.runs_dir, columns=columns, sort=args.sort)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


def _cmd_import(args) -> int:
    from hybridlab.pretrained.importer import import_model

    path, arch, fmt = import_model(args.source, args.out, name=args.name)
    print(f"imported {args.source} ({fmt}): {len(arch.layers)} layers, pattern {arch.pattern()[:60]}\n"
          f"  {path} and {path.parent / 'checkpoints'}: hybridlab eval {path.parent} | generate "
          f"{path.parent} --prompt TEXT | train {path}")
    return 0


def _cmd_export(args) -> int:
    from hybridlab.hf.exporter import export_model

    out, kind, note = export_model(args.checkpoint, args.out, fmt=args.format)
    names = {"mamba2": "Mamba2ForCausalLM", "llama": "LlamaForCausalLM",
             "hybridlab": "HybridlabForCausalLM (import hybridlab.hf before AutoModelForCausalLM)"}
    print(f"exported {args.checkpoint} to {out} as {names[kind]}" + (f"\n  {note}" if note else ""))
    return 0


def _cmd_data_prepare(args) -> int:
    from hybridlab.data.prepare import prepare

    r = prepare(args.source, args.out, tokenizer=args.tokenizer, text_field=args.text_field,
                workers=args.workers, shard_tokens=args.shard_tokens, eos=args.eos)
    what = (f"{r['documents']:,} documents, {r['tokens']:,} tokens ({r['dtype']}, vocab {r['vocab_size']}, "
            f"EOS {r['eos_id']}) in {r['shards']} shards")
    if r["already"]:
        print(f"{r['out']} is already prepared: {what}; nothing to do")
        return 0
    resumed = f", resumed at shard {r['resumed_from']}" if r["resumed_from"] is not None else ""
    print(f"prepared {args.source}: {what} in {r['seconds']:.1f} s{resumed}\n"
          f"  train on it with  data: {{prepared: {r['out']}}}")
    return 0


def _cmd_upcycle(args) -> int:
    from hybridlab.pretrained.upcycle import upcycle
    from hybridlab.train_config import parse_override

    settings = dict(parse_override(item) for item in (args.set or []))
    path, arch, added = upcycle(args.checkpoint, args.out, insert=args.insert, every=args.every,
                                settings=settings, seed=args.seed)
    print(f"upcycled {args.checkpoint}: {len(added)} {args.insert} layers at {', '.join(map(str, added))} "
          f"(outputs unchanged at the start), pattern {arch.pattern()[:60]}\n  hybridlab train {path}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad argument reported on one line (not usage + error) and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def make_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hybridlab", description="Hybrid SSM/attention language models from YAML graphs.")
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

    s = sub.add_parser("data", help="data preparation: `data prepare` tokenizes a corpus once into shards")
    data = s.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    s = data.add_parser("prepare", help="tokenize text files / JSONL into memory-mapped shards for "
                                        "`data: {prepared: DIR}`; run again to finish a stopped run")
    s.add_argument("source", help="a text file, a JSONL file (one document a line) or a folder of them")
    s.add_argument("--out", required=True, help="folder for the shards, index and manifest.json")
    s.add_argument("--tokenizer", help="Hugging Face tokenizer.json (default: bytes, vocab 256, EOS = byte 0)")
    s.add_argument("--workers", type=int, help="tokenizing processes (default: every core)")
    s.add_argument("--text-field", default="text", dest="text_field", help="JSONL key of the document (default text)")
    s.add_argument("--eos", help="end-of-document token (default: tokenizer_config.json's eos_token, or "
                                 "<|end_of_text|>, <|endoftext|>, </s>, <eos>)")
    s.add_argument("--shard-tokens", type=int, dest="shard_tokens",
                   help="tokens per shard; a shard ends with a whole document (default 100M, or the folder's)")
    s.set_defaults(func=_cmd_data_prepare)

    s = sub.add_parser("train", help="train an architecture on its `training:` section (or resume a run)",
                       epilog=_training_keys(), formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("arch", nargs="?", help="architecture YAML with a training section, or a suite YAML")
    s.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run exactly where it stopped")
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a training setting, value read as YAML (repeatable; keys below)")
    s.add_argument("--steps", type=int, help="optimizer steps (same as --set steps=N)")
    s.add_argument("--lr", type=float, help="peak learning rate")
    s.add_argument("--batch-size", type=int, dest="batch_size",
                   help="sequences per step over every process (unless tokens_per_step is set)")
    s.add_argument("--seq-len", type=int, dest="seq_len", help="tokens per sequence")
    s.add_argument("--seed", type=int, help="seed of the weights and the data order")
    s.add_argument("--run-name", dest="run_name", help="the run's folder name (default: ARCH-DATE-TIME)")
    s.add_argument("--runs-dir", dest="runs_dir", help="where run folders go (default: runs)")
    s.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default auto: cuda if present")
    s.set_defaults(func=_cmd_train)

    s = sub.add_parser("eval", help="perplexity, recall accuracy, perplexity vs context length, inference cost")
    s.add_argument("checkpoint", help="a run folder or a checkpoint folder")
    s.add_argument("--arch", help="check the checkpoint is of this architecture YAML")
    s.add_argument("--batches", type=int, default=20, help="validation batches (default 20)")
    s.add_argument("--max-factor", type=int, default=64, help="longest context as a multiple of the training length")
    s.add_argument("--contexts", default="1K,4K,16K", help="contexts for decode timing, e.g. 1K,64K,1M")
    s.add_argument("--time-budget", type=float, default=300.0, help="seconds per sweep of lengths")
    s.add_argument("--out", help="folder for eval.json and the plot (default RUN/eval/step_N)")
    s.add_argument("--device")
    s.add_argument("--lm-eval", metavar="TASKS", help="instead: these lm-evaluation-harness tasks, "
                   "comma-separated (e.g. swde,fda,squad_completion; hub tasks download their data)")
    s.add_argument("--lm-eval-limit", type=int, metavar="N", help="at most N examples per task")
    s.add_argument("--lm-eval-include", metavar="DIR", help="a folder of local task YAMLs")
    s.add_argument("--lm-eval-batch-size", type=int, default=8, metavar="N", help="sequences per forward (default 8)")
    s.set_defaults(func=_cmd_eval)

    s = sub.add_parser("generate", help="sample text from a checkpoint with cached decoding, streamed")
    s.add_argument("checkpoint")
    s.add_argument("--prompt", required=True)
    s.add_argument("--max-new-tokens", type=int, default=200)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--top-p", type=float, default=0.95)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                   help="decode through a captured CUDA graph, on CUDA (default; exact: same tokens as eager)")
    s.add_argument("--device")
    s.set_defaults(func=_cmd_generate)

    s = sub.add_parser("bench", help="benchmarks: model (training and decoding), kernels, attention")
    s.add_argument("what", choices=("model", "kernels", "attention"))
    s.add_argument("arch", nargs="?", help="architecture YAML (bench model)")
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--seq-len", type=int, default=4096, dest="seq_len")
    s.add_argument("--steps", type=int, default=10, help="timed training steps")
    s.add_argument("--contexts", default="1K,8K,32K,128K,1M", help="decode contexts")
    s.add_argument("--json", help="also write the results here")
    s.add_argument("--time-budget", type=float, default=300.0, help="seconds for the decode sweep")
    s.add_argument("--anchors", action=argparse.BooleanOptionalAction, default=True,
                   help="bench model: also time mamba_ssm's Mamba-2 and transformers' Llama of the same size, "
                        "when installed, and print the side-by-side table")
    s.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                   help="decode through a captured CUDA graph, on CUDA (default; exact: same tokens as eager)")
    s.add_argument("--compile", action="store_true",
                   help="bench model: also time training through torch.compile (the first steps compile)")
    s.add_argument("--device")
    s.set_defaults(func=_cmd_bench)

    s = sub.add_parser("sweep", help="Optuna search over SAL placement, capacity, window, ... against perplexity and cost",
                       epilog="Everything goes to <out_dir>/<study>/ (out_dir from the space, default sweeps/): "
                              "runs/ (one TensorBoard run per trial), hparams/ (the sweep's HParams table), "
                              "journal.log (the study, unless --storage), the Pareto table, plot and best "
                              "architecture YAML. Run the same command again to resume.")
    s.add_argument("space", help="search-space YAML, e.g. search_spaces/sal.yaml")
    s.add_argument("--storage", help="journal file path (default: <out_dir>/<study>/journal.log) or "
                                     "postgresql://user@host/db for workers on several machines")
    s.add_argument("--workers", type=int, help="worker processes on this machine (one per GPU when there are GPUs)")
    s.add_argument("--trials", type=int, help="total trials of the study, over every worker and resume")
    s.add_argument("--timeout", type=float, help="seconds after which no new trial starts")
    s.add_argument("--threads", type=int, help="torch CPU threads per worker (default: cores / workers)")
    s.add_argument("--report", action="store_true", help="only write and print the Pareto front, plot and best YAML")
    s.set_defaults(func=_cmd_sweep)

    s = sub.add_parser("report", help="Markdown comparison of the runs below a folder, from their event files")
    s.add_argument("runs_dir", help="a runs folder, a suite's folder, or a sweep's runs folder")
    s.add_argument("--columns", help="comma-separated scalar tags (default: params, val/loss, val/ppl, ...)")
    s.add_argument("--sort", help="sort by this column")
    s.add_argument("--out", help="also write the table to this file")
    s.set_defaults(func=_cmd_report)

    s = sub.add_parser("import", help="a local pretrained model (transformers Mamba2 / Llama, mamba_ssm) as arch "
                                      "YAML + checkpoint that train, eval and generate take")
    s.add_argument("source", help="a local model folder with config.json and weights (nothing is downloaded)")
    s.add_argument("--out", required=True, help="new folder for arch.yaml and checkpoints/")
    s.add_argument("--name", help="the architecture's name (default: the source folder's name)")
    s.set_defaults(func=_cmd_import)

    s = sub.add_parser("export", help="a checkpoint as a transformers folder: Mamba2ForCausalLM, LlamaForCausalLM "
                                      "or, for hybrids, HybridlabForCausalLM")
    s.add_argument("checkpoint", help="a run folder or a checkpoint folder")
    s.add_argument("--out", required=True, help="new folder for config.json and model.safetensors")
    s.add_argument("--format", default="auto", choices=("auto", "mamba2", "llama", "hybridlab"),
                   help="auto (default): Mamba-2 or Llama when transformers' class can hold the graph, else hybridlab")
    s.set_defaults(func=_cmd_export)

    s = sub.add_parser("upcycle", help="insert layers (SALs) into a pretrained model, outputs unchanged at the start")
    s.add_argument("checkpoint", help="a run, checkpoint or imported model folder")
    s.add_argument("--insert", default="sal", help="block type to insert (default sal)")
    s.add_argument("--every", type=int, default=6, help="one after every N layers of the type it follows (default 6)")
    s.add_argument("--out", required=True, help="new folder for arch.yaml and checkpoints/")
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a setting of the inserted block, e.g. capacity=0.15 (repeatable)")
    s.add_argument("--seed", type=int, default=0, help="seed of the new layers' weights")
    s.set_defaults(func=_cmd_upcycle)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from hybridlab.errors import ConfigError, TrainingDiverged, TrainingInterrupted, UserError

    try:
        return int(args.func(args) or 0)
    except TrainingDiverged as e:
        if _first_process():  # every torchrun process stops with the same message
            print(f"hybridlab {args.command}: error: {e}", file=sys.stderr)
        return 3
    except TrainingInterrupted as e:
        if _first_process():
            print(f"hybridlab {args.command}: {e}", file=sys.stderr)
        return 130
    except (ConfigError, UserError) as e:
        print(f"hybridlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hybridlab {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # the machine said no: full disk, read-only folder, no permission
        if e.errno not in USER_ERRNOS:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"hybridlab {args.command}: error: {where}{e.strerror}", file=sys.stderr)
        return 2
    except RecursionError:
        print(f"hybridlab {args.command}: error: the input is nested too deeply", file=sys.stderr)
        return 2


def _first_process() -> bool:
    """Not one of torchrun's processes other than rank 0."""
    import os

    return os.environ.get("RANK", "0") == "0"


USER_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOENT,
               errno.EISDIR, errno.ENOTDIR}


if __name__ == "__main__":
    sys.exit(main())
