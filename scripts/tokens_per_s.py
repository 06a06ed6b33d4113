"""One line per training run for the GPU scripts: steps, tokens/s over the last 4 logged steps,
and the losses, from a run's metrics.jsonl. Usage: python scripts/tokens_per_s.py METRICS..."""
import json
import sys

for path in sys.argv[1:]:
    rows = [json.loads(line) for line in open(path) if "train/tokens_per_s" in line]
    last = [r["train/tokens_per_s"] for r in rows[-4:]]
    print(f"{path}: steps {len(rows)}, tokens/s over the last 4 steps {sum(last) / max(len(last), 1) / 1e3:.1f}K, "
          f"losses {[round(r['train/loss'], 3) for r in rows]}")
