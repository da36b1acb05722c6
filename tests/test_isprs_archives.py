"""The official ISPRS downloads -> tiles: Vaihingen and Potsdam, zipped and extracted, both splits.

The real archives cannot be downloaded here, so the fixtures rebuild them: the official archive
and member names and formats (GeoTIFF; the Potsdam nDSM as an 8-bit JPEG), filled with small
generated scenes whose class maps are known, so every decoded label is checked pixel for pixel.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.io import DatasetReader, MemoryFile
from scipy import ndimage

from aerialseg.classes import (
    BOUNDARY_COLOUR,
    CLASSES,
    IGNORE_INDEX,
    UnknownColourError,
    colours_to_index,
    decode_colours,
    index_to_colours,
)
from aerialseg.config import DataConfig
from aerialseg.datasets import heights, isprs_convert
from aerialseg.datasets.isprs import TILES_CSV, DatasetLayoutError, build_tiles, read_tiles_table
from aerialseg.datasets.isprs_layout import NDSM_JPEG_METRES_PER_VALUE, POTSDAM, VAIHINGEN
from aerialseg.datasets.synthetic import (
    BUILDING,
    IMPERVIOUS,
    LOW_VEGETATION,
    REFERENCE_SIZE_PX,
    erode_label,
    generate_scene,
)
from aerialseg.raster import GeoReference, RasterError, read_raster

SIZE = 96
FORMS = ("zip", "unzipped", "folders")
"""zip: the official archives; unzipped: extracted into raw_dir as `unzip` does (members keep their
folders); folders: each archive extracted into a folder named after it."""

VAIHINGEN_AREAS = ("1", "2", "3", "9")  # official train 1, 3; test 2; 9 is in neither list
POTSDAM_TILES = ("2_10", "2_11", "2_13")  # official train 2_10, 2_11; test 2_13
VAIHINGEN_CUSTOM = {"val_tiles": ("3",), "test_tiles": ("2",)}
POTSDAM_CUSTOM = {"val_tiles": ("2_11",), "test_tiles": ("2_13",)}
POTSDAM_BANDS = ("r", "g", "b", "ir", "dsm", "ndsm")
VAIHINGEN_BANDS = ("ir", "r", "g", "dsm", "ndsm")


# --------------------------------------------------------------------------------------
# Fixture archives


@dataclass(frozen=True)
class SourceTile:
    """What a fixture tile really is: the arrays its archive files were made from."""

    tile_id: str
    bands: dict[str, np.ndarray]
    """Spectral bands (uint8) by name."""
    dsm: np.ndarray
    label: np.ndarray
    georef: GeoReference
    real_eroded: np.ndarray | None = None
    """The eroded label where it is not simply an erosion of `label` (the real crop)."""

    @property
    def eroded(self) -> np.ndarray:
        return self.real_eroded if self.real_eroded is not None else erode_label(self.label)


@dataclass(frozen=True)
class Download:
    """One official archive: its file name and its members (path inside -> content)."""

    archive: str
    members: dict[str, bytes]


def raster_bytes(array: np.ndarray, georef: GeoReference | None, driver: str = "GTiff") -> bytes:
    """A (bands, H, W) or (H, W) array as the bytes of a GeoTIFF or JPEG file."""
    data = array[np.newaxis] if array.ndim == 2 else array
    profile = {"driver": driver, "count": data.shape[0], "height": data.shape[1], "width": data.shape[2]}
    if georef is not None:
        profile.update(crs=georef.crs, transform=georef.transform)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with MemoryFile() as memory:
            with memory.open(dtype=data.dtype.name, **profile) as dst:
                dst.write(data)
            return bytes(memory.read())


def colour_label(label: np.ndarray) -> np.ndarray:
    return index_to_colours(label).transpose(2, 0, 1)


def write_downloads(raw_dir: Path, downloads: list[Download], form: str) -> Path:
    raw_dir.mkdir(parents=True, exist_ok=True)
    for download in downloads:
        if form == "zip":
            with zipfile.ZipFile(raw_dir / download.archive, "w", zipfile.ZIP_DEFLATED) as archive:
                for member, content in download.members.items():
                    archive.writestr(member, content)
            continue
        root = raw_dir if form == "unzipped" else raw_dir / Path(download.archive).stem
        for member, content in download.members.items():
            (root / member).parent.mkdir(parents=True, exist_ok=True)
            (root / member).write_bytes(content)
    return raw_dir


def scene_tile(tile_id: str, size: int, seed: int, crs: str, pixel: float) -> SourceTile:
    scene = generate_scene(size, np.random.default_rng([seed, *map(int, tile_id.split("_"))]))
    ir, r, g = scene.irrg
    # A blue band for Potsdam: man-made surfaces grey (blue ~ green), vegetation low in blue.
    b = np.clip(0.8 * g.astype(np.float32) + 12.0, 0, 255).astype(np.uint8)
    x0 = 366_000.0 + 100.0 * sum(int(p) for p in tile_id.split("_"))
    georef = GeoReference(CRS.from_string(crs), Affine(pixel, 0.0, x0, 0.0, -pixel, 5_808_000.0))
    return SourceTile(tile_id, {"ir": ir, "r": r, "g": g, "b": b}, scene.dsm, scene.label, georef)


def scene_pixel_size(size: int) -> float:
    """Metres per pixel of a generated scene: below 512 px its objects shrink with the tile, so each
    pixel covers more ground than 9 cm. The georeference says so, as the nDSM's ground window is in metres."""
    return 0.09 * max(1.0, REFERENCE_SIZE_PX / size)


