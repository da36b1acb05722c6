"""What the official ISPRS 2D Semantic Labeling downloads hold: file names, archives, official splits.

Each dataset is described as data (a `DatasetLayout`), so that finding files, naming tiles and
splitting them is one code path for Vaihingen and Potsdam. A file is recognised by its name
alone (plus, for Vaihingen, the folder it sits in: the orthophoto and the full ground truth
share one file name), wherever it lies: in an official zip, in a folder extracted from one,
or in the older participant layout that the synthetic generator writes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from aerialseg.config import Source

# Roles: what a file is to a tile. Orthophotos are named after their band order.
IRRG = "irrg"
RGB = "rgb"
RGBIR = "rgbir"
DSM = "dsm"
NDSM = "ndsm"
LABEL = "label"
LABEL_ERODED = "label_eroded"


NDSM_JPEG_METRES_PER_VALUE = 0.1
"""Height in metres of one grey value in the Potsdam `*_normalized_lastools.jpg` nDSMs.

The JPEGs are 8-bit and carry no scale. They were made with LAStools (lasheight), whose 8-bit
height output is decimetres clamped to 0..255, and the matching nDSMs published for Vaihingen
by the benchmark's authors (M. Gerke) are documented as "heights encoded in dm". So a grey value
is taken as decimetres: 0..25.5 m, in the same metres as the nDSM this stage derives from a DSM.
"""


@dataclass(frozen=True)
class FileRole:
    """One kind of file of a tile: how its name looks and where it comes from."""

    role: str
    pattern: re.Pattern[str]
    """Matches the file name; its groups are the tile id's numbers."""
    example: str
    """The file name for tile id `{tile}`, for error messages."""
    where: str
    """The archive (and folder) the file ships in, for error messages."""
    folder: str | None = None
    """The file must sit in this folder (`top/`) ..."""
    not_folder: str | None = None
    """... or must not (the full ground truth has the orthophoto's name, outside `top/`)."""

    def tile_id(self, name: str, folder: str) -> str | None:
        """The tile id of a file named `name` in `folder`, or None if it is not of this role."""
        if self.folder is not None and folder != self.folder:
            return None
        if self.not_folder is not None and folder == self.not_folder:
            return None
        match = self.pattern.fullmatch(name)
        # int(): Potsdam DSMs are named 02_10 where the orthophotos say 2_10.
        return "_".join(str(int(g)) for g in match.groups()) if match else None


@dataclass(frozen=True)
class DatasetLayout:
    name: str
    tile_prefix: str
    """Tile names in tiles.csv are `<prefix><id>`: area15, potsdam_2_10."""
    pixel_size_m: float
    """Ground sampling distance of the orthophoto and DSM, for files without a metric georeference."""
    roles: tuple[FileRole, ...]
    spectral_sources: tuple[tuple[str, tuple[str, ...]], ...]
    """Orthophoto roles with their band order, in order of preference for each band."""
    archives: tuple[str, ...]
    """The official downloads, for the 'nothing found' error."""
    official_train: tuple[str, ...]
    official_test: tuple[str, ...]

    def role(self, role: str) -> FileRole:
        return next(r for r in self.roles if r.role == role)

    @property
    def ortho_roles(self) -> tuple[str, ...]:
        return tuple(role for role, _ in self.spectral_sources)

    def tile_name(self, tile_id: str) -> str:
        return f"{self.tile_prefix}{tile_id}"

    def sort_key(self, tile_id: str) -> tuple[int, ...]:
        return tuple(int(part) for part in tile_id.split("_"))


def _role(role: str, pattern: str, example: str, where: str, **folder: str) -> FileRole:
    return FileRole(role, re.compile(pattern), example, where, **folder)


