"""The official ISPRS Vaihingen folder layout -> one set of model-ready tiles per area.

Real archives (once extracted) and the synthetic scenes share this layout, so both go
through this one code path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from aerialseg.classes import colours_to_index
from aerialseg.config import SPECTRAL_BANDS, DataConfig
from aerialseg.files import atomic_path
from aerialseg.raster import RasterError, read_raster, write_raster

TILES_CSV = "tiles.csv"
SPLITS = ("train", "val", "test")
DSM_GROUND_PERCENTILE = 1.0
"""The DSM becomes height above this percentile of the tile, so the model sees object heights
(buildings, trees) rather than the terrain's absolute elevation, which varies between tiles."""

_AREA_PATTERN = re.compile(r"top_mosaic_09cm_area(\d+)\.tif$")


class DatasetLayoutError(ValueError):
    """The raw folder does not hold what the official layout promises."""


@dataclass(frozen=True)
class VaihingenPaths:
    area: int
    top: Path
    dsm: Path
    label: Path
    label_eroded: Path

    @classmethod
    def of(cls, raw_dir: Path, area: int) -> VaihingenPaths:
        name = f"top_mosaic_09cm_area{area}"
        return cls(
            area=area,
            top=raw_dir / "top" / f"{name}.tif",
            dsm=raw_dir / "dsm" / f"dsm_09cm_matching_area{area}.tif",
            label=raw_dir / "gts_for_participants" / f"{name}.tif",
            label_eroded=raw_dir / "gts_eroded_for_participants" / f"{name}_noBoundary.tif",
        )


def vaihingen_areas(raw_dir: Path) -> list[int]:
    """Area numbers that have an orthophoto in `raw_dir/top/`, sorted."""
    top = raw_dir / "top"
    if not top.is_dir():
        raise DatasetLayoutError(
            f"{raw_dir}: no 'top/' folder; expected the extracted ISPRS Vaihingen layout "
            "(top/, dsm/, gts_for_participants/, gts_eroded_for_participants/)"
        )
    areas = sorted(int(m.group(1)) for p in top.iterdir() if (m := _AREA_PATTERN.match(p.name)))
    if not areas:
        raise DatasetLayoutError(f"{top}: no top_mosaic_09cm_area<N>.tif files")
    return areas


def assign_splits(areas: list[int], data: DataConfig) -> dict[int, str]:
    """Whole tiles go to one split each: overlapping patches of one tile must never straddle splits."""
    missing = sorted((set(data.val_tiles) | set(data.test_tiles)) - set(areas))
    if missing:
        raise DatasetLayoutError(
            f"data.val_tiles/data.test_tiles name areas {missing}, which are not in the raw data "
            f"(available: {areas})"
        )
    splits = {a: "val" if a in data.val_tiles else "test" if a in data.test_tiles else "train" for a in areas}
    if "train" not in splits.values():
        raise DatasetLayoutError("the train split is empty: every area is in val_tiles or test_tiles")
    return splits


def build_tiles(raw_dir: Path, out_dir: Path, data: DataConfig) -> pd.DataFrame:
    """Convert every area of the raw layout into `out_dir`, one tile in memory at a time."""
    areas = vaihingen_areas(raw_dir)
    splits = assign_splits(areas, data)
    rows = []
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for area in areas:
            rows.append(_convert_area(VaihingenPaths.of(raw_dir, area), tmp, data, splits[area]))
        table = pd.DataFrame(rows)
        table.to_csv(tmp / TILES_CSV, index=False)
    return table


def read_tiles_table(tiles_dir: Path, split: str | None = None) -> pd.DataFrame:
    path = tiles_dir / TILES_CSV
    if not path.exists():
        raise FileNotFoundError(f"{path}: no tile table; run the `tiles` stage first")
    table = pd.read_csv(path)
    if split is not None:
        table = table[table["split"] == split].reset_index(drop=True)
        if table.empty:
            raise DatasetLayoutError(f"{path}: the {split} split has no tiles")
    return table


def _convert_area(paths: VaihingenPaths, out_dir: Path, data: DataConfig, split: str) -> dict[str, object]:
    for path in (paths.top, paths.dsm, paths.label, paths.label_eroded):
        if not path.exists():
            raise DatasetLayoutError(f"area {paths.area}: missing {path}")
    top, georef = read_raster(paths.top)
    dsm, dsm_georef = read_raster(paths.dsm)
    label_rgb, label_georef = read_raster(paths.label)
    eroded_rgb, eroded_georef = read_raster(paths.label_eroded)
    if top.shape[0] != 3:
        raise RasterError(f"{paths.top}: expected 3 bands (IR, R, G), found {top.shape[0]}")
    for path, arr, ref, bands in (
        (paths.dsm, dsm, dsm_georef, 1),
        (paths.label, label_rgb, label_georef, 3),
        (paths.label_eroded, eroded_rgb, eroded_georef, 3),
    ):
        if arr.shape != (bands, *top.shape[1:]):
            raise RasterError(
                f"{path}: shape {arr.shape} does not match {paths.top}; "
                f"expected ({bands}, {top.shape[1]}, {top.shape[2]})"
            )
        if (ref.crs, ref.transform) != (georef.crs, georef.transform):
            raise RasterError(
                f"{path}: its grid ({ref.crs}, {ref.transform}) differs from {paths.top} "
                f"({georef.crs}, {georef.transform})"
            )

    image = _stack_bands(top, dsm[0], data.bands)
    label = colours_to_index(np.moveaxis(label_rgb, 0, -1), paths.label)
    eroded = colours_to_index(np.moveaxis(eroded_rgb, 0, -1), paths.label_eroded, allow_boundary=True)

    name = f"area{paths.area}"
    files = {
        "image": f"{name}_image.tif",
        "label": f"{name}_label.tif",
        "label_eroded": f"{name}_label_eroded.tif",
    }
    write_raster(out_dir / files["image"], image, georef, band_names=list(data.bands))
    write_raster(out_dir / files["label"], label, georef, colormap=True)
    write_raster(out_dir / files["label_eroded"], eroded, georef, colormap=True)
    return {
        "tile": name,
        "area": paths.area,
        "split": split,
        "height": top.shape[1],
        "width": top.shape[2],
        **files,
    }


def _stack_bands(top: np.ndarray, dsm: np.ndarray, bands: tuple[str, ...]) -> np.ndarray:
    """(bands, H, W) float32: reflectance bands scaled to [0, 1], DSM as height above ground in metres."""
    available = {name: top[i].astype(np.float32) / 255.0 for i, name in enumerate(SPECTRAL_BANDS)}
    available["dsm"] = (dsm - np.percentile(dsm, DSM_GROUND_PERCENTILE)).astype(np.float32)
    return np.stack([available[b] for b in bands])
