"""The Slurm templates on a real one-node Slurm cluster started on localhost.

The module installs Debian's `slurm-wlm` and `munge` when they are missing and it can (root,
apt-get), starts munged (unless it runs already), slurmctld and slurmd with a configuration in a
temporary folder, and stops what it started at the end. Then it submits `slurm/cpu.sbatch` (2 tasks,
gloo DDP) on a tiny copy of the project: the whole `dvc repro` in one job (pattern 1), and the train
stage alone from `dvc repro` (pattern 2). See slurm/README.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from project_copy import TINY, copy_project, mlflow_client, project_env, run, set_params, stages_run

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SBIN = Path("/usr/sbin")
DAEMONS = ("slurmctld", "slurmd", "munged")
CLIENTS = ("sbatch", "sinfo", "squeue", "scancel", "srun")
TEMPLATE = "slurm/cpu.sbatch"
JOB_NAME = "aerialseg-cpu"
LAUNCH = f"sbatch --wait {TEMPLATE} srun"
TRAIN_CMD = "$AERIALSEG_LAUNCH python pipeline/train.py"
SLURM_PARAMS = {
    **TINY,
    "train": {
        **TINY["train"],
        "epochs": 1,
        "precision": "32",
        "accelerator": "cpu",
        "devices": 2,
        "strategy": "ddp",
    },
}
JOB_TIMEOUT = 600
MUNGE_DIRS = ("/etc/munge", "/run/munge", "/var/log/munge", "/var/lib/munge")


# ---------------------------------------------------------------- installing Slurm


def _missing() -> list[str]:
    daemons = [d for d in DAEMONS if not (SBIN / d).exists()]
    return daemons + [c for c in CLIENTS if shutil.which(c) is None]


def _install() -> None:
    """Install slurm-wlm and munge with apt-get, or skip the module saying why it cannot."""
    missing = ", ".join(_missing())
    if os.geteuid() != 0:
        pytest.skip(f"Slurm is not installed ({missing}) and installing it needs root")
    if shutil.which("apt-get") is None:
        pytest.skip(f"Slurm is not installed ({missing}) and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm", "munge"]
    started = time.monotonic()
    done = subprocess.run(install, env=env, capture_output=True, text=True)
    if done.returncode != 0:  # stale package lists: refresh them once
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True)
        done = subprocess.run(install, env=env, capture_output=True, text=True)
    if done.returncode != 0 or _missing():
        pytest.skip(f"installing slurm-wlm and munge failed: {(done.stderr or done.stdout)[-1500:]}")
    print(f"installed slurm-wlm and munge in {time.monotonic() - started:.0f} s")


# ---------------------------------------------------------------- the one-node cluster


@dataclass
class Cluster:
    dir: Path
    conf: Path

    def env(self, base: dict[str, str]) -> dict[str, str]:
        """`base`, without the settings of any job the tests run in, plus what the Slurm commands
        need to find this cluster (jobs inherit it)."""
        env = {k: v for k, v in base.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        return {**env, "SLURM_CONF": str(self.conf)}

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name}:\n{path.read_text(errors='replace')[-3000:]}"
            for path in (self.dir / "ctld.log", self.dir / "d.log")
            if path.exists()
        )


def _munge_works() -> bool:
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10, check=True).stdout
        subprocess.run(["unmunge"], input=cred, capture_output=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def _start_munge() -> int | None:
    """Start munged unless it runs already; the pid of the one started here, else None."""
    if _munge_works():
        return None
    for folder in MUNGE_DIRS:
        Path(folder).mkdir(parents=True, exist_ok=True)
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    subprocess.run(["chown", "-R", "munge:munge", *MUNGE_DIRS], check=True)
    subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", str(SBIN / "munged")], check=True, timeout=30)
    deadline = time.monotonic() + 20
    while not _munge_works():
        if time.monotonic() > deadline:
            pytest.fail("munged started but `munge -n | unmunge` still fails")
        time.sleep(0.2)
    pid_file = Path("/run/munge/munged.pid")
    return int(pid_file.read_text()) if pid_file.exists() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _write_conf(folder: Path, host: str, cpus: int) -> Path:
    (folder / "state").mkdir()
    (folder / "spool").mkdir()
    # Ports of their own: a cluster left behind by a killed run cannot get in the way.
    conf = f"""\
ClusterName=local
SlurmctldHost={host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/ctld.log
SlurmdLogFile={folder}/d.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
NodeName={host} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""
    path = folder / "slurm.conf"
    path.write_text(conf)
    return path


def _stop(pid_file: Path) -> None:
    """Stop the daemon whose pid is in `pid_file`: SIGTERM, then SIGKILL after 10 s."""
    if not pid_file.exists():
        return
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.2)
        os.kill(pid, signal.SIGKILL)
    except (ValueError, ProcessLookupError):
        pass


