#!/usr/bin/env bash
# The one-call GPU check: install from a folder of wheels (the GPU machine has
# no network), run every CuPy test, the CUDA sanitizers on small launches and
# the bench scripts with --device gpu, and leave everything under one folder.
#
#   bash bench/gpu_check.sh [WHEELS] [OUT]
#
# WHEELS (default .whl): the wheels the GPU machine lacks. Its image (see
# the device tool's KINDS.md) holds NumPy, CuPy, SciPy, h5py, matplotlib,
# torch, click, tqdm, threadpoolctl, pytest, hypothesis, six, filelock,
# protobuf and typing_extensions already, so only four travel (about
# 50 MB, under the device tool's 64 MiB a call). Recipe, on a machine with
# PyPI, from the repository root, for Python 3.12:
#
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 \
#       --platform manylinux_2_27_x86_64 -d .whl hdf5plugin mlxtend "setuptools<81"
#   PIP_CONSTRAINT="$PWD/constraints.txt" pip wheel --no-deps -w .whl chainer==7.8.1
#
# (setuptools<81: Chainer imports pkg_resources at run time.) They are
# installed with --no-deps; the "requirements" step then imports every
# module the package and its tests need, so a missing one is named there.
#
# OUT (default $OUT, else bench/results/gpu-check): log.txt with every
# step's output, pytest-gpu.xml, and the bench JSON files named
# <bench>-<gpu>.json; copy the JSON files into bench/results/ and commit.
# Each step has its own time limit so that one hung step cannot eat the
# rest: the second H200 run took 415 s before the profile step was added
# (at most 4 minutes more under ncu; 7 files under OUT, within the device
# tool's 8).
set -u
cd "$(dirname "$0")/.."
WHEELS=$(realpath "${1:-.whl}")
OUT=$(realpath -m "${2:-${OUT:-bench/results/gpu-check}}")
mkdir -p "$OUT"
LOG="$OUT/log.txt"
: > "$LOG"
status=0

step() {   # step NAME SECONDS COMMAND...: run, log, remember a failure
    local name=$1 limit=$2 start
    shift 2
    echo "=== $name ($(date -u +%T), limit ${limit}s): $*" | tee -a "$LOG"
    start=$(date +%s%N)
    timeout "$limit" "$@" >> "$LOG" 2>&1
    local rc=$?
    echo "=== $name: exit $rc, $(( ($(date +%s%N) - start) / 1000000 )) ms" \
        | tee -a "$LOG"
    [ "$rc" -eq 0 ] || status=1
    return "$rc"
}

if [ ! -d "$WHEELS" ]; then
    echo "error: no wheel folder $WHEELS (see the recipe in $0)" >&2
    exit 2
fi
command -v nvidia-smi >/dev/null && step nvidia-smi 30 nvidia-smi
step python 30 python3 -c 'import sys, numpy, cupy; print(sys.version); print("numpy", numpy.__version__, "cupy", cupy.__version__, "devices", cupy.cuda.runtime.getDeviceCount())' || {
    echo "error: python3 with NumPy and CuPy and a CUDA device is needed" >&2
    exit 2; }

VENV=${GPU_CHECK_VENV:-/tmp/gradnet-gpu-check-venv}
if python3 -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
    # python3 is a virtual environment already (CuPy lives in it): use it
    PY=python3
    PIP=("$PY" -m pip install -q --no-index --find-links "$WHEELS")
elif step venv 120 python3 -m venv --system-site-packages "$VENV"; then
    PY="$VENV/bin/python"
    PIP=("$PY" -m pip install -q --no-index --find-links "$WHEELS")
else    # no venv module: a throwaway machine's own Python takes the wheels
    status=0
    PY=python3
    PIP=("$PY" -m pip install -q --no-index --find-links "$WHEELS"
         --break-system-packages)
fi
step install-wheels 180 "${PIP[@]}" --no-deps "setuptools<81" chainer==7.8.1 \
    hdf5plugin mlxtend || exit 2
step install 120 "${PIP[@]}" --no-build-isolation --use-pep517 --no-deps -e . \
    || exit 2
step requirements 60 "$PY" -c 'import scipy, h5py, hdf5plugin, click, tqdm, threadpoolctl, pytest, hypothesis, matplotlib, mlxtend, six, filelock, google.protobuf, typing_extensions, torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' || exit 2
step import 60 "$PY" -c 'import gradnet_cupy.chainer_compat, gradnet_cupy.kernels; import chainer.backends.cuda as c; from gradnet_cupy.backend import gpu_available; print("chainer cuda available", c.available, "gpu_available", gpu_available())'

