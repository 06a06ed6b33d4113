"""TensorBoard: event files hold the expected tags; a real server lists runs and hparams."""
import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from hybridlab.tracking import hparam_keys, metric_keys
from hybridlab.train import prepare, train
from tests.runs_helpers import write_arch


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tb")
    runs = tmp / "runs"
    arch = write_arch(tmp, runs, steps=4, eval_every=2, checkpoint_every=0)
    for name, lr in (("a", 3e-3), ("b", 1e-3)):
        train(prepare(str(arch), overrides={"run_name": name, "lr": lr}), quiet=True)
    return runs


def test_event_files_hold_expected_tags(two_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(two_runs / "a"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "val/loss", "val/ppl",
                "blocks/layers.2.sal/selected_frac", "blocks/layers.2.sal/budget_loss",
                "hparam/val_loss", "hparam/train_loss", "hparam/eval_selected_frac",
                "blocks/layers.2.sal/eval_selected_frac", "val/selected_frac", "val/loss_off", "val/ppl_off"):
        assert tag in tags, tag
    # P(select) at each validation (steps 2 and 4; the accumulator keeps one histogram unless told)
    hist = EventAccumulator(str(two_runs / "a"), size_guidance={"histograms": 0})
    hist.Reload()
    assert [e.step for e in hist.Histograms("blocks/layers.2.sal/p_select")] == [2, 4]
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert "config/text_summary" in acc.Tags()["tensors"] or any("config" in t for t in acc.Tags()["tensors"])
    meta = json.loads((two_runs / "a" / "meta.json").read_text())
    assert {"arch_hash", "git_commit", "torch", "python", "params"} <= set(meta)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensorboard_server_lists_runs_and_hparams(two_runs):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(two_runs), "--host",
                             "127.0.0.1", "--port", str(port), "--reload_interval", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        runs = None
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                runs = json.load(urllib.request.urlopen(f"{base}/data/runs", timeout=5))
                if {"a", "b"} <= set(runs):
                    break
            except OSError:
                pass
            time.sleep(1)
        assert runs is not None and {"a", "b"} <= set(runs), runs
        req = urllib.request.Request(f"{base}/data/plugin/hparams/experiment",
                                     data=json.dumps({"experimentName": ""}).encode(),
                                     headers={"Content-Type": "application/json", "X-XSRF-Protected": "1"})
        exp = json.load(urllib.request.urlopen(req, timeout=10))
        names = {h["name"] for h in exp["hparamInfos"]}
        metrics = {m["name"]["tag"] for m in exp["metricInfos"]}
        assert names == set(hparam_keys())
        assert set(metric_keys()) <= metrics
        req = urllib.request.Request(f"{base}/data/plugin/hparams/session_groups",
                                     data=json.dumps({"experimentName": "", "allowedStatuses": [
                                         "STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
                                         "colParams": [], "startIndex": 0, "sliceSize": 10}).encode(),
                                     headers={"Content-Type": "application/json", "X-XSRF-Protected": "1"})
        groups = json.load(urllib.request.urlopen(req, timeout=10))["sessionGroups"]
        lrs = sorted(g["hparams"]["lr"] for g in groups)
        assert lrs == [1e-3, 3e-3]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_hparams_dashboard_ticks_the_architecture_columns_first(tmp_path):
    """TensorBoard's HParams dashboard shows the first 5 hparams it is given: they must be the
    ones that tell architectures apart, not the run's name and hash."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from hybridlab.tracking import Tracker, hparam_keys

    Tracker(tmp_path, {k: 0 for k in hparam_keys()}).close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    infos = [plugin_data_pb2.HParamsPluginData.FromString(c).experiment.hparam_infos
             for c in acc.PluginTagToContent("hparams").values()]
    names = [h.name for h in next(i for i in infos if len(i))]
    assert names[0] == "pattern" and {"sal_capacity", "sal_window"} & set(names[:5])
    assert "arch_hash" not in names[:5]


def test_a_line_cut_by_a_kill_is_left_out_and_dropped_on_resume(tmp_path):
    """SIGKILL (or a reader racing the writer) can leave metrics.jsonl ending mid-line: readers
    skip it, and a resume rewrites the file without it, one whole row per step."""
    from hybridlab.report import read_scalars
    from hybridlab.tracking import Tracker, read_jsonl

    tracker = Tracker(tmp_path)
    for step in (1, 2, 3):
        tracker.log(step, {"train/loss": float(step)})
    tracker.close()
    path = tmp_path / "metrics.jsonl"
    whole = path.read_text()
    path.write_text(whole + whole.splitlines()[-1][:17])  # one more row, cut mid-write (no newline)
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3]
    only_jsonl = tmp_path / "jsonl_only"  # report falls back to metrics.jsonl without events
    only_jsonl.mkdir()
    (only_jsonl / "metrics.jsonl").write_text(path.read_text())
    assert read_scalars(only_jsonl) == ({"train/loss": 3.0}, 3)

    resumed = Tracker(tmp_path, resume_step=2)  # the last checkpoint was at step 2
    resumed.log(3, {"train/loss": 30.0})
    resumed.close()
    lines = path.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    assert json.loads(lines[-1])["train/loss"] == 30.0
