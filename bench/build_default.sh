#!/usr/bin/env bash
# Rebuild the embedded default model, model_store/cifar10-resnet56, and the documents measured on it.
#
#   bash bench/build_default.sh            # needs ../shared/datasets/cifar10 and the dev venv (.venv)
#
# Every step resumes or starts over safely: training resumes from its checkpoint (kept outside git), the
# later steps rewrite their outputs. On 2 CPU cores with native bf16 (AVX512-BF16) training takes about
# 3.6 min per epoch; calibration and documents about 45 min more. On a GPU: TRAIN_DEVICE=cuda.
set -euo pipefail
cd "$(dirname "$0")/.."
CIFAR=../shared/datasets/cifar10
MODEL_DIR=${MODEL_DIR:-model_store/cifar10-resnet56}
CKPT=${CKPT:-$HOME/.cache/classmeans/cifar10-resnet56.ckpt}
EPOCHS=${EPOCHS:-36}
TRAIN_DEVICE=${TRAIN_DEVICE:-cpu}
BIN=.venv/bin

# 1. The backbone, on 45,000 training images: the other 5,000 (stratified, seed 0) are never trained on and
#    become the selection split of step 2 (model.json records the split; calibration checks it).
"$BIN/classmeans" train --arch resnet56 --data "$CIFAR/train.npz" --test-data "$CIFAR/test.npz" \
  --holdout 5000 --holdout-seed 0 --epochs "$EPOCHS" --lr 0.1 --weight-decay 5e-4 --bf16 auto --seed 0 \
  --device "$TRAIN_DEVICE" --out "$MODEL_DIR" --checkpoint "$CKPT" --resume

# 2. Class means from the 45,000 (eight head variants and the paper's rule), thresholds chosen on the 5,000,
#    the best variant activated; docs/results.md + results.json on the 10,000 test images.
"$BIN/python" -m bench.results --model-dir "$MODEL_DIR"

# 3. SDN-style internal classifiers on the 45,000, profiles of the ic_prob / ic_entropy / combined modes
#    chosen on the 5,000.
"$BIN/classmeans" train-ics --model-dir "$MODEL_DIR" --data "$CIFAR/train.npz" --epochs 25 --milestones 15 \
  --holdout 5000

# 4. What the service serves in every mode (docs/ic_profiles.md) and the serving benchmark
#    (docs/benchmarks.md: plain PyTorch, LitServe, exits off, every profile).
"$BIN/python" -m bench.ic_profiles --model-dir "$MODEL_DIR"
"$BIN/python" -m bench.serving --model-dir "$MODEL_DIR"
