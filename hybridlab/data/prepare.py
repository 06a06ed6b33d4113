"""Offline data preparation: a corpus tokenized once into memory-mappable shards.

    hybridlab data prepare SOURCE [--tokenizer tokenizer.json] --out DIR [--workers N]

SOURCE is a text file, a JSONL file or a folder of them (searched recursively; hidden, empty and
binary files are skipped the way `corpus.text_files` skips them). One text file is one document;
one JSONL line is one document, its `text_field` ("text"). DIR then holds, for shard k:

    shard_0000k.bin        token ids, raw (uint16 when the vocab fits in 65536, else uint32),
                           an EOS after every document; a document never spans two shards
    shard_0000k.docs.npy   int64 start offset, in the shard, of each of its documents

plus `manifest.json` (format, tokenizer sha256 and vocab size, EOS id, dtype, documents and tokens
per shard and in total, the source files with sizes and mtimes) and, with a tokenizer, a copy of
`tokenizer.json`: the folder is all that `data: {prepared: DIR}` needs.

Byte-level when no tokenizer: vocab 256 as `data: {text: ...}`, and EOS = 0 (NUL), a byte that
text never holds (corpus.py takes a file with NUL for binary; a document that holds one is refused),
so the byte-level models (vocab_size 256) train on prepared data unchanged. With a tokenizer, EOS
is its end-of-text token, and special tokens written in the text are encoded as plain text, so EOS
ids in a shard are exactly the document ends.

The work is cut into units (runs of files and byte ranges of JSONL files, by size alone) which
worker processes tokenize while the main process writes their output in unit order: the files are
the same whatever the number of workers. Each finished shard is renamed into place and recorded
in the manifest with the place the next shard starts from, so a killed run continues at its first
unfinished shard and ends with the files an uninterrupted run writes.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import sys
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from hybridlab.checkpoint import publish, tmp_name, write_atomic
from hybridlab.data import corpus
from hybridlab.errors import UserError
from hybridlab.progress import fmt_time

FORMAT, VERSION = "hybridlab-prepared", 1
MANIFEST, TOKENIZER = "manifest.json", "tokenizer.json"
BYTE_EOS = 0                     # NUL: never in text, so byte-level data keeps vocab 256
SHARD_TOKENS = 100_000_000       # tokens per shard (a shard closes at the first document end past it)
UNIT_BYTES = 1 << 22             # source bytes per unit of work handed to a worker
EOS_NAMES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>")  # Llama 3, GPT-2, Llama 2, Gemma


@dataclass(frozen=True)
class SourceFile:
    path: Path
    name: str       # relative to the source folder
    kind: str       # "text" (one document) or "jsonl" (one document a line)
    size: int
    mtime_ns: int

    def record(self) -> dict:
        return {"path": self.name, "kind": self.kind, "bytes": self.size, "mtime_ns": self.mtime_ns}


def source_files(source: Path) -> list[SourceFile]:
    """The files of SOURCE in sorted order, each stat'ed and sniffed (so unreadable ones fail now)."""
    if not source.exists():
        raise UserError(f"source {source} does not exist")
    single = source.is_file()
    root = source.parent if single else source
    paths = [source] if single else [
        f for f in sorted(source.rglob("*"))
        if f.is_file() and not any(part.startswith(".") for part in f.relative_to(source).parts)]
    files = []
    for f in paths:
        try:
            st = f.stat()
            text = st.st_size > 0 and corpus._is_text(f)
        except OSError as e:
            raise UserError(f"cannot read {f}: {e.strerror}") from None
        if single and not st.st_size:
            raise UserError(f"source file {f} is empty")
        if single and not text:
            raise UserError(f"source file {f} is not text (it holds NUL bytes)")
        if text:
            kind = "jsonl" if f.suffix.lower() == ".jsonl" else "text"
            files.append(SourceFile(f, f.relative_to(root).as_posix(), kind, st.st_size, st.st_mtime_ns))
    if not files:
        raise UserError(f"source folder {source} holds no non-empty text or JSONL files")
    return files


