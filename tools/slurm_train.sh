#!/usr/bin/env bash
# Training on a SLURM cluster, with the toolboxes' interface (mmseg / mmpretrain tools/slurm_train.sh):
#
#   [GPUS=16] [GPUS_PER_NODE=8] [CPUS_PER_TASK=5] [SRUN_ARGS="..."] \
#       bash tools/slurm_train.sh PARTITION JOB_NAME CONFIG WORK_DIR [train.py args...]
#
# srun starts GPUS tasks (one per GPU, GPUS_PER_NODE per node); every task runs tools/train.py
# with --launcher slurm, and mmengine reads its rank, the world size and the master node from
# SLURM's environment (SLURM_PROCID, SLURM_NTASKS, SLURM_NODELIST via scontrol). MASTER_PORT
# (default 29500) picks the rendezvous port; --kill-on-bad-exit stops every task once one fails.
# PYTHON (default python) is the interpreter srun runs.
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: $0 PARTITION JOB_NAME CONFIG WORK_DIR [train.py args...]" >&2; exit 2
fi
PARTITION=$1
JOB_NAME=$2
CONFIG=$3
WORK_DIR=$4
GPUS=${GPUS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(( GPUS < 8 ? GPUS : 8 ))}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
SRUN_ARGS=${SRUN_ARGS:-""}
HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python}
set -x
# SRUN_ARGS is split into words on purpose (e.g. SRUN_ARGS="--quotatype=auto --exclusive")
# shellcheck disable=SC2086
PYTHONPATH="$HERE/..${PYTHONPATH:+:$PYTHONPATH}" \
srun -p "$PARTITION" \
    --job-name="$JOB_NAME" \
    --gres=gpu:"$GPUS_PER_NODE" \
    --ntasks="$GPUS" \
    --ntasks-per-node="$GPUS_PER_NODE" \
    --cpus-per-task="$CPUS_PER_TASK" \
    --kill-on-bad-exit=1 \
    ${SRUN_ARGS} \
    "$PYTHON" -u "$HERE/train.py" "$CONFIG" --work-dir="$WORK_DIR" --launcher=slurm "${@:5}"
