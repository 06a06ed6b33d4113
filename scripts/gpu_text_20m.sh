#!/usr/bin/env bash
# On the GPU machine, from the repository root: issue 14's text runs (experiments/grids/text-20m.yaml)
# then `hybridlab eval` of each run; everything small lands in $OUT (text20m.tgz: unpack it into
# docs/measurements/<folder>/ to commit it; the record is plain files). /tmp is scratch space on
# the GPU machine (the corpus copy and the run folders).
#     bash scripts/gpu_text_20m.sh TRAIN_DEADLINE_S EVAL_BUDGET_S
set -u
source scripts/gpu_env.sh
stdlib=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
rm -rf /tmp/hl-text && mkdir -p /tmp/hl-text
cp "$stdlib"/*.py /tmp/hl-text/
for pkg in email json asyncio logging xml http unittest concurrent importlib multiprocessing; do
    cp -r "$stdlib/$pkg" /tmp/hl-text/ 2>/dev/null
done
find /tmp/hl-text -name '__pycache__' -prune -exec rm -rf {} +
du -sh /tmp/hl-text
out=/tmp/text20m
sed 's#data: default#data: {text: /tmp/hl-text}#' experiments/grids/text-20m.yaml > /tmp/text-20m.yaml
python -P scripts/mqar_grid.py /tmp/text-20m.yaml --out $out --jobs 4 --deadline "$1" --device cuda
for run in $out/stdlib-L512/*/; do
    name=$(basename "$run")
    python -P -m hybridlab eval "$run" --batches 16 --max-factor 16 --contexts 1K,8K \
        --time-budget "$2" > "$out/eval_$name.log" 2>&1 &
done
wait
tail -n 40 $out/eval_*.log
tar czf "$OUT/text20m.tgz" --exclude=checkpoints --exclude="events.out.tfevents*" --exclude=results.tgz -C $out .
cp $out/summary.md "$OUT/" 2>/dev/null