def plan_units(files: list[SourceFile], unit_bytes: int) -> list[list[tuple[int, int, int]]]:
    """Units of work: lists of (file index, start byte, stop byte) of about `unit_bytes`.

    A text file is one piece (one document); a JSONL file is cut into byte ranges, each owning the
    lines that start inside it. Depends on the files' sizes alone, so a resumed run plans the same."""
    units, unit, size = [], [], 0
    for i, f in enumerate(files):
        step = unit_bytes if f.kind == "jsonl" else f.size
        for start in range(0, f.size, step):
            stop = min(start + step, f.size)
            unit.append((i, start, stop))
            size += stop - start
            if size >= unit_bytes:
                units.append(unit)
                unit, size = [], 0
    if unit:
        units.append(unit)
    return units


# ---- workers: one unit of source bytes -> (tokens with an EOS after each document, lengths) ----

_WORKER: dict = {}
_LOCKED: Optional[int] = None  # the fd holding the output folder's lock, in the main process


def _init_worker(files: list[SourceFile], text_field: str, tokenizer: Optional[str], eos_id: int,
                 dtype: str, pooled: bool) -> None:
    if pooled:
        _exit_with_parent()
        if _LOCKED is not None:  # forked with the folder's lock: only the main process may hold it
            os.close(_LOCKED)
    tok = None
    if tokenizer is not None:
        if pooled:  # the processes are the parallelism; threads in each would oversubscribe
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(tokenizer)
        tok.encode_special_tokens = True  # "<|endoftext|>" written in a document is text, not EOS
    _WORKER.update(files=files, text_field=text_field, tok=tok, eos=np.array([eos_id], dtype),
                   dtype=np.dtype(dtype))


