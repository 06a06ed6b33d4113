"""Data layer: pure, reproducible batches; held-out sets that stay held out; clear errors."""
import sys
import time
import types

import numpy as np
import pytest
import torch

from hybridlab.data import TASKS, Dataset, make_dataset
from hybridlab.errors import ConfigError, UserError

L = 64  # short sequences keep the whole file fast on a 2-core CPU


def task(name, **knobs):
    return make_dataset({"task": name, **knobs}, L)


def rows(x):
    return {tuple(r) for r in x.tolist()}


# ----------------------------------------------------------------------------- every task

@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_batches_are_pure_functions_of_step_and_seed(name):
    ds = task(name)
    a = ds.train_batch(5, 8, seed=1)
    ds.train_batch(3, 8, seed=1)  # no hidden iterator state in between
    b = ds.train_batch(5, 8, seed=1)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], ds.train_batch(6, 8, seed=1)[0])
    assert not torch.equal(a[0], ds.train_batch(5, 8, seed=2)[0])


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_loss_mask_nonempty_and_in_vocab(name):
    ds = task(name)
    assert isinstance(ds, Dataset) and ds.kind == "task" and ds.name == name
    x, y = ds.train_batch(0, 16, seed=0)
    assert x.shape == y.shape == (16, L) and x.dtype == y.dtype == torch.long
    assert x.min() >= 0 and x.max() < ds.vocab_size
    scored = y != -100
    assert scored.any(dim=1).all()
    assert y[scored].min() >= 0 and y[scored].max() < ds.vocab_size
    for label, batches in ds.eval_groups().items():
        xe, ye = next(batches(4, 1))
        assert xe.shape == (4, L) and (ye != -100).any(dim=1).all(), label


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_generates_64x512_quickly(name):
    ds = make_dataset({"task": name}, 512)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: threads only add contention on a busy CPU
    try:
        best = min(_timed(ds.train_batch, i, 64, 0) for i in range(5))
    finally:
        torch.set_num_threads(threads)
    assert best < 0.05, f"{name}: {best * 1e3:.1f} ms per 64 x 512 batch"


def _timed(fn, *args):
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_long_examples_keep_the_mask(name):
    ds = task(name)
    x = ds.long_sequences(2 * L, 3)
    assert x.shape == (3, 2 * L + 1) and x.max() < ds.vocab_size
    inputs, targets = ds.long_examples(2 * L, 3)
    assert torch.equal(inputs, x[:, :-1])
    scored = targets != -100
    assert scored.any() and torch.equal(targets[scored], x[:, 1:][scored])


def test_task_has_no_text_encoding():
    with pytest.raises(UserError, match="mqar has no text encoding"):
        task("mqar").encode("hi")


# ----------------------------------------------------------------------------- MQAR

@pytest.mark.parametrize("knobs", [{}, {"num_queries": 3, "query_gaps": "uniform"},
                                   {"random_filler": False, "num_kv_pairs": 12, "vocab_size": 64}])