# every test that runs CuPy: tests/gpu and the cupy tier of the kernel tests
step pytest 300 "$PY" -m pytest -q -p no:cacheprovider -rs \
    --junitxml="$OUT/pytest-gpu.xml" tests/gpu \
    tests/test_sparsify.py tests/test_block_outer.py -k "cupy or gpu"

# the sanitizers on small launches of every kernel
LAUNCHES=$(mktemp -d)/small_launches.py
cat > "$LAUNCHES" <<'EOF'
import cupy, numpy as np
from gradnet_cupy.kernels import Blocks, percentile_sparsify, block_outer_accumulate
rng = np.random.default_rng(0)
g = cupy.asarray(rng.standard_normal((8, 700)).astype(np.float32))
csr = percentile_sparsify(g, [100, 600], 85.0)
# the sampled path too (split, resolve, fallback): samples of 64 entries
from gradnet_cupy.kernels._cuda import launcher
from gradnet_cupy.kernels.sparsify import (CUDA_SOURCE, segment_offsets,
                                           sparsify_launch_sequence)
sampled = sparsify_launch_sequence(g, segment_offsets([100, 600], 700), 0.85,
                                   launcher(CUDA_SOURCE), cupy, 512, 64)
assert bool((sampled.indptr == csr.indptr).all())
for dtype in (np.float32, np.float64):
    blocks = Blocks.contiguous([100, 300, 300])
    G = cupy.zeros(blocks.packed_size, dtype=dtype)
    block_outer_accumulate(csr, blocks, G, method='sparse')
cupy.cuda.Device().synchronize()
print('ok', int(csr.indptr[-1]))
EOF
if command -v compute-sanitizer >/dev/null; then
    for tool in memcheck racecheck synccheck initcheck; do
        step "sanitizer-$tool" 120 compute-sanitizer --tool "$tool" \
            --error-exitcode 1 "$PY" "$LAUNCHES"
    done
else
    echo "=== compute-sanitizer: not on this machine, skipped" | tee -a "$LOG"
    step small-launches 60 "$PY" "$LAUNCHES"
fi

gpu=$("$PY" -c 'import cupy; print(cupy.cuda.runtime.getDeviceProperties(0)["name"].decode().split()[-1].lower())' 2>/dev/null || echo gpu)
step bench-sparsify 120 "$PY" bench/bench_sparsify.py --device gpu \
    --output "$OUT/sparsify-$gpu.json"
step bench-metric 150 "$PY" bench/bench_metric.py --device gpu \
    --out "$OUT/metric-$gpu.json"
step bench-tangent 150 "$PY" bench/bench_tangent.py --device gpu \
    --out "$OUT/tangent-$gpu.json"
step bench-store 150 "$PY" bench/bench_store.py --device gpu \
    --out "$OUT/store-$gpu.json"
step bench-geodesic 150 "$PY" bench/bench_geodesic.py --device gpu \
    --out "$OUT/geodesic-$gpu.json"
# which launch the kernels' time goes to (Nsight Compute where present)
if command -v ncu >/dev/null; then
    step profile 240 ncu --profile-from-start off --section SpeedOfLight \
        --section LaunchStats --section Occupancy "$PY" bench/profile_kernels.py
else
    echo "=== ncu: not on this machine, wall times only" | tee -a "$LOG"
    step profile 60 "$PY" bench/profile_kernels.py
fi

# the README's quickstart end to end on the GPU (embedded MNIST), each
# command a step: the log's step times are its wall times
QS=$(mktemp -d)
CLI=("$PY" -c 'from gradnet_cupy.cli import main; main()')
SNAP="$QS/base/snapshot_epoch_1.npz"
step quickstart-train-base 180 "${CLI[@]}" train-base --dataset mnist \
    --model cnn --epochs 1 --device gpu --json --out "$QS/base"
step quickstart-extract-train 180 "${CLI[@]}" extract --model "$SNAP" \
    --arch cnn --split gradnet --candidates random --device gpu --json \
    --out "$QS/train.h5"
step quickstart-extract-test 180 "${CLI[@]}" extract --model "$SNAP" \
    --arch cnn --split test --candidates all --device gpu --json \
    --out "$QS/test.h5"
step quickstart-fit 300 "${CLI[@]}" fit --train "$QS/train.h5" \
    --test "$QS/test.h5" --normalize scale_power --epochs 3 --device gpu \
    --json --out "$QS/gradnet"
step quickstart-evaluate 120 "${CLI[@]}" evaluate --gradnet "$QS/gradnet" \
    --test "$QS/test.h5" --device gpu --json
echo "=== done, exit $status; everything is in $OUT" | tee -a "$LOG"
exit "$status"