def _exit_with_parent() -> None:
    """A worker whose main process was killed (SIGKILL: no clean-up) would wait for work forever."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _line_number(path: Path, offset: int) -> int:
    """1-based number of the line starting at byte `offset` (counted only to report an error)."""
    n, done = 1, 0
    with open(path, "rb") as f:
        while done < offset:
            block = f.read(min(1 << 20, offset - done))
            n, done = n + block.count(b"\n"), done + len(block)
    return n


def _jsonl_documents(f: SourceFile, start: int, stop: int, text_field: str) -> Iterator[tuple[str, Callable]]:
    """(text, where) of the lines that start in bytes [start, stop) of a JSONL file."""
    with open(f.path, "rb") as fh:
        if start:
            fh.seek(start - 1)
            fh.readline()  # the rest of the line under way at `start` belongs to the previous range
        pos = fh.tell()
        while pos < stop:
            line = fh.readline()
            if not line:
                return
            if pos == 0:
                line = line.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
            if line.strip():
                where = lambda pos=pos: f"{f.path}:{_line_number(f.path, pos)}"  # noqa: E731
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise UserError(f"{where()}: not a JSON object ({getattr(e, 'msg', e)})") from None
                if not isinstance(obj, dict) or text_field not in obj:
                    raise UserError(f"{where()}: no {text_field!r} field (choose another with --text-field)")
                if not isinstance(obj[text_field], str):
                    raise UserError(f"{where()}: {text_field!r} is {type(obj[text_field]).__name__}, not a string")
                yield obj[text_field], where
            pos = fh.tell()


def _byte_ids(data: bytes, where) -> np.ndarray:
    ids = np.frombuffer(data, dtype=np.uint8)
    nul = np.flatnonzero(ids == BYTE_EOS)
    if nul.size:
        raise UserError(f"{where()}: holds a NUL byte (at byte {int(nul[0])}), the byte-level end of "
                        "document; remove it or prepare with --tokenizer")
    return ids


def _tokenize_unit(unit: list[tuple[int, int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """-> (tokens, lengths): the unit's documents in order, each followed by EOS; lengths count
    the EOS. Documents with no tokens are dropped."""
    files, tok, dtype = _WORKER["files"], _WORKER["tok"], _WORKER["dtype"]
    docs = []  # (text or bytes, where)
    for i, start, stop in unit:
        f = files[i]
        if f.kind == "text":
            data = f.path.read_bytes()
            docs.append((data.decode("utf-8", errors="replace") if tok else data, lambda f=f: str(f.path)))
        else:
            for text, where in _jsonl_documents(f, start, stop, _WORKER["text_field"]):
                docs.append((text if tok else text.encode("utf-8", errors="replace"), where))
    if tok is None:
        ids = [_byte_ids(data, where) for data, where in docs]
    else:
        ids = [np.asarray(e.ids, dtype=np.uint32) for e in
               tok.encode_batch([text for text, _ in docs], add_special_tokens=False)]
    parts = []
    for x in ids:
        if len(x):
            parts += [x.astype(dtype, copy=False), _WORKER["eos"]]
    lengths = np.array([len(x) + 1 for x in ids if len(x)], dtype=np.int64)
    return (np.concatenate(parts) if parts else np.zeros(0, dtype)), lengths


def _unit_results(units, first: int, workers: int, init_args) -> Iterator[tuple[int, tuple]]:
    """(unit index, result) in unit order from `first` on; at most 2 units a worker in flight."""
    if workers == 1:
        _init_worker(*init_args, pooled=False)
        for u in range(first, len(units)):
            yield u, _tokenize_unit(units[u])
        return
    todo = iter(range(first, len(units)))
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(*init_args, True)) as pool:
        window = deque((u, pool.submit(_tokenize_unit, units[u])) for u in itertools.islice(todo, 2 * workers))
        try:
            while window:
                u, future = window.popleft()
                result = future.result()
                nxt = next(todo, None)
                if nxt is not None:
                    window.append((nxt, pool.submit(_tokenize_unit, units[nxt])))
                yield u, result
        finally:
            for _, future in window:
                future.cancel()


# ---- the output folder -------------------------------------------------------------------------

def _write_manifest(out: Path, manifest: dict) -> None:
    write_atomic(out / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())


def shard_names(k: int) -> tuple[str, str]:
    return f"shard_{k:05d}.bin", f"shard_{k:05d}.docs.npy"


class _Shards:
    """Appends documents to the open shard; closes it at the first document end past `limit`."""

    def __init__(self, out: Path, manifest: dict, limit: int, on_shard):
        self.out, self.manifest, self.limit, self.on_shard = out, manifest, limit, on_shard
        self.file = self.tmp = None
        self.length, self.starts = 0, []

    def add(self, tokens: np.ndarray, lengths: np.ndarray, unit: int, skip: int) -> None:
        """A unit's output less its first `skip` documents (those already in a finished shard)."""
        ends = np.cumsum(lengths)  # (D,) end of each document in `tokens`
        i, pos = skip, int(ends[skip - 1]) if skip else 0
        while i < len(lengths):
            if self.file is None:
                name = shard_names(len(self.manifest["shards"]))[0]
                self.tmp = tmp_name(self.out / name)
                self.file = open(self.tmp, "wb")
            # documents i..j-1 go in; j-1 is the first whose end reaches the limit (or the last)
            room = self.limit - self.length
            j = min(int(np.searchsorted(ends[i:] - pos, room)) + i + 1, len(lengths))
            stop = int(ends[j - 1])
            self.starts.append(self.length + np.concatenate([[0], ends[i:j - 1] - pos]))
            self.file.write(tokens[pos:stop].tobytes())
            self.length += stop - pos
            i, pos = j, stop
            if self.length >= self.limit:
                self.close([unit, i] if i < len(lengths) else [unit + 1, 0])

    def abandon(self) -> None:
        if self.file is not None:
            self.file.close()
            self.tmp.unlink(missing_ok=True)
            self.file = None

    def close(self, resume_at: list[int]) -> None:
        if self.file is None:
            return
        k = len(self.manifest["shards"])
        name, docs_name = shard_names(k)
        self.file.close()
        publish(self.tmp, self.out / name)
        starts = np.concatenate(self.starts).astype(np.int64)
        tmp = tmp_name(self.out / docs_name)
        with open(tmp, "wb") as f:
            np.save(f, starts)
        publish(tmp, self.out / docs_name)
        self.manifest["shards"].append({"tokens_file": name, "doc_starts_file": docs_name,
                                        "tokens": self.length, "documents": len(starts),
                                        "resume_at": resume_at})
        _write_manifest(self.out, self.manifest)
        self.file, self.length, self.starts = None, 0, []
        if self.on_shard is not None:
            self.on_shard(k)


