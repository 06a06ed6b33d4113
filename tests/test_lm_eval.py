"""lm-evaluation-harness on a tiny trained run (CPU, offline): local tasks of every request type
through the "hybridlab" model type score exactly what the model's own forward and cached
decoding give; `hybridlab eval --lm-eval` prints, saves and logs them; bad task names are one line."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

pytest.importorskip("lm_eval")

from hybridlab.generate import generate  # noqa: E402
from hybridlab.train import prepare, train  # noqa: E402
from tests.runs_helpers import write_arch  # noqa: E402

ROOT = Path(__file__).parent.parent
M = 32  # the tiny run's seq_len: the model's max_length
TEXTS = ["The module defines the following functions and classes, in the order they appear.",
         "Return a new list.", "import os\nimport sys\n\nprint(sys.argv)\n" * 2]
PROMPTS = ["def main(args):\n    ret", "The default value is 1", "import sys\nimport os\nfro"]


def offline_env(tmp: Path) -> dict:
    """No network, and the datasets cache inside the test's folder."""
    return {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_CACHE": str(tmp / "hf-datasets"), "HF_HOME": str(tmp / "hf")}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny run trained a few steps and a folder of local tasks, one per request type."""
    tmp = tmp_path_factory.mktemp("lm_eval")
    run = prepare(str(write_arch(tmp, tmp / "runs", steps=1, eval_every=0, eval_batches=1)), overrides={"run_name": "h"})
    train(run, quiet=True)
    tasks = tmp / "tasks"
    tasks.mkdir()
    choice = [  # the second context is longer than max_length: cut from the left
        {"question": "Return a new", "choices": [" list", " lisp", "xyz"], "answer": 0},
        {"question": "The module defines the following functions and classes: the",
         "choices": [" end", " module", "\n"], "answer": 1},
        {"question": "import", "choices": [" os", " sys"], "answer": 1}]
    rows = {"choice": choice, "text": [{"text": t} for t in TEXTS],
            "gen": [{"prompt": p, "answer": "x"} for p in PROMPTS]}
    for name, docs in rows.items():
        (tasks / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = {"dataset_path": "json", "test_split": "test"}

    def task(name, data, **cfg):
        files = {"data_files": {"test": str(tasks / f"{data}.jsonl")}, "cache_dir": str(tmp / "hf-datasets")}
        cfg = {"task": name, **common, "dataset_kwargs": files, **cfg}
        (tasks / f"{name}.yaml").write_text(yaml.safe_dump(cfg))

    task("hl_choice", "choice", output_type="multiple_choice", doc_to_text="{{question}}",
         doc_to_choice="{{choices}}", doc_to_target="{{answer}}", target_delimiter="",
         metric_list=[{"metric": "acc"}])
    task("hl_text", "text", output_type="loglikelihood_rolling", doc_to_text="", doc_to_target="{{text}}",
         metric_list=[{"metric": "word_perplexity"}, {"metric": "byte_perplexity"}, {"metric": "bits_per_byte"}])
    task("hl_gen", "gen", output_type="generate_until", doc_to_text="{{prompt}}", doc_to_target="{{answer}}",
         generation_kwargs={"until": ["\n", "("], "max_gen_toks": 6, "do_sample": False},
         metric_list=[{"metric": "exact_match"}])
    return run, tasks, tmp


def own_loglikelihood(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """The model's own forward on one unpadded sequence, cut to the last M tokens it reads."""
    ids = (ctx + cont)[-(M + 1):]
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].float(), -1)  # (n, V)
    pred, target = logp[-len(cont):], torch.tensor(cont)
    return pred.gather(-1, target[:, None]).sum().item(), bool((pred.argmax(-1) == target).all())


def own_rolling(model, ids: list[int], prefix: int) -> float:
    """Windows of M predicted tokens, the first reading the prefix token."""
    shifted = [prefix] + ids
    # all that came before as context, cut to what fits: one token, or more for a short last window
    return sum(own_loglikelihood(model, shifted[:s + 1], ids[s:s + M])[0] for s in range(0, len(ids), M))


def test_harness_scores_equal_the_models_own(setup, monkeypatch):
    import lm_eval
    import lm_eval.evaluator
    from lm_eval.tasks import TaskManager

    from hybridlab.lm_eval_model import HybridLabLM

    run, tasks, _ = setup
    lm = HybridLabLM(path=str(run.run_dir), device="cpu", batch_size=3)
    assert lm.max_length == M and lm.prefix_token_id == 10  # bytes: a newline starts a document
    model, enc, dec = lm.model, lm.dataset.encode, lm.dataset.decode
    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)  # 6 s of `pip list` etc.
    out = lm_eval.simple_evaluate(model=lm, tasks=["hl_choice", "hl_text", "hl_gen"], log_samples=True,
                                  task_manager=TaskManager(include_path=str(tasks), include_defaults=False))
    samples, results = out["samples"], out["results"]

    # multiple choice: each (context, choice) scored as the unpadded forward scores it
    greedy_seen = set()
    for s in samples["hl_choice"]:
        for (ctx, cont), resp in zip(s["arguments"], s["resps"]):
            ll, greedy = resp[0]
            want_ll, want_greedy = own_loglikelihood(model, enc(ctx), enc(cont))
            assert ll == pytest.approx(want_ll, abs=1e-4) and greedy == want_greedy
            greedy_seen.add(greedy)
    assert 0 <= results["hl_choice"]["acc,none"] <= 1

    # the model's greedy continuation is flagged greedy; one token off it anywhere is not
    ctx = enc("import sys\nimport")
    with torch.no_grad():
        best = model(torch.tensor([ctx])).logits[0, -1].argmax().item()
        after = model(torch.tensor([ctx + [best]])).logits[0, -1].argmax().item()
    off, off_after = (best + 1) % 256, (after + 1) % 256
    got = lm._loglikelihood_tokens([(None, ctx, [best, after]), (None, ctx, [best, off_after]),
                                    (None, ctx, [off])])
    assert [g for _, g in got] == [True, False, False] and got[0][0] > got[1][0]

    # perplexity: whole documents in disjoint windows (the third spans 3 windows of 32 bytes)
    total_ll = total_bytes = 0
    for s in samples["hl_text"]:
        text = s["arguments"][0][0]
        ll = s["resps"][0][0]
        assert ll == pytest.approx(own_rolling(model, enc(text), 10), abs=1e-3)
        total_ll, total_bytes = total_ll + ll, total_bytes + len(text.encode())
    byte_ppl = math.exp(-total_ll / total_bytes)
    assert results["hl_text"]["byte_perplexity,none"] == pytest.approx(byte_ppl, rel=1e-5)

    # generation: hybridlab's own greedy cached decoding, cut at the first stop string
    for s in samples["hl_gen"]:
        prompt = s["arguments"][0][0]
        ids = generate(model, torch.tensor([enc(prompt)]), 6, temperature=0)[0, len(enc(prompt)):]
        want = dec(ids.tolist()).split("\n")[0].split("(")[0]
        assert s["resps"][0][0] == want
    assert 0 <= results["hl_gen"]["exact_match,none"] <= 1


