"""MLflow: one run per pipeline run, opened by `train` and reopened by `evaluate`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aerialseg.files import atomic_path
from aerialseg.names import (
    CHAMPION_ALIAS,
    CHAMPION_COMPARABLE,
    CHAMPION_METRIC,
    DVC_EXP_TAG,
    GIT_COMMIT_TAG,
    GIT_DIRTY_TAG,
    LINEAGE_ARTIFACTS,
    LINEAGE_TAG_PREFIX,
    MODEL_ARTIFACT,
    OWNER_HOST_TAG,
    OWNER_PID_TAG,
    OWNER_START_TAG,
    VERSION_CHAMPION_TAG,
    VERSION_VALIDATION_TAG,
)
from aerialseg.processes import pid_exists, proc_stat, start_time

if TYPE_CHECKING:
    from aerialseg.model_card import ModelCard

DEFAULT_DB = "mlflow.db"
MODEL_REQUIREMENTS = ("torch", "numpy")
"""What the logged pt2 model needs besides MLflow: torch runs the graph, numpy its inputs."""
DVC_LOCK = Path("dvc.lock")


DVC_ROOT_ENV = "DVC_ROOT"
"""Set by DVC for every stage command it runs: the project's root. In `dvc exp run --temp` and in
queued experiments the stages run in a throwaway copy under .dvc/tmp/exps/, and DVC sets it to the
ORIGINAL project's root there (dvc/repo/experiments/queue/base.py: "Override DVC_ROOT env var to
point to the parent DVC repo root (and not an executor tempdir root)")."""
DEFAULT_ARTIFACTS = "mlruns"
"""The project's own store keeps artifacts in <project root>/mlruns (MLflow's default folder name)."""


def project_root() -> Path:
    """The project whose own MLflow store a run belongs to: DVC_ROOT when DVC runs us, so that an
    experiment run in a temporary copy still lands in the project; else the working directory
    (commands such as `aerialseg leaderboard` run from the project root)."""
    root = os.environ.get(DVC_ROOT_ENV, "").strip()
    return Path(root) if root else Path.cwd()


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set (a team server, `aerialseg server start`), else the project's own
    SQLite store, <project_root()>/mlflow.db (where `mlflow ui` run from the root looks)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / DEFAULT_DB}"


