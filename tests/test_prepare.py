"""`hybridlab data prepare` and `data: {prepared: DIR}`: shards, index and manifest that decode
back to the documents, identical output for any number of workers, a killed run resumed to the
same files, clean errors for bad input, and training on the result with document boundaries."""
import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hybridlab.cli import main
from hybridlab.data import Dataset, make_dataset
from hybridlab.data.prepare import prepare, read_manifest
from hybridlab.errors import UserError

tokenizers = pytest.importorskip("tokenizers")

ROOT = Path(__file__).parent.parent
EOS = "<|endoftext|>"
SMALL = dict(shard_tokens=600, unit_bytes=512, progress=False)  # several shards and units


def words(rng: random.Random, n: int) -> str:
    vocab = ["state", "space", "model", "attention", "token", "select", "window", "mamba", "layer", "the",
             "a", "of", "scan", "gate", "héllo", "naïve", "über", "data", "shard", "résumé"]
    return " ".join(rng.choice(vocab) for _ in range(n))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(source folder, its documents in prepare's order): text files (one nested), a JSONL file
    with a blank line, an empty document and a literal EOS string, a hidden and a binary file."""
    rng = random.Random(0)
    src = tmp_path_factory.mktemp("corpus")
    (src / "nested").mkdir()
    a = "First file.\n" + words(rng, 120) + "\n"
    b = words(rng, 200) + "\n\n  indented line\n"
    c = "# notes\n" + words(rng, 60)
    lines = [words(rng, rng.randint(3, 40)) for _ in range(40)]
    lines[7] = f"a document that writes {EOS} inside its text"
    (src / "a.txt").write_text(a)
    with open(src / "docs.jsonl", "w", encoding="utf-8-sig") as f:  # with a byte-order mark
        for i, text in enumerate(lines):
            f.write(json.dumps({"id": i, "text": text}) + "\n")
            if i == 3:
                f.write("\n" + json.dumps({"id": "empty", "text": ""}) + "\n")  # skipped: no tokens
    (src / "nested" / "b.txt").write_text(b)
    (src / "nested" / "c.md").write_text(c)
    (src / ".hidden.txt").write_text("never read")
    (src / "weights.bin").write_bytes(b"\x00\x01\x02binary")
    return src, [a, *lines, b, c]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A byte-level BPE tokenizer.json (vocab ~300, EOS <|endoftext|>) trained here, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    rng = random.Random(1)
    tok.train_from_iterator([words(rng, 400) for _ in range(4)],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def prepared(corpus, bpe, tmp_path_factory):
    """The corpus prepared with the BPE by one worker (in this process)."""
    out = tmp_path_factory.mktemp("prepared") / "out"
    summary = prepare(corpus[0], out, tokenizer=str(bpe), workers=1, **SMALL)
    return out, summary


def files_of(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def shards_of(folder: Path):
    """[(tokens, doc_starts)] of every shard, in order."""
    m = read_manifest(folder)
    return [(np.fromfile(folder / s["tokens_file"], dtype=m["dtype"]), np.load(folder / s["doc_starts_file"]))
            for s in m["shards"]]


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """`hybridlab ARGS` in this process (main() is what `python -m hybridlab` runs)."""
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


# ----------------------------------------------------------------------------- output format

def test_shards_index_and_manifest_decode_back_to_the_documents(corpus, bpe, prepared):
    src, docs = corpus
    out, summary = prepared
    tok = tokenizers.Tokenizer.from_file(str(bpe))
    eos = tok.token_to_id(EOS)
    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == "hybridlab-prepared" and m["version"] == 1 and m["complete"]
    assert m["tokenizer"]["sha256"] == hashlib.sha256(bpe.read_bytes()).hexdigest()
    assert m["tokenizer"]["vocab_size"] == m["vocab_size"] == tok.get_vocab_size()
    assert m["eos_id"] == eos and m["dtype"] == "uint16"
    assert [f["path"] for f in m["files"]] == ["a.txt", "docs.jsonl", "nested/b.txt", "nested/c.md"]
    assert all(f["bytes"] == (src / f["path"]).stat().st_size for f in m["files"])
    assert m["documents"] == summary["documents"] == len(docs)
    assert m["tokens"] == summary["tokens"] == sum(s["tokens"] for s in m["shards"])
    assert len(m["shards"]) == summary["shards"] >= 3
    assert (out / "tokenizer.json").read_bytes() == bpe.read_bytes()

    decoded = []
    for (ids, starts), record in zip(shards_of(out), m["shards"]):
        assert len(ids) == record["tokens"] and len(starts) == record["documents"]
        ends = np.append(starts[1:], len(ids))
        # EOS exactly at the index's document ends, also for the document that writes "<|endoftext|>"
        assert np.array_equal(np.flatnonzero(ids == eos), ends - 1)
        decoded += [tok.decode(ids[s:e - 1].tolist()) for s, e in zip(starts, ends)]
    assert decoded == docs


def test_byte_level_keeps_vocab_256_with_eos_zero(corpus, tmp_path):
    src, docs = corpus
    summary = prepare(src, tmp_path / "bytes", **SMALL)
    assert (summary["vocab_size"], summary["eos_id"], summary["dtype"]) == (256, 0, "uint16")
    shards = shards_of(tmp_path / "bytes")
    stream = np.concatenate([ids for ids, _ in shards])
    assert bytes(stream.astype(np.uint8)) == b"".join(d.encode() + b"\0" for d in docs)
    ds = make_dataset({"prepared": str(tmp_path / "bytes"), "val_fraction": 0.2}, 32)
    assert ds.vocab_size == 256  # the byte-level models (vocab_size 256) train on it unchanged
    assert ds.decode(ds.encode("naïve")) == "naïve"


def test_vocab_past_65536_is_stored_as_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, EOS: 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([EOS])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "doc.txt").write_text("w69999 w5 unknown")
    summary = prepare(tmp_path / "src", tmp_path / "out", tokenizer=str(tmp_path / "tokenizer.json"), progress=False)
    assert (summary["dtype"], summary["vocab_size"], summary["eos_id"]) == ("uint32", 70_002, 1)
    assert np.fromfile(tmp_path / "out" / "shard_00000.bin", np.uint32).tolist() == [70_001, 7, 0, 1]


def test_one_worker_or_two_write_identical_files(corpus, bpe, prepared, tmp_path):
    summary = prepare(corpus[0], tmp_path / "two", tokenizer=str(bpe), workers=2, **SMALL)
    assert summary["resumed_from"] is None and not summary["already"]
    assert files_of(tmp_path / "two") == files_of(prepared[0])


KILLER = """
import os, signal, sys
from hybridlab.data.prepare import prepare
def on_shard(k):
    if k == 1:
        os.kill(os.getpid(), signal.SIGKILL)
prepare(sys.argv[1], sys.argv[2], tokenizer=sys.argv[3], workers=2, shard_tokens=600, unit_bytes=512,
        on_shard=on_shard)
"""


def test_killed_run_resumes_to_the_files_of_an_uninterrupted_run(corpus, bpe, prepared, tmp_path, capsys):
    out = tmp_path / "killed"
    with open(tmp_path / "log", "w") as log:  # not a pipe: a worker left behind would hold it open
        proc = subprocess.Popen([sys.executable, "-c", KILLER, str(corpus[0]), str(out), str(bpe)], cwd=ROOT,
                                stdout=log, stderr=log)
        assert proc.wait(timeout=120) == -signal.SIGKILL, (tmp_path / "log").read_text()
    m = json.loads((out / "manifest.json").read_text())
    assert not m["complete"] and len(m["shards"]) == 2
    with pytest.raises(UserError, match="did not finish"):
        make_dataset({"prepared": str(out)}, 16)
    (out / ".shard_00002.bin.tmp-1").write_bytes(b"half")  # what a kill mid-shard leaves
    (out / "shard_00002.bin").write_bytes(b"renamed, never recorded")

    summary = prepare(corpus[0], out, tokenizer=str(bpe), workers=2, progress=False)  # layout: the folder's
    assert summary["resumed_from"] == 2
    assert files_of(out) == files_of(prepared[0])

    rc, stdout, err = run_cli(capsys, "data", "prepare", corpus[0], "--out", out, "--tokenizer", bpe)
    assert rc == 0 and "already prepared" in stdout and f"{summary['documents']} documents" in stdout


def test_a_folder_from_another_tokenizer_or_source_is_refused(corpus, bpe, prepared, tmp_path, capsys):
    out = prepared[0]
    other = tmp_path / "other.txt"
    other.write_text("another corpus\n")
    for args, what in ((["--tokenizer", bpe, "--text-field", "body"], "--text-field"),
                       ([], "tokenizer sha256"), (["--tokenizer", bpe, "--shard-tokens", 7], "--shard-tokens")):
        rc, _, err = run_cli(capsys, "data", "prepare", corpus[0], "--out", out, *args)
        assert rc == 2 and what in err and err.count("\n") == 1, err
    rc, _, err = run_cli(capsys, "data", "prepare", other, "--out", out, "--tokenizer", bpe)
    assert rc == 2 and "another source" in err, err
    assert read_manifest(out)["complete"]  # untouched


def test_one_prepare_at_a_time_in_a_folder(corpus, tmp_path):
    from hybridlab.data.prepare import _exclusive

    out = tmp_path / "out"
    out.mkdir()
    with _exclusive(out):  # as another process writing there would hold it
        with pytest.raises(UserError, match="another `hybridlab data prepare` is writing"):
            prepare(corpus[0], out, progress=False)
    assert prepare(corpus[0], out, progress=False)["documents"] == len(corpus[1])


# ----------------------------------------------------------------------------- bad input

def bad_inputs(tmp: Path, src: Path, bpe: Path) -> dict:
    """name -> (argv after `data prepare`, words the one-line error must hold)."""
    (tmp / "empty").mkdir()
    (tmp / "binary").mkdir()
    (tmp / "binary" / "x.bin").write_bytes(b"\x00" * 10)
    (tmp / "junk.json").write_text('{"not": "a tokenizer"}')
    (tmp / "a-file").write_text("x")
    (tmp / "busy").mkdir()
    (tmp / "busy" / "notes.txt").write_text("mine")
    (tmp / "bad.jsonl").write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": broken\n')
    (tmp / "nofield.jsonl").write_text('{"text": "ok"}\n\n{"body": "no text"}\n')
    (tmp / "nul.jsonl").write_text('{"text": "a\\u0000b"}\n')
    out = ["--out", tmp / "out"]
    return {
        "missing source": ([tmp / "nope", *out], "does not exist"),
        "empty folder": ([tmp / "empty", *out], "holds no non-empty text"),
        "only binary files": ([tmp / "binary", *out], "holds no non-empty text"),
        "tokenizer missing": ([src, "--tokenizer", tmp / "no.json", *out], "does not exist"),
        "not a tokenizer": ([src, "--tokenizer", tmp / "junk.json", *out], "cannot read tokenizer"),
        "unknown --eos": ([src, "--tokenizer", bpe, "--eos", "<none>", *out], "not a token"),
        "JSONL not JSON": ([tmp / "bad.jsonl", *out], "bad.jsonl:3: not a JSON object"),
        "JSONL lacks the field": ([tmp / "nofield.jsonl", *out], "nofield.jsonl:3: no 'text' field"),
        "NUL in byte-level text": ([tmp / "nul.jsonl", *out], "nul.jsonl:1: holds a NUL byte"),
        "out is a file": ([src, "--out", tmp / "a-file"], "is a file"),
        "out holds other files": ([src, "--out", tmp / "busy"], "not empty"),
        "out inside the source": ([src, "--out", src / "prep"], "inside the source"),
        "workers 0": ([src, "--workers", 0, *out], "--workers must be >= 1"),
    }


def test_each_bad_input_is_one_clean_line(corpus, bpe, tmp_path, capsys):
    src = corpus[0]
    cases = bad_inputs(tmp_path, src, bpe)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for name, (argv, words_) in cases.items():
        rc, stdout, err = run_cli(capsys, "data", "prepare", *argv)
        assert rc == 2, (name, err)
        assert err.startswith("hybridlab data: error: ") and err.count("\n") == 1, (name, err)
        assert words_ in err and "Traceback" not in err, (name, err)
    # nothing written: a failed first run takes back the --out folder it made
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert not (src / "prep").exists()


def test_unreadable_file_names_it(corpus, tmp_path, monkeypatch, capsys):
    """(A permission error, raised by hand: these tests may run as root, which reads anything.)"""
    from hybridlab.data import corpus as corpus_mod

    locked = corpus[0] / "nested" / "b.txt"
    real = corpus_mod._is_text

    def sniff(path):
        if path == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(corpus_mod, "_is_text", sniff)
    rc, _, err = run_cli(capsys, "data", "prepare", corpus[0], "--out", tmp_path / "o")
    assert rc == 2 and err == f"hybridlab data: error: cannot read {locked}: Permission denied\n"


def test_without_tokenizers_installed(corpus, bpe, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # `import tokenizers` now fails
    rc, _, err = run_cli(capsys, "data", "prepare", corpus[0], "--out", tmp_path / "o", "--tokenizer", bpe)
    assert rc == 2 and err == (f"hybridlab data: error: reading tokenizer {bpe} needs the 'tokenizers' "
                               "package: pip install 'hybridlab[text]'\n")
    assert not (tmp_path / "o").exists()


def test_cli_subprocess_prints_a_summary(corpus, tmp_path):
    """The real command, in a folder of its own: a summary, the bar on stderr, nothing else written."""
    r = subprocess.run([sys.executable, "-m", "hybridlab", "data", "prepare", str(corpus[0]), "--out", "ok",
                        "--workers", "2"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"{len(corpus[1])} documents" in r.stdout and "shards in" in r.stdout and "prepared" in r.stdout
    assert "prepare 100.0%" in r.stderr  # the progress bar
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]


# ----------------------------------------------------------------------------- the dataset

L = 24


@pytest.fixture(scope="module")
def dataset(prepared):
    return make_dataset({"prepared": str(prepared[0]), "val_fraction": 0.25}, L)


def check_seq_idx(x, seq_idx, eos):
    assert seq_idx.shape == x.shape and seq_idx.dtype == torch.int32
    assert (seq_idx[:, 0] == 0).all()
    # a new document starts right after each EOS, and only there (the EOS ends its own document)
    assert torch.equal(seq_idx[:, 1:] - seq_idx[:, :-1], (x[:, :-1] == eos).int())


def test_dataset_split_batches_and_codec(dataset, prepared, bpe):
    m = read_manifest(prepared[0])
    assert isinstance(dataset, Dataset) and dataset.kind == "text"
    assert dataset.vocab_size == m["vocab_size"] and dataset.seq_len == L
    n = dataset.n_train + dataset.n_val
    assert n == m["tokens"] and 0.15 < dataset.n_val / n < 0.35
    # the split falls on a document start: the token before it is an EOS
    assert int(dataset.stream.slice(dataset.n_train - 1, dataset.n_train)[0]) == m["eos_id"]
    a = dataset.train_batch(3, 4, seed=0)
    assert all(torch.equal(u, v) for u, v in zip(a, dataset.train_batch(3, 4, seed=0)))
    assert not torch.equal(a[0], dataset.train_batch(4, 4, seed=0)[0])
    assert torch.equal(a[0][:, 1:], a[1][:, :-1]) and a[0].shape == (4, L) and a[0].dtype == torch.long
    evals = list(dataset.eval_batches(4))
    assert evals and all(x.shape[1] == L for x, _ in evals)
    x, y = dataset.long_examples(2 * L, 2)
    assert x.shape == (2, 2 * L)
    text = "the naïve mamba scan"
    assert dataset.decode(dataset.encode(text)) == text


def test_packed_batches_number_the_documents(dataset, prepared):
    eos = read_manifest(prepared[0])["eos_id"]
    for step in range(4):
        x, y, seq_idx = dataset.train_batch_packed(step, 8, seed=1)
        x0, y0 = dataset.train_batch(step, 8, seed=1)
        assert torch.equal(x, x0) and torch.equal(y, y0)
        check_seq_idx(x, seq_idx, eos)
    assert dataset.train_batch_packed(0, 8, 1)[2].max() >= 1  # rows do cross documents
    packed = list(dataset.eval_batches_packed(4, max_batches=3))
    plain = list(dataset.eval_batches(4, max_batches=3))
    assert len(packed) == len(plain) == 3
    for (x, y, seq_idx), (x0, y0) in zip(packed, plain):
        assert torch.equal(x, x0) and torch.equal(y, y0)
        check_seq_idx(x, seq_idx, eos)


def test_seq_idx_at_every_start_across_shards(dataset, prepared):
    """The document numbering from the documents starting in each row (not a per-token search)
    at every start of the training split: rows inside one document, across several, and across
    shard ends (shards of 600 tokens)."""
    eos = read_manifest(prepared[0])["eos_id"]
    starts = list(range(0, dataset.n_train - L))
    x, _ = dataset._batch(starts)
    seq_idx = dataset._seq_idx(starts)
    check_seq_idx(x, seq_idx, eos)
    assert (seq_idx[:, -1] == 0).any() and seq_idx.max() >= 2
    docs = np.arange(1, int(read_manifest(prepared[0])["documents"]))
    before = dataset.document_starts(docs) - 1  # the last token of the document before each
    assert all(int(dataset.stream.slice(p, p + 1)[0]) == eos for p in before)


def test_dataset_errors_name_the_folder(prepared, tmp_path):
    with pytest.raises(UserError, match="holds no manifest.json"):
        make_dataset({"prepared": str(tmp_path)}, L)
    with pytest.raises(UserError, match="fewer than seq_len"):
        make_dataset({"prepared": str(prepared[0])}, 400)  # 1% of ~3500 tokens held out
    broken = tmp_path / "broken"
    broken.mkdir()
    for name, data in files_of(prepared[0]).items():
        (broken / name).write_bytes(data)
    (broken / "shard_00001.bin").write_bytes(b"12")
    with pytest.raises(UserError, match="shard_00001.bin: 2 bytes"):
        make_dataset({"prepared": str(broken)}, L)


def test_train_a_few_steps_on_prepared_data(prepared, tmp_path, capsys):
    arch = tmp_path / "tiny.yaml"
    arch.write_text(f"""name: prepared-tiny
d_model: 32
vocab_size: 320
defaults:
  mamba2: {{d_state: 8, headdim: 8, expand: 2, chunk_size: 8}}
  sal: {{capacity: 0.25, window: 8, head_dim: 8}}
pattern: "M M S"
training:
  data: {{prepared: {prepared[0]}, val_fraction: 0.25}}
  seq_len: {L}
  batch_size: 4
  steps: 3
  warmup_steps: 1
  eval_every: 3
  eval_batches: 2
  checkpoint_every: 0
""")
    losses = {}
    for pack in ("true", "false"):
        run = f"pack-{pack}"
        rc, _, err = run_cli(capsys, "train", arch, "--runs-dir", tmp_path / "runs", "--run-name", run,
                             "--device", "cpu", "--set", f"pack_documents={pack}", "--set", "log_every=1")
        assert rc == 0, err[-2000:]
        lines = [json.loads(s) for s in (tmp_path / "runs" / run / "metrics.jsonl").read_text().splitlines()]
        assert any("val/loss" in rec for rec in lines), lines[-1]
        losses[pack] = [rec["train/loss"] for rec in lines if "train/loss" in rec]
    # the same data, weights and noise: only the document mask differs, from the first step on
    assert len(losses["true"]) == 3 and losses["true"][0] != pytest.approx(losses["false"][0], rel=1e-6)
