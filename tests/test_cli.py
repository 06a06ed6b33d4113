"""The command line as a user meets it: real subprocesses, exit codes, no tracebacks."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def hybridlab(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "hybridlab", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_build_taipan_190m_prints_its_size():
    r = hybridlab("build", "experiments/taipan-190m.yaml")
    assert r.returncode == 0, r.stderr
    total = int(re.search(r"total\s+([\d,]+)", r.stdout).group(1).replace(",", ""))
    assert 180e6 <= total <= 200e6
    assert "built on cpu" in r.stdout or "built on cuda" in r.stdout
    assert "logits (1, 64, 128256)" in r.stdout
    for label in ("4K tokens", "128K tokens", "1M tokens"):
        assert label in r.stdout


def test_build_out_writes_yaml_and_weights(tmp_path):
    r = hybridlab("build", "experiments/taipan-tiny.yaml", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    again = hybridlab("build", str(tmp_path / "o" / "arch.yaml"), "--no-forward")
    assert again.returncode == 0, again.stderr
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "o" / "model.safetensors")
    assert "embed.weight" in weights


def test_blocks_lists_every_block_with_fields():
    r = hybridlab("blocks")
    assert r.returncode == 0
    for name in ("mamba2 [M]", "sal [S]", "attention [A]", "swa [W]", "mlp [F]"):
        assert name in r.stdout
    assert re.search(r"capacity\s+= 0.15\s+target share C", r.stdout)


@pytest.mark.parametrize("content,expected", [
    ("name: x\nd_model: 64\nvocab_size: 10\nlayers:\n  - {block: sal, capacity: 1.5}\n",
     "layers[0].capacity: must be in (0, 1], got 1.5"),
    ("name: x\nd_model: 64\nlayers:\n  - {block: transformer}\n", "layers[0].block: unknown block 'transformer'"),
    ("layers: [unclosed\n", "not valid YAML"),
    ("\x00\x01binary", "not"),
])
def test_bad_yaml_one_line_exit_2(tmp_path, content, expected):
    f = tmp_path / "arch.yaml"
    f.write_text(content)
    r = hybridlab("build", str(f))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(f) in lines[0] and expected in lines[0], r.stderr


def test_missing_file_exit_2():
    r = hybridlab("build", "experiments/nope.yaml")
    assert r.returncode == 2 and "experiments/nope.yaml: file not found" in r.stderr
    assert "Traceback" not in r.stderr
