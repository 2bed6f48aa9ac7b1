#!/usr/bin/env bash
# The GPU measurements of docs/performance.md in one command, highest priority first (parts 1-5: about 8 minutes
# on one H100/H200), and the small experiment (part 6 alone: about 6-7 minutes, estimated). Each part has its own time limit; a failing part is reported and the next one runs. Results are
# appended to bench/results/*.jsonl as usual; with OUT=<dir>, the lines this run added and the log also go there.
#
#   bash bench/gpu_checks.sh                 # needs CUDA and an importable fewstep (pip install -e . or PYTHONPATH=src)
#   OUT=/tmp/gpu bash bench/gpu_checks.sh    # part 4 needs data/default-gpt2 (fewstep data --config small_mdlm)
#   bash bench/gpu_checks.sh 2 4             # only parts 2 and 4
#   OUT=/tmp/gpu bash bench/gpu_checks.sh 6  # the small experiment; its report is copied to OUT/small
#
# 1  tests marked gpu (CUDA graphs, compiled decode, bf16 paths)
# 2  roofline of one denoising step at the ~160M owt-small shape (target: within 2x of the floor); fused draw
# 3  MDLM loss head on masked rows vs the full head at that shape (time, peak memory)
# 4  training tokens/s and MFU of small_mdlm on one GPU (target: >= 40%)
# 5  sampling latency: 1/4/1024 steps vs KV-cached AR (compiled), batch 1 (targets: 100x and 20x)
# 6  `fewstep experiment small` (docs/experiments.md; needs data/default-gpt2): resumable, so a cut run continues
set -u
PY=${PYTHON:-python3}
OUT=${OUT:-}
PARTS=${*:-1 2 3 4 5}
[ -n "$OUT" ] && mkdir -p "$OUT"
before=$(mktemp -d)
cp bench/results/*.jsonl "$before"/ 2>/dev/null
run() {  # run <part> <seconds> <command...>
    local n=$1 limit=$2
    shift 2
    case " $PARTS " in *" $n "*) ;; *) return 0 ;; esac
    echo "== part $n: $* ($(date +%T), limit ${limit}s)"
    timeout "$limit" "$@"
    local rc=$?
    [ $rc -ne 0 ] && echo "!! part $n exited with $rc"
    return 0
}
{
run 1 240 "$PY" -m pytest -q -m gpu tests
run 2 150 "$PY" bench/roofline.py --preset owt-small-shape --append
run 2 60 "$PY" bench/draw.py --device cuda --rows 1024
run 3 120 "$PY" bench/loss_head.py --device cuda --batch 32 --len 1024 --d-model 768 --layers 12 --heads 12
run 4 180 "$PY" bench/train_throughput.py --device cuda --preset small_mdlm --procs 1 --steps 80 --log-every 20
run 5 240 "$PY" bench/speed.py --preset owt-small-shape --random-weights --compile --steps 1,4,1024 --batches 1 \
    --hf none
run 6 570 "$PY" -m fewstep experiment small
} 2>&1 | tee "${OUT:-$before}/gpu_checks.log"
if [ -n "$OUT" ]; then
    [ -d docs/results/small ] && cp -r docs/results/small "$OUT/small"
    [ -d runs/experiments/small/stages ] && cp -r runs/experiments/small/stages "$OUT/small-stages"  # a cut run's results
    for f in bench/results/*.jsonl; do
        b=$(basename "$f")
        new=$(diff "$before/$b" "$f" 2>/dev/null | sed -n 's/^> //p')
        [ -f "$before/$b" ] || new=$(cat "$f")
        [ -n "$new" ] && printf '%s\n' "$new" > "$OUT/new-$b"
    done
fi
exit 0