def ensure_experiment(name: str) -> str:
    """The id of experiment `name`, created when missing; returns the existing one when another
    process created it meanwhile (two jobs starting together on one server).

    Created here rather than by Lightning's logger so that, in the project's own store, its
    artifacts go to <project_root()>/mlruns: MLflow's default is ./mlruns of the working
    directory, the throwaway copy of a `dvc exp run --temp`. A server (MLFLOW_TRACKING_URI) keeps
    its own artifact location (proxied, `--artifacts-destination`).
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri())
    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    local = not os.environ.get("MLFLOW_TRACKING_URI")
    location = (project_root() / DEFAULT_ARTIFACTS).absolute().as_uri() if local else None
    try:
        return str(client.create_experiment(name, artifact_location=location))
    except MlflowException as err:
        found = client.get_experiment_by_name(name)
        if err.error_code != "RESOURCE_ALREADY_EXISTS" or found is None:
            raise
        return str(found.experiment_id)


TRACKING_TIMEOUT_ENV = "AERIALSEG_TRACKING_TIMEOUT"
"""Seconds the check of a remote tracking store waits for an answer (default DEFAULT_TRACKING_TIMEOUT)."""
DEFAULT_TRACKING_TIMEOUT = 30.0
PROBE_ENDPOINT = "/api/2.0/mlflow/experiments/search"
"""What the probe asks: the call MlflowClient().search_experiments makes, with max_results 1."""


class TrackingStoreError(ConnectionError):
    """The tracking store (MLFLOW_TRACKING_URI) cannot be reached, does not answer, or is not MLflow."""


def tracking_timeout() -> float:
    """AERIALSEG_TRACKING_TIMEOUT in seconds, DEFAULT_TRACKING_TIMEOUT when unset."""
    text = os.environ.get(TRACKING_TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TRACKING_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise ValueError(f"{TRACKING_TIMEOUT_ENV}={text!r}: expected a number of seconds above 0")
    return value


def check_tracking_store(uri: str | None = None) -> None:
    """Fail within tracking_timeout() seconds, naming the URI, when a remote store cannot be used.

    Called before a stage does any work: without it, MLflow's client retries a refused connection
    for minutes and waits for a silent server indefinitely. Only http(s) stores are probed (one
    POST of PROBE_ENDPOINT, no retries, with MLflow's credentials from MLFLOW_TRACKING_USERNAME /
    _PASSWORD or _TOKEN); local stores (sqlite, folders) need no network. MLflow's own later calls
    are bounded too: MLFLOW_HTTP_REQUEST_TIMEOUT defaults to the same timeout here (MLflow's: 120 s).
    """
    uri = uri or tracking_uri()
    if not uri.lower().startswith(("http://", "https://")):
        return
    timeout = tracking_timeout()
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, round(timeout))))
    outcome: list[str | None] = []
    # In a thread, so that the whole probe (name resolution included) is bounded, not each socket call.
    probe = threading.Thread(target=lambda: outcome.append(_probe(uri, timeout)), daemon=True)
    probe.start()
    probe.join(timeout + 1.0)
    if not outcome:
        problem = f"no answer within {timeout:g} s"
    elif outcome[0] is None:
        return
    else:
        problem = outcome[0]
    raise TrackingStoreError(
        f"MLFLOW_TRACKING_URI={uri}: {problem}; expected a running MLflow tracking server there "
        f"(or unset MLFLOW_TRACKING_URI for the project's own store, {DEFAULT_DB}); "
        f"{TRACKING_TIMEOUT_ENV} sets how long to wait (now {timeout:g} s)"
    )


def _probe(uri: str, timeout: float) -> str | None:
    """None when `uri` answers PROBE_ENDPOINT as an MLflow server does; else what went wrong."""
    import requests

    url = uri.rstrip("/") + PROBE_ENDPOINT
    headers, auth = {}, None
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
    elif os.environ.get("MLFLOW_TRACKING_USERNAME"):
        auth = (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
    verify: bool | str = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or (
        os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() != "true"
    )
    try:
        answer = requests.post(
            url, json={"max_results": 1}, headers=headers, auth=auth, timeout=timeout, verify=verify
        )
    except requests.Timeout:
        return f"no answer within {timeout:g} s (POST {PROBE_ENDPOINT})"
    except requests.ConnectionError as err:
        return f"cannot connect ({_reason(err)})"
    except requests.RequestException as err:
        return f"request failed ({_reason(err)})"
    status = f"{answer.status_code} {answer.reason or ''}".strip()
    if answer.status_code in (401, 403):
        said = answer.text.strip().splitlines()[0][:200] if answer.text.strip() else "no message"
        return (
            f"the server refused access ({status}: {said}); set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN"
        )
    try:
        body = answer.json()
    except ValueError:
        body = None
    if answer.ok and isinstance(body, dict):
        return None
    if not isinstance(body, dict) or "error_code" not in body:
        kind = answer.headers.get("Content-Type", "no content type").split(";")[0]
        return (
            f"the server answered {status} ({kind}) to POST {PROBE_ENDPOINT}: not an MLflow tracking "
            "server (check the host, port and path prefix)"
        )
    return f"the MLflow server answered {status}: {body.get('error_code')}: {body.get('message', '')}".strip()


def _reason(err: BaseException) -> str:
    """The innermost cause of a requests error, e.g. `[Errno 111] Connection refused`."""
    while err.__cause__ is not None or (err.args and isinstance(err.args[0], BaseException)):
        err = err.__cause__ if err.__cause__ is not None else err.args[0]
    reason = getattr(err, "reason", None)
    text = str(reason if isinstance(reason, BaseException) else err).strip()
    text = text.split(": ", 1)[-1] if "Errno" in text and ": [Errno" in text else text
    return text.splitlines()[0] if text else type(err).__name__


def run_tags() -> dict[str, str]:
    """Tags that tie a run to the code and the DVC experiment that produced it."""
    tags = {"mlflow.source.type": "PROJECT"}
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags[GIT_COMMIT_TAG] = commit
        tags[GIT_DIRTY_TAG] = str(bool(_git("status", "--porcelain", "--untracked-files=no")))
    exp_name = os.environ.get("DVC_EXP_NAME")
    if exp_name:
        tags[DVC_EXP_TAG] = exp_name
    return tags


def run_name(encoder: str) -> str:
    """The DVC experiment's name when `dvc exp run` started us, else the encoder and the time.

    Named explicitly because MLflow's random names repeat once training has seeded Python's RNG.
    """
    return os.environ.get("DVC_EXP_NAME") or f"{encoder}-{datetime.now():%Y%m%d-%H%M%S}"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 0.1}} -> {"train.lr": 0.1}, the keys `dvc exp show` uses too."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


@dataclass(frozen=True)
class RunRef:
    """How `evaluate` finds the run that `train` opened (a DVC output of `train`)."""

    run_id: str
    experiment_id: str
    experiment_name: str

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> RunRef:
        if not path.exists():
            raise FileNotFoundError(f"{path}: no MLflow run reference; run the `train` stage first")
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as err:  # not JSON (JSONDecodeError), or not its keys
            raise ValueError(
                f"{path}: not an MLflow run reference ({err}); rerun the `train` stage (or `dvc checkout`)"
            ) from err


@contextlib.contextmanager
def reopen(ref: RunRef) -> Iterator[Any]:
    """Make `ref`'s run the active one again, for the duration of the block; this process owns it
    meanwhile (owner_tags), so that a `train` started in the meantime does not take the RUNNING
    run of its dead training process for a killed one."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    with mlflow.start_run(run_id=ref.run_id) as run:
        mlflow.set_tags(owner_tags())
        yield run


def log_model(
    run_id: str,
    model: Any,
    card: ModelCard,
    *,
    registered_model: str | None = None,
    alias: str | None = None,
) -> str:
    """Log `model` (a torch module) to the run as `model`, pickle-free: MLflow's `pt2` format (a
    `torch.export` graph and its weights as tensors; loading runs no pickle and needs neither
    aerialseg nor segmentation-models-pytorch), with its model card as `metadata` so that
    `aerialseg predict` can feed it from the URI alone. Batch, height and width stay dynamic (the
    signature marks them -1): any height and width that are multiples of the architecture's input
    multiple, from the training window (`card.window`) up. Register it when `registered_model` is
    set, and move `alias` to the new version when `alias` is set too (`train` passes none: the
    alias moves once `evaluate` has tested the model, `set_alias_to_run`). Returns the model URI.

    Raises ModelExportError, naming the architecture, when torch.export cannot export the network.
    """
    import mlflow
    import numpy as np
    import torch
    from mlflow.exceptions import MlflowException
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    model = model.float().to(memory_format=torch.contiguous_format).cpu().eval()
    # Batch 2 and a non-square window: torch.export makes a dimension of size 1 a constant, and
    # two equal sizes could be taken for one. The window, not less: a pooling pyramid (pan) that
    # reaches 1 px on a smaller input would fix that size too.
    example = torch.zeros(2, len(card.bands), card.window, card.window + _input_multiple(card))
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(card.bands), -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, card.num_classes, -1, -1))]),
    )
    mlflow.set_tracking_uri(tracking_uri())
    with mlflow.start_run(run_id=run_id):
        try:
            info = mlflow.pytorch.log_model(
                model,
                name=MODEL_ARTIFACT,
                signature=signature,
                # A tensor: MLflow saves no JSON copy of it (megabytes of zeros at 512 px) and adds
                # no pyfunc flavour; `mlflow.pytorch.load_model` is how the model is loaded.
                input_example=(example,),
                serialization_format="pt2",
                # The card without the training's params: they are the run's params already.
                metadata=card.to_dict(training=False),
                # What loading the graph needs (tests/test_registry.py checks every module it
                # imports is covered); stated, because MLflow's inference of it starts a
                # subprocess that takes ~30 s on every run.
                pip_requirements=[f"{name}=={version(name)}" for name in MODEL_REQUIREMENTS],
                registered_model_name=registered_model,
            )
        except (MlflowException, OSError):
            raise  # the store's, not the export's
        except Exception as err:  # torch.export's many kinds (UserError, Unsupported, guards)
            raise ModelExportError(_export_problem(card, err)) from err
    if registered_model and alias and info.registered_model_version is not None:
        mlflow.MlflowClient().set_registered_model_alias(
            registered_model, alias, str(info.registered_model_version)
        )
    return str(info.model_uri)


