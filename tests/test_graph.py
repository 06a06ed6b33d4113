"""YAML graphs: shorthands normalise to the canonical list; bad input names its path."""
from pathlib import Path

import pytest
import yaml

from hybridlab.errors import ConfigError
from hybridlab.graph import load_arch, parse_arch, parse_pattern

BASE = {"name": "t", "d_model": 64, "vocab_size": 100,
        "defaults": {"mamba2": {"d_state": 8, "headdim": 16}, "sal": {"head_dim": 16, "window": 16},
                     "attention": {"head_dim": 16}, "swa": {"head_dim": 16, "window": 8}}}


def arch(**kw):
    return parse_arch({**BASE, **kw})


def test_pattern_grammar():
    assert parse_pattern("(M*6 S)*2", "p") == (["M"] * 6 + ["S"]) * 2
    assert parse_pattern("MMS", "p") == ["M", "M", "S"]
    assert parse_pattern("((MF)*2 A)*2", "p") == ["M", "F", "M", "F", "A"] * 2


def test_repeat_pattern_and_list_forms_normalise_identically():
    a = arch(layers=[{"repeat": 2, "body": [{"block": "mamba2", "repeat": 6}, {"block": "sal"}]}])
    b = arch(pattern="(M*6 S)*2")
    c = arch(layers=[{"pattern": "MMMMMMS", "repeat": 2}])
    d = parse_arch(yaml.safe_load(a.to_yaml()))  # the canonical form reads back to itself
    assert a.pattern() == "MMMMMMS" * 2
    assert a.to_dict() == b.to_dict() == c.to_dict() == d.to_dict()
    assert a.arch_hash() == d.arch_hash()


def test_defaults_and_overrides():
    a = arch(layers=[{"block": "sal"}, {"block": "sal", "capacity": 0.3}])
    assert a.layers[0].config.capacity == 0.15 and a.layers[0].config.window == 16
    assert a.layers[1].config.capacity == 0.3 and a.layers[1].config.window == 16


def test_weight_sharing():
    import torch

    from hybridlab.model import HybridLM

    a = arch(layers=[{"block": "mlp", "name": "m"}, {"block": "mamba2"}, {"block": "mlp", "share": "m"}])
    model = HybridLM(a)
    assert model.layers[0] is model.layers[2]
    unshared = HybridLM(arch(layers=[{"block": "mlp"}, {"block": "mamba2"}, {"block": "mlp"}]))
    from hybridlab.analysis import num_params
    assert model.num_params() == num_params(a) == unshared.num_params() - a.layers[0].config.num_params(64)
    model(torch.randint(0, 100, (1, 9)))


BAD = [
    ({"layers": [{"block": "mamba3"}]}, "layers[0].block", "unknown block 'mamba3' (did you mean 'mamba2'?)"),
    ({"layers": [{"block": "sal", "capacty": 0.2}]}, "layers[0].capacty", "did you mean 'capacity'?"),
    ({"layers": [{"repeat": 2, "body": [{"block": "sal", "capacity": 0}]}]}, "layers[0].body[0].capacity", "must be in (0, 1]"),
    ({"layers": [{"block": "sal", "capacity": 1.5}]}, "layers[0].capacity", "must be in (0, 1], got 1.5"),
    ({"layers": [{"block": "sal", "window": -4}]}, "layers[0].window", "must be >= 1, got -4"),
    ({"layers": [{"block": "sal", "capacity": "high"}]}, "layers[0].capacity", "must be a number"),
    ({"layers": [{"block": "mamba2", "d_state": 8.5}]}, "layers[0].d_state", "must be an integer"),
    ({"d_model": 100, "layers": [{"block": "attention"}]}, "layers[0].head_dim", "d_model 100 is not divisible by head_dim 16"),
    ({"d_model": 76, "layers": [{"block": "mamba2"}]}, "layers[0].headdim", "d_inner = expand * d_model = 152 is not divisible by headdim 16"),
    ({"layers": []}, "layers", "must list at least one layer"),
    ({"layers": [{"block": "sal", "repeat": 0}]}, "layers[0].repeat", "must be an integer >= 1"),
    ({"pattern": "MMX"}, "pattern", "unknown pattern letter 'X'"),
    ({"pattern": "(MM"}, "pattern", "unclosed '('"),
    ({"layers": [{"block": "mlp", "share": "nope"}]}, "layers[0].share", "no earlier layer is named 'nope'"),
    ({"d_modle": 64, "layers": [{"block": "mlp"}]}, "d_modle", "did you mean 'd_model'?"),
    ({"defaults": {"sal": {"windw": 3}}, "layers": [{"block": "sal"}]}, "defaults.sal.windw", "did you mean 'window'?"),
    ({"tie_embeddings": "yes", "layers": [{"block": "mlp"}]}, "tie_embeddings", "must be true or false"),
    ({"layers": [{"block": "sal", "kv": "some"}]}, "layers[0].kv", "must be one of all, selected"),
]


