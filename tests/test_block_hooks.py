"""Block hooks (blocks/base.py): the core turns blocks off, records them, logs their hparams and
diagnostics, and prints their warnings without naming a block type; the SAL's own hooks."""
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
import yaml

from hybridlab.blocks import REGISTRY, Block, register_block
from hybridlab.blocks.base import BlockConfigMixin
from hybridlab.config import Config, field
from hybridlab.data import make_dataset
from hybridlab.graph import parse_arch
from hybridlab.model import HybridLM
from hybridlab.probes import RecordBlocks, blocks_off
from hybridlab.validation import group_metrics, validate
from tests.helpers import D_MODEL

ROOT = Path(__file__).parent.parent
CPU = torch.device("cpu")
MQAR = {"task": "mqar", "num_kv_pairs": 2, "vocab_size": 32, "eval_examples": 32}


def test_the_core_names_no_block_type():
    # "sal"/"SAL"/"SALs" as a word or an identifier part (not inside "causal"), and the rest anywhere
    banned = re.compile(r"(?i)(?<![a-z])sals?(?![a-z])|SALBlock|mamba-?2|selected_frac")
    core = ROOT / "hybridlab"
    sweep = sorted((core / "sweep").glob("*.py"))
    assert len(sweep) >= 7  # the glob found the package: the check below has something to read
    for path in [core / "tracking.py", core / "train.py", *sorted(core.glob("evaluate*.py")), *sweep]:
        found = sorted({m.group(0) for m in banned.finditer(path.read_text())})
        assert not found, f"{path.relative_to(ROOT)} names {found}"


# ----------------------------------------------------------------------------- a toy block


@dataclass(frozen=True)
class ShiftConfig(Config, BlockConfigMixin):
    scale: float = field(1.0, "size of the shift added to every token", gt=0)

    def num_params(self, d_model):
        return d_model

    def flops_per_token(self, d_model, seq_len):
        return float(d_model)

    def state_bytes(self, d_model, seq_len, dtype_bytes=2):
        return 0


class ShiftBlock(Block):
    """x + shift, where `ablate` turns the shift off: a block the core knows nothing about."""

    def __init__(self, cfg, d_model, n_layers):
        super().__init__(cfg, d_model, n_layers)
        self.shift = torch.nn.Parameter(cfg.scale * torch.randn(d_model))
        self.off = False

    @classmethod
    def hparams(cls, configs):
        return {"shift_scale": configs[0].scale if configs else 0.0}

    def forward(self, x, aux=None):
        return x if self.off else x + self.shift

    @contextmanager
    def _off(self):
        self.off = True
        try:
            yield
        finally:
            self.off = False

    def ablate(self):
        return self._off()


@pytest.fixture
def shift_block():
    """Registered for one test only: other tests check every registered block."""
    register_block("shift", "Z", ShiftConfig, "test block: adds a learned shift")(ShiftBlock)
    try:
        yield
    finally:
        REGISTRY.pop("shift")


def test_the_core_turns_off_a_block_it_does_not_know(shift_block):
    torch.manual_seed(0)
    arch = parse_arch({"name": "t", "d_model": D_MODEL, "vocab_size": 32, "pattern": "F Z",
                       "defaults": {"shift": {"scale": 3.0}}})
    model = HybridLM(arch)
    ds = make_dataset(MQAR, 16)
    val = validate(model, ds, 8, 2, CPU).scalars
    with torch.no_grad():
        model.layers[1].shift.zero_()  # the same model with the shift removed by hand
    by_hand = group_metrics(model, ds.eval_batches(8, 2), CPU)
    assert val["val/loss_off"] == pytest.approx(by_hand["loss"])
    assert val["val/ppl_off"] == pytest.approx(math.exp(by_hand["loss"]))
    assert val["val/acc_off"] == pytest.approx(by_hand["acc"])
    assert val["val/acc_first_off"] == pytest.approx(by_hand["acc_first"])
    assert abs(val["val/loss_off"] - val["val/loss"]) > 1e-3  # the shift mattered: the probe has teeth
    assert not model.layers[1].off  # back on after the probe

    from hybridlab.tracking import hparam_keys, hparams_for
    from hybridlab.train_config import parse_training

    assert "shift_scale" in hparam_keys()
    cfg, _ = parse_training({"data": "default", "seq_len": 16, "steps": 1})
    assert hparams_for(arch, cfg, "d", 1)["shift_scale"] == 3.0