class ModelExportError(RuntimeError):
    """torch.export cannot turn the network into the pickle-free graph that is logged."""


def _export_problem(card: ModelCard, err: BaseException) -> str:
    detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (
        f"cannot log the model of {card.model_args.get('arch')!r} ({card.model_args.get('encoder_name')!r}) "
        f"pickle-free: torch.export failed ({detail}); models/model.ckpt holds it"
    )


def _input_multiple(card: ModelCard) -> int:
    """The architecture's input multiple (model.ARCHITECTURES), 32 for a network it does not list."""
    from aerialseg.model import ARCHITECTURES, OUTPUT_STRIDE

    entry = ARCHITECTURES.get(str(card.model_args.get("arch")))
    return entry.input_multiple if entry is not None else OUTPUT_STRIDE


def set_alias_to_run(run_id: str, registered_model: str, alias: str) -> str | None:
    """Move `alias` of `registered_model` to the newest version logged by run `run_id`; returns that
    version, or None (and leaves the alias) when the run registered none."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri())
    versions = [
        int(v.version)
        for v in client.search_model_versions(f"run_id='{run_id}'")
        if v.name == registered_model and v.status == "READY"
    ]
    if not versions:
        return None
    client.set_registered_model_alias(registered_model, alias, str(max(versions)))
    return str(max(versions))


def promote_champion(run_id: str, registered_model: str, version: str) -> bool:
    """Move the CHAMPION_ALIAS of `registered_model` to `version` (run `run_id`'s, just evaluated)
    when its validation figure, the run's CHAMPION_METRIC (the best val_mean_f1, which chose the
    published checkpoint), is above the current champion's and both were validated the same way
    (CHAMPION_COMPARABLE params); the test figures never decide. Tags the version with its figure
    (VERSION_VALIDATION_TAG) and the decision in one sentence (VERSION_CHAMPION_TAG), which is also
    printed. Returns whether the alias moved.

    Two evaluations finishing at the same moment may both read the old champion; the later one to
    set the alias wins (MLflow has no compare-and-set on aliases)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri())
    value, validated = _validation(client, run_id)
    client.set_model_version_tag(
        registered_model,
        version,
        VERSION_VALIDATION_TAG,
        json.dumps({CHAMPION_METRIC: value, **validated}, sort_keys=True),
    )
    try:
        current = client.get_model_version_by_alias(registered_model, CHAMPION_ALIAS)
    except MlflowException:
        current = None  # no champion yet
    promote = False
    if value is None:
        reason = f"not the {CHAMPION_ALIAS}: its run logged no {CHAMPION_METRIC}"
    elif current is None:
        promote = True
        reason = f"{CHAMPION_ALIAS}: the first version validated ({CHAMPION_METRIC} {value:.4f})"
    elif str(current.version) == str(version):
        reason = f"{CHAMPION_ALIAS} already ({CHAMPION_METRIC} {value:.4f}); evaluated again"
    else:
        theirs, their_validation = _validation(client, str(current.run_id))
        differ = [k for k in CHAMPION_COMPARABLE if validated.get(k) != their_validation.get(k)]
        before = f"version {current.version}, the {CHAMPION_ALIAS}"
        if theirs is None or differ:
            shown = ", ".join(f"{k} {validated.get(k)} (theirs {their_validation.get(k)})" for k in differ)
            reason = (
                f"not the {CHAMPION_ALIAS}: {before}, was validated otherwise "
                f"({shown or f'no {CHAMPION_METRIC}'}); move the alias by hand if they compare"
            )
        elif value > theirs:
            promote = True
            reason = f"{CHAMPION_ALIAS}: {CHAMPION_METRIC} {value:.4f} > {theirs:.4f} of {before} until now"
        else:
            reason = f"not the {CHAMPION_ALIAS}: {CHAMPION_METRIC} {value:.4f} <= {theirs:.4f} of {before}"
    if promote:
        client.set_registered_model_alias(registered_model, CHAMPION_ALIAS, str(version))
    client.set_model_version_tag(registered_model, version, VERSION_CHAMPION_TAG, reason)
    print(f"MLflow registry: {registered_model} version {version}: {reason}", flush=True)
    return promote


