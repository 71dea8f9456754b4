#!/bin/bash
# Extracts ../shared/data/cifar10-jpeg.tar.gz (all 60,000 CIFAR-10 images, lossy JPEG) to
# runs/data/cifar10-jpeg, the train set of the CPU recipes (configs/train_*.py:cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
archive="${1:-../shared/data/cifar10-jpeg.tar.gz}"
if [ ! -f "$archive" ]; then
  echo "prepare_cifar10_jpeg.sh: $archive not found: expected the CIFAR-10 JPEG archive of ../shared/data (see its README)" >&2
  exit 2
fi
if [ -d runs/data/cifar10-jpeg/train ] && [ -d runs/data/cifar10-jpeg/test ]; then
  echo "runs/data/cifar10-jpeg already extracted"
  exit 0
fi
mkdir -p runs/data
tmp="$(mktemp -d runs/data/extract.XXXXXX)"
tar xzf "$archive" -C "$tmp"
mv "$tmp/cifar10-jpeg" runs/data/cifar10-jpeg
rmdir "$tmp"
echo "extracted to runs/data/cifar10-jpeg"
