"""Probes the evaluation runs on every block through its hooks (blocks/base.py), never naming a
block type: turning off the blocks that can be turned off (`blocks_off`), and recording what each
block decided per token (`RecordBlocks`)."""
from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch

from hybridlab.blocks.base import Recorder, TokenRecord


def scoped_blocks(model) -> list[tuple[torch.nn.Module, list[str]]]:
    """Each distinct block of `model` with the layer positions (scopes) it runs at, in layer
    order: a shared block runs at several."""
    out: dict[int, tuple[torch.nn.Module, list[str]]] = {}
    for scope, block in zip(model.scopes, model.layers):
        out.setdefault(id(block), (block, []))[1].append(scope)
    return list(out.values())


@contextmanager
def blocks_off(model, only=None):
    """Within this context every block of `model` that can be turned off (Block.ablate) is off
    at inference, or only the block `only`; yields the blocks turned off (empty: none can be)."""
    with ExitStack() as stack:
        off = []
        for block, _ in scoped_blocks(model):
            if only is not None and block is not only:
                continue
            ablation = block.ablate()
            if ablation is not None:
                stack.enter_context(ablation)
                off.append(block)
        yield off


class RecordBlocks:
    """Within this context every block that can record (Block.record) does; `collect(targets)`
    after each forward files what each recorded under its scope: `records[scope]`, a TokenRecord,
    on the CPU. A shared block records once per layer position it runs at, in layer order.

    answers: keep each batch's answer positions (targets != -100) beside the marks (tasks)."""

    def __init__(self, model, answers: bool = False):
        self.model, self.answers = model, answers
        self.records: dict[str, TokenRecord] = {}
        self._recorders: list[tuple[Recorder, list[str]]] = []
        self._stack = ExitStack()

    def __enter__(self) -> RecordBlocks:
        with ExitStack() as stack:  # a failure part-way leaves no block recording
            for block, scopes in scoped_blocks(self.model):
                recording = block.record()
                if recording is None:
                    continue
                recorder = stack.enter_context(recording)
                self._recorders.append((recorder, scopes))
                for scope in scopes:
                    self.records[scope] = TokenRecord(recorder.mark, recorder.score_name,
                                                      answers=[] if self.answers else None)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def collect(self, targets: torch.Tensor | None = None) -> None:
        """File the calls recorded in the forward just run; targets (B, L), -100 where unscored."""
        for recorder, scopes in self._recorders:
            if len(recorder.calls) != len(scopes):
                raise RuntimeError(f"the block at {', '.join(scopes)} recorded {len(recorder.calls)} "
                                   f"calls in one forward, not {len(scopes)} (is the model in eval mode?)")
            for scope, (mask, score) in zip(scopes, recorder.calls):
                record = self.records[scope]
                record.masks.append(mask.cpu())
                record.scores.append(score.cpu())
                if record.answers is not None:
                    record.answers.append((targets != -100).cpu())
            recorder.calls.clear()
