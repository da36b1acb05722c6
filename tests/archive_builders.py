"""The official ISPRS downloads, rebuilt for tests: Vaihingen and Potsdam archives, zipped or extracted.

The real archives cannot be downloaded here, so these builders make them: the official archive and
member names and formats (GeoTIFF; the Potsdam nDSM as an 8-bit JPEG), filled with small generated
scenes whose class maps are known (`SourceTile`), so every decoded label can be checked pixel for
pixel. Kept apart from the tests, as TorchGeo keeps its test-data generators, and imported like
project_copy.py (`from archive_builders import ...`); conftest.py holds the fixtures built from them.
"""

from __future__ import annotations

import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.io import MemoryFile

from aerialseg.classes import index_to_colours
from aerialseg.datasets.synthetic import REFERENCE_SIZE_PX, erode_label, generate_scene
from aerialseg.raster import GeoReference

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
SMALL = 64
"""Side in px of the small tiles of the band order, split and defects tests."""


# --------------------------------------------------------------------------------------
# Fake archives: the official names and formats, filled with generated scenes


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


def replace_member(raw: Path, archive: str, member: str, content: bytes) -> None:
    """Rewrite `archive` in place with `member` replaced."""
    with zipfile.ZipFile(raw / archive) as old:
        members = {name: old.read(name) for name in old.namelist()}
    members[member] = content
    with zipfile.ZipFile(raw / archive, "w") as new:
        for name, data in members.items():
            new.writestr(name, data)


# --------------------------------------------------------------------------------------
# Reading back what build_tiles wrote


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
