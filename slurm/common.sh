# Sourced by every slurm/*.sbatch template, in the project root: the job's environment, a few
# checks, then the job's command (its arguments; default `dvc repro`). See slurm/README.md.

# The project's Python: the stages call `python`, DVC must be the project's.
if [[ -f .venv/bin/activate ]]; then
    source .venv/bin/activate
fi

# The train stage's command is `$AERIALSEG_LAUNCH python pipeline/train.py`: inside the job it becomes
# `slurm/launch python pipeline/train.py`, which checks params.yaml against the job and runs
# `srun python pipeline/train.py`: one task per GPU (or CPU rank), each task one Lightning rank. The
# other stages run once, in this batch step. Set here, so a value inherited from the submitting
# shell (pattern 2's `sbatch --wait ...`) never reaches a stage inside the job.
export AERIALSEG_LAUNCH=slurm/launch  # relative: DVC runs the stage in the project root
# srun of Slurm 22.05-23.02 does not read --cpus-per-task from the job (SLURM_CPUS_PER_TASK); without
# this a task may get 1 CPU, starving its DataLoader workers.
export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}
# One OpenMP/BLAS thread per CPU of the task, not one per CPU of the node for every task.
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
# When one rank dies, srun ends the others at once; without this they wait for it until the
# collective timeout (30 minutes) while the job holds its GPUs.
export SLURM_KILL_BAD_EXIT=1

# Readable logs: lines reach the .out/.err files when printed, not when the job ends...
export PYTHONUNBUFFERED=1
# ...progress at most every 30 s: tqdm's bars (DVC's, downloads) and, off a terminal, the project's
# own progress lines (src/aerialseg/progress.py)...
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-30}
# ...and srun prefixes every line of a task with its rank ("1: ..."), so errors name their rank.
export SLURM_LABELIO=1

# Compute nodes often have no internet: never wait on the Hugging Face Hub. train.pretrained:
# imagenet reads the cache filled on a login node by `aerialseg prefetch-weights resnet50`; put it on
# the shared file system (export HF_HOME=/shared/hf there and here).
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}

# MLflow: unless MLFLOW_TRACKING_URI is set (exported by sbatch from the submitting shell), the runs go
# to the SQLite file mlflow.db in the project root, which must be on the shared file system. Only
# global rank 0 writes to it. For many jobs at once use an MLflow server instead:
# export MLFLOW_TRACKING_URI=http://login-node:5000

# Lightning treats a job named "bash" or "interactive" as an interactive session: it ignores the
# Slurm tasks and starts train.devices processes in every task itself.
case "${SLURM_JOB_NAME:-}" in
bash | interactive)
    echo "error: the job name '$SLURM_JOB_NAME' makes Lightning ignore Slurm; submit with another --job-name" >&2
    exit 2
    ;;
esac

run_job() {
    if (($# == 0)); then
        set -- dvc repro
    fi
    # A job of N tasks makes every Lightning process expect N ranks; a bare `python` is one of them
    # and would wait (30 minutes) for the others. `srun python ...` starts all of them.
    if [[ "$(basename "$1")" == python* ]] && ((${SLURM_NTASKS:-1} > 1)); then
        echo "error: the job has $SLURM_NTASKS tasks: run 'srun $*', not '$*'" >&2
        exit 2
    fi
    echo "job ${SLURM_JOB_ID:-?} on ${SLURM_JOB_NODELIST:-?}: ${SLURM_JOB_NUM_NODES:-1} node(s) x" \
        "${SLURM_NTASKS_PER_NODE:-1} task(s), ${SLURM_CPUS_PER_TASK:-1} CPU(s) per task;" \
        "params.yaml needs train.num_nodes=${SLURM_JOB_NUM_NODES:-1} train.devices=${SLURM_NTASKS_PER_NODE:-1}"
    # A requeued job (preemption, src/aerialseg/preemption.py) runs this script again from the top.
    if ((${SLURM_RESTART_COUNT:-0} > 0)); then
        echo "restart ${SLURM_RESTART_COUNT} of job ${SLURM_JOB_ID:-?} (requeued): the stages already done" \
            "are skipped, the training resumes from its last.ckpt into the same MLflow run"
    fi
    echo "running: $*"
    # Pattern 2 (`... slurm/<template> srun python pipeline/train.py`): srun, with slurm/launch's checks.
    if [[ "$1" == srun ]]; then
        shift
        set -- slurm/launch "$@"
    fi
    exec "$@"
}
