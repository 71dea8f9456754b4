#!/usr/bin/env bash
# The GPU measurements, in stages. Run it on the GPU machine from the
# repository root:
#
#   OUT=DIR scripts/gpu_benchmark.sh STAGE [STAGE ...]
#
# Stages (each bounded by STAGE_SECONDS, default 540; every run resumes, so
# rerunning a stage continues it):
#   nin10k     the whole CIFAR-10 test set (10,000 JPEG images), NiN with random
#              weights, 1 pixel, paper settings, early stop off
#   nin10k16   the same in bfloat16
#   bench      scripts/benchmark.py for ResNet and NiN (docs/benchmarks.md)
#   resnet200  ResNet, 1 pixel, 200 exact images, scipy and paper presets
#   train      NiN, All-CNN-C and VGG16 on the CIFAR-10 JPEG train set
#
# `scripts/gpu_benchmark.sh --stage`, run first on a machine with ../shared/data,
# copies the inputs into the working tree (./shared/data and ./.whl, both
# git-ignored), so that they travel with it. Outputs: one $OUT/<stage>.tar.gz
# per stage (workdirs, logs, wall times).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--stage" ]; then
  # Inputs from ../shared/data into ./shared/data (a copy, not a link: links
  # do not travel), and the one Python package the device image lacks.
  set -e
  mkdir -p shared/data
  for part in cifar10-jpeg.tar.gz cifar10-test-exact keras; do
    [ -e "shared/data/$part" ] || cp -r "../shared/data/$part" shared/data/
  done
  grep -qx "/shared/" .git/info/exclude || echo "/shared/" >> .git/info/exclude
  grep -qx "/.whl/" .git/info/exclude || echo "/.whl/" >> .git/info/exclude
  ls .whl/ml_collections-*.whl >/dev/null 2>&1 || python3 -m pip download -q --no-deps \
      --only-binary=:all: --python-version 3.12 -d .whl "ml_collections==1.1.0"
  du -sh shared .whl
  exit 0
fi

: "${OUT:?OUT must name the folder for outputs}"
STAGE_SECONDS="${STAGE_SECONDS:-540}"
EXTRA=(${OPA_EXTRA_FLAGS:-})  # e.g. "--config.num_images=2" for a dry rehearsal
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
if ! "$PY" -c "import ml_collections" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
# The configs name ../shared/data; on the device the data travels in ./shared.
[ -e ../shared ] || ln -s "$PWD/shared" ../shared
if [ ! -d /tmp/cifar10-jpeg/test ]; then
  mkdir -p /tmp/cifar10-jpeg && tar -xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp/cifar10-jpeg
fi
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
mkdir -p runs/gpu
started=$(date +%s)

left() { echo $((STAGE_SECONDS - ($(date +%s) - started))); }

timed() {  # timed NAME COMMAND...: runs with the time left, logs wall time
  local name=$1; shift
  local budget; budget=$(left)
  if [ "$budget" -le 10 ]; then echo "$name: no time left"; return 0; fi
  local t0=$SECONDS
  timeout "$budget" "$@" "${EXTRA[@]}" > "runs/gpu/$name.log" 2>&1
  local rc=$?  # 124: stopped at the stage's time limit (the run resumes when rerun)
  echo "$name rc $rc wall $((SECONDS - t0)) s" | tee -a runs/gpu/walltimes.txt
  tail -n 3 "runs/gpu/$name.log"
}

nin10k() {
  timed "nin10k$1" "$PY" scripts/attack.py --config=configs/cifar10.py:nin,1,nontargeted \
      --config.model=random:nin --config.data=folder:/tmp/cifar10-jpeg \
      --config.only_correct=False --config.de.stop=none --config.precision="$2" \
      --workdir="runs/gpu/nin10k$1"
}

for stage in "$@"; do
  case "$stage" in
    nin10k) nin10k "" float32 ;;
    nin10k16) nin10k "_bf16" bfloat16 ;;
    bench)
      timed bench_resnet "$PY" scripts/benchmark.py --config=configs/benchmark.py \
          --workdir=runs/gpu/benchmark_resnet --config.slots=64 --config.num_images=128 \
          --config.de.generations=10 --config.repetitions=3 --config.baseline.num_images=2 \
          --config.early_stop.num_images=256 --config.early_stop.generations=100 \
          --config.memory.slots='(8, 32)' --config.scaling.slots='(1, 8, 32, 128)' \
          --config.scaling.generations=5 --config.scaling.repetitions=2 \
          --config.scaling.image_slots=8 --config.scaling.image_popsize=400 \
          --config.scaling.forward_batches='(400, 3200, 12800, 51200)' \
          --config.scaling.devices='()' --config.profile.enabled=True
      timed bench_nin "$PY" scripts/benchmark.py --config=configs/benchmark_nin.py \
          --workdir=runs/gpu/benchmark_nin --config.slots=32 --config.num_images=64 \
          --config.de.generations=10 --config.repetitions=3 --config.baseline.num_images=2 \
          --config.memory.slots='(8, 32)' --config.profile.enabled=True
      ;;
    resnet200)
      timed resnet_scipy "$PY" scripts/attack.py \
          --config=configs/cifar10_scipy.py:resnet,1,nontargeted \
          --workdir=runs/gpu/resnet_1px_scipy --config.num_images=200
      timed resnet_paper "$PY" scripts/attack.py --config=configs/cifar10.py:resnet,1,nontargeted \
          --workdir=runs/gpu/resnet_1px_paper --config.num_images=200
      ;;
    train)
      for model in nin allconv vgg16; do
        timed "train_$model" "$PY" scripts/train.py --config="configs/train_$model.py" \
            --config.dataset=folder:/tmp/cifar10-jpeg --workdir="runs/gpu/train_$model"
      done
      ;;
    *) echo "unknown stage $stage: expected nin10k, nin10k16, bench, resnet200 or train" >&2
       exit 2 ;;
  esac
  # Everything but checkpoints (too large to come back: at most 16 MiB a file).
  tar -czf "$OUT/$stage.tar.gz" --exclude='*.msgpack' runs/gpu
done
cp runs/gpu/walltimes.txt "$OUT/walltimes.txt" 2>/dev/null || true
