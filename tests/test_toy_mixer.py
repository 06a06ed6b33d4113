"""A mixer the core has never heard of, registered from this module, goes through build, training,
evaluation and a sweep (placement and a field) by its hooks alone: nothing in hybridlab/ changes
for it (issue 15; DESIGN.md "Blocks": the core never names a block type)."""
import json
from dataclasses import dataclass

import pytest
import torch
import yaml
from torch import nn

from hybridlab.blocks import REGISTRY, Block, register_block
from hybridlab.blocks.base import BlockConfigMixin, Placement
from hybridlab.blocks.common import RMSNorm
from hybridlab.config import Config, ConfigError, field
from runs_helpers import TINY_ARCH, read_metrics
from sweep_helpers import load, write_space


@dataclass(frozen=True)
class ToyConfig(Config, BlockConfigMixin):
    width: int = field(3, "tokens each position mixes: itself and width - 1 before it", ge=1, le=8)

    def num_params(self, d_model):
        return d_model + self.width * d_model + d_model * d_model  # norm, taps, out-proj

    def flops_per_token(self, d_model, seq_len):
        return 2.0 * (self.width * d_model + d_model * d_model)

    def state_bytes(self, d_model, seq_len, dtype_bytes=2):
        return (self.width - 1) * d_model * dtype_bytes  # the last width - 1 normed inputs

    def describe(self):
        return f"taps={self.width}"


class ToyBlock(Block):
    """x + W_out(sum_j taps[j] * u_{t-j}), u = RMSNorm(x): a causal depthwise mixer over `width`
    tokens, placed after Mamba-2 blocks in sweeps, with the mix switchable off."""

    def __init__(self, cfg, d_model, n_layers):
        super().__init__(cfg, d_model, n_layers)
        self.norm = RMSNorm(d_model)
        self.taps = nn.Parameter(torch.randn(cfg.width, d_model) / cfg.width)  # taps[j]: token t - j
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.off = False

    def _mix(self, u, past):
        """u (B, T, d) normed, past (B, width - 1, d) -> the mix (B, T, d), the new past."""
        k, T = self.cfg.width, u.shape[1]
        seq = torch.cat([past.to(u.dtype), u], dim=1)  # (B, k - 1 + T, d)
        y = sum(self.taps[j] * seq[:, k - 1 - j:k - 1 - j + T] for j in range(k))
        return self.out(y), seq[:, T:]

    def forward(self, x, aux=None):
        past = x.new_zeros(x.shape[0], self.cfg.width - 1, x.shape[2])
        return self._add(x, self._mix(self.norm(x), past)[0])

    def _add(self, x, y):
        return x if self.off else x + y

    def allocate_cache(self, batch, max_len, device=None, dtype=None):
        return {"past": torch.zeros(batch, self.cfg.width - 1, self.d_model, device=device, dtype=dtype)}

    def prefill(self, x, cache):
        y, past = self._mix(self.norm(x), cache["past"])
        cache["past"].copy_(past)
        return self._add(x, y)

    def step(self, x, cache):
        return self.prefill(x[:, None], cache)[:, 0]

    # the hooks: HParams columns, an off-switch for the ablation probe, placement in sweeps

    @classmethod
    def hparams(cls, configs):
        return {"n_toy": len(configs), "toy_width": configs[0].width if configs else 0}

    def ablate(self):
        return _switched_off(self)

    placement = Placement(after="mamba2", label="toy mixer", after_label="Mamba-2")


class _switched_off:
    def __init__(self, block):
        self.block = block

    def __enter__(self):
        self.block.off = True

    def __exit__(self, *exc):
        self.block.off = False


@pytest.fixture(scope="module", autouse=True)
def toy():
    """Registered for this module only: other tests go over every registered block."""
    before = dict(REGISTRY)
    register_block("toy", "T", ToyConfig, "test mixer: causal depthwise taps")(ToyBlock)
    try:
        yield
    finally:
        REGISTRY.pop("toy")
        assert REGISTRY == before


ARCH = {**TINY_ARCH, "defaults": {**TINY_ARCH["defaults"], "toy": {"width": 4}}}


def _write(path, pattern, **extra):
    path.write_text(yaml.safe_dump({**ARCH, "pattern": pattern, **extra}, sort_keys=False))
    return path


