#!/usr/bin/env bash
# Fetches into .whl/ every wheel the GPU machine lacks (bench/gpu_wheels.txt), for its Python 3.12 on
# x86-64, without their dependencies (the image has those). Run once on a machine that reaches PyPI:
#   bash bench/fetch_wheels.sh        then: run(command="OUT=$OUT bash bench/gpu_suite.sh", carry=[".whl"])
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
grep -v '^#' bench/gpu_wheels.txt | xargs python3 -m pip download -q --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl
ls -l .whl
