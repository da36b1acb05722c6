"""Shared fixtures: one small synthetic Vaihingen layout, the tiles and patches built from it, and the
official ISPRS archives rebuilt by tests/archive_builders.py.

The data fixtures are session-scoped and read-only: a test that needs to damage the layout copies it first
(see `raw_copy`), so the fixtures stay valid for every other test.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from archive_builders import (
    FORMS,
    SourceTile,
    potsdam_downloads,
    potsdam_tiles,
    vaihingen_downloads,
    vaihingen_tiles,
    write_downloads,
)

from aerialseg.config import DataConfig, Params, SyntheticConfig
from aerialseg.datasets.isprs import build_tiles
from aerialseg.datasets.synthetic import write_vaihingen_layout
from aerialseg.patches import build_patches

SYNTHETIC_TILES = 4
SYNTHETIC_SIZE = 128
VAL_TILES = (3,)
TEST_TILES = (4,)


@pytest.fixture(scope="session")
def synthetic_config() -> SyntheticConfig:
    return SyntheticConfig(tiles=SYNTHETIC_TILES, size_px=SYNTHETIC_SIZE, seed=0)


@pytest.fixture(scope="session")
def data_config() -> DataConfig:
    """All four bands; area 3 is validation, area 4 is test, areas 1 and 2 train."""
    return DataConfig(val_tiles=VAL_TILES, test_tiles=TEST_TILES)


@pytest.fixture(scope="session")
def synthetic_raw(tmp_path_factory: pytest.TempPathFactory, synthetic_config: SyntheticConfig) -> Path:
    """The official Vaihingen folder layout with 4 synthetic areas of 128 x 128 px. Do not modify."""
    root = tmp_path_factory.mktemp("raw") / "synthetic"
    write_vaihingen_layout(root, synthetic_config)
    return root


@pytest.fixture(scope="session")
def synthetic_tiles(
    tmp_path_factory: pytest.TempPathFactory, synthetic_raw: Path, data_config: DataConfig
) -> Path:
    """`build_tiles` output (tiles.csv and GeoTIFFs) for `synthetic_raw`. Do not modify."""
    out = tmp_path_factory.mktemp("tiles") / "tiles"
    build_tiles(synthetic_raw, out, data_config)
    return out


@pytest.fixture
def raw_copy(tmp_path: Path, synthetic_raw: Path) -> Path:
    """A private copy of the synthetic layout that a test may damage."""
    return Path(shutil.copytree(synthetic_raw, tmp_path / "raw"))


@pytest.fixture(scope="session")
def patches_dir(tmp_path_factory: pytest.TempPathFactory, synthetic_tiles: Path) -> Path:
    """train.h5 of 64 px patches (overlap 0.5) and val.h5 (the val tile whole) from
    `synthetic_tiles`, written as the `patches` stage writes them. Do not modify."""
    out = tmp_path_factory.mktemp("patches")
    build_patches(synthetic_tiles, out, size=64, overlap=0.5, bands=["ir", "r", "g", "dsm"])
    return out


@pytest.fixture(autouse=True)
def _mlflow_tracking_uri_per_test(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts without MLflow's process-wide tracking URI. The stages set it
    (`mlflow.set_tracking_uri` in tracking.py, model_source.py: one stage, one process), and it
    outranks MLFLOW_TRACKING_URI: set by an earlier test, it sent a later test's `MlflowClient()`
    to that test's store ("Run with id=... not found")."""
    import mlflow.tracking._tracking_service.utils as mlflow_uri

    monkeypatch.setattr(mlflow_uri, "_tracking_uri", None)


# --------------------------------------------------------------------------------------
# One small base Params that each test changes a key or two of (as lightning-hydra-template's tests do)


SMALL_PARAMS: dict[str, dict[str, Any]] = {
    "data": {"val_tiles": list(VAL_TILES), "test_tiles": list(TEST_TILES)},
    "patches": {"size_px": 64},  # `patches_dir`'s
    "model": {"encoder": "resnet18"},
    "train": {
        "epochs": 1,
        "batch_size": 4,
        "num_workers": 0,
        "limit_train_batches": 2,
        "precision": "32",
        "accelerator": "cpu",
    },
    "tracking": {"experiment": "unit"},
}
"""One epoch of two batches of 4 of `patches_dir`'s 64 px patches, ResNet18, fp32 on the CPU, no
loader workers; every other key at its default, paths.models in the test's folder (`small_params`)."""

SmallParams = Callable[..., Params]


def _small_params(root: Path, overrides: Mapping[str, Any] | None = None) -> Params:
    values = {section: dict(keys) for section, keys in SMALL_PARAMS.items()}
    values["paths"] = {"models": root / "models"}
    for dotted, value in (overrides or {}).items():
        section, sep, key = dotted.partition(".")
        if not sep:
            raise KeyError(f"{dotted!r}: expected a dotted key, section.key (e.g. 'train.epochs')")
        values.setdefault(section, {})[key] = value
    return Params.model_validate(values)


@pytest.fixture(scope="session")
def small_params() -> SmallParams:
    """`small_params(tmp_path, {"paths.patches": patches_dir, "train.epochs": 2})`: SMALL_PARAMS with
    paths.models = tmp_path / "models" and the given dotted keys (section.key) changed, validated as
    params.yaml is (pydantic's ValidationError for a bad value, KeyError for a key without a
    section). A test that needs them as a file writes `.model_dump(mode="json")`. Session-scoped, so
    module-scoped fixtures can use it too."""
    return _small_params


# --------------------------------------------------------------------------------------
# The official ISPRS archives (tests/archive_builders.py)


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    """Where a test's `build_tiles` writes: neither the folder nor its parent exists yet; a parent of
    its own, so that any temporary sibling left behind would be seen (`assert_no_output`)."""
    return tmp_path / "out" / "tiles"


@pytest.fixture(scope="session")
def vaihingen() -> list[SourceTile]:
    """Vaihingen areas 1, 2, 3 and 9 as generated scenes of 96 px. Do not modify."""
    return vaihingen_tiles()


@pytest.fixture(scope="session")
def vaihingen_raw(tmp_path_factory: pytest.TempPathFactory, vaihingen: list[SourceTile]) -> dict[str, Path]:
    """raw_dir per form (zip, unzipped, folders). Do not modify."""
    downloads = vaihingen_downloads(vaihingen)
    return {
        form: write_downloads(tmp_path_factory.mktemp(f"vaihingen_{form}"), downloads, form) for form in FORMS
    }


@pytest.fixture(scope="session")
def potsdam() -> list[SourceTile]:
    """Potsdam tiles 2_10, 2_11 and 2_13 as generated scenes of 96 px. Do not modify."""
    return potsdam_tiles()


@pytest.fixture(scope="session")
def potsdam_raw(tmp_path_factory: pytest.TempPathFactory, potsdam: list[SourceTile]) -> dict[str, Path]:
    """Every official Potsdam archive, per form. Do not modify."""
    downloads = potsdam_downloads(potsdam)
    return {
        form: write_downloads(tmp_path_factory.mktemp(f"potsdam_{form}"), downloads, form) for form in FORMS
    }