def test_build_checks_the_toy_analytic_figures_and_decoding_equals_forward(tmp_path, capsys):
    from hybridlab.build import build
    from hybridlab.graph import load_arch
    from hybridlab.model import HybridLM

    path = _write(tmp_path / "arch.yaml", "M T M T")
    assert build(str(path), seq_len=32) == 0  # raises if the real parameter count differs
    assert "taps=4" in capsys.readouterr().out  # the layer table shows describe()
    torch.manual_seed(0)
    block = HybridLM(load_arch(path)).eval().layers[1]
    x = torch.randn(2, 12, 32)
    with torch.no_grad():  # token by token through the cache, as generation and decode_ms run it
        cache = block.allocate_cache(2, 12)
        stepped = torch.stack([block.step(x[:, t], cache) for t in range(12)], dim=1)
        assert torch.allclose(stepped, block(x), atol=1e-5)
    with pytest.raises(ConfigError, match=r"toy\.width"):
        _write(tmp_path / "bad.yaml", "M T", defaults={"toy": {"width": 0}})
        load_arch(tmp_path / "bad.yaml")


def test_train_and_evaluate_a_toy_model(tmp_path):
    from hybridlab.evaluate import run_eval
    from hybridlab.train import prepare, train

    training = {"data": "default", "seq_len": 32, "batch_size": 4, "steps": 6, "lr": 3e-3, "warmup_steps": 1,
                "log_every": 1, "eval_every": 6, "eval_batches": 2, "checkpoint_every": 6,
                "runs_dir": str(tmp_path / "runs"), "run_name": "toy"}
    path = _write(tmp_path / "arch.yaml", "M T M T", training=training)
    run = prepare(str(path))
    summary = train(run, quiet=True)
    rows = read_metrics(run.run_dir)
    assert summary["step"] == 6
    val = rows[6]
    # the ablation probe turned the toy blocks off through ablate(): a different model, a different loss
    assert "val/loss_off" in val and abs(val["val/loss_off"] - val["val/loss"]) > 1e-4

    from hybridlab.tracking import hparam_keys, hparams_for

    assert {"n_toy", "toy_width"} <= set(hparam_keys())
    h = hparams_for(run.arch, run.cfg, "default", 0)
    assert (h["n_toy"], h["toy_width"]) == (2, 4)

    out = run_eval(str(run.run_dir), out_dir=str(tmp_path / "eval"), batches=1, max_factor=2,
                   contexts="64", time_budget_s=30)
    assert "val/loss_off" in out["validation"] and "blocks" in out
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["step"] == 6


def _toy_space(tmp_path, **over):
    _write(tmp_path / "base.yaml", "M M M")  # no toy layer: placement adds them
    return write_space(tmp_path, **over)


def test_placement_comes_from_the_toy_hook(tmp_path):
    from hybridlab.sweep.space import load_space

    space = load_space(_toy_space(tmp_path, parameters={"toy.positions": [[1], [1, 3]], "toy.width": [2, 5]}))
    arch, _ = space.build({"toy.positions": "1,3", "toy.width": 5})
    assert arch.pattern() == "MTMMT"
    assert [layer.config.width for layer in arch.layers if layer.block == "toy"] == [5, 5]
    with pytest.raises(ConfigError) as err:
        load_space(_toy_space(tmp_path, parameters={"toy.period": {"type": "int", "low": 1, "high": 9}}))
    assert ("parameters.toy.period.high: a period must be 1..3 (the base's Mamba-2 blocks), got 9; "
            "a larger one places no toy mixer") in str(err.value)


def test_sweep_places_and_sets_the_toy_mixer(tmp_path):
    from hybridlab.graph import load_arch
    from hybridlab.sweep.run import run_sweep

    path = _toy_space(tmp_path, trials=2, sampler={"type": "random", "seed": 5}, training={"steps": 4},
                      parameters={"toy.period": {"type": "int", "low": 1, "high": 3}, "toy.width": [2, 4]})
    run_sweep(str(path))  # workers: 1 runs the trials in this process, which knows the toy block
    study, space = load(path)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert len({t.params["toy.period"] for t in study.trials}) == 2  # seed 5 draws two layouts
    for t in study.trials:
        arch = load_arch(space.folder / "runs" / f"trial-{t.number:04d}" / "config.yaml")
        period = t.params["toy.period"]
        assert arch.pattern() == "".join("MT" if k % period == 0 else "M" for k in range(1, 4))
        assert {layer.config.width for layer in arch.layers if layer.block == "toy"} == {t.params["toy.width"]}