_IDENTITY = {"format": "format", "version": "format version", "source": "source",
             "text_field": "--text-field", "files": "source files", "tokenizer": "tokenizer",
             "eos_id": "EOS token", "dtype": "dtype", "shard_tokens": "--shard-tokens",
             "unit_bytes": "unit size"}


def _check_same(out: Path, old: dict, new: dict) -> None:
    """Refuse to continue (or call finished) a folder prepared from other inputs. A layout setting
    left out (None: --shard-tokens not given) takes the folder's."""
    for key, what in _IDENTITY.items():
        if old.get(key) == new[key] or (new[key] is None and key in ("shard_tokens", "unit_bytes")):
            continue
        if key == "tokenizer":
            desc = lambda t: f"tokenizer sha256 {t['sha256'][:12]}" if t else "bytes (no tokenizer)"  # noqa: E731
            detail = f"{desc(old.get(key))}, not {desc(new[key])}"
        elif key == "files":
            before = {f["path"]: f for f in old.get(key) or []}
            changed = [f["path"] for f in new[key] if before.pop(f["path"], None) != f] + sorted(before)
            detail = f"{changed[0]} was added, removed or changed since" if changed else "their order differs"
        else:
            detail = f"{old.get(key)!r}, not {new[key]!r}"
        raise UserError(f"--out {out} was prepared with another {what} ({detail}); use a new --out "
                        "folder, or delete this one to prepare it again")


def _open_out(out: Path, manifest: dict) -> Optional[dict]:
    """Check the output folder and tidy a killed run's leftovers; the manifest already there
    (None for a new folder)."""
    old = None
    if (out / MANIFEST).is_file():
        try:
            old = json.loads((out / MANIFEST).read_text())
        except ValueError:
            pass
        if not isinstance(old, dict) or old.get("format") != FORMAT or not isinstance(old.get("shards"), list):
            raise UserError(f"--out {out}: {MANIFEST} is not a prepared-data manifest; use a new --out folder")
        _check_same(out, old, manifest)
    elif any(not p.name.startswith(".") for p in out.iterdir()):
        raise UserError(f"--out {out}: folder is not empty and holds no {MANIFEST}; use a new or empty folder")
    for stale in out.glob(".*.tmp-*"):  # a killed run's half-written files
        stale.unlink()
    if old is not None and not old.get("complete"):
        recorded = {name for k in range(len(old["shards"])) for name in shard_names(k)}
        for p in out.glob("shard_*"):  # renamed into place after the last manifest update
            if p.name not in recorded:
                p.unlink()
    return old


def _remove_output(out: Path, created: bool) -> None:
    for p in [out / MANIFEST, out / TOKENIZER, *out.glob("shard_*")]:
        p.unlink(missing_ok=True)
    if created:
        out.rmdir()


def _tokenizer_record(tokenizer: Optional[str], eos: Optional[str]) -> tuple[Optional[dict], int, int, bytes]:
    """-> (manifest record, vocab size, EOS id, the tokenizer file's bytes)."""
    if tokenizer is None:
        if eos is not None:
            raise UserError("--eos goes with --tokenizer (byte-level data ends documents with byte 0)")
        return None, 256, BYTE_EOS, b""
    from hybridlab.data.text import TokenizerCodec

    path = Path(os.path.expanduser(tokenizer))
    codec = TokenizerCodec(path)
    origin = f"--eos {eos!r}"
    if eos is None:  # a tokenizer_config.json beside it (Hugging Face layout) names its EOS
        config = path.with_name("tokenizer_config.json")
        try:
            value = json.loads(config.read_text()).get("eos_token") if config.is_file() else None
        except (ValueError, OSError, AttributeError):
            value = None
        value = value.get("content") if isinstance(value, dict) else value
        eos, origin = (value, f"{config}'s eos_token {value!r}") if isinstance(value, str) else (None, "")
    for name in [eos] if eos else EOS_NAMES:
        eos_id = codec.tok.token_to_id(name)
        if eos_id is not None:
            data = path.read_bytes()
            return ({"sha256": hashlib.sha256(data).hexdigest(), "vocab_size": codec.vocab_size,
                     "eos_token": name}, codec.vocab_size, int(eos_id), data)
    if eos:
        raise UserError(f"{origin}: not a token of tokenizer {path}")
    raise UserError(f"tokenizer {path} has none of the usual end-of-document tokens "
                    f"({', '.join(EOS_NAMES)}); name its one with --eos TOKEN")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


