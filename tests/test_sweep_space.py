"""Search spaces: placement, paths into the architecture, and bad spaces caught before any trial."""
import subprocess
import sys
from pathlib import Path

import pytest

from hybridlab.errors import ConfigError
from hybridlab.sweep.edit import chosen_anchors
from hybridlab.sweep.space import load_space
from sweep_helpers import env, write_space

ROOT = Path(__file__).resolve().parent.parent


def test_chosen_anchors_period_offset_positions():
    assert chosen_anchors(6, 6) == [6]                   # Taipan's M*6 S
    assert chosen_anchors(6, 2) == [2, 4, 6]
    assert chosen_anchors(6, 2, offset=1) == [1, 3, 5]   # one block earlier
    assert chosen_anchors(6, 3, offset=4) == [2, 5]      # offset taken modulo the period
    assert chosen_anchors(6, positions="1,4") == [1, 4]
    assert chosen_anchors(6, positions=[4, 1, 4]) == [1, 4]


def test_build_regenerates_layers_and_sets_fields(tmp_path):
    space = load_space(write_space(tmp_path, parameters={
        "sal.period": {"type": "int", "low": 1, "high": 3},
        "sal.window": [8, 16], "mamba2.d_state": [4, 8], "training.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}))
    arch, training = space.build({"sal.period": 1, "sal.window": 8, "mamba2.d_state": 4, "training.lr": 2e-3})
    assert arch.pattern() == "MSMSMS"
    assert {layer.config.window for layer in arch.layers if layer.block == "sal"} == {8}
    assert {layer.config.d_state for layer in arch.layers if layer.block == "mamba2"} == {4}
    assert training["lr"] == 2e-3
    arch, _ = space.build({"sal.period": 3, "sal.window": 16, "mamba2.d_state": 8, "training.lr": 2e-3})
    assert arch.pattern() == "MMMS"


def test_positions_as_lists(tmp_path):
    space = load_space(write_space(tmp_path, parameters={"sal.positions": {"type": "categorical", "choices": [[1], [1, 3]]}}))
    assert space.params[0].choices == ("1", "1,3")
    assert space.build({"sal.positions": "1,3"})[0].pattern() == "MSMMS"


def test_shipped_search_spaces_load():
    for path in sorted((ROOT / "search_spaces").glob("*.yaml")):
        space = load_space(path)
        assert space.objectives and space.params, path


BAD = [
    ({"parameters": {"sal.capacty": {"type": "float", "low": 0.1, "high": 0.2}}},
     "parameters.sal.capacty: unknown path into the architecture: sal has no field 'capacty' (did you mean 'capacity'?)"),
    ({"parameters": {"attn.window": [8, 16]}}, "parameters.attn.window: unknown path into the architecture: no block 'attn'"),
    ({"parameters": {"swa.window": [8, 16]}}, "parameters.swa.window: the base architecture has no swa layer"),
    ({"parameters": {"sal.capacity": {"type": "float", "low": 0.5, "high": 0.1}}},
     "parameters.sal.capacity: empty range: low 0.5 > high 0.1"),
    ({"parameters": {"sal.window": {"type": "categorical", "choices": []}}}, "parameters.sal.window.choices: empty"),
    ({"parameters": {"sal.capacity": {"type": "float", "low": 0.1, "high": 1.5}}},
     "parameters.sal.capacity.high: 1.5 gives an invalid architecture"),
    ({"parameters": {"sal.period": {"type": "int", "low": 1, "high": 9}}},
     "parameters.sal.period.high: a period must be 1..3 (the base's Mamba-2 blocks), got 9; a larger one places no SAL"),
    ({"parameters": {"sal.positions": [[1, 5]]}},
     "parameters.sal.positions.choices[0]: SAL after Mamba-2 block 5: the base has Mamba-2 blocks 1..3"),
    ({"parameters": {"sal.positions": [[1]], "sal.offset": [0, 1]}},
     "parameters.sal.positions: give either sal.positions or sal.period/sal.offset, not both"),
    ({"parameters": {"mlp.period": [1, 2]}},
     "parameters.mlp.period: unknown path into the architecture: mlp has no field 'period'"),
    ({"objectives": [{"metric": "val_perplexity"}]},
     "objectives[0].metric: unknown metric 'val_perplexity'"),
    ({"objectives": [{"metric": "recall_acc"}]}, "objectives[0].metric: recall_acc needs a recall task"),
    ({"constraints": [{"metric": "latency_ms", "max": 3}]}, "constraints[0].metric: unknown metric 'latency_ms'"),
    ({"sampler": {"type": "cmaes"}}, "sampler.type: must be one of tpe, nsga2, random"),
    ({"sampler": {"type": "tpe", "seed": 0, "n_startup": 3}}, "sampler: bad setting for tpe"),
    ({"paramters": {}}, "paramters: unknown key (did you mean 'parameters'?)"),
]


@pytest.mark.parametrize("over,message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_spaces_are_named(tmp_path, over, message):
    with pytest.raises(ConfigError) as err:
        load_space(write_space(tmp_path, **over))
    assert message in str(err.value)
    assert str(err.value).startswith(str(tmp_path / "space.yaml"))


def test_placement_needs_its_anchor_in_the_base(tmp_path):
    import yaml

    from runs_helpers import TINY_ARCH

    (tmp_path / "base.yaml").write_text(yaml.safe_dump({**TINY_ARCH, "pattern": "F S F"}))
    with pytest.raises(ConfigError) as err:
        load_space(write_space(tmp_path, parameters={"sal.period": {"type": "int", "low": 1, "high": 2}}))
    assert "parameters.sal.period: SAL placement needs Mamba-2 blocks in the base architecture; it has none" \
        in str(err.value)


def test_cli_one_line_error_before_any_trial(tmp_path):
    path = write_space(tmp_path, parameters={"sal.windw": [8, 16]})
    r = subprocess.run([sys.executable, "-m", "hybridlab", "sweep", str(path)], capture_output=True, text=True,
                       timeout=60, env=env(), cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "parameters.sal.windw: unknown path into the architecture" in lines[0], r.stderr
    assert not (tmp_path / "sweeps").exists()  # nothing was created, no trial ran
