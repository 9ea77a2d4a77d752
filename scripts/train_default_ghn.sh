#!/usr/bin/env bash
# Retrain the GHN bundled as timm_ghn/data/ghn2-cifar5.safetensors and evaluate it (MODEL_CARD.md).
#
# Usage: scripts/train_default_ghn.sh [CIFAR10_ZIP_OR_DIR] [OUTPUT]
#
# The bundled GHN was trained in five runs of the same command that resumed each other: the total
# step count (--steps) was set to 2500, 2200, 1800, 1300 and 1500 from steps 0, 100, 200, 300 and
# 800, to fit the time available on a shared 2-core CPU. --steps only sets the length of the cosine
# learning-rate schedule (the architectures and images of a step depend on the seed and the step
# alone), so the five runs below repeat that training step for step.
#
# One thread per process: on a busy 2-core machine, two OpenMP threads made each step about 20
# times slower than one, because each thread waited for the other to be scheduled.
set -euo pipefail

DATA="${1:-../shared/data/cifar10-jpeg.zip}"
OUTPUT="${2:-runs/default/ghn2-cifar5.safetensors}"

pretrain() {
    timm-ghn -v pretrain "$DATA" --classes airplane,automobile,bird,cat,deer -o "$OUTPUT" \
        --arch-batch 8 --image-batch 32 --hid 64 --max-shape 64,64,7,7 \
        --lr 1e-3 --warmup-steps 100 --num-architectures 3000 --min-params 50000 --max-params 1000000 \
        --checkpoint-every 100 --val-every 250 --val-images 500 --threads 1 --seed 0 "$@"
}

pretrain --steps 2500 --stop-after 100
pretrain --steps 2200 --stop-after 100
pretrain --steps 1800 --stop-after 100
pretrain --steps 1300 --stop-after 500
pretrain --steps 1500

timm-ghn evaluate-ghn "$DATA" --ghn "$OUTPUT" --threads 1