@pytest.mark.parametrize("patch,path,message", BAD)
def test_bad_yaml_names_path_and_problem(patch, path, message):
    data = {**BASE, **patch}
    with pytest.raises(ConfigError) as err:
        parse_arch(data, "arch.yaml")
    assert err.value.path == path
    assert message in err.value.message
    assert str(err.value).startswith(f"arch.yaml: {path}: ")


def test_files(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_arch(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+"):
        load_arch(bad)
    prose = tmp_path / "prose.yaml"
    prose.write_text("just some words\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_arch(prose)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        load_arch(empty)


def _is_suite(path):
    return "suite" in (yaml.safe_load(path.read_text()) or {})


def _is_grid(path):  # scripts/mqar_grid.py's input (tests/test_mqar_grid.py parses those)
    return "settings" in (yaml.safe_load(path.read_text()) or {})


ALL_YAML = sorted(Path(__file__).parent.parent.joinpath("experiments").rglob("*.yaml"))
EXPERIMENTS = [p for p in ALL_YAML if not _is_suite(p) and not _is_grid(p)]
SUITES = [p for p in ALL_YAML if _is_suite(p)]
SIZES = {"190m": 190e6, "450m": 450e6, "1.3b": 1.3e9}


def test_experiments_exist():
    names = {p.stem for p in EXPERIMENTS}
    for base in ("taipan", "mamba2", "transformerpp", "jamba", "samba"):
        assert f"{base}-tiny" in names and f"{base}-190m" in names
    assert {"taipan-450m", "taipan-1.3b"} <= names


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_shipped_yaml_builds(path):
    import torch

    from hybridlab.analysis import num_params
    from hybridlab.model import HybridLM

    a = load_arch(path)
    size = path.stem.rsplit("-", 1)[1]
    if size in SIZES:
        assert abs(num_params(a) - SIZES[size]) <= 0.05 * SIZES[size], f"{num_params(a):,}"
        assert a.vocab_size == 128256 and a.tie_embeddings
        with torch.device("meta"):  # full size: build the modules without allocating weights
            model = HybridLM(a)
        assert model.num_params() == num_params(a)
    else:
        model = HybridLM(a).eval()
        assert model.num_params() == num_params(a)
        out = model(torch.randint(0, a.vocab_size, (2, 40)), torch.randint(0, a.vocab_size, (2, 40)))
        assert torch.isfinite(out.loss)


@pytest.mark.parametrize("path", SUITES, ids=lambda p: p.stem)
def test_every_shipped_suite_plans(path):
    from hybridlab.data import make_dataset
    from hybridlab.suite import plan
    from hybridlab.train_config import parse_training

    runs = plan(str(path))
    assert runs
    for name, arch, base in runs:
        cfg, data = parse_training(arch["training"])
        assert make_dataset(data, cfg.seq_len, base_dir=base).vocab_size <= arch["vocab_size"]