def vaihingen_tiles(size: int = SIZE, areas: tuple[str, ...] = VAIHINGEN_AREAS) -> list[SourceTile]:
    return [scene_tile(area, size, 1, "EPSG:32632", scene_pixel_size(size)) for area in areas]


def potsdam_tiles(size: int = SIZE, tile_ids: tuple[str, ...] = POTSDAM_TILES) -> list[SourceTile]:
    return [scene_tile(tile_id, size, 2, "EPSG:32633", scene_pixel_size(size)) for tile_id in tile_ids]


def vaihingen_downloads(tiles: list[SourceTile]) -> list[Download]:
    """The three official Vaihingen archives; the main one has a top-level folder inside."""
    main = "ISPRS_semantic_labeling_Vaihingen"
    ortho, gts, eroded = {}, {}, {}
    for t in tiles:
        irrg = np.stack([t.bands["ir"], t.bands["r"], t.bands["g"]])
        ortho[f"{main}/top/top_mosaic_09cm_area{t.tile_id}.tif"] = raster_bytes(irrg, t.georef)
        ortho[f"{main}/dsm/dsm_09cm_matching_area{t.tile_id}.tif"] = raster_bytes(t.dsm, t.georef)
        gts[f"top_mosaic_09cm_area{t.tile_id}.tif"] = raster_bytes(colour_label(t.label), t.georef)
        eroded[f"top_mosaic_09cm_area{t.tile_id}_noBoundary.tif"] = raster_bytes(
            colour_label(t.eroded), t.georef
        )
    return [
        Download(f"{main}.zip", ortho),
        Download(f"{main}_ground_truth_COMPLETE.zip", gts),
        Download(f"{main}_ground_truth_eroded_COMPLETE.zip", eroded),
    ]


def ndsm_jpeg_values(t: SourceTile) -> np.ndarray:
    """What the fixture's lastools nDSM holds: decimetres above the tile's lowest point."""
    return np.clip(np.rint((t.dsm - t.dsm.min()) * 10.0), 0, 255).astype(np.uint8)


