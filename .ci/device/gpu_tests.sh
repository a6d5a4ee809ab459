#!/usr/bin/env bash
# Run ON THE DEVICE host, from the repo root, after fetch_wheels.sh here:
#   run(command="bash .ci/device/gpu_tests.sh", carry=[".device_wheels"], timeout_s=360)
# Installs the missing wheels into /tmp/site and runs the `-m gpu` tests (TESTS= narrows them; TESTS=none skips
# them), then with GPU_STEP=1 bench/gpu_step.py (JSON lines in $OUT/gpu_step.jsonl). Output: $OUT/log.txt.
# Assembled from session 7's runs on an H200 (its wheel set, install-what-is-missing and pytest line ran there);
# this file as a whole has not run on a device yet.
exec > >(tee -a "${OUT:-/tmp}/log.txt") 2>&1
T0=$(date +%s); S=/tmp/site; mkdir -p $S
export PYTHONPATH=$S:$PWD PYTHONUNBUFFERED=1 SCFM_CACHE=/tmp/scfm_cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; python3 -V; nproc
missing=""
for w in .device_wheels/*.whl; do  # install only the distributions the host lacks (its own torch stack stays)
  python3 -c "import importlib.metadata as m, sys; m.distribution(sys.argv[1])" "$(basename "$w" | cut -d- -f1)" \
    2>/dev/null || missing="$missing $w"
done
echo "installing:$missing"
# the host's pandas 3 with anndata 0.12 (installed without its pins) refuses to write string indexes
printf 'try:\n    import pandas\n    pandas.set_option("future.infer_string", False)\nexcept Exception:\n    pass\n' \
  > $S/sitecustomize.py
[ -n "$missing" ] && python3 -m pip install -q --no-index --no-deps --no-compile --target $S $missing
python3 -c "import torch, lightning; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), 'lightning', lightning.__version__)"
echo "setup took $(( $(date +%s) - T0 )) s"
[ "${TESTS:-}" = none ] || timeout "${TEST_S:-270}" python3 -m pytest -p no:cacheprovider -m gpu -rsfE --durations=15 -q \
  ${TESTS:-tests/test_model.py tests/test_attention.py tests/test_distributed.py}
echo "pytest rc=$? after $(( $(date +%s) - T0 )) s"
if [ -n "${GPU_STEP:-}" ]; then  # GPU_STEP=1: bench/gpu_step.py too (GPU_STEP="--presets ... --steps ..." for options)
  [ "$GPU_STEP" = 1 ] && GPU_STEP=""
  timeout "${BENCH_S:-300}" python3 bench/gpu_step.py $GPU_STEP > "${OUT:-/tmp}/gpu_step.jsonl"
  echo "gpu_step rc=$? after $(( $(date +%s) - T0 )) s"
fi