def _wait_idle(cluster: Cluster, env: dict[str, str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        done = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True)
        state = (done.stdout + done.stderr).strip()
        if state == "idle":
            return
        time.sleep(0.5)
    pytest.fail(f"the Slurm node is not idle after {timeout:.0f} s (sinfo: {state!r})\n{cluster.logs()}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.skip("starting slurmctld, slurmd and munged for the test needs root")
    if _missing():
        _install()
    cpus = os.cpu_count() or 1
    if cpus < 2:
        pytest.skip("the Slurm test runs 2 tasks of 1 CPU: this machine has 1 CPU")
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()
    folder = tmp_path_factory.mktemp("slurm")
    cluster = Cluster(folder, _write_conf(folder, host, cpus))
    env = cluster.env(dict(os.environ))
    munged = _start_munge()
    try:
        subprocess.run([str(SBIN / "slurmctld"), "-f", str(cluster.conf)], env=env, check=True, timeout=30)
        subprocess.run([str(SBIN / "slurmd"), "-f", str(cluster.conf)], env=env, check=True, timeout=30)
        _wait_idle(cluster, env)
        yield cluster
    finally:
        subprocess.run(["scancel", "--partition=debug"], env=env, capture_output=True, timeout=30)
        _stop(folder / "slurmd.pid")
        _stop(folder / "slurmctld.pid")
        if munged is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(munged, signal.SIGTERM)


# ---------------------------------------------------------------- the tiny project and its jobs


@dataclass
class Job:
    id: str
    returncode: int
    output: str
    out: Path
    err: Path

    def log(self) -> str:
        return "\n".join(
            f"--- {p.name}:\n{p.read_text(errors='replace')[-4000:]}"
            for p in (self.out, self.err)
            if p.exists()
        )


def _job(project: Path, result: subprocess.CompletedProcess[str]) -> Job:
    output = result.stdout + result.stderr
    ids = re.findall(r"Submitted batch job (\d+)", output)
    assert len(ids) == 1, f"expected one submitted job:\n{output[-3000:]}"
    logs = project / "slurm" / "logs"
    return Job(
        ids[0],
        result.returncode,
        output,
        logs / f"{JOB_NAME}-{ids[0]}.out",
        logs / f"{JOB_NAME}-{ids[0]}.err",
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_project(tmp_path_factory.mktemp("project"), SLURM_PARAMS)


@pytest.fixture(scope="module")
def pattern1(cluster: Cluster, project: Path) -> Job:
    """`sbatch --wait slurm/cpu.sbatch` in the copy: the whole `dvc repro` inside one job."""
    env = cluster.env(project_env(project))
    result = run(project, "sbatch", "--wait", TEMPLATE, env=env, timeout=JOB_TIMEOUT, check=False)
    return _job(project, result)


def _runs(project: Path) -> list[Any]:
    client = mlflow_client(project)
    experiment = client.get_experiment_by_name("aerialseg")
    return [] if experiment is None else list(client.search_runs([experiment.experiment_id]))


def test_pattern1_runs_the_whole_pipeline_in_one_job(pattern1: Job, project: Path) -> None:
    assert pattern1.returncode == 0, f"job {pattern1.id} failed:\n{pattern1.output}\n{pattern1.log()}"
    assert pattern1.out.exists() and pattern1.err.exists()
    out = pattern1.out.read_text()
    assert stages_run(out) == {"params", "scenes", "tiles", "patches", "train", "evaluate"}, pattern1.log()
    assert "running: dvc repro" in out
    # Two Lightning ranks, started by srun (labelled 0: and 1:), that found each other.
    log = out + pattern1.err.read_text()
    for rank in (0, 1):
        assert re.search(rf"^{rank}: .*GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2", log, re.M), pattern1.log()
    for path in ("models/model.ckpt", "models/checkpoints/last.ckpt", "reports/metrics.json"):
        assert (project / path).is_file(), path
    assert not list((project / "models").glob("**/*-v1.ckpt"))


def test_pattern1_makes_one_mlflow_run_of_world_size_2(pattern1: Job, project: Path) -> None:
    assert pattern1.returncode == 0, pattern1.log()
    runs = _runs(project)
    assert len(runs) == 1
    run_ = runs[0]
    assert run_.data.params["train.world_size"] == "2"
    assert run_.data.params["train.devices"] == "2"
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert metrics["mlflow_run_id"] == run_.info.run_id


def test_pattern2_sends_only_the_train_stage_to_slurm(pattern1: Job, cluster: Cluster, project: Path) -> None:
    assert pattern1.returncode == 0, pattern1.log()
    env = cluster.env(project_env(project, AERIALSEG_LAUNCH=LAUNCH))

    # params.yaml must fit the job: slurm/launch stops the job before srun, and sbatch --wait fails
    # the stage. (Lightning itself would not: with train.devices=1, strategy auto, both tasks train.)
    set_params(project, {"train": {"devices": 1, "strategy": "auto"}})
    failed = run(project, "dvc", "repro", "train", env=env, timeout=JOB_TIMEOUT, check=False)
    job = _job(project, failed)
    assert failed.returncode != 0 and "failed to reproduce 'train'" in failed.stderr, failed.stderr[-3000:]
    assert "train.devices is 1, the job runs 2 task(s) per node: set 2" in job.err.read_text(), job.log()
    assert len(_runs(project)) == 1

    set_params(project, {"train": {"devices": 2, "strategy": "ddp", "lr": 0.002}})
    done = run(project, "dvc", "repro", "train", env=env, timeout=JOB_TIMEOUT)
    job = _job(project, done)
    assert stages_run(done.stdout) == {"train"}
    assert "running: srun python pipeline/train.py" in job.out.read_text(), job.log()
    # The stage's command stays the same, whatever the launcher.
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["train"]["cmd"] == TRAIN_CMD
    runs = _runs(project)
    assert len(runs) == 2
    newest = max(runs, key=lambda r: r.info.start_time)
    assert newest.data.params["train.lr"] == "0.002"
    assert newest.data.params["train.world_size"] == "2"
    assert json.loads((project / "models" / "mlflow_run.json").read_text())["run_id"] == newest.info.run_id
    assert run(project, "dvc", "status", "train", env=env).stdout.strip().endswith("up to date.")