def potsdam_downloads(
    tiles: list[SourceTile],
    *,
    rgbir: bool = True,
    rgb_irrg: bool = True,
    ndsm: bool = True,
    heights_short: Mapping[str, tuple[int, int]] | None = None,
) -> list[Download]:
    """The official Potsdam archives. Labels and nDSM JPEGs carry no georeferencing, as may real ones.

    heights_short: tile id -> (columns, rows) that its DSM and nDSM lack on the right and bottom
    edges, as the official tile 3_13's (5999 x 6000 px for a 6000 x 6000 orthophoto: (1, 0)).
    """
    files: dict[str, dict[str, bytes]] = {}
    short = heights_short or {}

    def add(archive: str, member: str, content: bytes) -> None:
        files.setdefault(archive, {})[member] = content

    for t in tiles:
        r, g, b, ir = (t.bands[k] for k in ("r", "g", "b", "ir"))
        padded = "_".join(f"{int(p):02d}" for p in t.tile_id.split("_"))
        name = f"top_potsdam_{t.tile_id}"
        if rgbir:
            add(
                "4_Ortho_RGBIR.zip",
                f"4_Ortho_RGBIR/{name}_RGBIR.tif",
                raster_bytes(np.stack([r, g, b, ir]), t.georef),
            )
        if rgb_irrg:
            add("2_Ortho_RGB.zip", f"2_Ortho_RGB/{name}_RGB.tif", raster_bytes(np.stack([r, g, b]), t.georef))
            add(
                "3_Ortho_IRRG.zip",
                f"3_Ortho_IRRG/{name}_IRRG.tif",
                raster_bytes(np.stack([ir, r, g]), t.georef),
            )
        cols, rows = short.get(t.tile_id, (0, 0))
        height, width = t.dsm.shape[0] - rows, t.dsm.shape[1] - cols
        add("1_DSM.zip", f"1_DSM/dsm_potsdam_{padded}.tif", raster_bytes(t.dsm[:height, :width], t.georef))
        if ndsm:
            jpeg = raster_bytes(ndsm_jpeg_values(t)[:height, :width], None, driver="JPEG")
            add(
                "1_DSM_normalisation.zip",
                f"1_DSM_normalisation/dsm_potsdam_{padded}_normalized_lastools.jpg",
                jpeg,
            )
        add("5_Labels_all.zip", f"{name}_label.tif", raster_bytes(colour_label(t.label), None))
        add(
            "5_Labels_all_noBoundary.zip",
            f"{name}_label_noBoundary.tif",
            raster_bytes(colour_label(t.eroded), None),
        )
    return [Download(archive, members) for archive, members in files.items()]


def read_band(path: Path, band: int = 1) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(band)


def read_member(archive: Path, member: str) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(f"/vsizip/{archive}/{member}") as src:
            return src.read()


def band_names(path: Path) -> tuple[str | None, ...]:
    with rasterio.open(path) as src:
        return tuple(src.descriptions)


def assert_no_output(out_dir: Path) -> None:
    """Neither the output folder nor a temporary sibling of it is left behind."""
    assert not out_dir.exists()
    assert not out_dir.parent.exists() or list(out_dir.parent.iterdir()) == []


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    return tmp_path / "out" / "tiles"


# --------------------------------------------------------------------------------------
# Vaihingen


@pytest.fixture(scope="module")
def vaihingen() -> list[SourceTile]:
    return vaihingen_tiles()


@pytest.fixture(scope="module")
def vaihingen_raw(tmp_path_factory: pytest.TempPathFactory, vaihingen: list[SourceTile]) -> dict[str, Path]:
    """raw_dir per form (zip, unzipped, folders). Do not modify."""
    downloads = vaihingen_downloads(vaihingen)
    return {
        form: write_downloads(tmp_path_factory.mktemp(f"vaihingen_{form}"), downloads, form) for form in FORMS
    }


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


def test_vaihingen_official_split_converts_only_the_tiles_used(
    vaihingen_raw: dict[str, Path], out_dir: Path
) -> None:
    data = DataConfig(source="vaihingen", split="official", val_tiles=("3",))
    table = build_tiles(vaihingen_raw["zip"], out_dir, data)
    # Area 9 is in neither official list: skipped, not converted.
    assert dict(zip(table["tile_id"], table["split"], strict=True)) == {"1": "train", "2": "test", "3": "val"}
    assert sorted(p.name for p in out_dir.iterdir() if "area9" in p.name) == []
    assert len(list(out_dir.iterdir())) == 1 + 3 * 3


def test_synthetic_source_reads_the_participant_layout_with_the_official_split(
    synthetic_raw: Path, out_dir: Path
) -> None:
    # conftest's synthetic areas 1..4: official train 1, 3 and test 2, 4.
    data = DataConfig(source="synthetic", split="official", val_tiles=(3,), bands=("ndsm", "ir"))
    table = build_tiles(synthetic_raw, out_dir, data)
    assert dict(zip(table["tile_id"], table["split"], strict=True)) == {
        "1": "train",
        "2": "test",
        "3": "val",
        "4": "test",
    }
    assert band_names(out_dir / "area1_image.tif") == ("ndsm", "ir")


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


# --------------------------------------------------------------------------------------
# Potsdam


@pytest.fixture(scope="module")
def potsdam() -> list[SourceTile]:
    return potsdam_tiles()


@pytest.fixture(scope="module")
def potsdam_raw(tmp_path_factory: pytest.TempPathFactory, potsdam: list[SourceTile]) -> dict[str, Path]:
    """Every official Potsdam archive, per form. Do not modify."""
    downloads = potsdam_downloads(potsdam)
    return {
        form: write_downloads(tmp_path_factory.mktemp(f"potsdam_{form}"), downloads, form) for form in FORMS
    }


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


