#!/usr/bin/env bash
# One `accelerate launch` per node: the container's entrypoint, and what slurm/train.sbatch runs on
# each node. Arguments go to launcher/train.py. Processes per node = visible GPUs; with none, the
# CPU gloo path with NPROC processes.
#
#   NNODES (1)  NODE_RANK (0)  MASTER_ADDR (127.0.0.1)  MASTER_PORT (29500 with NNODES>1, else 0 = a free port)
#   NPROC       processes per node on CPU (default 2); ignored when GPUs are visible
#   RDZV_BACKEND  static (default) or c10d (elastic rendezvous at MASTER_ADDR:MASTER_PORT)
#   MAX_RESTARTS  restarts of the node's workers when one fails (default 0): a self-healing run resumes from
#                 its newest checkpoint (README, "Self-healing runs")
set -euo pipefail
cd "$(dirname "$0")/.."  # the repository (/app in the image): launcher/ and configs/ are relative to it

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
RDZV_BACKEND="${RDZV_BACKEND:-static}"
if [[ "$NNODES" -gt 1 ]]; then
  MASTER_PORT="${MASTER_PORT:-29500}"
else
  MASTER_PORT="${MASTER_PORT:-0}"
fi

# Visible GPUs: CUDA_VISIBLE_DEVICES when set (an empty value hides them all), else nvidia-smi's list.
count_gpus() {
  if [[ -n "${CUDA_VISIBLE_DEVICES+x}" ]]; then
    if [[ -z "$CUDA_VISIBLE_DEVICES" || "$CUDA_VISIBLE_DEVICES" == "-1" ]]; then
      echo 0
    else
      tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .
    fi
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
  else
    echo 0
  fi
}

gpus="$(count_gpus)"
args=(--num_machines "$NNODES" --mixed_precision no --dynamo_backend no)
if [[ "$gpus" -gt 0 ]]; then
  per_node="$gpus"
else
  # No GPU: the launcher forms a gloo group on CPU; one thread per process unless told otherwise.
  per_node="${NPROC:-2}"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
# accelerate counts --num_processes over all machines, not per machine.
total=$((per_node * NNODES))
if [[ "$total" -gt 1 ]]; then
  args+=(--multi_gpu --num_processes "$total" --main_process_port "$MASTER_PORT")
  if [[ "${MAX_RESTARTS:-0}" -gt 0 ]]; then
    args+=(--max_restarts "$MAX_RESTARTS")
  fi
else
  args+=(--num_processes 1)
fi
if [[ "$NNODES" -gt 1 ]]; then
  # Fail in one line, not after torchrun's rendezvous timeout: interfaces, rank, port, reachability.
  NNODES="$NNODES" NODE_RANK="$NODE_RANK" MASTER_ADDR="$MASTER_ADDR" MASTER_PORT="$MASTER_PORT" \
    "${PYTHON:-python}" -m launcher.preflight
  args+=(--machine_rank "$NODE_RANK" --main_process_ip "$MASTER_ADDR" --rdzv_backend "$RDZV_BACKEND")
fi

exec accelerate launch "${args[@]}" launcher/train.py "$@"