class _Bar:
    """One line on stderr: share of the source done, tokens, shards, speed, ETA."""

    def __init__(self, total_bytes: int, done_bytes: int, enabled: bool, stream=sys.stderr):
        self.total, self.done, self.start = total_bytes, done_bytes, done_bytes
        self.stream, self.enabled, self.tty = stream, enabled, stream.isatty()
        self.t0 = self.last = time.perf_counter()

    def update(self, unit_bytes: int, tokens: int, shards: int) -> None:
        self.done += unit_bytes
        now = time.perf_counter()
        if not self.enabled or (not self.tty and now - self.last < 10 and self.done < self.total):
            return
        rate = (self.done - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - self.done) / rate if rate else 0.0
        line = (f"prepare {100 * self.done / self.total:5.1f}% | {_size(self.done)} of {_size(self.total)} | "
                f"{tokens:,} tokens | {shards} shards | {_size(rate)}/s | ETA {fmt_time(eta)}")
        self.stream.write("\r" + line.ljust(100) if self.tty else line + "\n")
        self.stream.flush()
        self.last = now

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def prepare(source, out_dir, tokenizer: Optional[str] = None, text_field: str = "text",
            workers: Optional[int] = None, shard_tokens: Optional[int] = None, eos: Optional[str] = None,
            unit_bytes: Optional[int] = None, progress: bool = True,
            on_shard: Optional[Callable[[int], None]] = None) -> dict:
    """Tokenize SOURCE into shards in `out_dir` (or finish a killed run there). Returns a summary:
    documents, tokens, shards, seconds, resumed_from (first shard written now; None if from the
    start), already (the folder was finished before). `on_shard(k)` runs after shard k is recorded.
    shard_tokens and unit_bytes (the size of a worker's unit of work) default to the folder's when
    it was started before, else SHARD_TOKENS and UNIT_BYTES."""
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    if shard_tokens is not None and shard_tokens < 1:
        raise UserError(f"--shard-tokens must be >= 1, got {shard_tokens}")
    if unit_bytes is not None and unit_bytes < 1:
        raise UserError(f"unit_bytes must be >= 1, got {unit_bytes}")
    if not text_field:
        raise UserError("--text-field must not be empty")
    t0 = time.perf_counter()
    src = Path(os.path.expanduser(str(source))).resolve()
    out = Path(os.path.expanduser(str(out_dir))).resolve()
    files = source_files(src)
    if src.is_dir() and out.is_relative_to(src):
        raise UserError(f"--out {out_dir} is inside the source folder {source}; it would read its own output")
    tok_record, vocab, eos_id, tok_bytes = _tokenizer_record(tokenizer, eos)
    manifest = {"format": FORMAT, "version": VERSION, "complete": False, "source": str(src),
                "text_field": text_field, "files": [f.record() for f in files], "tokenizer": tok_record,
                "vocab_size": vocab, "eos_id": eos_id, "dtype": "uint16" if vocab <= 1 << 16 else "uint32",
                "shard_tokens": shard_tokens, "unit_bytes": unit_bytes, "shards": []}
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out_dir}: is a file, not a folder")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        old = _open_out(out, manifest)
        for key, default in (("shard_tokens", SHARD_TOKENS), ("unit_bytes", UNIT_BYTES)):
            manifest[key] = manifest[key] or (old or {}).get(key) or default
        if old is not None and old.get("complete"):
            return _summary(out, old, t0, already=True, resumed_from=None)
        if old is not None:
            manifest["shards"] = old["shards"]
        resumed_from = len(manifest["shards"]) or None
        _write_manifest(out, manifest)  # first: a folder with files but no manifest is not ours
        if tok_record is not None:
            write_atomic(out / TOKENIZER, tok_bytes)
        tokenizer = str(Path(os.path.expanduser(tokenizer))) if tokenizer else None
        try:
            _write_shards(out, manifest, files, tokenizer, workers, progress, on_shard)
            if not manifest["shards"]:
                raise UserError(f"source {source} holds no text to tokenize (every document is empty)")
        except UserError:  # the source needs fixing, and a later run refuses to mix these shards in
            if old is None:  # so a folder this run started goes back to how it was
                _remove_output(out, created)
            raise
        manifest.update(complete=True, documents=sum(s["documents"] for s in manifest["shards"]),
                        tokens=sum(s["tokens"] for s in manifest["shards"]))
        _write_manifest(out, manifest)
    return _summary(out, manifest, t0, already=False, resumed_from=resumed_from)