def test_a_model_with_nothing_to_turn_off_reports_no_off_metrics():
    arch = parse_arch({"name": "t", "d_model": D_MODEL, "vocab_size": 32, "pattern": "F F"})
    model = HybridLM(arch)
    v = validate(model, make_dataset(MQAR, 16), 8, 1, CPU)
    assert not any(k.endswith("_off") for k in v.scalars) and not v.histograms and not v.warnings
    with blocks_off(model) as off:
        assert off == []


# ----------------------------------------------------------------------------- the SAL's hooks


def _taipan(capacity=0.15, vocab=32, **sal):
    torch.manual_seed(0)
    arch = parse_arch({"name": "t", "d_model": D_MODEL, "vocab_size": vocab, "pattern": "M S",
                       "defaults": {"mamba2": {"d_state": 8, "headdim": 16, "chunk_size": 16},
                                    "sal": {"head_dim": 16, "window": 16, "capacity": capacity, **sal}}})
    return HybridLM(arch).eval()


def _force(sal, keep):
    """Replace the SAL's inference rule by one selecting the positions where keep(L) is True."""
    sal.infer_select = lambda s: keep(s.shape[-2]).expand(s.shape[:-1])


@pytest.mark.parametrize("data", ["default", "mqar"])
def test_sal_off_metrics_are_the_model_with_no_token_selected(data):
    model = _taipan(capacity=0.5, vocab=256)
    sal = model.layers[1]
    with torch.no_grad():  # a gate that selects every token, an attention that matters
        sal.gate.bias.copy_(torch.tensor([-10.0, 10.0]))
        sal.attn.wo.weight.normal_(0, 1.0)
    ds = make_dataset(data if data == "default" else {**MQAR, "vocab_size": 256}, 16)
    val = validate(model, ds, 8, 2, CPU).scalars
    assert val["blocks/layers.1.sal/eval_selected_frac"] == 1.0
    with torch.no_grad():  # the same model with the gate forced shut
        sal.gate.bias.copy_(torch.tensor([10.0, -10.0]))
    shut = group_metrics(model, ds.eval_batches(8, 2), CPU)
    assert val["val/loss_off"] == pytest.approx(shut["loss"]) and val["val/loss_off"] != val["val/loss"]
    assert val["val/ppl_off"] == pytest.approx(math.exp(shut["loss"]))
    if data == "mqar":
        assert val["val/acc_off"] == pytest.approx(shut["acc"])
        assert val["val/acc_first_off"] == pytest.approx(shut["acc_first"])
    else:  # text has no answers: no accuracy, no answer share
        assert not any(k.startswith("val/acc") or "answer" in k for k in val)
    assert "infer_select" not in sal.__dict__  # the class's method again


def test_sal_answer_share_and_histogram_come_from_what_it_recorded():
    model = _taipan(capacity=0.5)
    sal = model.layers[1]
    ds = make_dataset(MQAR, 16)
    # every third position (not every second: MQAR's queried keys all sit at even positions)
    _force(sal, lambda L: torch.arange(L) % 3 == 0)
    targets = torch.cat([t for _, t in ds.eval_batches(8, 2)])
    answer = targets != -100
    expected = (answer[:, 0::3].sum() / answer.sum()).item()
    assert 0 < expected < 1  # answers fall on and off the rule, so the check has teeth
    v = validate(model, ds, 8, 2, CPU)
    assert v.scalars["blocks/layers.1.sal/eval_answer_selected_frac"] == pytest.approx(expected)
    assert v.scalars["val/answer_selected_frac"] == pytest.approx(expected)
    assert v.scalars["blocks/layers.1.sal/eval_selected_frac"] == pytest.approx(6 / 16)  # 0, 3, ..., 15
    assert v.scalars["val/selected_frac"] == pytest.approx(6 / 16)
    p = v.histograms["blocks/layers.1.sal/p_select"]
    assert p.numel() == targets.numel() and 0 <= p.min() and p.max() <= 1
    assert "infer_select" in sal.__dict__  # the override outlives the recording
    with blocks_off(model), RecordBlocks(model, answers=True) as rec:  # records what "off" selects
        group_metrics(model, ds.eval_batches(8, 2), CPU, recording=rec)
    assert rec.records["layers.1.sal"].share() == 0.0
    assert rec.records["layers.1.sal"].answer_share() == 0.0
    assert sal.__dict__["infer_select"] is not None  # the test's override is back in place


