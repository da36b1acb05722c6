"""Bad downloads: each error names the folder, archive or member and what was expected, and
leaves no output (or the previous one) behind."""

from __future__ import annotations

import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from affine import Affine
from archive_builders import (
    POTSDAM_CUSTOM,
    POTSDAM_TILES,
    VAIHINGEN_CUSTOM,
    SourceTile,
    assert_no_output,
    colour_label,
    files_under,
    raster_bytes,
    replace_member,
)
from rasterio.crs import CRS

from aerialseg.config import DataConfig
from aerialseg.datasets.isprs import TILES_CSV, DatasetLayoutError, build_tiles
from aerialseg.raster import GeoReference, RasterError


def test_empty_raw_dir_lists_the_expected_archives(tmp_path: Path, out_dir: Path) -> None:
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "notes.txt").write_text("nothing here")
    with pytest.raises(DatasetLayoutError) as info:
        build_tiles(tmp_path / "raw", out_dir, DataConfig(source="potsdam", **POTSDAM_CUSTOM))
    message = str(info.value)
    assert "no ISPRS Potsdam orthophotos found" in message
    for archive in ("4_Ortho_RGBIR.zip", "1_DSM.zip", "5_Labels_all.zip", "5_Labels_all_noBoundary.zip"):
        assert archive in message
    assert_no_output(out_dir)


def test_missing_raw_dir(tmp_path: Path, out_dir: Path) -> None:
    with pytest.raises(
        DatasetLayoutError, match=r"folder does not exist.*ISPRS_semantic_labeling_Vaihingen\.zip"
    ):
        build_tiles(tmp_path / "nowhere", out_dir, DataConfig(source="vaihingen", **VAIHINGEN_CUSTOM))
    assert_no_output(out_dir)


def test_potsdam_data_for_the_vaihingen_source(potsdam_raw: dict[str, Path], out_dir: Path) -> None:
    with pytest.raises(DatasetLayoutError, match="no ISPRS Vaihingen orthophotos found") as info:
        build_tiles(potsdam_raw["zip"], out_dir, DataConfig(source="vaihingen", **VAIHINGEN_CUSTOM))
    assert "It holds ISPRS Potsdam files: is data.source right?" in str(info.value)
    assert_no_output(out_dir)


def test_archives_inside_an_archive_are_named(
    potsdam_raw: dict[str, Path], tmp_path: Path, out_dir: Path
) -> None:
    (tmp_path / "raw").mkdir()
    with zipfile.ZipFile(tmp_path / "raw" / "Potsdam.zip", "w") as outer:
        for inner in sorted(potsdam_raw["zip"].glob("*.zip")):
            outer.write(inner, f"Potsdam/{inner.name}")
    with pytest.raises(DatasetLayoutError, match=r"extract these first: .*Potsdam\.zip!Potsdam/1_DSM\.zip"):
        build_tiles(tmp_path / "raw", out_dir, DataConfig(source="potsdam", **POTSDAM_CUSTOM))
    assert_no_output(out_dir)


def test_unreadable_zip(tmp_path: Path, out_dir: Path) -> None:
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "1_DSM.zip").write_bytes(b"not a zip")
    with pytest.raises(DatasetLayoutError, match=r"1_DSM\.zip: not a readable zip archive"):
        build_tiles(tmp_path / "raw", out_dir, DataConfig(source="potsdam", **POTSDAM_CUSTOM))
    assert_no_output(out_dir)


def copy_without(raw: Path, tmp_path: Path, archive: str) -> Path:
    copy = Path(shutil.copytree(raw, tmp_path / "raw"))
    (copy / archive).unlink()
    return copy


def test_missing_archive_lists_every_missing_file(
    potsdam_raw: dict[str, Path], tmp_path: Path, out_dir: Path
) -> None:
    raw = copy_without(potsdam_raw["zip"], tmp_path, "5_Labels_all_noBoundary.zip")
    with pytest.raises(DatasetLayoutError) as info:
        build_tiles(raw, out_dir, DataConfig(source="potsdam", **POTSDAM_CUSTOM))
    message = str(info.value)
    assert str(raw) in message
    for tile_id in POTSDAM_TILES:
        assert f"potsdam_{tile_id}: missing top_potsdam_{tile_id}_label_noBoundary.tif" in message
    assert "5_Labels_all_noBoundary.zip" in message
    assert_no_output(out_dir)


def test_band_without_a_file_that_has_it(potsdam_raw: dict[str, Path], tmp_path: Path, out_dir: Path) -> None:
    raw = copy_without(potsdam_raw["zip"], tmp_path, "4_Ortho_RGBIR.zip")
    (raw / "2_Ortho_RGB.zip").unlink()
    with pytest.raises(DatasetLayoutError) as info:
        build_tiles(raw, out_dir, DataConfig(source="potsdam", bands=("ir", "b"), **POTSDAM_CUSTOM))
    message = str(info.value)
    assert "potsdam_2_10: band 'b' needs top_potsdam_2_10_RGBIR.tif (4_Ortho_RGBIR.zip)" in message
    assert "top_potsdam_2_10_RGB.tif (2_Ortho_RGB.zip)" in message
    assert "found only" in message and "top_potsdam_2_10_IRRG.tif" in message
    assert_no_output(out_dir)


