"""scripts/mqar_grid.py: every committed grid parses, and a tiny grid runs and is summarised."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
GRIDS = sorted((REPO / "experiments" / "grids").glob("*.yaml"))


def _grid(args, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "scripts" / "mqar_grid.py"), *args],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)


@pytest.fixture(scope="module")
def mqar_grid():
    """scripts/mqar_grid.py as a module: the --check runs of every grid in this process (a
    process each cost ~6 s of imports on the CI machine); the tests below run the script."""
    spec = importlib.util.spec_from_file_location("mqar_grid", REPO / "scripts" / "mqar_grid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("grid", GRIDS, ids=lambda p: p.name)
def test_committed_grids_parse(grid, tmp_path, mqar_grid, capsys):
    assert mqar_grid.main([str(grid), "--out", str(tmp_path / "out"), "--check"]) == 0
    out = capsys.readouterr().out
    n = sum(len(s["variants"]) for s in yaml.safe_load(grid.read_text())["settings"])
    assert out.count("\nok  ") + out.startswith("ok  ") == n


def test_bad_variant_is_named_and_nothing_runs(tmp_path):
    grid = {"settings": [{"name": "s", "training": {"data": {"task": "mqar", "num_kv_pairs": 4,
                                                             "vocab_size": 64}, "seq_len": 32},
                          "variants": [{"name": "bad", "arch": "taipan-tiny.yaml",
                                        "defaults": {"sal": {"capacity": 2.0}}}]}]}
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(grid))
    r = _grid([str(path), "--out", str(tmp_path / "out"), "--device", "cpu"], tmp_path)
    assert r.returncode != 0
    assert "BAD s/bad" in r.stdout and "capacity" in r.stdout
    assert not (tmp_path / "out" / "s" / "bad").exists()


def test_tiny_grid_runs_and_summarises(tmp_path):
    training = {"data": {"task": "mqar", "num_kv_pairs": 2, "vocab_size": 32, "eval_examples": 16},
                "seq_len": 16, "batch_size": 4, "steps": 4, "warmup_steps": 1, "log_every": 2,
                "eval_every": 2, "eval_batches": 1, "checkpoint_every": 2}
    grid = {"settings": [{"name": "t", "defaults": {"sal": {"window": 16}}, "training": training,
                          "variants": [{"name": "sal", "arch": "taipan-tiny.yaml",
                                        "defaults": {"sal": {"capacity_start": 1.0,
                                                             "capacity_warmup_steps": 2}}}]}]}
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(grid))
    r = _grid([str(path), "--out", str(tmp_path / "out"), "--device", "cpu", "--jobs", "1"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    [row] = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (row["setting"], row["variant"], row["status"]) == ("t", "sal", "done")
    assert row["steps"] == 4
    assert row["eval_step"] == 4 and 0.0 <= row["eval"]["val/acc"] <= 1.0
    assert 0.0 <= row["eval"]["val/selected_frac"] <= 1.0
    assert 0.0 <= row["eval"]["val/acc_off"] <= 1.0  # the "SAL off" column
    head, cells = [line.split(" | ") for line in r.stdout.splitlines() if line.startswith("| ")][:2]
    assert cells[head.index("SAL off")] == f"{row['eval']['val/acc_off']:.3f}"
    assert "| t | sal | done |" in r.stdout
