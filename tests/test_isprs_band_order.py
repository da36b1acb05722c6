"""Bands land in `data.bands` order, whichever archive each comes from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from affine import Affine
from archive_builders import (
    POTSDAM_CUSTOM,
    POTSDAM_TILES,
    SMALL,
    VAIHINGEN_AREAS,
    VAIHINGEN_CUSTOM,
    SourceTile,
    band_names,
    potsdam_downloads,
    vaihingen_downloads,
    write_downloads,
)
from rasterio.crs import CRS

from aerialseg.config import DataConfig
from aerialseg.datasets.isprs import build_tiles
from aerialseg.datasets.synthetic import BUILDING
from aerialseg.raster import GeoReference, read_raster

BAND_VALUES = {"r": 11, "g": 22, "b": 33, "ir": 44}


def constant_tiles(tile_ids: tuple[str, ...], crs: str, pixel: float) -> list[SourceTile]:
    """Tiles whose bands are distinct constants, so each output band shows where it came from."""
    label = np.zeros((SMALL, SMALL), dtype=np.uint8)
    label[20:40, 20:40] = BUILDING
    dsm = np.where(label == BUILDING, 110.0, 100.0).astype(np.float32)
    georef = GeoReference(CRS.from_string(crs), Affine(pixel, 0, 0, 0, -pixel, 0))
    bands = {k: np.full((SMALL, SMALL), v, dtype=np.uint8) for k, v in BAND_VALUES.items()}
    return [SourceTile(tile_id, bands, dsm, label, georef) for tile_id in tile_ids]


@pytest.mark.parametrize(
    ("source", "bands"),
    [
        ("potsdam", ("r", "g", "b", "ir")),
        ("potsdam", ("ir", "b", "g", "r")),
        ("potsdam", ("g", "ndsm", "ir", "dsm", "b")),
        ("vaihingen", ("g", "r", "ir")),
        ("vaihingen", ("dsm", "ir", "ndsm", "g")),
    ],
)
def test_bands_land_in_data_bands_order(
    tmp_path: Path, out_dir: Path, source: str, bands: tuple[str, ...]
) -> None:
    if source == "potsdam":
        tiles = constant_tiles(POTSDAM_TILES, "EPSG:32633", 0.05)
        # RGB + IRRG only: blue and infrared then come from different files.
        raw = write_downloads(tmp_path / "raw", potsdam_downloads(tiles, rgbir=False, ndsm=False), "zip")
        data = DataConfig(source="potsdam", bands=bands, **POTSDAM_CUSTOM)
    else:
        tiles = constant_tiles(VAIHINGEN_AREAS, "EPSG:32632", 0.09)
        raw = write_downloads(tmp_path / "raw", vaihingen_downloads(tiles), "zip")
        data = DataConfig(source="vaihingen", bands=bands, **VAIHINGEN_CUSTOM)
    table = build_tiles(raw, out_dir, data)
    image, _ = read_raster(out_dir / str(table["image"][0]))
    assert image.shape == (len(bands), SMALL, SMALL)
    assert band_names(out_dir / str(table["image"][0])) == bands
    for i, band in enumerate(bands):
        if band in BAND_VALUES:
            np.testing.assert_allclose(image[i], BAND_VALUES[band] / 255.0, atol=1e-6)
        else:
            # dsm and ndsm: 0 on the ground, 10 m on the 20 x 20 px block (1-1.8 m wide: a roof).
            assert image[i][0, 0] == pytest.approx(0.0, abs=1e-4)
            assert image[i][30, 30] == pytest.approx(10.0, abs=1e-4)
