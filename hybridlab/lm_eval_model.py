"""A hybridlab checkpoint as an lm-evaluation-harness model type, "hybridlab".

    python -m hybridlab.lm_eval_model --model hybridlab --model_args path=runs/NAME,device=cpu \
        --tasks swde,fda --limit 100          # lm_eval's own CLI, every option of it
    hybridlab eval runs/NAME --lm-eval swde,fda   # the same, logged to the run's TensorBoard

lm_eval finds model types only in its own registry (no plugin entry point), so `lm_eval --model
hybridlab` cannot see this one: importing this module registers it, and `python -m` of it runs
lm_eval's CLI after the import. From Python: `import hybridlab.lm_eval_model`, then
`lm_eval.simple_evaluate(model="hybridlab", model_args={"path": ...}, ...)`.

Text becomes tokens through the run's own data (`encode`/`decode`: bytes, or its
tokenizer.json), so the training data must be where the run found it. Scores are exact sums of
log-probabilities from the full forward; generation runs through the decoding caches (prefill,
then one `step` per token).
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from .errors import ConfigError, UserError

# A tokenizer's end-of-text token, when it has one, marks document boundaries: the harness
# conditions an empty context on it and stops generating there. Byte-level data has none.
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>")


class HybridLabLM(TemplateLM):
    """model_args: path (run or checkpoint folder), device, batch_size, max_length (default: the
    training sequence length), max_gen_toks (256), seed (sampling, 1234), arch (an architecture
    YAML the checkpoint must match)."""

    def __init__(self, path: str, device: str | None = None, batch_size: int | str = 8,
                 max_length: int | None = None, max_gen_toks: int = 256, seed: int = 1234,
                 arch: str | None = None, max_batch_size=None, **unknown):
        super().__init__()
        from .data import make_dataset
        from .load import load_checkpoint

        if unknown:
            raise UserError(f"hybridlab model_args: unknown {', '.join(sorted(unknown))}; known: path, "
                            "device, batch_size, max_length, max_gen_toks, seed, arch")
        self.batch_size = _int_arg("batch_size", batch_size)
        self.max_gen_toks = _int_arg("max_gen_toks", max_gen_toks)
        self.loaded = lo = load_checkpoint(path, device, arch)
        self.model = lo.model
        self._device = next(self.model.parameters()).device
        self.amp = torch.bfloat16 if self._device.type == "cuda" else None
        self.dataset = make_dataset(lo.data_spec, lo.cfg.seq_len, path="training.data", base_dir=lo.base_dir)
        self.dataset.encode("")  # data without a text encoding (a synthetic task) says so here
        self._max_length = _int_arg("max_length", self.dataset.seq_len if max_length is None else max_length)
        self.generator = torch.Generator(device=self._device).manual_seed(_int_arg("seed", seed, low=0))
        self.eos_id = _eos_id(self.dataset)

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        # lm_eval adds its own batch_size/device (from --batch_size, --device; default 1 and
        # None) to model_args; the ones named in model_args win instead of clashing.
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # ------------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        """The tokenizer's end-of-text token; else a newline, the closest thing bytes have."""
        return self.eos_id if self.eos_id is not None else self.dataset.encode("\n")[-1]

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.dataset.name

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.dataset.encode(string)

    def tok_decode(self, ids) -> str:
        return self.dataset.decode(list(ids))

    def get_model_info(self) -> dict:
        lo = self.loaded
        return {"checkpoint": str(lo.ckpt), "step": lo.step, "arch": lo.arch.name,
                "arch_hash": lo.arch.arch_hash(), "max_length": self.max_length}

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def _logits(self, idx: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self._device.type, dtype=self.amp, enabled=self.amp is not None):
            return self.model(idx).logits

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """requests: ((context, continuation) strings or None, context ids, continuation ids)
        -> (sum of the continuation's log-probs, whether greedy decoding gives it)."""
        for _, ctx, cont in requests:
            if len(cont) > self.max_length:
                raise UserError(f"a continuation of {len(cont)} tokens is longer than max_length "
                                f"{self.max_length}; raise it (model_args max_length=N)")

        def longest_first(req):  # the first batch shows at once whether memory suffices
            ids = req[1] + req[2]
            return -len(ids), tuple(ids)

        batches = Collator(requests, sort_fn=longest_first)
        results = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood")
        for chunk in batches.get_batched(n=self.batch_size):
            # what the model reads: context + continuation but the last token, cut from the left
            rows = [(ctx + cont)[-(self.max_length + 1):-1] for _, ctx, cont in chunk]
            # Right padding: every block is causal, so a pad never reaches a real position.
            idx = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)  # (B, L)
            for i, row in enumerate(rows):
                idx[i, :len(row)] = torch.tensor(row)
            logits = self._logits(idx.to(self._device))  # (B, L, V)
            for i, (key, _, cont) in enumerate(chunk):
                n, k = len(rows[i]), len(cont)
                logp = F.log_softmax(logits[i, n - k:n].float(), dim=-1)  # (k, V): predictions of cont
                target = torch.tensor(cont, device=logp.device)
                answer = (logp.gather(-1, target[:, None]).sum().item(),
                          bool((logp.argmax(-1) == target).all()))
                results.append(answer)
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
            bar.update(len(chunk))
        bar.close()
        return batches.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document's log-likelihood in disjoint windows of max_length predicted tokens,
        the first conditioned on the end-of-text (prefix) token, each later one on the token
        before it."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for ctx, pred in map(make_disjoint_window, get_rolling_token_windows(
                    self.tok_encode(text), self.prefix_token_id, self.max_length, context_len=1)):
                windows.append((None, ctx, pred))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[i] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy, or sampled (do_sample, temperature, top_k, top_p), until a stop string or
        max_gen_toks. Prompts of equal length and settings share a batch: the decoding caches
        hold no padding, so a batch is a set of prompts that all end at the same position."""
        groups: dict[tuple, list[int]] = {}
        prompts, settings = [], []
        for i, (context, gen_kwargs) in enumerate(req.args for req in requests):
            kw = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            room = max(1, self.max_length - kw["max_gen_toks"])  # context cut from the left
            ids = self.tok_encode(context)[-room:] or [self.prefix_token_id]
            prompts.append(ids)
            settings.append(kw)
            groups.setdefault((repr(sorted(kw.items())), len(ids)), []).append(i)
        out: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
        for members in groups.values():
            for s in range(0, len(members), self.batch_size):
                batch = members[s:s + self.batch_size]
                texts = self._generate([prompts[i] for i in batch], settings[batch[0]])
                for i, text in zip(batch, texts):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return out

    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], kw: dict) -> list[str]:
        from .generate import sample_next

        eos = self.tok_decode([self.eos_id]) if self.eos_id is not None else None
        until = handle_stop_sequences(list(kw["until"]), eos)
        temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0
        top_k, top_p = int(kw.get("top_k") or 0), float(kw.get("top_p") or 1.0)
        max_new = kw["max_gen_toks"]
        prompt = torch.tensor(prompts, device=self._device)  # (B, T), every row the same length
        new: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        with torch.autocast(self._device.type, dtype=self.amp, enabled=self.amp is not None):
            caches = self.model.allocate_cache(len(prompts), prompt.shape[1] + max_new)
            logits = self.model.prefill(prompt, caches)  # (B, V) at the last prompt token
            for step in range(max_new):
                nxt = sample_next(logits, temperature, top_k, top_p, self.generator)  # (B,)
                for b, token in enumerate(nxt.tolist()):
                    if not done[b]:
                        new[b].append(token)
                        done[b] = any(u in self.tok_decode(new[b]) for u in until)
                if all(done) or step + 1 == max_new:
                    break
                logits = self.model.step(nxt, caches)
        texts = []
        for ids in new:
            text = self.tok_decode(ids)
            for u in until:  # the answer ends before the first stop string
                text = text.split(u)[0]
            texts.append(text)
        return texts


def _int_arg(name: str, value, low: int = 1) -> int:
    """model_args arrive as ints or, from a command line, as strings."""
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit() or int(text) < low:
        raise UserError(f"hybridlab model_args {name}: must be an integer >= {low}, got {value!r}")
    return int(text)


def _eos_id(dataset) -> int | None:
    tok = getattr(getattr(dataset, "codec", None), "tok", None)  # a tokenizers.Tokenizer, if any
    if tok is None:
        return None
    for name in EOS_NAMES:
        if tok.token_to_id(name) is not None:
            return tok.token_to_id(name)
    return None


def register() -> None:
    """Make "hybridlab" a model type of lm_eval (idempotent). A lazy entry, named by import
    path, so running this file as __main__ and importing it do not register two classes."""
    import lm_eval.models  # noqa: F401  lm_eval lists its own types only into an empty registry

    if "hybridlab" not in model_registry:
        model_registry.register("hybridlab", target="hybridlab.lm_eval_model:HybridLabLM")


register()


def main() -> int:
    """lm_eval's CLI with "hybridlab" registered; bad hybridlab input is one line, exit 2."""
    from lm_eval.__main__ import cli_evaluate

    try:
        cli_evaluate()
    except (UserError, ConfigError) as e:
        print(f"hybridlab lm_eval: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