def _validation(client: Any, run_id: str) -> tuple[float | None, dict[str, str | None]]:
    """Run `run_id`'s CHAMPION_METRIC (None when it has none) and its CHAMPION_COMPARABLE params."""
    run = client.get_run(run_id)
    value = run.data.metrics.get(CHAMPION_METRIC)
    return (
        None if value is None else float(value),
        {key: run.data.params.get(key) for key in CHAMPION_COMPARABLE},
    )


DATASET_STAGES = ("tiles", "patches")
"""The stages whose outputs a training run records as its dataset inputs (`log_dataset_inputs`)."""


def log_dataset_inputs(run_id: str, lock: Path = DVC_LOCK) -> dict[str, str]:
    """Record the outputs of DATASET_STAGES in `lock` (data/tiles, data/patches) as the run's dataset
    inputs (`mlflow.log_input`'s entities): each an `mlflow.data.meta_dataset.MetaDataset` named by
    its DVC path, whose digest is DVC's md5 of it from `dvc.lock` (`<md5>.dir` for a folder), with
    its file URI in the project as the source and the stage's name as the context. Returns
    {path: digest}.

    Only when DVC runs the caller (DVC_STAGE), as `log_lineage`: outside DVC the lock may describe
    other files. Logging the same ones again (a resumed run) adds nothing."""
    if not os.environ.get("DVC_STAGE"):
        return {}
    import warnings

    from mlflow import MlflowClient
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    inputs, logged = [], {}
    for stage, entry in lock_entries(DATASET_STAGES, lock).items():
        for out in entry.get("outs") or []:
            path, digest = out.get("path"), out.get("md5")
            if not isinstance(path, str) or not isinstance(digest, str):
                continue
            with warnings.catch_warnings():  # "can be interpreted in multiple ways": all local files
                warnings.simplefilter("ignore")
                source = resolve_dataset_source((project_root() / path).absolute().as_uri())
            dataset = MetaDataset(source, name=path, digest=digest)  # type: ignore[abstract]
            context = InputTag(key=MLFLOW_DATASET_CONTEXT, value=stage)
            inputs.append(DatasetInput(dataset=dataset._to_mlflow_entity(), tags=[context]))
            logged[path] = digest
    if inputs:
        MlflowClient(tracking_uri()).log_inputs(run_id, datasets=inputs)
    return logged