def _write_shards(out: Path, manifest: dict, files: list[SourceFile], tokenizer: Optional[str],
                  workers: Optional[int], progress: bool, on_shard) -> None:
    """Tokenize the source from where the last recorded shard ends, recording each new shard."""
    units = plan_units(files, manifest["unit_bytes"])
    first_unit, skip = manifest["shards"][-1]["resume_at"] if manifest["shards"] else (0, 0)
    n_workers = max(1, min(workers or default_workers(), len(units) - first_unit))
    unit_size = [sum(stop - start for _, start, stop in unit) for unit in units]
    bar = _Bar(sum(unit_size), sum(unit_size[:first_unit]), progress)
    shards = _Shards(out, manifest, manifest["shard_tokens"], on_shard)
    tokens = sum(s["tokens"] for s in manifest["shards"])
    init = (files, manifest["text_field"], tokenizer, manifest["eos_id"], manifest["dtype"])
    try:
        for u, (ids, lengths) in _unit_results(units, first_unit, n_workers, init):
            done = skip if u == first_unit else 0  # documents of this unit in a recorded shard
            if len(lengths) > done:
                shards.add(ids, lengths, u, done)
            tokens += len(ids) - int(lengths[:done].sum())
            bar.update(unit_size[u], tokens, len(manifest["shards"]))
        shards.close([len(units), 0])
    finally:
        bar.close()
        shards.abandon()  # stopped (an error, Ctrl-C): drop the shard under way; finished ones stay


@contextlib.contextmanager
def _exclusive(out: Path):
    """One `prepare` at a time in a folder: flock on the folder itself, so no lock file is left."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    global _LOCKED
    fd, outer = os.open(out, os.O_RDONLY), _LOCKED
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"--out {out}: another `hybridlab data prepare` is writing to it") from None
        _LOCKED = fd
        yield
    finally:
        _LOCKED = outer
        os.close(fd)


def _summary(out: Path, manifest: dict, t0: float, **extra) -> dict:
    shards = manifest["shards"]
    return {"out": str(out), "documents": sum(s["documents"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards), "shards": len(shards), "dtype": manifest["dtype"],
            "vocab_size": manifest["vocab_size"], "eos_id": manifest["eos_id"],
            "seconds": time.perf_counter() - t0, **extra}


def read_manifest(folder: Path) -> dict:
    """The manifest of a finished prepared folder (for the dataset), with clear errors."""
    path = folder / MANIFEST
    if not folder.is_dir():
        raise UserError(f"prepared data folder {folder} does not exist")
    if not path.is_file():
        raise UserError(f"{folder} holds no {MANIFEST}; make it with `hybridlab data prepare SOURCE --out {folder}`")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path}: not JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path}: not a prepared-data manifest")
    if manifest.get("version") != VERSION:
        raise UserError(f"{path}: format version {manifest.get('version')}, this hybridlab reads {VERSION}; "
                        "prepare the data again")
    if not manifest.get("complete"):
        raise UserError(f"{folder}: preparation did not finish ({len(manifest.get('shards', []))} shards "
                        "so far); run the same `hybridlab data prepare` again to finish it")
    return manifest