def test_potsdam_official_split(potsdam_raw: dict[str, Path], out_dir: Path) -> None:
    table = build_tiles(
        potsdam_raw["zip"], out_dir, DataConfig(source="potsdam", split="official", val_tiles=("2_11",))
    )
    assert dict(zip(table["tile_id"], table["split"], strict=True)) == {
        "2_10": "train",
        "2_11": "val",
        "2_13": "test",
    }


def test_tile_ids_may_be_zero_padded(potsdam_raw: dict[str, Path], out_dir: Path) -> None:
    data = DataConfig(source="potsdam", bands=("r",), val_tiles=("02_11",), test_tiles=("2_13",))
    assert build_tiles(potsdam_raw["zip"], out_dir, data)["split"].tolist() == ["train", "val", "test"]


# --------------------------------------------------------------------------------------
# Band order


BAND_VALUES = {"r": 11, "g": 22, "b": 33, "ir": 44}
SMALL = 64


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


# --------------------------------------------------------------------------------------
# Colour tolerance


NEAR_WHITE = (252, 255, 253)  # 3 off impervious white
NEAR_BLUE = (2, 1, 255)  # 2 off building blue
NEAR_BLACK = (3, 0, 1)  # 3 off boundary black


@pytest.fixture(scope="module")
def off_colour_raw(tmp_path_factory: pytest.TempPathFactory, potsdam: list[SourceTile]) -> Path:
    """Potsdam whose tile 2_10 labels carry colours up to 3 values off the legend. Do not modify."""
    downloads = potsdam_downloads(potsdam, rgb_irrg=False, ndsm=False)
    t = potsdam[0]
    full, eroded = colour_label(t.label), colour_label(t.eroded)
    full[:, t.label == IMPERVIOUS] = np.array(NEAR_WHITE, dtype=np.uint8)[:, None]
    full[:, t.label == BUILDING] = np.array(NEAR_BLUE, dtype=np.uint8)[:, None]
    eroded[:, t.eroded == IGNORE_INDEX] = np.array(NEAR_BLACK, dtype=np.uint8)[:, None]
    for download in downloads:
        for member in download.members:
            if member == "top_potsdam_2_10_label.tif":
                download.members[member] = raster_bytes(full, None)
            elif member == "top_potsdam_2_10_label_noBoundary.tif":
                download.members[member] = raster_bytes(eroded, None)
    return write_downloads(tmp_path_factory.mktemp("potsdam_off_colours"), downloads, "zip")


def test_colours_within_tolerance_are_snapped_and_counted(
    off_colour_raw: Path, potsdam: list[SourceTile], out_dir: Path
) -> None:
    data = DataConfig(source="potsdam", bands=("r",), colour_tolerance=3, **POTSDAM_CUSTOM)
    table = build_tiles(off_colour_raw, out_dir, data).set_index("tile_id")
    t = potsdam[0]
    assert table.loc["2_10", "snapped_pixels"] == np.isin(t.label, [IMPERVIOUS, BUILDING]).sum()
    assert table.loc["2_10", "snapped_pixels_eroded"] == (t.eroded == IGNORE_INDEX).sum()
    assert table.loc["2_11", "snapped_pixels"] == 0
    np.testing.assert_array_equal(read_band(out_dir / "potsdam_2_10_label.tif"), t.label)
    np.testing.assert_array_equal(read_band(out_dir / "potsdam_2_10_label_eroded.tif"), t.eroded)
    assert read_tiles_table(out_dir)["snapped_pixels"].tolist() == table["snapped_pixels"].tolist()


@pytest.mark.parametrize("tolerance", [0, 2])
def test_colours_beyond_tolerance_fail_with_file_colour_and_count(
    off_colour_raw: Path, potsdam: list[SourceTile], out_dir: Path, tolerance: int
) -> None:
    data = DataConfig(source="potsdam", bands=("r",), colour_tolerance=tolerance, **POTSDAM_CUSTOM)
    with pytest.raises(UnknownColourError) as info:
        build_tiles(off_colour_raw, out_dir, data)
    message = str(info.value)
    t = potsdam[0]
    assert f"{off_colour_raw / '5_Labels_all.zip'}!top_potsdam_2_10_label.tif" in message
    assert f"{NEAR_WHITE}: {(t.label == IMPERVIOUS).sum()} px" in message
    if tolerance == 0:
        assert f"{NEAR_BLUE}: {(t.label == BUILDING).sum()} px" in message
    else:
        assert str(NEAR_BLUE) not in message  # 2 off: snapped
    assert_no_output(out_dir)