def test_mqar_targets_are_the_values_bound_to_queried_keys(knobs):
    ds = task("mqar", **knobs)
    P, V = ds.cfg.num_kv_pairs, ds.vocab_size
    x, y = ds.train_batch(0, 32, seed=0)
    for xb, yb in zip(x.tolist(), y.tolist()):
        keys, values = xb[0:2 * P:2], xb[1:2 * P:2]
        assert len(set(keys)) == P and all(1 <= k < V // 2 for k in keys)
        assert all(V // 2 <= v < V for v in values)
        bound = dict(zip(keys, values))
        answers = [(t, yt) for t, yt in enumerate(yb) if yt != -100]
        assert len(answers) == (ds.cfg.num_queries or P)
        assert len({xb[t] for t, _ in answers}) == len(answers)  # each queried key asked once
        assert all(t >= 2 * P and yt == bound[xb[t]] for t, yt in answers)


def test_mqar_eval_groups_cover_levels_and_training_setting():
    ds = make_dataset({"task": "mqar", "num_kv_pairs": 12}, 128)
    assert list(ds.eval_groups()) == ["kv=4", "kv=8", "kv=12", "kv=16"]
    xa, _ = next(ds.eval_groups()["kv=12"](8))
    xb, _ = next(ds.eval_batches(8))
    assert torch.equal(xa, xb)
    assert list(task("memorization").eval_groups()) == ["kv=64"]


def test_task_eval_set_is_fixed_and_disjoint_from_training():
    ds = task("mqar", eval_examples=200)
    first = torch.cat([x for x, _ in ds.eval_batches(64)])
    again = torch.cat([x for x, _ in make_dataset({"task": "mqar", "eval_examples": 200}, L)
                       .eval_batches(17)])
    assert first.shape == (200, L) and torch.equal(first, again)  # any batch size, any instance
    assert len(list(ds.eval_batches(64, max_batches=2))) == 2
    seen = set()
    for step in range(50):
        seen |= rows(ds.train_batch(step, 64, seed=0)[0])
    assert not rows(first) & seen


def test_mqar_long_sequences_and_impossible_length():
    ds = task("mqar", num_kv_pairs=8)
    x, y = ds.long_examples(1024, 2)
    assert x.shape == (2, 1024) and ((y != -100).sum(dim=1) == 8).all()
    with pytest.raises(UserError, match="length 20"):
        ds.long_sequences(20, 1)


def test_other_task_layouts():
    ds = task("selective_copy", num_tokens=5)
    x, y = ds.train_batch(0, 4, seed=0)
    for xb, yb in zip(x.tolist(), y.tolist()):
        data = [t for t in xb if t >= 2]
        assert [t for t in yb if t != -100] == data[:5]  # scattered tokens, copied in order
    x, y = task("memorization").train_batch(0, 8, seed=0)
    keys, values = task("memorization").cfg.mapping()
    mapping = dict(zip(keys.tolist(), values.tolist()))
    pairs = zip(x[:, 0::2].flatten().tolist(), y[:, 0::2].flatten().tolist())
    assert all(mapping[k] == v for k, v in pairs)  # one mapping across every example
    P, kl, vl = 4, 3, 2
    x, y = task("fuzzy_recall", num_kv_pairs=P, key_len=kl, value_len=vl,
                key_vocab=3).train_batch(0, 4, seed=0)
    for xb, yb in zip(x.tolist(), y.tolist()):
        pairs = [xb[i:i + kl + vl] for i in range(0, P * (kl + vl), kl + vl)]
        bound = {tuple(p[:kl]): p[kl:] for p in pairs}
        assert len(bound) == P  # keys are distinct even though they share tokens
        t = [i for i, v in enumerate(yb) if v != -100]
        assert len(t) == P * vl  # every value token of every query
        for q in range(0, len(t), vl):  # each value follows its whole key
            key = tuple(xb[t[q] - kl + 1:t[q] + 1])
            assert [yb[i] for i in t[q:q + vl]] == bound[key]


# ----------------------------------------------------------------------------- config errors

def test_unknown_task_suggests():
    with pytest.raises(ConfigError, match=r"data\.task: unknown task 'mqr' \(did you mean 'mqar'\?\)"):
        make_dataset({"task": "mqr"}, L)


@pytest.mark.parametrize("spec,message", [
    ({"task": "mqar", "num_kv_pairs": 0}, "data.num_kv_pairs: must be >= 1, got 0"),
    ({"task": "mqar", "num_kv_pair": 4}, "data.num_kv_pair: unknown key for the mqar task "
                                         "(did you mean 'num_kv_pairs'?)"),
    ({"task": "mqar", "num_kv_pairs": 40},
     "data.num_kv_pairs: 40 pairs and 40 queries need seq_len >= 159"),
    ({"task": "mqar", "query_gaps": "zipf"}, "data.query_gaps: must be one of power, uniform"),
    ({"task": "mqar", "num_queries": 9}, "data.num_queries: must be <= num_kv_pairs"),
    ({"task": "selective_copy", "num_tokens": 40}, "data.num_tokens:"),
    ({"text": "default", "val_fraction": 1.5}, "data.val_fraction: must be in (0, 1)"),
    ({"tokens": "x.bin", "dtype": "int8"}, "data.dtype: must be one of uint16, uint32"),
    ({"txet": "default"}, "data.txet: unknown key (did you mean 'text'?)"),
    ({"task": "mqar", "text": "default"}, "data: give one of task:, text:, tokens:, not task and text"),
    ("mqra", "data: unknown data 'mqra' (did you mean 'mqar'?)"),
])
def test_bad_settings_name_the_yaml_path(spec, message):
    with pytest.raises(ConfigError) as err:
        make_dataset(spec, L)
    assert str(err.value).startswith(message)


# ----------------------------------------------------------------------------- text

def test_default_corpus_splits_and_round_trips():
    ds = make_dataset("default", 128)
    assert ds.kind == "text" and ds.name == "default" and ds.vocab_size == 256
    assert ds.n_train + ds.n_val > 100_000 and ds.n_val > 0.09 * (ds.n_train + ds.n_val)
    assert make_dataset({"text": "default"}, 128).name == "default"
    x, y = ds.train_batch(0, 4, seed=0)
    assert torch.equal(x[:, 1:], y[:, :-1]) and (y != -100).all()
    assert sum(c.isalpha() for c in ds.decode(x[0].tolist())) > 40  # English, not noise
    text = "héllo, wörld — ∑"
    assert ds.decode(ds.encode(text)) == text and len(ds.encode(text)) > len(text)
    val = [x for x, _ in ds.eval_batches(16)]
    assert all(torch.equal(a, b) for a, b in zip(val, [x for x, _ in ds.eval_batches(16)]))
    assert sum(len(v) for v in val) == (ds.n_val - 1) // 128


def test_text_eval_and_long_sequences_come_from_validation(tmp_path):
    n = 5000  # a token file whose ids are their positions shows where every window came from
    np.arange(n, dtype=np.uint16).tofile(tmp_path / "ids.bin")
    ds = make_dataset({"tokens": "ids.bin", "dtype": "uint16", "vocab_size": n}, 32,
                      base_dir=tmp_path)
    assert ds.n_val == 500
    for step in range(20):
        x, y = ds.train_batch(step, 8, seed=0)
        assert torch.equal(y, x + 1) and y.max() < ds.n_train
    x, y = next(ds.eval_batches(4))
    assert x.min() >= ds.n_train and torch.equal(x[1, 0], x[0, 0] + 32)
    long = ds.long_sequences(100, 4)
    assert long.shape == (4, 101) and long.min() >= ds.n_train
    assert torch.equal(long[:, 1:] - long[:, :-1], torch.ones(4, 100, dtype=torch.long))
    with pytest.warns(UserWarning, match="wrap"):
        wrapped = ds.long_sequences(1200, 2)  # longer than the whole split: wraps round
    assert wrapped.shape == (2, 1201) and wrapped.min() >= ds.n_train
    with pytest.raises(UserError, match="no text encoding"):
        ds.decode([1, 2])


def test_token_memmap_round_trip_uint32(tmp_path):
    ids = np.random.default_rng(0).permutation(70_000)[:4000].astype(np.uint32)  # distinct ids
    ids.tofile(tmp_path / "t.bin")
    ds = make_dataset({"tokens": str(tmp_path / "t.bin"), "dtype": "uint32"}, 16)
    assert ds.vocab_size == int(ids.max()) + 1  # scanned when not given
    x, y = ds.train_batch(0, 4, seed=0)
    for xb, yb in zip(x.tolist(), y.tolist()):
        start = int(np.flatnonzero(ids == xb[0])[0])
        assert xb + yb[-1:] == ids[start:start + 17].tolist()
    with pytest.raises(UserError, match="vocab_size 100"):
        make_dataset({"tokens": str(tmp_path / "t.bin"), "dtype": "uint32", "vocab_size": 100}, 16)
    (tmp_path / "odd.bin").write_bytes(b"\0" * 7)
    with pytest.raises(UserError, match="odd.bin.*not a multiple of 2"):
        make_dataset({"tokens": str(tmp_path / "odd.bin")}, 2)


def test_byte_text_file_and_folder(tmp_path):
    (tmp_path / "b.txt").write_text("second file. " * 200)
    (tmp_path / "a.txt").write_text("first file. " * 200)
    (tmp_path / "blob.bin").write_bytes(b"\0\1\2" * 100)       # binary: skipped
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "c.txt").write_text("hidden " * 100)  # hidden: skipped
    ds = make_dataset({"text": str(tmp_path), "val_fraction": 0.2}, 32)
    assert ds.name == f"text:{tmp_path}" and len(ds.stream) == 12 * 200 + 13 * 200
    whole = ds.decode(ds.stream.slice(0, len(ds.stream)).tolist())
    assert whole.startswith("first file.") and whole.endswith("second file. ")
    one = make_dataset({"text": "a.txt"}, 32, base_dir=tmp_path)
    assert one.decode(one.train_batch(0, 1, seed=0)[0][0].tolist()) in "first file. " * 200


@pytest.mark.parametrize("spec,where", [
    ({"text": "nope.txt"}, "nope.txt"),
    ({"text": "empty.txt"}, "empty.txt"),
    ({"text": "emptydir"}, "emptydir"),
    ({"tokens": "nope.bin"}, "nope.bin"),
    ({"tokens": "empty.txt"}, "empty.txt"),
    ({"text": "short.txt"}, "short.txt"),
])
def test_missing_empty_or_short_data_names_the_path(tmp_path, spec, where):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(UserError, match=where):
        make_dataset(spec, 32, base_dir=tmp_path)


def test_tokenizer_needs_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import fails as if not installed
    with pytest.raises(UserError, match=r"pip install 'hybridlab\[text\]'"):
        make_dataset({"text": "default", "tokenizer": "tok.json"}, 32, base_dir=tmp_path)


def test_tokenizer_from_local_file(tmp_path, monkeypatch):
    class FakeTokenizer:  # the `tokenizers` API we use, as a word-level stand-in
        @classmethod
        def from_file(cls, path):
            assert path == str(tmp_path / "tok.json")
            return cls()

        def get_vocab_size(self):
            return 1000

        def encode(self, text, add_special_tokens=True):
            return types.SimpleNamespace(ids=[hash(w) % 1000 for w in text.split()])

        def decode(self, ids):
            return " ".join(map(str, ids))

    monkeypatch.setitem(sys.modules, "tokenizers", types.SimpleNamespace(Tokenizer=FakeTokenizer))
    with pytest.raises(UserError, match="tok.json"):
        make_dataset({"text": "default", "tokenizer": "tok.json"}, 32, base_dir=tmp_path)
    (tmp_path / "tok.json").write_text("{}")
    ds = make_dataset({"text": "default", "tokenizer": "tok.json"}, 32, base_dir=tmp_path)
    assert ds.vocab_size == 1000 and ds.name == "default+tok.json"
    x, _ = ds.train_batch(0, 2, seed=0)
    assert x.shape == (2, 32) and x.max() < 1000
    assert ds.encode("a b") == [hash("a") % 1000, hash("b") % 1000]


def test_real_tokenizer_trained_locally(tmp_path):
    """A real HF tokenizer.json (a small BPE trained here on the default corpus, no download)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from hybridlab.data.corpus import default_corpus_text

    tok = tokenizers.Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([default_corpus_text()[:200_000]],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    ds = make_dataset({"text": "default", "tokenizer": "tokenizer.json"}, 32, base_dir=tmp_path)
    assert 256 < ds.vocab_size <= 300
    inputs, targets = ds.train_batch(0, 2, 0)
    assert inputs.shape == (2, 32) and int(inputs.max()) < ds.vocab_size
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    ids = ds.encode("The assert statement")
    assert len(ids) < len("The assert statement")  # merges happened
    assert ds.decode(ids).strip() == "The assert statement"
