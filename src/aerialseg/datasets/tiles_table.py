"""The `tiles` stage's output contract: tiles.csv, one row per converted tile.

Kept apart from the conversion code so that the stages that only read the table (patches,
evaluate) do not depend on how the raw archives are read.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from aerialseg.datasets.errors import DatasetLayoutError

TILES_CSV = "tiles.csv"
SPLITS = ("train", "val", "test")
READ_COLUMNS = ("tile", "tile_id", "split", "height", "width", "image", "label", "label_eroded")
"""The columns the stages after `tiles` read (the counts after them are for people)."""
RERUN_TILES = "rerun the `tiles` stage (`dvc repro tiles`, or `dvc checkout` for the stored one)"
TABLE_COLUMNS = (
    "tile",  # output name: area15, potsdam_2_10
    "tile_id",  # the dataset's own id, as data.*_tiles name it: 15, 2_10
    "split",  # train, val or test
    "height",
    "width",
    "image",  # <tile>_image.tif: float32, bands in data.bands order
    "label",  # <tile>_label.tif: uint8 class 0..5, the full reference
    "label_eroded",  # <tile>_label_eroded.tif: uint8 class 0..5, 255 on the boundary band
    "ndsm_source",  # archive (Potsdam lastools JPEG), derived (from the DSM) or none (no ndsm band)
    "snapped_pixels",  # label pixels within data.colour_tolerance of a legend colour, not on it
    "snapped_pixels_eroded",  # the same in the eroded label
    # Height rasters a few px short of the orthophoto on the right or bottom edge (Potsdam 3_13's DSM
    # and nDSM lack a column), padded by repeating their last column / row
    # (isprs_convert.MAX_HEIGHT_PADDING_PX); 0 where nothing was padded or the file was not read.
    "dsm_padded_cols",  # columns repeated on the right of the DSM
    "dsm_padded_rows",  # rows repeated at the bottom of the DSM
    "ndsm_padded_cols",  # the same for the archive's nDSM (Potsdam's lastools JPEG)
    "ndsm_padded_rows",
)


def read_tiles_table(tiles_dir: Path, split: str | None = None) -> pd.DataFrame:
    """tiles.csv of `tiles_dir`, or the rows of one split (which must not be empty)."""
    path = tiles_dir / TILES_CSV
    if not path.exists():
        raise FileNotFoundError(f"{path}: no tile table; run the `tiles` stage first")
    # Text, not numbers: Vaihingen ids (15) would otherwise read back as integers.
    try:
        table = pd.read_csv(path, dtype={"tile": str, "tile_id": str})
    except (ValueError, UnicodeDecodeError) as err:  # pandas' ParserError is a ValueError
        raise DatasetLayoutError(f"{path}: not a tile table ({err}); {RERUN_TILES}") from err
    missing = [column for column in READ_COLUMNS if column not in table.columns]
    if missing:
        raise DatasetLayoutError(
            f"{path}: missing column(s) {', '.join(missing)} (found {', '.join(map(str, table.columns))}); "
            f"expected the table the `tiles` stage writes; {RERUN_TILES}"
        )
    # A row of another split would silently drop its tile from training, validation or the test.
    odd = table[~table["split"].isin(SPLITS)]
    if not odd.empty:
        row = odd.iloc[0]
        raise DatasetLayoutError(
            f"{path}: tile {row['tile']} has split {row['split']!r}; expected one of {', '.join(SPLITS)}; "
            f"{RERUN_TILES}"
        )
    if split is not None:
        table = table[table["split"] == split].reset_index(drop=True)
        if table.empty:
            raise DatasetLayoutError(f"{path}: the {split} split has no tiles")
    return table
