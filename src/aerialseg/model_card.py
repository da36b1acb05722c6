"""The model card: what a trained network needs beside its weights to be used on new imagery.

One frozen description, written once by `train` (into models/model.ckpt and the MLflow model's
`metadata`) and read by evaluate, predict, export and tracking: the band order and units, the
normalisation (with its own `normalise()`), the legend, the window size and the arguments that
rebuild the network (nanoGPT's checkpoint that carries its model arguments). Serialised as plain
JSON data (`to_dict` / `from_dict`) so that a checkpoint, an MLflow model and an ONNX file carry
the same keys.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aerialseg.classes import IGNORE_INDEX, legend
from aerialseg.config import HEIGHT_BANDS, SPECTRAL_BANDS

CARD_FORMAT = "aerialseg-checkpoint/1"
"""The format tag of every checkpoint and card (unchanged since checkpoints had untyped metadata)."""
REQUIRED_KEYS = ("model_args", "bands", "band_mean", "band_std", "patch_size", "classes")
"""What a serialised card must hold; `units`, `ignore_index`, `config` and `metrics` have defaults
(cards written before they existed)."""
BAND_UNITS = {**dict.fromkeys(SPECTRAL_BANDS, "reflectance"), **dict.fromkeys(HEIGHT_BANDS, "m")}
"""The units of each band as the `tiles` stage writes it: spectral bands as reflectances in [0, 1],
heights in metres (dsm above the tile's ground level, ndsm above ground)."""


class ModelCardError(ValueError):
    """Serialised card data that lacks a key or whose parts disagree (the message names the source)."""


@dataclass(frozen=True)
class ModelCard:
    model_args: Mapping[str, Any]
    """The arguments of `model.build_model` (arch, encoder_name, in_channels, classes)."""
    bands: tuple[str, ...]
    """Input band names, in the order the network reads them."""
    band_mean: tuple[float, ...]
    """Per band, in the band's units: the training tiles' mean (`patches.band_statistics`)."""
    band_std: tuple[float, ...]
    """Per band, in the band's units: the training tiles' standard deviation (1 for a constant band)."""
    window: int
    """Side of the square training patches in px: the sliding window's default size."""
    classes: tuple[Mapping[str, Any], ...] = field(default_factory=lambda: tuple(legend()))
    """The legend: `{"index", "name", "colour": [r, g, b]}` per class, index = output channel."""
    ignore_index: int = IGNORE_INDEX
    units: tuple[str, ...] = ()
    """Per band: `reflectance` or `m` (BAND_UNITS); filled from the band names when empty."""
    config: Mapping[str, Any] = field(default_factory=dict)
    """The params the model was trained with (params.yaml as the `train` stage saw it); may be empty."""
    metrics: Mapping[str, float] = field(default_factory=dict)
    """The training's final metrics (validation figures of the published epoch); may be empty."""

    def __post_init__(self) -> None:
        if not self.units:
            object.__setattr__(self, "units", tuple(BAND_UNITS.get(b, "") for b in self.bands))
        if not len(self.bands) == len(self.band_mean) == len(self.band_std) == len(self.units):
            raise ModelCardError(
                f"the card names {len(self.bands)} bands but has {len(self.band_mean)} means, "
                f"{len(self.band_std)} standard deviations and {len(self.units)} units"
            )

    @classmethod
    def for_training(
        cls,
        model_args: Mapping[str, Any],
        *,
        bands: Sequence[str],
        mean: Sequence[float],
        std: Sequence[float],
        window: int,
        config: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> ModelCard:
        return cls(
            model_args=dict(model_args),
            bands=tuple(bands),
            band_mean=tuple(float(v) for v in mean),
            band_std=tuple(float(v) for v in std),
            window=int(window),
            config=dict(config or {}),
            metrics={k: float(v) for k, v in (metrics or {}).items()},
        )

    # ------------------------------------------------------------------ using it

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        return [str(c["name"]) for c in self.classes]

    def normalise(self, image: np.ndarray) -> np.ndarray:
        """(bands, H, W) in the bands' units -> float32 (value - band_mean) / band_std."""
        if image.shape[0] != len(self.bands):
            raise ValueError(f"{image.shape[0]} bands, but the model reads {self.expected_bands()}")
        mean = np.asarray(self.band_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.band_std, dtype=np.float32)[:, None, None]
        return (image.astype(np.float32, copy=False) - mean) / std

    def expected_bands(self) -> str:
        return f"{len(self.bands)} bands ({', '.join(self.bands)}, in that order)"

    # ------------------------------------------------------------------ plain data

    def to_dict(self, *, training: bool = True) -> dict[str, Any]:
        """JSON data: a checkpoint's metadata, the MLflow model's `metadata`, ONNX metadata_props.
        `training=False` leaves out `config` and `metrics`."""
        data: dict[str, Any] = {
            "format": CARD_FORMAT,
            "model_args": dict(self.model_args),
            "bands": list(self.bands),
            "units": list(self.units),
            "band_mean": list(self.band_mean),
            "band_std": list(self.band_std),
            "patch_size": self.window,
            "classes": [dict(c) for c in self.classes],
            "ignore_index": self.ignore_index,
        }
        if training:
            data["config"] = dict(self.config)
            data["metrics"] = dict(self.metrics)
        return data

    @classmethod
    def from_dict(cls, data: Any, source: str) -> ModelCard:
        """Read `to_dict`'s data; ModelCardError naming `source` when it is not a card."""
        if not isinstance(data, Mapping):
            raise ModelCardError(
                f"{source}: no aerialseg model card (bands, normalisation, window size, model arguments)"
            )
        missing = [key for key in REQUIRED_KEYS if key not in data]
        if missing:
            raise ModelCardError(f"{source}: the model card lacks {missing}")
        if not isinstance(data["model_args"], Mapping):
            raise ModelCardError(f"{source}: the model card's model_args is not a mapping")
        try:
            return cls(
                model_args=dict(data["model_args"]),
                bands=tuple(str(b) for b in data["bands"]),
                band_mean=tuple(float(v) for v in data["band_mean"]),
                band_std=tuple(float(v) for v in data["band_std"]),
                window=int(data["patch_size"]),
                classes=tuple(dict(c) for c in data["classes"]),
                ignore_index=int(data.get("ignore_index", IGNORE_INDEX)),
                units=tuple(str(u) for u in data.get("units") or ()),
                config=dict(data.get("config") or {}),
                metrics=dict(data.get("metrics") or {}),
            )
        except ModelCardError as err:
            raise ModelCardError(f"{source}: {err}") from None
        except (TypeError, ValueError) as err:
            raise ModelCardError(f"{source}: the model card cannot be read ({err})") from None
