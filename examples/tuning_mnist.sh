#!/bin/sh
# GradNet settings tried on one weak base snapshot of the embedded MNIST:
# the defaults of examples/reproduce_table.py (scale_power, hidden 130 in
# proportion to the cnn's layers = 1,99,30, 3 epochs, q 85) against the
# paper's hidden sizes 5,100,25, more epochs, other normalizations and a
# sparser q. Every variant trains on the same 2,000 gradnet digits (one
# random candidate each) and is evaluated on the 1,000 test digits (all 10
# candidates); each prints one JSON line, collected in OUT/results.jsonl.
#
#     sh examples/tuning_mnist.sh [OUT]     (default runs/tuning-mnist)
#
# The base snapshot: epoch 1 of examples/reproduce_table.py --dataset mnist
# (plain SGD lr 0.002), trained here first when OUT/base has none.
set -e
OUT=${1:-runs/tuning-mnist}
CLI=${GRADNET_CUPY:-gradnet-cupy}
mkdir -p "$OUT"
if [ ! -f "$OUT/base/snapshot_epoch_1.npz" ]; then
    $CLI train-base --dataset mnist --model cnn --epochs 1 --optimizer sgd \
        --lr 0.002 --out "$OUT/base" --device cpu
fi
SNAPSHOT="$OUT/base/snapshot_epoch_1.npz"
: > "$OUT/results.jsonl"

stores() {  # q
    for split in gradnet test; do
        candidates=random
        [ $split = test ] && candidates=all
        $CLI extract --model "$SNAPSHOT" --arch cnn --q "$1" --split $split \
            --candidates $candidates --compression lzf \
            --out "$OUT/q$1-$split.h5" --device cpu --json > /dev/null
    done
}

fit() {  # name q fit-options...
    name=$1; q=$2; shift 2
    $CLI fit --train "$OUT/q$q-gradnet.h5" --test "$OUT/q$q-test.h5" \
        --eval-every 0 --out "$OUT/$name" --device cpu --json "$@" \
        | sed "s/^{/{\"variant\": \"$name\", \"q\": $q, /" \
        >> "$OUT/results.jsonl"
    tail -n 1 "$OUT/results.jsonl"
}

stores 85
fit defaults 85 --epochs 3
fit hidden-5-100-25 85 --epochs 3 --hidden 5,100,25
fit epochs-10 85 --epochs 10
fit standard_l2 85 --epochs 3 --normalize standard_l2
fit none 85 --epochs 3 --normalize none
fit momentum 85 --epochs 3 --optimizer momentum
stores 95
fit q95 95 --epochs 3
fit paper-hidden-epochs-10 85 --epochs 10 --hidden 5,100,25
fit metric 85 --epochs 3 --normalize metric
fit metric-damping-0.1 85 --epochs 3 --normalize metric --metric-damping 0.1