def test_decode_colours_snaps_within_tolerance() -> None:
    rgb = np.array([[CLASSES[1].colour, NEAR_BLUE, NEAR_BLACK, (40, 40, 40)]], dtype=np.uint8)
    decoded = decode_colours(rgb, allow_boundary=True, tolerance=3)
    assert decoded.index.tolist() == [[1, 1, IGNORE_INDEX, IGNORE_INDEX]]
    assert decoded.snapped == 2
    assert decoded.unknown == {(40, 40, 40): 1}
    # Near-black is only boundary where boundary is allowed.
    assert decode_colours(rgb, tolerance=3).unknown == {NEAR_BLACK: 1, (40, 40, 40): 1}
    assert decode_colours(rgb).snapped == 0


def test_colours_to_index_tolerance_defaults_to_exact() -> None:
    rgb = np.array([[NEAR_BLUE, BOUNDARY_COLOUR]], dtype=np.uint8)
    with pytest.raises(UnknownColourError, match=r"\(2, 1, 255\): 1 px"):
        colours_to_index(rgb, "x.tif", allow_boundary=True)
    assert colours_to_index(rgb, allow_boundary=True, tolerance=2).tolist() == [[1, IGNORE_INDEX]]
    with pytest.raises(UnknownColourError, match="within 1 of one"):
        colours_to_index(rgb, allow_boundary=True, tolerance=1)


# --------------------------------------------------------------------------------------
# Heights


@contextlib.contextmanager
def dataset(array: np.ndarray, nodata: float | None = None) -> Iterator[DatasetReader]:
    """An in-memory single-band float32 GeoTIFF, open for reading."""
    profile = {"driver": "GTiff", "count": 1, "height": array.shape[0], "width": array.shape[1]}
    with warnings.catch_warnings(), MemoryFile() as memory:
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with memory.open(dtype="float32", nodata=nodata, **profile) as dst:
            dst.write(array.astype(np.float32), 1)
        with memory.open() as src:
            yield src


def test_ground_estimate_keeps_a_slope_and_removes_buildings() -> None:
    rows, cols = np.mgrid[0:600, 0:500].astype(np.float32)
    terrain = 200.0 + 0.005 * rows + 0.0025 * cols  # 5 cm pixels: 10 % and 5 % slopes
    box = np.zeros_like(terrain)
    box[100:300, 150:350] = 12.0  # a 10 x 10 m building
    with dataset(terrain + box) as src:
        ground = heights.estimate_ground(src, 0.05, fill=0.0, block_rows=64)
        estimate = np.concatenate([ground.block(r, 100, 500) for r in range(0, 600, 100)])
        ndsm = heights.normalised_heights(terrain + box, estimate)
    np.testing.assert_allclose(ndsm[box == 0], 0.0, atol=0.1)
    np.testing.assert_allclose(ndsm[box > 0], 12.0, atol=0.1)


def test_ground_level_on_a_decimated_read(monkeypatch: pytest.MonkeyPatch) -> None:
    values = np.random.default_rng(0).normal(100.0, 5.0, size=(300, 400))
    with dataset(values) as src:
        exact = heights.ground_level(src)
        monkeypatch.setattr(heights, "PERCENTILE_MAX_SAMPLES", 10_000)
        assert heights.ground_level(src) == pytest.approx(exact, abs=0.5)
    assert exact == pytest.approx(np.percentile(values, 1.0), abs=1e-3)


def test_dsm_nodata_reads_as_ground() -> None:
    values = np.full((50, 60), 100.0, dtype=np.float32)
    values[:5] = -9999.0
    values[10:20, 10:20] = 110.0
    with dataset(values, nodata=-9999.0) as src:
        level = heights.ground_level(src)
        filled = heights.read_heights(src, None, fill=level)
    assert level == 100.0
    assert (filled[:5] == 100.0).all() and filled.max() == 110.0


# --------------------------------------------------------------------------------------
# Errors: each names the file or archive, and leaves no output


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


