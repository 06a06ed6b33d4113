"""Suites: one command trains several runs on one training section; running it again skips."""
import yaml

from hybridlab.suite import plan, run_suite
from tests.runs_helpers import TINY_ARCH


def test_suite_runs_compares_and_skips_finished(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({**TINY_ARCH, "name": "a"}))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({**TINY_ARCH, "name": "b", "pattern": "M M"}))
    suite = tmp_path / "s.yaml"
    suite.write_text(yaml.safe_dump({
        "suite": "s", "runs_dir": str(tmp_path / "runs"),
        "training": {"data": {"task": "mqar", "num_kv_pairs": 2, "vocab_size": 32, "eval_examples": 16},
                     "seq_len": 16, "batch_size": 2, "steps": 3, "eval_every": 0, "eval_batches": 1,
                     "checkpoint_every": 0, "log_every": 1},
        "runs": [{"arch": "a.yaml"}, {"arch": "a.yaml", "name": "a-C0.5", "defaults": {"sal": {"capacity": 0.5}}},
                 {"arch": "b.yaml"}],
    }))
    names = [name for name, _, _ in plan(str(suite))]
    assert names == ["a", "a-C0.5", "b"]
    assert plan(str(suite))[1][1]["defaults"]["sal"]["capacity"] == 0.5
    rows = run_suite(str(suite), quiet=True)
    table = capsys.readouterr().out
    assert "| a-C0.5 |" in table and "val/acc" in table
    assert all(r["step"] == 3 for r in rows)
    assert rows[2]["params"] < rows[0]["params"]
    again = run_suite(str(suite), quiet=True)  # finished runs are read back, not retrained
    assert [r["val/loss"] for r in again] == [r["val/loss"] for r in rows]


def test_under_torchrun_only_rank_0_prints_and_writes(tmp_path, capsys, monkeypatch):
    """Every process of a torchrun suite trains (the collectives need them all); ranks other
    than 0 neither print the table nor write summary.json."""
    from hybridlab import suite as suite_mod

    (tmp_path / "a.yaml").write_text(yaml.safe_dump({**TINY_ARCH, "name": "a"}))
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"suite": "s", "runs_dir": str(tmp_path / "runs"), "runs": [{"arch": "a.yaml"}],
                                    "training": {"steps": 1}}))

    def fake_train(run, quiet=False):
        run.run_dir.mkdir(parents=True)
        (run.run_dir / "meta.json").write_text('{"params": 7}')
        return {"step": 1, "quiet": quiet}
    monkeypatch.setattr(suite_mod, "train", fake_train)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    rows = run_suite(str(path))
    assert rows[0]["quiet"] is True and rows[0]["params"] == 7
    assert capsys.readouterr().out == ""
    assert not (tmp_path / "runs" / "a" / "summary.json").exists()
