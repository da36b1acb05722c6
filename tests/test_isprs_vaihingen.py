"""The official Vaihingen downloads -> tiles: zipped, extracted, or extracted per archive; every band
and label checked against the scenes the archives were made from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from archive_builders import (
    FORMS,
    SIZE,
    VAIHINGEN_AREAS,
    VAIHINGEN_BANDS,
    VAIHINGEN_CUSTOM,
    Download,
    SourceTile,
    band_names,
    files_under,
    read_band,
    vaihingen_downloads,
    write_downloads,
)

from aerialseg.config import DataConfig
from aerialseg.datasets.isprs import DatasetLayoutError, build_tiles, read_tiles_table
from aerialseg.datasets.synthetic import BUILDING, IMPERVIOUS, LOW_VEGETATION
from aerialseg.raster import read_raster


@pytest.fixture(scope="module")
def vaihingen_built(
    tmp_path_factory: pytest.TempPathFactory, vaihingen_raw: dict[str, Path]
) -> dict[str, tuple[Path, pd.DataFrame]]:
    """build_tiles output per form, custom split (val 3, test 2, train 1 and 9), every band."""
    data = DataConfig(source="vaihingen", bands=VAIHINGEN_BANDS, **VAIHINGEN_CUSTOM)
    built = {}
    for form, raw in vaihingen_raw.items():
        before = files_under(raw)
        out = tmp_path_factory.mktemp(f"vaihingen_tiles_{form}") / "tiles"
        built[form] = (out, build_tiles(raw, out, data))
        # Zip members are read in place: nothing is extracted next to the archives.
        assert files_under(raw) == before
    return built


@pytest.mark.parametrize("form", FORMS)
def test_vaihingen_table(vaihingen_built: dict[str, tuple[Path, pd.DataFrame]], form: str) -> None:
    out, table = vaihingen_built[form]
    assert table["tile"].tolist() == ["area1", "area2", "area3", "area9"]
    assert table["tile_id"].tolist() == list(VAIHINGEN_AREAS)
    assert table["split"].tolist() == ["train", "test", "val", "train"]
    assert (table["ndsm_source"] == "derived").all()
    assert (table[["height", "width"]] == SIZE).all().all()
    pd.testing.assert_frame_equal(read_tiles_table(out), table, check_dtype=False)


@pytest.mark.parametrize("form", FORMS)
def test_vaihingen_pixels(
    vaihingen_built: dict[str, tuple[Path, pd.DataFrame]], vaihingen: list[SourceTile], form: str
) -> None:
    out, _ = vaihingen_built[form]
    for t in vaihingen:
        name = f"area{t.tile_id}"
        image, georef = read_raster(out / f"{name}_image.tif")
        assert georef == t.georef
        assert band_names(out / f"{name}_image.tif") == VAIHINGEN_BANDS
        for i, band in enumerate(("ir", "r", "g")):
            np.testing.assert_allclose(image[i], t.bands[band] / np.float32(255), atol=1e-7)
        np.testing.assert_allclose(image[3], t.dsm - np.percentile(t.dsm, 1.0), atol=1e-4)
        np.testing.assert_array_equal(read_band(out / f"{name}_label.tif"), t.label)
        np.testing.assert_array_equal(read_band(out / f"{name}_label_eroded.tif"), t.eroded)


def test_vaihingen_derived_ndsm(
    vaihingen_built: dict[str, tuple[Path, pd.DataFrame]], vaihingen: list[SourceTile]
) -> None:
    out, _ = vaihingen_built["zip"]
    for t in vaihingen:
        ndsm = read_band(out / f"area{t.tile_id}_image.tif", 5)
        assert ndsm.min() >= 0.0
        ground = np.isin(t.label, [IMPERVIOUS, LOW_VEGETATION])
        assert np.median(ndsm[ground]) < 0.8
        assert np.median(ndsm[t.label == BUILDING]) > 2.0


def test_only_needed_archives_are_required(
    tmp_path: Path, vaihingen: list[SourceTile], out_dir: Path
) -> None:
    # Without the DSM, spectral bands alone still convert.
    downloads = vaihingen_downloads(vaihingen)
    main = downloads[0]
    no_dsm = Download(main.archive, {m: c for m, c in main.members.items() if "/dsm/" not in m})
    raw = write_downloads(tmp_path / "raw", [no_dsm, *downloads[1:]], "zip")
    data = DataConfig(source="vaihingen", bands=("g", "ir"), **VAIHINGEN_CUSTOM)
    build_tiles(raw, out_dir, data)
    with pytest.raises(DatasetLayoutError, match=r"area1: missing dsm/dsm_09cm_matching_area1\.tif"):
        build_tiles(raw, tmp_path / "other" / "tiles", DataConfig(source="vaihingen", **VAIHINGEN_CUSTOM))