@pytest.mark.parametrize(
    ("split", "match"),
    [
        ({"val_tiles": ("4_12",), "test_tiles": ("2_13",)}, r"data\.val_tiles \[4_12\]"),
        ({"val_tiles": ("2_11",), "test_tiles": ("7_13", "2_13")}, r"data\.test_tiles \[7_13\]"),
        (
            {"train_tiles": ("6_7",), "val_tiles": ("2_11",), "test_tiles": ("2_13",)},
            r"data\.train_tiles \[6_7\]",
        ),
    ],
)
def test_tile_not_in_the_data_lists_what_is_available(
    potsdam_raw: dict[str, Path], out_dir: Path, split: dict[str, tuple[str, ...]], match: str
) -> None:
    with pytest.raises(DatasetLayoutError, match=match) as info:
        build_tiles(potsdam_raw["zip"], out_dir, DataConfig(source="potsdam", **split))
    assert "available: [2_10, 2_11, 2_13]" in str(info.value)
    assert_no_output(out_dir)


def test_official_val_tile_must_be_an_official_train_tile(
    potsdam_raw: dict[str, Path], out_dir: Path
) -> None:
    data = DataConfig(source="potsdam", split="official", val_tiles=("2_13",))
    with pytest.raises(DatasetLayoutError, match=r"\[2_13\] are not official Potsdam training tiles"):
        build_tiles(potsdam_raw["zip"], out_dir, data)
    assert_no_output(out_dir)


def test_official_split_without_test_tiles(tmp_path: Path, out_dir: Path) -> None:
    tiles = vaihingen_tiles(SMALL, ("1", "3"))
    raw = write_downloads(tmp_path / "raw", vaihingen_downloads(tiles), "zip")
    data = DataConfig(source="vaihingen", split="official", val_tiles=("3",))
    with pytest.raises(DatasetLayoutError, match=r"test split is empty: none of the official Vaihingen test"):
        build_tiles(raw, out_dir, data)
    assert_no_output(out_dir)


def replace_member(raw: Path, archive: str, member: str, content: bytes) -> None:
    """Rewrite `archive` in place with `member` replaced."""
    with zipfile.ZipFile(raw / archive) as old:
        members = {name: old.read(name) for name in old.namelist()}
    members[member] = content
    with zipfile.ZipFile(raw / archive, "w") as new:
        for name, data in members.items():
            new.writestr(name, data)


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


# --------------------------------------------------------------------------------------
# Real pixels: the ISPRS Vaihingen crop in ../shared, packed as official archives


# ../shared/data/isprs-vaihingen-crop beside the project, or wherever AERIALSEG_ISPRS_CROP points.
CROP = Path(
    os.environ.get("AERIALSEG_ISPRS_CROP")
    or Path(__file__).resolve().parents[2] / "shared" / "data" / "isprs-vaihingen-crop"
)
CROP_HEIGHTS = {1: 9.0, 3: 7.0, 4: 1.5}  # building, tree, car: metres above the terrain


def read_png(path: Path) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path) as src:
            return src.read()


def real_crop_tile() -> SourceTile:
    """Area 1's top-left 512 x 512 px: real IRRG and eroded labels; the full label and DSM made up."""
    ir, r, g = read_png(CROP / "area1_0_0_512_512_irrg.png")
    # The crop's own coding: 0 = boundary, 1..6 = the classes in legend order.
    coded = read_png(CROP / "area1_0_0_512_512_label_eroded.png")[0]
    eroded = np.where(coded == 0, IGNORE_INDEX, coded.astype(np.int16) - 1).astype(np.uint8)
    # Full label: each boundary pixel takes the class of the nearest labelled pixel.
    _, (rows, cols) = ndimage.distance_transform_edt(eroded == IGNORE_INDEX, return_indices=True)
    label = eroded[rows, cols]
    terrain = 250.0 + 0.01 * np.arange(512, dtype=np.float32)[:, None]
    dsm = terrain + np.vectorize(lambda c: CROP_HEIGHTS.get(int(c), 0.0), otypes=[np.float32])(label)
    georef = GeoReference(CRS.from_epsg(32632), Affine(0.09, 0, 496_200.0, 0, -0.09, 5_421_800.0))
    return SourceTile("1", {"ir": ir, "r": r, "g": g}, dsm.astype(np.float32), label, georef, eroded)


