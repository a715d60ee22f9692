#!/usr/bin/env bash
# The one prepared device check: the full-size training bench (bench/bench_train_gpu.py) under a wall-time cap,
# then the unit-test files that hold CUDA tests (tests/test_*.py naming cuda.is_available). Installs nothing. Run from the repository root:
#   bash bench/gpu_check.sh [BENCH_SECONDS]        (default 420; the table is also written to $OUT or /tmp)
# BENCH_ARGS adds bench options (BENCH_ARGS=--quick tries the script on CPU in half a minute).
set -u
cd "$(dirname "$0")/.."
CAP="${1:-420}"
DEST="${OUT:-/tmp}"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
python -c "import lycoris" 2>/dev/null || echo "note: lycoris-lora not importable here; its rows will read n/a"
timeout --signal=INT --kill-after=20 "$CAP" python bench/bench_train_gpu.py ${BENCH_ARGS:-} --json "$DEST/bench_train_gpu.json" \
    2> "$DEST/bench_train_gpu.stderr" | tee "$DEST/bench_train_gpu.md"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then
    echo "bench exited $rc (124: the ${CAP}s cap); rows finished so far:"
    grep '^row ' "$DEST/bench_train_gpu.stderr" || true
    tail -20 "$DEST/bench_train_gpu.stderr"
fi
CUDA_FILES=$(grep -l "cuda.is_available" tests/test_*.py)  # the unit-test files with CUDA tests (no server suite)
prc=5
[ -n "$CUDA_FILES" ] && { timeout 180 python -m pytest -q -rs $CUDA_FILES -p no:cacheprovider; prc=$?; }
[ "$prc" -eq 5 ] && echo "(no CUDA-named tests in the suite)" && prc=0
exit $(( rc != 0 ? rc : prc ))
