#!/bin/bash
# The README's "Step by step, as a batch job would run it": every command as written there, each timed.
# Run from the repository root after `make setup`: bash benchmarks/cluster_walkthrough.sh
# It starts a local S3 server (moto) on 127.0.0.1:9000 for the run and stops it at the end; logs/, runs/unic-pair
# and results/teachers-rank.* are rewritten, synth/ is made when missing.
set -euo pipefail
export PATH=$PWD/.venv/bin:$PATH
rm -rf logs runs/unic-pair
mkdir -p logs
timed() {
    local start=$(date +%s%N)
    "$@"
    echo "[$(( ($(date +%s%N) - start) / 1000000000 )) s] ${*: -1}" | cut -c1-160 >&2
}
[ -d synth/train ] || timed bash -c 'distillery data synth --out synth > logs/synth.log 2>&1'
moto_server -H 127.0.0.1 -p 9000 > logs/s3.log 2>&1 &
trap "kill $!" EXIT
sleep 3
export FSSPEC_S3_ENDPOINT_URL=http://127.0.0.1:9000 AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test
timed python -c "import fsspec; s3 = fsspec.filesystem('s3'); s3.mkdir('lab'); s3.put('synth/train/', 'lab/shards/train/', recursive=True)"
timed bash -c 'torchrun --nproc_per_node=2 -m distillery.cli cache-teachers --data s3://lab/shards/train \
    --teacher local-dir:teachers/shape_cnn --out s3://lab/cache/shape.zarr --views 2 > logs/cache-shape.log 2>&1'
timed bash -c 'torchrun --nproc_per_node=2 -m distillery.cli cache-teachers --data s3://lab/shards/train \
    --teacher local-dir:teachers/pattern_cnn --out s3://lab/cache/pattern.zarr --views 2 > logs/cache-pattern.log 2>&1'
timed bash -c "DISTILLERY_PROGRESS_SECONDS=10 torchrun --nproc_per_node=2 -m distillery.cli train --method unic \
    --recipe synth --data 's3://lab/shards/train/train-{000000..000009}.tar' --cache s3://lab/cache/shape.zarr \
    --cache s3://lab/cache/pattern.zarr --out runs/unic-pair --epochs 1 --device cpu > logs/train.log 2>&1"
timed distillery teachers rank --store s3://lab/cache/shape.zarr --store s3://lab/cache/pattern.zarr
timed bash -c 'distillery cache-teachers --data s3://lab/shards/train --out s3://lab/cache/shape.zarr --add \
    --teacher local-dir:teachers/pattern_cnn > logs/add-pattern.log 2>&1'
timed distillery cache info s3://lab/cache/shape.zarr
grep -h "caching (rank 0" logs/cache-shape.log
grep -h "unic on" logs/train.log
