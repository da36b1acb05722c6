"""Where `aerialseg predict` and `aerialseg export` get a model: a checkpoint file or an MLflow URI.

Both sources give the network and the same model card (`model_card.ModelCard`): band order,
normalisation, window size, legend. So the commands need nothing else to feed a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from aerialseg.checkpoint import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint
from aerialseg.model_card import ModelCard, ModelCardError

MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")
MLFLOW_EXAMPLES = "runs:/<run id>/model, models:/<name>@<alias>"


class ModelSourceError(ValueError):
    """The model cannot be had from the given checkpoint path or MLflow URI."""


def is_mlflow_uri(source: str) -> bool:
    return source.startswith(MLFLOW_SCHEMES)


def load_model(source: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelCard]:
    """A checkpoint path or an MLflow model URI (`runs:/<id>/model`, `models:/<name>@<alias>`,
    `models:/<name>/<version>`) -> (model in eval mode on `device`, its model card)."""
    text = str(source)
    if not is_mlflow_uri(text):
        return _load_checkpoint(Path(text), device)
    model, meta = _load_mlflow(text, device)
    if meta is None:
        raise ModelSourceError(
            f"{text}: the model carries no aerialseg model card (bands, normalisation, window size); "
            "log it with aerialseg.tracking.log_model or use a checkpoint written by `train`"
        )
    try:
        return model, ModelCard.from_dict(meta, text)
    except ModelCardError as err:
        raise ModelSourceError(str(err)) from None


def _load_checkpoint(path: Path, device: str | torch.device) -> tuple[nn.Module, ModelCard]:
    if not path.exists():
        raise ModelSourceError(
            f"{path}: no such file; expected an aerialseg checkpoint (e.g. models/model.ckpt) "
            f"or an MLflow model URI ({MLFLOW_EXAMPLES})"
        )
    if not path.is_file():
        raise ModelSourceError(f"{path}: not a file; expected an aerialseg checkpoint")
    try:
        return load_checkpoint(path, device)
    except CheckpointError as err:  # not a torch file, truncated, not our format, other weights
        raise ModelSourceError(f"{err}, or an MLflow model URI ({MLFLOW_EXAMPLES})") from err
    except (RuntimeError, OSError, EOFError) as err:  # the device, a file that vanished
        raise ModelSourceError(
            f"{path}: cannot load the checkpoint ({err}); expected an aerialseg checkpoint "
            f"(format {CHECKPOINT_FORMAT!r}) or an MLflow model URI ({MLFLOW_EXAMPLES})"
        ) from err


def _load_mlflow(uri: str, device: str | torch.device) -> tuple[nn.Module, Any]:
    import mlflow
    import mlflow.pytorch
    from mlflow.environment_variables import MLFLOW_ALLOW_PICKLE_DESERIALIZATION
    from mlflow.exceptions import MlflowException

    from aerialseg.tracking import check_tracking_store, tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    try:
        check_tracking_store()  # a server that is down: one line within seconds, not retries
        meta = mlflow.models.get_model_info(uri).metadata
        model = mlflow.pytorch.load_model(uri, map_location=torch.device(device))
    except (MlflowException, OSError) as err:
        if "pickle" in str(err).lower() and not MLFLOW_ALLOW_PICKLE_DESERIALIZATION.get():
            raise ModelSourceError(
                f"{uri}: a pickled model (logged before aerialseg logged models pickle-free, as pt2), "
                "and MLFLOW_ALLOW_PICKLE_DESERIALIZATION is false here; use that run's checkpoint "
                "(models/model.ckpt of its DVC experiment), or allow pickles for this trusted store"
            ) from err
        raise ModelSourceError(
            f"{uri}: cannot load the MLflow model from tracking store {tracking_uri()} "
            f"(set MLFLOW_TRACKING_URI to the store the model was logged to): {err}"
        ) from err
    if not isinstance(model, nn.Module):
        raise ModelSourceError(f"{uri}: expected a PyTorch model, got {type(model).__name__}")
    return in_eval_mode(model.to(device)), meta


def in_eval_mode(model: nn.Module) -> nn.Module:
    """`model.eval()`, except for a torch.export graph (the pt2 models `train` logs since they are
    pickle-free), which was exported in eval mode, runs as exported and refuses eval()."""
    try:
        return model.eval()
    except NotImplementedError:
        return model
