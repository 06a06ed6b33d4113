"""Validation loss/ppl of a run with its SALs as trained and with every SAL selecting nothing
(the HEAD API of 2026-12-03 morning: group_metrics + sals_off), and each SAL's eval share."""
import json, math, sys
import torch
from hybridlab.data import make_dataset
from hybridlab.evaluate import group_metrics, sals_off
from hybridlab.load import load_checkpoint

lo = load_checkpoint(sys.argv[1], None, None)
model = lo.model.eval()
dev = next(model.parameters()).device
ds = make_dataset(lo.data_spec, lo.cfg.seq_len, path="training.data", base_dir=lo.base_dir)
amp = torch.bfloat16 if dev.type == "cuda" else None
on = group_metrics(model, ds.eval_batches(lo.cfg.batch_size, 32), dev, amp)
with sals_off(model):
    off = group_metrics(model, ds.eval_batches(lo.cfg.batch_size, 32), dev, amp)
print(json.dumps({"run": sys.argv[1], "step": lo.step, "ppl_on": math.exp(on["loss"]), "ppl_off": math.exp(off["loss"]),
                  "selected": on["selected"]}))