def test_a_shared_sal_records_at_each_layer_position():
    torch.manual_seed(0)
    arch = parse_arch({"name": "t", "d_model": D_MODEL, "vocab_size": 32,
                       "defaults": {"sal": {"head_dim": 16, "window": 16}},
                       "layers": [{"block": "sal", "name": "s"}, {"block": "mlp"}, {"block": "sal", "share": "s"}]})
    model = HybridLM(arch).eval()
    with RecordBlocks(model) as rec:
        model(torch.randint(0, 32, (2, 8)))
        rec.collect()
    assert set(rec.records) == {"layers.0.sal", "layers.2.sal"}
    # the two positions see different inputs, so their scores differ
    assert not torch.equal(rec.records["layers.0.sal"].scores[0], rec.records["layers.2.sal"].scores[0])


def test_sal_warns_when_shut_or_far_above_capacity_and_not_near_it(capsys):
    from hybridlab.diagnostics import print_warnings

    model = _taipan(capacity=0.25)
    sal = model.layers[1]
    ds = make_dataset(MQAR, 16)
    with torch.no_grad():
        sal.gate.bias.copy_(torch.tensor([10.0, -10.0]))  # forced shut
    shut = validate(model, ds, 8, 1, CPU).warnings
    assert shut == ["SAL layers.1.sal selects 0.000 at inference (capacity 0.25): it is off"]
    print_warnings(shut, prefix="[trial 3] ")
    assert capsys.readouterr().err == (
        "[trial 3] warning: SAL layers.1.sal selects 0.000 at inference (capacity 0.25): it is off\n")
    with torch.no_grad():
        sal.gate.bias.copy_(torch.tensor([-10.0, 10.0]))  # selects everything: 1.0 > 3 * 0.25
    assert validate(model, ds, 8, 1, CPU).warnings == [
        "SAL layers.1.sal selects 1.000 at inference (capacity 0.25): far above its capacity"]
    _force(sal, lambda L: torch.arange(L) % 4 == 0)  # exactly C
    assert validate(model, ds, 8, 1, CPU).warnings == []


def test_training_prints_the_warning_once_per_validation(tmp_path, capfd):
    from hybridlab.train import prepare, train
    from tests.runs_helpers import write_arch

    # the spec's literal rule (s1 > s0) selects nothing while the gate sits at its init P = C
    arch = write_arch(tmp_path, tmp_path / "runs", steps=4, eval_every=2, checkpoint_every=0)
    data = yaml.safe_load(arch.read_text())
    data["defaults"]["sal"]["inference"] = "threshold"
    arch.write_text(yaml.safe_dump(data))
    summary = train(prepare(str(arch), overrides={"run_name": "w"}), quiet=True)
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "warning:" in line]
    assert lines == ["warning: SAL layers.2.sal selects 0.000 at inference (capacity 0.15): it is off"] * 2
    assert "Traceback" not in err
    assert 0 <= summary["selected_frac"] <= 1  # the training share, in the summary as before