VAIHINGEN = DatasetLayout(
    name="Vaihingen",
    tile_prefix="area",
    pixel_size_m=0.09,
    roles=(
        _role(
            IRRG,
            r"top_mosaic_09cm_area(\d+)\.tif",
            "top/top_mosaic_09cm_area{tile}.tif",
            "ISPRS_semantic_labeling_Vaihingen.zip, folder top/",
            folder="top",
        ),
        _role(
            DSM,
            r"dsm_09cm_matching_area(\d+)\.tif",
            "dsm/dsm_09cm_matching_area{tile}.tif",
            "ISPRS_semantic_labeling_Vaihingen.zip, folder dsm/",
        ),
        _role(
            LABEL,
            r"top_mosaic_09cm_area(\d+)\.tif",
            "top_mosaic_09cm_area{tile}.tif",
            "ISPRS_semantic_labeling_Vaihingen_ground_truth_COMPLETE.zip (or gts_for_participants/)",
            not_folder="top",
        ),
        _role(
            LABEL_ERODED,
            r"top_mosaic_09cm_area(\d+)_noBoundary\.tif",
            "top_mosaic_09cm_area{tile}_noBoundary.tif",
            "ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE.zip "
            "(or gts_eroded_for_participants/)",
        ),
    ),
    spectral_sources=((IRRG, ("ir", "r", "g")),),
    archives=(
        "ISPRS_semantic_labeling_Vaihingen.zip (top/top_mosaic_09cm_area<N>.tif, "
        "dsm/dsm_09cm_matching_area<N>.tif)",
        "ISPRS_semantic_labeling_Vaihingen_ground_truth_COMPLETE.zip (top_mosaic_09cm_area<N>.tif)",
        "ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE.zip "
        "(top_mosaic_09cm_area<N>_noBoundary.tif)",
    ),
    official_train=tuple(str(a) for a in (1, 3, 5, 7, 11, 13, 15, 17, 21, 23, 26, 28, 30, 32, 34, 37)),
    official_test=tuple(str(a) for a in (2, 4, 6, 8, 10, 12, 14, 16, 20, 22, 24, 27, 29, 31, 33, 35, 38)),
)

_POTSDAM_TILE = r"(\d+)_(\d+)"
POTSDAM = DatasetLayout(
    name="Potsdam",
    tile_prefix="potsdam_",
    pixel_size_m=0.05,
    roles=(
        _role(
            RGBIR,
            rf"top_potsdam_{_POTSDAM_TILE}_RGBIR\.tif",
            "top_potsdam_{tile}_RGBIR.tif",
            "4_Ortho_RGBIR.zip",
        ),
        _role(RGB, rf"top_potsdam_{_POTSDAM_TILE}_RGB\.tif", "top_potsdam_{tile}_RGB.tif", "2_Ortho_RGB.zip"),
        _role(
            IRRG, rf"top_potsdam_{_POTSDAM_TILE}_IRRG\.tif", "top_potsdam_{tile}_IRRG.tif", "3_Ortho_IRRG.zip"
        ),
        _role(DSM, rf"dsm_potsdam_{_POTSDAM_TILE}\.tif", "dsm_potsdam_{tile}.tif (zero-padded)", "1_DSM.zip"),
        _role(
            NDSM,
            rf"dsm_potsdam_{_POTSDAM_TILE}_normalized_lastools\.jpg",
            "dsm_potsdam_{tile}_normalized_lastools.jpg (zero-padded)",
            "1_DSM_normalisation.zip",
        ),
        _role(
            LABEL,
            rf"top_potsdam_{_POTSDAM_TILE}_label\.tif",
            "top_potsdam_{tile}_label.tif",
            "5_Labels_all.zip",
        ),
        _role(
            LABEL_ERODED,
            rf"top_potsdam_{_POTSDAM_TILE}_label_noBoundary\.tif",
            "top_potsdam_{tile}_label_noBoundary.tif",
            "5_Labels_all_noBoundary.zip",
        ),
    ),
    # RGBIR holds every band; without it, blue comes from RGB and infrared from IRRG.
    spectral_sources=((RGBIR, ("r", "g", "b", "ir")), (RGB, ("r", "g", "b")), (IRRG, ("ir", "r", "g"))),
    archives=(
        "4_Ortho_RGBIR.zip (top_potsdam_<X>_<Y>_RGBIR.tif) or 2_Ortho_RGB.zip + 3_Ortho_IRRG.zip",
        "1_DSM.zip (dsm_potsdam_<XX>_<YY>.tif)",
        "1_DSM_normalisation.zip (dsm_potsdam_<XX>_<YY>_normalized_lastools.jpg; optional)",
        "5_Labels_all.zip (top_potsdam_<X>_<Y>_label.tif)",
        "5_Labels_all_noBoundary.zip (top_potsdam_<X>_<Y>_label_noBoundary.tif)",
    ),
    official_train=(
        *("2_10", "2_11", "2_12", "3_10", "3_11", "3_12", "4_10", "4_11", "4_12", "5_10", "5_11", "5_12"),
        *("6_7", "6_8", "6_9", "6_10", "6_11", "6_12", "7_7", "7_8", "7_9", "7_10", "7_11", "7_12"),
    ),
    official_test=(
        *("2_13", "2_14", "3_13", "3_14", "4_13", "4_14", "4_15", "5_13", "5_14", "5_15", "6_13", "6_14"),
        *("6_15", "7_13"),
    ),
)

LAYOUTS: dict[Source, DatasetLayout] = {"synthetic": VAIHINGEN, "vaihingen": VAIHINGEN, "potsdam": POTSDAM}
"""The synthetic generator writes the Vaihingen participant layout, so it reads as Vaihingen."""
