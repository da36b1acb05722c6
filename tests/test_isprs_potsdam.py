"""The official Potsdam downloads -> tiles: the nDSM from the lastools JPEG or derived, the orthophoto
from RGBIR or from RGB + IRRG, labels without georeferencing; every band and label checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
from archive_builders import (
    FORMS,
    POTSDAM_BANDS,
    POTSDAM_CUSTOM,
    POTSDAM_TILES,
    SourceTile,
    band_names,
    ndsm_jpeg_values,
    potsdam_downloads,
    read_band,
    read_member,
    write_downloads,
)

from aerialseg.config import DataConfig
from aerialseg.datasets import isprs_convert
from aerialseg.datasets.isprs import build_tiles
from aerialseg.datasets.isprs_layout import NDSM_JPEG_METRES_PER_VALUE
from aerialseg.datasets.synthetic import BUILDING, IMPERVIOUS, LOW_VEGETATION
from aerialseg.raster import read_raster


@pytest.fixture(scope="module")
def potsdam_built(
    tmp_path_factory: pytest.TempPathFactory, potsdam_raw: dict[str, Path]
) -> dict[str, tuple[Path, pd.DataFrame]]:
    data = DataConfig(source="potsdam", bands=POTSDAM_BANDS, **POTSDAM_CUSTOM)
    built = {}
    for form, raw in potsdam_raw.items():
        out = tmp_path_factory.mktemp(f"potsdam_tiles_{form}") / "tiles"
        built[form] = (out, build_tiles(raw, out, data))
    return built


@pytest.mark.parametrize("form", FORMS)
def test_potsdam_table_and_pixels(
    potsdam_built: dict[str, tuple[Path, pd.DataFrame]], potsdam: list[SourceTile], form: str
) -> None:
    out, table = potsdam_built[form]
    assert table["tile"].tolist() == ["potsdam_2_10", "potsdam_2_11", "potsdam_2_13"]
    assert table["split"].tolist() == ["train", "val", "test"]
    assert (table["ndsm_source"] == "archive").all()
    for t in potsdam:
        name = f"potsdam_{t.tile_id}"
        image, georef = read_raster(out / f"{name}_image.tif")
        assert georef == t.georef
        assert band_names(out / f"{name}_image.tif") == POTSDAM_BANDS
        for i, band in enumerate(("r", "g", "b", "ir")):
            np.testing.assert_allclose(image[i], t.bands[band] / np.float32(255), atol=1e-7)
        np.testing.assert_allclose(image[4], t.dsm - np.percentile(t.dsm, 1.0), atol=1e-4)
        np.testing.assert_array_equal(read_band(out / f"{name}_label.tif"), t.label)
        np.testing.assert_array_equal(read_band(out / f"{name}_label_eroded.tif"), t.eroded)
        # Labels without georeferencing take the orthophoto's grid.
        with rasterio.open(out / f"{name}_label.tif") as label:
            assert (label.crs, label.transform) == (t.georef.crs, t.georef.transform)


def test_potsdam_ndsm_is_read_from_the_lastools_jpeg(
    potsdam_built: dict[str, tuple[Path, pd.DataFrame]],
    potsdam_raw: dict[str, Path],
    potsdam: list[SourceTile],
) -> None:
    out, _ = potsdam_built["zip"]
    for t in potsdam:
        padded = "_".join(f"{int(p):02d}" for p in t.tile_id.split("_"))
        member = f"1_DSM_normalisation/dsm_potsdam_{padded}_normalized_lastools.jpg"
        jpeg = read_member(potsdam_raw["zip"] / "1_DSM_normalisation.zip", member)[0]
        ndsm = read_band(out / f"potsdam_{t.tile_id}_image.tif", 6)
        np.testing.assert_allclose(ndsm, jpeg * np.float32(NDSM_JPEG_METRES_PER_VALUE), atol=1e-6)
        # Decimetres: within JPEG loss of the heights the fixture encoded.
        assert np.abs(ndsm - ndsm_jpeg_values(t) / 10.0).mean() < 0.2


@pytest.fixture(scope="module")
def potsdam_rgb_irrg_raw(tmp_path_factory: pytest.TempPathFactory, potsdam: list[SourceTile]) -> Path:
    """Potsdam without 4_Ortho_RGBIR.zip and without 1_DSM_normalisation.zip. Do not modify."""
    downloads = potsdam_downloads(potsdam, rgbir=False, ndsm=False)
    return write_downloads(tmp_path_factory.mktemp("potsdam_rgb_irrg"), downloads, "zip")


def test_potsdam_from_rgb_and_irrg_with_derived_ndsm(
    potsdam_rgb_irrg_raw: Path, potsdam: list[SourceTile], out_dir: Path
) -> None:
    bands = ("ndsm", "b", "ir", "r")
    table = build_tiles(
        potsdam_rgb_irrg_raw, out_dir, DataConfig(source="potsdam", bands=bands, **POTSDAM_CUSTOM)
    )
    assert (table["ndsm_source"] == "derived").all()
    for t in potsdam:
        image, _ = read_raster(out_dir / f"potsdam_{t.tile_id}_image.tif")
        assert band_names(out_dir / f"potsdam_{t.tile_id}_image.tif") == bands
        for i, band in ((1, "b"), (2, "ir"), (3, "r")):
            np.testing.assert_allclose(image[i], t.bands[band] / np.float32(255), atol=1e-7)
        ndsm = image[0]
        assert ndsm.min() >= 0.0
        assert np.median(ndsm[np.isin(t.label, [IMPERVIOUS, LOW_VEGETATION])]) < 0.8
        assert np.median(ndsm[t.label == BUILDING]) > 2.0


def test_blocks_give_the_same_tiles_as_one_block(
    potsdam_rgb_irrg_raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Row blocks (and the ground estimate read in strips) change nothing but memory use."""
    data = DataConfig(source="potsdam", bands=("dsm", "ndsm", "g"), **POTSDAM_CUSTOM)
    build_tiles(potsdam_rgb_irrg_raw, tmp_path / "whole" / "tiles", data)
    monkeypatch.setattr(isprs_convert, "BLOCK_ROWS", 20)
    build_tiles(potsdam_rgb_irrg_raw, tmp_path / "blocks" / "tiles", data)
    for tile_id in POTSDAM_TILES:
        for kind in ("image", "label", "label_eroded"):
            whole, _ = read_raster(tmp_path / "whole" / "tiles" / f"potsdam_{tile_id}_{kind}.tif")
            blocks, _ = read_raster(tmp_path / "blocks" / "tiles" / f"potsdam_{tile_id}_{kind}.tif")
            np.testing.assert_array_equal(blocks, whole)