@pytest.fixture
def damaged_potsdam(potsdam_raw: dict[str, Path], tmp_path: Path) -> Callable[[str, str, bytes], Path]:
    """A private copy of the Potsdam zips with one member replaced."""

    def damage(archive: str, member: str, content: bytes) -> Path:
        raw = Path(shutil.copytree(potsdam_raw["zip"], tmp_path / "raw"))
        replace_member(raw, archive, member, content)
        return raw

    return damage


def test_label_of_another_size(
    damaged_potsdam: Callable[[str, str, bytes], Path], potsdam: list[SourceTile], out_dir: Path
) -> None:
    t = potsdam[2]
    raw = damaged_potsdam(
        "5_Labels_all.zip", "top_potsdam_2_13_label.tif", raster_bytes(colour_label(t.label)[:, :, :80], None)
    )
    with pytest.raises(RasterError) as info:
        build_tiles(raw, out_dir, DataConfig(source="potsdam", **POTSDAM_CUSTOM))
    message = str(info.value)
    assert "5_Labels_all.zip!top_potsdam_2_13_label.tif: the label is 80 x 96 px" in message
    assert "top_potsdam_2_13_RGBIR.tif is 96 x 96 px" in message
    assert_no_output(out_dir)


@pytest.mark.parametrize("change", ["crs", "transform", "size"])
def test_dsm_on_another_grid(
    damaged_potsdam: Callable[[str, str, bytes], Path], potsdam: list[SourceTile], out_dir: Path, change: str
) -> None:
    t = potsdam[1]
    dsm, georef = t.dsm, t.georef
    if change == "crs":
        georef = GeoReference(CRS.from_epsg(25833), georef.transform)
    elif change == "transform":
        georef = GeoReference(georef.crs, georef.transform @ Affine.translation(3, 0))
    else:
        dsm = dsm[:90]
    raw = damaged_potsdam("1_DSM.zip", "1_DSM/dsm_potsdam_02_11.tif", raster_bytes(dsm, georef))
    with pytest.raises(RasterError) as info:
        build_tiles(raw, out_dir, DataConfig(source="potsdam", **POTSDAM_CUSTOM))
    message = str(info.value)
    assert "1_DSM.zip!1_DSM/dsm_potsdam_02_11.tif" in message
    assert ("the DSM is 96 x 90 px" if change == "size" else "the DSM's grid") in message
    assert_no_output(out_dir)


def test_unreadable_member(damaged_potsdam: Callable[[str, str, bytes], Path], out_dir: Path) -> None:
    raw = damaged_potsdam("1_DSM.zip", "1_DSM/dsm_potsdam_02_10.tif", b"garbage")
    with pytest.raises(RasterError, match=r"1_DSM\.zip!1_DSM/dsm_potsdam_02_10\.tif: not a readable raster"):
        build_tiles(raw, out_dir, DataConfig(source="potsdam", **POTSDAM_CUSTOM))
    assert_no_output(out_dir)


def test_orthophoto_with_too_few_bands(
    damaged_potsdam: Callable[[str, str, bytes], Path], potsdam: list[SourceTile], out_dir: Path
) -> None:
    t = potsdam[0]
    three = np.stack([t.bands["r"], t.bands["g"], t.bands["b"]])
    raw = damaged_potsdam(
        "4_Ortho_RGBIR.zip", "4_Ortho_RGBIR/top_potsdam_2_10_RGBIR.tif", raster_bytes(three, t.georef)
    )
    with pytest.raises(
        RasterError, match=r"expected an 8-bit R-G-B-IR orthophoto \(4 uint8 bands\), found 3"
    ):
        build_tiles(raw, out_dir, DataConfig(source="potsdam", **POTSDAM_CUSTOM))
    assert_no_output(out_dir)


def test_failed_build_keeps_the_previous_output(
    damaged_potsdam: Callable[[str, str, bytes], Path], potsdam_raw: dict[str, Path], out_dir: Path
) -> None:
    data = DataConfig(source="potsdam", bands=("r",), **POTSDAM_CUSTOM)
    build_tiles(potsdam_raw["zip"], out_dir, data)
    before = files_under(out_dir)
    raw = damaged_potsdam("1_DSM.zip", "1_DSM/dsm_potsdam_02_13.tif", b"garbage")
    with pytest.raises(RasterError):
        build_tiles(raw, out_dir, DataConfig(source="potsdam", bands=("r", "dsm"), **POTSDAM_CUSTOM))
    assert files_under(out_dir) == before
    assert [p.name for p in out_dir.parent.iterdir()] == ["tiles"]
    assert (out_dir / TILES_CSV).is_file()