@pytest.mark.skipif(not CROP.is_dir(), reason=f"{CROP} is not available here")
def test_real_vaihingen_crop_through_the_official_archives(tmp_path: Path, out_dir: Path) -> None:
    real = real_crop_tile()
    # Official split: the real area 1 trains; small synthetic areas 3 and 2 fill val and test.
    tiles = [real, *vaihingen_tiles(SMALL, ("2", "3"))]
    raw = write_downloads(tmp_path / "raw", vaihingen_downloads(tiles), "zip")
    data = DataConfig(source="vaihingen", split="official", val_tiles=("3",), bands=("ir", "r", "g", "ndsm"))
    table = build_tiles(raw, out_dir, data)
    assert table.set_index("tile_id").loc["1", "split"] == "train"
    image, _ = read_raster(out_dir / "area1_image.tif")
    for i, band in enumerate(("ir", "r", "g")):
        np.testing.assert_allclose(image[i], real.bands[band] / np.float32(255), atol=1e-7)
    label = read_band(out_dir / "area1_label.tif")
    eroded = read_band(out_dir / "area1_label_eroded.tif")
    np.testing.assert_array_equal(label, real.label)
    np.testing.assert_array_equal(eroded, real.eroded)
    assert 0.05 < (eroded == IGNORE_INDEX).mean() < 0.4
    # Real vegetation is bright in the infrared band, which confirms the IR-R-G order end to end.
    excess = image[0] - image[1]
    assert excess[label == 2].mean() > excess[label == 0].mean() + 0.05
    ndsm = image[3]
    assert np.median(ndsm[label == 1]) > 7.0
    assert np.median(ndsm[np.isin(label, [0, 2])]) < 0.5


@pytest.mark.skipif(not CROP.is_dir(), reason=f"{CROP} is not available here")
def test_real_crop_through_tiles_and_evaluate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The evaluate stage's path on real pixels: whole-tile prediction, eroded scoring, georeference."""
    import mlflow
    import torch

    from aerialseg.checkpoint import save_checkpoint
    from aerialseg.config import Params
    from aerialseg.evaluation import evaluate
    from aerialseg.model import build_model, model_args
    from aerialseg.patches import BandStats
    from aerialseg.tracking import RunRef

    real = real_crop_tile()
    raw = write_downloads(
        tmp_path / "raw", vaihingen_downloads([real, *vaihingen_tiles(SMALL, ("2", "3"))]), "zip"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = Params.model_validate(
        {
            "data": {
                "source": "vaihingen",
                "raw_dir": str(raw),
                "bands": ["ir", "r", "g"],
                "train_tiles": ["2"],
                "val_tiles": ["3"],
                "test_tiles": ["1"],
            },
            "paths": {"tiles": "tiles", "models": "models", "reports": "reports"},
            "evaluate": {"overlap": 0.5, "batch_size": 4},
        }
    )
    build_tiles(raw, params.paths.tiles, params.data)
    # An untrained network: the point is the path on real pixels, not the accuracy.
    torch.manual_seed(0)
    args = model_args("fcn_skip", "resnet18", in_channels=3, num_classes=6)
    stats = BandStats((0.3, 0.3, 0.3), (0.2, 0.2, 0.2))
    save_checkpoint(
        Path("models/model.ckpt"),
        build_model(args),
        args,
        bands=["ir", "r", "g"],
        stats=stats,
        patch_size=128,
        config={},
        metrics={},
    )
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.set_experiment("crop")
    with mlflow.start_run() as run:
        pass
    RunRef(run.info.run_id, experiment.experiment_id, "crop").save(Path("models/mlflow_run.json"))

    metrics = evaluate(params)

    assert metrics["pixels"] == int((real.eroded != IGNORE_INDEX).sum())
    assert list(metrics["tiles"]) == ["area1"]
    saved = json.loads(Path("reports/metrics.json").read_text())
    assert saved["mlflow_run_id"] == run.info.run_id and saved["pixels"] == metrics["pixels"]
    with rasterio.open("reports/predictions/area1.tif") as pred:
        assert pred.shape == (512, 512) and pred.transform == real.georef.transform
        assert pred.read(1).max() <= 5


def test_layouts_name_the_official_tiles() -> None:
    assert len(VAIHINGEN.official_train) == 16 and len(VAIHINGEN.official_test) == 17
    assert len(POTSDAM.official_train) == 24 and len(POTSDAM.official_test) == 14
    assert not set(VAIHINGEN.official_train) & set(VAIHINGEN.official_test)
    assert not set(POTSDAM.official_train) & set(POTSDAM.official_test)