def start_system_metrics(run_id: str, *, resume: bool) -> Any:
    """Start MLflow's system metrics monitor on run `run_id` (system/cpu_utilization_percentage,
    system/system_memory_usage_megabytes, disk and network, and per GPU utilisation and memory
    where NVIDIA's NVML (nvidia-ml-py) or ROCm's library is installed): a thread that samples every
    MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (MLflow's default 10) and logs each sample;
    `resume` continues the step count of a resumed run. Returns the monitor; stop it with its
    `finish()`, which logs what is pending (a sample in progress is lost: a run shorter than one
    interval records none). Call it on global rank 0 only: one set of curves per run."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, resume_logging=resume, tracking_uri=tracking_uri())
    monitor.start()
    return monitor


def owner_tags() -> dict[str, str]:
    """OWNER_*_TAG of this process, for the run it trains."""
    tags = {OWNER_HOST_TAG: socket.gethostname(), OWNER_PID_TAG: str(os.getpid())}
    start = start_time(os.getpid())
    if start is not None:
        tags[OWNER_START_TAG] = start
    return tags


def owner_alive(tags: Mapping[str, str]) -> bool | None:
    """Whether the process that `tags` (owner_tags) name still runs; None when that cannot be told
    from here: no owner tags (a run of an older version), or another host's process."""
    host, pid_text = tags.get(OWNER_HOST_TAG), tags.get(OWNER_PID_TAG, "")
    if host != socket.gethostname() or not pid_text.isdigit():
        return None
    pid = int(pid_text)
    if pid == os.getpid():
        return True  # never judge this process's own runs
    if not pid_exists(pid):
        return False
    fields = proc_stat(pid)
    if fields is None:
        return True  # no /proc: the pid exists, that is all one can tell
    if fields[0] in ("Z", "X"):
        return False  # exited, not yet reaped by its parent
    start = tags.get(OWNER_START_TAG)
    return start is None or len(fields) <= 19 or fields[19] == start  # else: the pid was reused


def end_dead_runs(experiment: str, keep: str | None = None) -> list[str]:
    """Mark KILLED the RUNNING runs of `experiment` whose owner (owner_tags) on this host is gone,
    except run `keep` (the one `train.resume` continues); then mark FAILED the logged models left
    PENDING (a kill while `log_model` uploaded them) by runs that no longer run. Returns the ids of
    the runs ended. Runs of other hosts and untagged runs are left alone."""
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelStatus

    client = MlflowClient(tracking_uri())
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    ended = []
    token = None
    while True:
        page = client.search_runs(
            [found.experiment_id], "attributes.status = 'RUNNING'", max_results=1000, page_token=token
        )
        for run in page:
            if run.info.run_id != keep and owner_alive(run.data.tags) is False:
                client.set_terminated(run.info.run_id, "KILLED")
                ended.append(run.info.run_id)
        token = page.token
        if not token:
            break
    if ended:
        print(
            f"MLflow: marked KILLED {len(ended)} run(s) of {experiment!r} whose process is gone: "
            + ", ".join(ended),
            file=sys.stderr,
            flush=True,
        )
    token = None
    while True:
        models = client.search_logged_models([found.experiment_id], max_results=1000, page_token=token)
        for model in models:
            if model.status != LoggedModelStatus.PENDING or not model.source_run_id:
                continue
            if model.source_run_id == keep or _status(client, model.source_run_id) != "RUNNING":
                client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        token = models.token
        if not token:
            break
    return ended


