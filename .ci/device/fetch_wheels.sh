#!/usr/bin/env bash
# Run HERE (package registries reachable), before a device check: downloads the cp312 wheels the device host lacks
# into .device_wheels/ (git-ignored; ~50 MB; pass it to the device tool's `carry`). The device host (checked
# 2026-11-26: Python 3.12, torch 2.11+cu130, lightning, numba, pandas, pyarrow, transformers, pytest) has no
# hydra, anndata, tensordict, torchdata or deepspeed, and no internet.
set -euo pipefail
cd "$(dirname "$0")/../.."
W=.device_wheels; mkdir -p $W
pip download -q --only-binary=:all: --python-version 3.12 --implementation cp --no-deps -d $W \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_27_x86_64 --platform manylinux2010_x86_64 --platform manylinux_2_12_x86_64 \
  hydra-core==1.3.8 omegaconf==2.3.1 anndata zarr numcodecs donfig legacy-api-wrap natsort array-api-compat \
  session-info2 scverse-misc pyvers google-crc32c tensordict torchdata hjson py-cpuinfo pydantic pydantic-core \
  annotated-types typing-inspection msgpack einops nvidia-ml-py matplotlib contourpy cycler fonttools kiwisolver \
  pillow pyparsing python-dateutil hypothesis sortedcontainers
# sdists only on PyPI: antlr4 (hydra's parser) is pure Python; deepspeed builds its ops on first use (JIT)
pip wheel -q --no-deps -w $W antlr4-python3-runtime==4.9.3
DS_BUILD_OPS=0 pip wheel -q --no-deps --no-build-isolation -w $W deepspeed
ls $W | wc -l
