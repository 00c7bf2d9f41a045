#!/usr/bin/env bash
# The CUDA checks of this project in one run, sized for a short GPU lease (at most 9
# minutes on one GPU): the CUDA tests, bench_train.py in fp32 and bf16 with the naive
# reference beside it, bench_map.py on CUDA tensors, runner.compile (inductor, Triton)
# on two small methods last, and a two-process NCCL run when the machine has two GPUs.
# Each stage has its own time limit and its own log, so one failing stage leaves the
# others' figures. Logs go to $OUT (default device_out/).
#
# Prepare on a machine with the git history (the copy sent to a GPU machine has none):
#   mkdir -p .device_ref && git archive 4a05054 | tar -x -C .device_ref
# (.device_ref/ is git-ignored, so name it in the device tool's carry), then run this
# script there from the repository root.
# Without .device_ref the benchmarks run without the naive reference.
set -u
out=${OUT:-device_out}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 NUMBA_NUM_THREADS=1 OMP_NUM_THREADS=1
ref=(--no-reference)
[ -f .device_ref/runners/optim.py ] && ref=(--reference-tree .device_ref)

stage() {  # stage NAME SECONDS COMMAND...: run, log to $out/NAME.txt, note the exit status
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$out/$name.txt" 2>&1
    local rc=$?
    echo "$name rc=$rc in $((SECONDS - t0))s" | tee -a "$out/summary.txt"
    tail -n 25 "$out/$name.txt"
}

{ nvidia-smi; "$py" -c "import torch, numba; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'gpus', torch.cuda.device_count(), torch.cuda.get_device_name(0), 'numba', numba.__version__)"; } \
    >"$out/environment.txt" 2>&1
tail -n 3 "$out/environment.txt"

stage tests 150 "$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py \
    "tests/test_runner.py::test_bf16_autocast_trains_and_fp16_needs_cuda"
stage bench_train_fp32 180 "$py" benchmarks/bench_train.py --device cuda --matmul 8192 --rounds 1 \
    --steps 50 --min-seconds 2 "${ref[@]}" --json "$out/bench_train_fp32.json"
stage bench_train_bf16 100 "$py" benchmarks/bench_train.py --device cuda --matmul 8192 --rounds 1 \
    --steps 50 --min-seconds 2 --amp bf16 --no-reference --json "$out/bench_train_bf16.json"
stage bench_map 45 "$py" benchmarks/bench_map.py --device cuda --naive-queries 200
stage bench_train_compile 60 "$py" benchmarks/bench_train.py --device cuda --matmul 8192 --rounds 1 \
    --steps 50 --min-seconds 1 --compile --methods DCMHT DSPH --no-reference --json "$out/bench_train_compile.json"

if [ "$("$py" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    run=/tmp/device_check_runs
    rm -rf "$run"
    stage single_gpu 60 "$py" main.py --config-file configs/DSPH/demo.yaml --set runner.device=cuda \
        runner.progress=false --output-dir "$run/one"
    stage nccl_two_gpus 90 "$py" -m torch.distributed.run --nnodes=1 --nproc-per-node=2 main.py \
        --config-file configs/DSPH/demo.yaml --set runner.device=cuda runner.progress=false --output-dir "$run/two"
else
    echo "nccl_two_gpus skipped: $("$py" -c 'import torch; print(torch.cuda.device_count())') GPU(s); NCCL needs one GPU per rank" \
        >>"$out/summary.txt"
fi
cat "$out/summary.txt"