def test_hparams_have_the_same_keys_with_and_without_each_block_type():
    from hybridlab.tracking import hparam_keys, hparams_for, metric_keys
    from hybridlab.train_config import parse_training

    cfg, _ = parse_training({"data": "default", "seq_len": 16, "steps": 1})
    taipan = parse_arch({"name": "a", "d_model": D_MODEL, "vocab_size": 32, "pattern": "M M S",
                         "defaults": {"mamba2": {"d_state": 8, "headdim": 16},
                                      "sal": {"head_dim": 16, "capacity": 0.2, "window": 64}}})
    mlps = parse_arch({"name": "b", "d_model": D_MODEL, "vocab_size": 32, "pattern": "F F"})
    a, b = hparams_for(taipan, cfg, "d", 1), hparams_for(mlps, cfg, "d", 1)
    assert set(a) == set(b) == set(hparam_keys())
    old = {"n_sal", "sal_capacity", "sal_window", "sal_kv", "sal_positional", "sal_temperature",
           "sal_inference", "sal_budget_weight", "mamba2_d_state"}  # earlier runs' columns
    assert old | {"sal_signal", "sal_refine"} <= set(a)
    assert (a["n_sal"], a["sal_capacity"], a["sal_window"], a["mamba2_d_state"]) == (1, 0.2, 64, 8)
    assert (b["n_sal"], b["sal_capacity"], b["sal_kv"], b["mamba2_d_state"]) == (0, 0.0, "", 0)
    assert "hparam/eval_selected_frac" in metric_keys()


def test_training_summary_averages_the_blocks_summarised_metrics():
    from hybridlab.diagnostics import progress_text, training_summary

    s = training_summary({"layers.2.sal/selected_frac": torch.tensor(0.2),
                          "layers.5.sal/selected_frac": torch.tensor(0.4),
                          "layers.2.sal/budget_loss": torch.tensor(9.0)})
    assert s == {"selected_frac": pytest.approx(0.3)}
    assert progress_text(s) == "sel 0.300"
    assert math.isnan(training_summary({})["selected_frac"]) and progress_text(training_summary({})) == ""


# ----------------------------------------------------------------------------- selection.html


class _Spans(HTMLParser):
    """section id -> list of sequences -> [(classes, title, text)] per token span."""

    def __init__(self):
        super().__init__()
        self.sections, self._scope, self._span = {}, None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self._scope = a["id"]
            self.sections[self._scope] = []
        elif tag == "div" and a.get("class") == "seq":
            self.sections[self._scope].append([])
        elif tag == "span":
            self._span = [a["class"].split(), a["title"], ""]

    def handle_data(self, data):
        if self._span is not None:
            self._span[2] += data

    def handle_endtag(self, tag):
        if tag == "span" and self._span is not None:
            self.sections[self._scope][-1].append(tuple(self._span))
            self._span = None


def _page(model, ds, path):
    from hybridlab.selection_view import write_selection_page

    write_selection_page(path, model, ds, CPU, n_sequences=3, title="t <&>")
    parser = _Spans()
    parser.feed(path.read_text())
    return path.read_text(), parser.sections


def test_selection_page_marks_exactly_the_selected_text_tokens(tmp_path):
    model = _taipan(vocab=256)
    _force(model.layers[1], lambda L: torch.arange(L) % 5 == 1)
    ds = make_dataset("default", 24)
    html, sections = _page(model, ds, tmp_path / "selection.html")
    assert list(sections) == ["layers.1.sal"] and len(sections["layers.1.sal"]) == 3
    inputs, _ = next(iter(ds.eval_batches(3, 1)))
    for row, spans in zip(inputs, sections["layers.1.sal"]):
        assert [j for j, (cls, _, _) in enumerate(spans) if "on" in cls] == list(range(1, 24, 5))
        assert [text for _, _, text in spans] == [ds.decode([i]) for i in row.tolist()]  # escaped, read back
        assert all(title.startswith("P(select) 0.") for _, title, _ in spans)
    assert "<title>t &lt;&amp;&gt;</title>" in html
    assert "selected: 0.208 of the tokens" in html  # 5 of 24 positions


def test_selection_page_shows_task_token_ids_and_underlines_answers(tmp_path):
    model = _taipan()
    _force(model.layers[1], lambda L: torch.arange(L) < 2)
    ds = make_dataset(MQAR, 16)
    _, sections = _page(model, ds, tmp_path / "selection.html")
    inputs, targets = next(iter(ds.eval_batches(3, 1)))
    for row, tgt, spans in zip(inputs, targets, sections["layers.1.sal"]):
        assert [text for _, _, text in spans] == [str(i) for i in row.tolist()]
        assert [j for j, (cls, _, _) in enumerate(spans) if "on" in cls] == [0, 1]
        assert [j for j, (cls, _, _) in enumerate(spans) if "ans" in cls] == (tgt != -100).nonzero()[:, 0].tolist()