def _status(client: Any, run_id: str) -> str | None:
    """The run's status; None for a run the store no longer has."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_run(run_id).info.status)
    except MlflowException:
        return None


def lock_entries(stages: Iterable[str], lock: Path = DVC_LOCK) -> dict[str, Any]:
    """The `dvc.lock` entries (cmd, deps, params, outs with their hashes) of those `stages` it has.

    A missing, unreadable or malformed lock (a first run, a copy without one) gives {}, never an error.
    """
    import yaml

    try:
        data = yaml.safe_load(Path(lock).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    recorded = data.get("stages") if isinstance(data, dict) else None
    if not isinstance(recorded, dict):
        return {}
    return {name: recorded[name] for name in stages if isinstance(recorded.get(name), dict)}


def stage_digest(entry: Mapping[str, Any]) -> str:
    """A short, stable fingerprint of one stage's `dvc.lock` entry: the first 12 hex digits of the
    SHA-256 of its canonical JSON (keys sorted), so YAML formatting and key order do not matter."""
    canonical = json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def lineage_tags(stages: Iterable[str], lock: Path = DVC_LOCK) -> dict[str, str]:
    """`{"dvc.<stage>": stage_digest(entry)}` for each of `stages` that `lock` records; {} without a lock.

    Pass only stages that are up to date when the caller runs: during `dvc repro`, DVC rewrites a
    stage's entry right after the stage finishes, so a stage sees its upstream stages' current
    entries and its own previous one.
    """
    return {f"{LINEAGE_TAG_PREFIX}{name}": stage_digest(e) for name, e in lock_entries(stages, lock).items()}


def log_lineage(run_id: str, stages: Iterable[str], lock: Path = DVC_LOCK) -> dict[str, str]:
    """Tag run `run_id` with `lineage_tags(stages)` and log those `dvc.lock` entries as the artifact
    `dvc/lock_at_<running stage>.json`; returns the tags.

    Only when DVC runs the caller (DVC sets DVC_STAGE for every stage command): outside DVC, the
    lock may describe other data than the files on disk, so nothing is recorded.
    """
    running = os.environ.get("DVC_STAGE")
    if not running:
        return {}
    entries = lock_entries(stages, lock)
    if not entries:
        return {}
    from mlflow import MlflowClient

    tags = {f"{LINEAGE_TAG_PREFIX}{name}": stage_digest(entry) for name, entry in entries.items()}
    client = MlflowClient(tracking_uri())
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", running)
    client.log_dict(
        run_id,
        {"dvc_stage": running, "digests": tags, "stages": entries},
        f"{LINEAGE_ARTIFACTS}/lock_at_{safe}.json",
    )
    return tags


def hardware_tag(device_type: str | None = None, world_size: int = 1, num_nodes: int = 1) -> str:
    """What trained the model, for the leaderboard: `1x NVIDIA H100 80GB HBM3`, or
    `CPU: <model> (N cores)`; `world_size` processes (DDP) over `num_nodes` nodes.

    `device_type` is torch's (`cuda`, `cpu`, `mps`; Lightning: `trainer.strategy.root_device.type`);
    None takes CUDA when it is available.
    """
    import torch

    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    nodes = f" on {num_nodes} nodes" if num_nodes > 1 else ""
    if device_type == "cuda" and torch.cuda.is_available():
        return f"{max(world_size, 1)}x {torch.cuda.get_device_name(torch.cuda.current_device())}{nodes}"
    if device_type == "mps":
        return f"{max(world_size, 1)}x Apple MPS{nodes}"
    processes = f", {world_size} processes" if world_size > 1 else ""
    return f"CPU: {_cpu_model()} ({_cpu_cores()} cores{processes}){nodes}"


def _cpu_model() -> str:
    with contextlib.suppress(OSError, UnicodeDecodeError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Processor") and value.strip():
                return " ".join(value.split())
    return platform.processor() or platform.machine() or "unknown"


def _cpu_cores() -> int:
    """The cores this process may use (a Slurm or container allocation), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()
