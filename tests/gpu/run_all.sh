#!/usr/bin/env bash
# Every GPU check and the end-to-end benchmark in one go, on a host with two GPUs:
#   1. both GPUs: TP=2 vs TP=1 (GPTModel, and pretrain_gpt_s2.py through Megatron's loop), CP=2 vs CP=1;
#   2. then, side by side: GPU 0 runs tools/bench_training.py (S2 hybrid vs dense), GPU 1 runs the
#      quickstart, the Hugging Face bf16 parity, the kernel's, torch.compile's and the decode kernel's
#      GPU tests.
# Time on two H200s (2026-11-30, the parts timed in separate calls): the two-GPU tests about 10
# minutes (most of it Triton compiling float32 kernels for each pretraining run), then about 10
# minutes for the side-by-side part (the kernel tests about 5); the timeouts leave some room.
# One log per check goes to $LOG_DIR (default runs/gpu_checks), the runs' own logs to $LOG_DIR/runs;
# everything is packed into $LOG_DIR.tgz and a summary is printed last. Exits 1 when any check failed
# (or left no exit status).
set -u
cd "$(dirname "$0")/../.."
LOG_DIR=${LOG_DIR:-runs/gpu_checks}
mkdir -p "$LOG_DIR/runs"
export PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
# The tools import megatron_s2: this checkout, unless it is installed (`pip install -e .`).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

# The two-GPU tests write their tables and run logs under $OUT.
OUT="$LOG_DIR/runs" timeout "${TWO_GPU_TIMEOUT:-900}" python -m pytest -q -p no:cacheprovider -s \
    tests/gpu/test_tp_gpu.py tests/gpu/test_cp_gpu.py tests/gpu/test_pretrain_gpu.py \
    -k "two_gpus or tp2 or resume" > "$LOG_DIR/two_gpu_tests.log" 2>&1
echo "check two_gpu_tests exit $?" >> "$LOG_DIR/two_gpu_tests.log"

(
    export CUDA_VISIBLE_DEVICES=0
    timeout "${BENCH_TIMEOUT:-270}" python tools/bench_training.py --config configs/hybrid_1b_32k.yaml \
        --seq-lengths 8192 32768 --output "$LOG_DIR/bench_training.json" --log-dir "$LOG_DIR/runs" > "$LOG_DIR/bench_training.log" 2>&1
    echo "check bench_training exit $?" >> "$LOG_DIR/bench_training.log"
) &
(
    export CUDA_VISIBLE_DEVICES=1
    SKIP_INSTALL=1 RUN_DIR=/tmp/quickstart ITERS=${QUICKSTART_ITERS:-400} timeout 120 \
        bash examples/quickstart.sh > "$LOG_DIR/quickstart.log" 2>&1
    echo "check quickstart exit $?" >> "$LOG_DIR/quickstart.log"
    timeout 180 python -m pytest -q -p no:cacheprovider -s tests/gpu/test_hf_gpu.py > "$LOG_DIR/hf_gpu.log" 2>&1
    echo "check hf_gpu exit $?" >> "$LOG_DIR/hf_gpu.log"
    timeout 600 python -m pytest -q -p no:cacheprovider tests/gpu/test_kernel_gpu.py > "$LOG_DIR/kernel_gpu.log" 2>&1
    echo "check kernel_gpu exit $?" >> "$LOG_DIR/kernel_gpu.log"
    timeout 150 python -m pytest -q -p no:cacheprovider -s tests/gpu/test_compile_gpu.py > "$LOG_DIR/compile_gpu.log" 2>&1
    echo "check compile_gpu exit $?" >> "$LOG_DIR/compile_gpu.log"
    timeout 300 python -m pytest -q -p no:cacheprovider -s tests/gpu/test_hf_decode_gpu.py > "$LOG_DIR/hf_decode_gpu.log" 2>&1
    echo "check hf_decode_gpu exit $?" >> "$LOG_DIR/hf_decode_gpu.log"
) &
wait

tar czf "$LOG_DIR.tgz" -C "$(dirname "$LOG_DIR")" "$(basename "$LOG_DIR")"
CHECKS=(two_gpu_tests quickstart hf_gpu kernel_gpu compile_gpu hf_decode_gpu bench_training)
for log in "${CHECKS[@]}"; do
    echo "===== $log"
    grep -E "passed|failed|error|exit|^\||iteration +[0-9]+/|TP=|loss" "$LOG_DIR/$log.log" | grep -v Warning | tail -n 14
done
cat "$LOG_DIR/runs/tp_gpu.txt" 2>/dev/null

failed=()
for log in "${CHECKS[@]}"; do
    grep -qx "check $log exit 0" "$LOG_DIR/$log.log" 2>/dev/null || failed+=("$log")
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]} (logs in $LOG_DIR)"
    exit 1
fi
echo "all GPU checks passed"