class _Req:
    def __init__(self, args):
        self.args = args


def test_batched_generation_equals_one_at_a_time(setup):
    from hybridlab.lm_eval_model import HybridLabLM

    run, _, _ = setup
    lm = HybridLabLM(path=str(run.run_dir), device="cpu", batch_size=4)
    kw = {"until": ["\n\n"], "max_gen_toks": 5, "do_sample": False}
    prompts = ["abcd", "efgh", "The module", "ijkl", ""]  # three of length 4 share a batch
    batches, run_batch = [], lm._generate
    lm._generate = lambda ids, kw: batches.append(len(ids)) or run_batch(ids, kw)
    together = lm.generate_until([_Req((p, kw)) for p in prompts])
    assert sorted(batches) == [1, 1, 3]
    alone = [lm.generate_until([_Req((p, kw))])[0] for p in prompts]
    assert together == alone
    # sampling: seeded, so repeatable, and not the greedy answer
    sample = {**kw, "do_sample": True, "temperature": 1.0}
    lm.generator.manual_seed(0)
    first = lm.generate_until([_Req(("abcd", sample))])
    lm.generator.manual_seed(0)
    assert lm.generate_until([_Req(("abcd", sample))]) == first != together[:1]


def hl(*args, env=None):
    return subprocess.run([sys.executable, "-m", "hybridlab", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=env)


def test_cli_prints_saves_and_logs_to_tensorboard(setup):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, tasks, tmp = setup
    r = hl("eval", str(run.run_dir), "--lm-eval", "hl_choice,hl_text", "--lm-eval-include", str(tasks),
           "--lm-eval-limit", "2", "--device", "cpu", env=offline_env(tmp))
    assert r.returncode == 0, r.stderr
    assert "hl_choice" in r.stdout and "byte_perplexity" in r.stdout
    saved = json.loads((run.run_dir / "eval" / "step_0000001" / "lm_eval.json").read_text())
    assert set(saved["results"]) == {"hl_choice", "hl_text"} and saved["config"]["step"] == 1
    acc = EventAccumulator(str(run.run_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"lm_eval/hl_choice/acc", "lm_eval/hl_text/byte_perplexity", "lm_eval/hl_text/bits_per_byte"} <= tags
    assert not any("stderr" in t for t in tags)
    (event,) = acc.Scalars("lm_eval/hl_text/byte_perplexity")
    assert event.step == 1 and event.value == pytest.approx(saved["results"]["hl_text"]["byte_perplexity,none"])


def test_cli_bad_task_names_are_one_line(setup, capsys):
    from hybridlab.cli import main

    run, tasks, tmp = setup
    for args, needle in [(("--lm-eval", "hl_choice,no_such_task", "--lm-eval-include", str(tasks)), "'no_such_task'"),
                         (("--lm-eval", "hl_choice", "--lm-eval-include", str(tmp / "nowhere")), "not a folder"),
                         (("--lm-eval", "hl_choice,,x"), "separated by commas"),
                         (("--lm-eval-limit", "3"), "go with --lm-eval")]:
        assert main(["eval", str(run.run_dir), *args]) == 2, args
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and needle in err, err


def test_bad_model_args_are_user_errors(setup):
    from hybridlab.errors import UserError
    from hybridlab.lm_eval_model import HybridLabLM

    run, _, _ = setup
    for kwargs, needle in [({"pretrained": "gpt2"}, "unknown pretrained"), ({"batch_size": "auto"}, "batch_size"),
                           ({"max_length": 0}, "max_length")]:
        with pytest.raises(UserError, match=needle):
            HybridLabLM(path=str(run.run_dir), device="cpu", **kwargs)
    # lm_eval's own --batch_size (default 1) does not clash with one named in model_args
    lm = HybridLabLM.create_from_arg_string(f"path={run.run_dir},device=cpu,batch_size=5", {"batch_size": 1})
    assert lm.batch_size == 5
