#!/usr/bin/env bash
# Create (or update) the project's virtual environment with the pinned OpenMMLab stack.
#
#   bash tools/setup_env.sh            # runtime + demo packages
#   bash tools/setup_env.sh --tests    # ... + test tools
#
# Environment: GRPO_RM_VENV (default .venv), PYTHON (default python3), MAX_JOBS (mmcv build, 2).
# Idempotent: a second run only checks. Every version comes from requirements/lock.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
venv=${GRPO_RM_VENV:-.venv}
with_tests=0
for arg in "$@"; do
  case "$arg" in
    --tests) with_tests=1 ;;
    *) echo "setup_env.sh: unknown argument '$arg' (use --tests)" >&2; exit 2 ;;
  esac
done
say() { printf '[setup_env %(%H:%M:%S)T] %s\n' -1 "$*"; }

[ -x "$venv/bin/python" ] || { say "creating $venv"; "${PYTHON:-python3}" -m venv "$venv"; }
py="$venv/bin/python"
pip=("$py" -m pip install --disable-pip-version-check -q -c requirements/lock.txt)

say "1/5 torch, torchvision and build tools"
"${pip[@]}" -r requirements/build.txt

say "2/5 mmcv 2.1.0 with compiled ops (first build ~4-5 min on 2 cores, then from pip's wheel cache)"
if ! "$py" -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '2.1.0'" 2>/dev/null; then
  # tools/build/cxx20-g++: torch 2.14's headers need C++20, mmcv's setup.py forces -std=c++17.
  MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-2} CFLAGS=-g0 \
    CC="$root/tools/build/cxx20-g++" CXX="$root/tools/build/cxx20-g++" \
    "${pip[@]}" --no-build-isolation -r requirements/mmcv.txt
fi

say "3/5 OpenMMLab runtime and demo packages"
"${pip[@]}" -r requirements/runtime.txt -r requirements/demo.txt
if [ "$with_tests" = 1 ]; then
  "${pip[@]}" -r requirements/tests.txt
fi

say "4/5 grpo_rm_mm (editable)"
"$py" -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .

say "5/5 Fashion-MNIST (Debian package dataset-fashion-mnist)"
if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then sudo=(); else sudo=(sudo); fi
  "${sudo[@]}" apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || {
    "${sudo[@]}" apt-get update -q >/dev/null && \
      "${sudo[@]}" apt-get install -y -q dataset-fashion-mnist >/dev/null; }
fi

"$py" - <<'EOF'
import mmcv, mmcv.ops, mmengine, mmpretrain, mmseg, torch, torchvision  # noqa: F401
import grpo_rm_mm  # noqa: F401  (applies the compatibility patches)
print(f'[setup_env] ready: torch {torch.__version__}, torchvision {torchvision.__version__}, '
      f'mmcv {mmcv.__version__} (ops), mmengine {mmengine.__version__}, '
      f'mmseg {mmseg.__version__}, mmpretrain {mmpretrain.__version__}')
EOF
