#!/usr/bin/env bash
# Submit data preparation to SLURM: an array of NUM_TASKS tasks (launch/slurm/prepare_data.sbatch), then a
# `stage=merge` job that starts only once every task succeeded (and is cancelled if one fails).
#   NUM_TASKS=8 launch/slurm/prepare_data.sh inputs=[A,B,...] output_dir=OUT vocab=V/vocab.txt [overrides]
# Relative paths are taken from the repository root. Extra sbatch options for both jobs go in SBATCH_ARGS
# (e.g. SBATCH_ARGS="--partition=cpu --cpus-per-task=16 --time=4:00:00"). Logs go to OUT/logs/.
# Prints "ARRAY_JOB_ID MERGE_JOB_ID".
set -euo pipefail
cd "$(dirname "$0")/../.."
NUM_TASKS=${NUM_TASKS:-4}
PYTHON=${PYTHON:-python}
output_dir=data/out  # PrepareConfig's default
vocab=""
for arg in "$@"; do
    case $arg in
        output_dir=*) output_dir=${arg#output_dir=} ;;
        vocab=*) vocab=${arg#vocab=} ;;
        stage=* | task_index=* | num_tasks=*)
            echo "error: $arg is set by this script; choose the number of tasks with NUM_TASKS=N" >&2; exit 2 ;;
    esac
done
if [[ ! $NUM_TASKS =~ ^[1-9][0-9]*$ ]]; then
    echo "error: NUM_TASKS=$NUM_TASKS: give a positive number of array tasks" >&2; exit 2
fi
if [[ -z $vocab || ! -f $vocab ]]; then
    echo "error: vocab=${vocab:-<unset>}: array tasks must share an existing vocab.txt; make one first with" \
        "prepare_data.py stage=read then stage=vocab (see launch/slurm/README.md)" >&2
    exit 2
fi
mkdir -p "$output_dir/logs"
read -ra extra <<< "${SBATCH_ARGS:-}"

array=$(sbatch --parsable "${extra[@]}" --array="0-$((NUM_TASKS - 1))" \
    --output="$output_dir/logs/prepare-data-%A_%a.out" launch/slurm/prepare_data.sbatch "$@")
array=${array%%;*}
merge_cmd=$(printf '%q ' "$PYTHON" launch/prepare_data.py "$@" stage=merge num_tasks="$NUM_TASKS")
merge=$(sbatch --parsable "${extra[@]}" --job-name=prepare-data-merge --ntasks=1 \
    --dependency="afterok:$array" --kill-on-invalid-dep=yes \
    --output="$output_dir/logs/prepare-data-merge-%j.out" --wrap="$merge_cmd")
merge=${merge%%;*}
echo "$array $merge"
