"""The official ISPRS 2D Semantic Labeling data (Vaihingen, Potsdam) -> model-ready tiles and their split.

`build_tiles` takes raw_dir as users have it - the official zip files or the folders extracted
from them, directly in raw_dir or one folder down; the synthetic scenes come in the older
Vaihingen participant layout and take the same path - and writes to out_dir, per tile used:

    <tile>_image.tif         float32, bands in data.bands order (named in the band descriptions):
                             ir/r/g/b reflectance in [0, 1]; dsm in metres above the tile's
                             1st percentile; ndsm in metres above the local ground (heights.py)
    <tile>_label.tif         uint8 class index 0..5 (full reference)
    <tile>_label_eroded.tif  uint8 class index 0..5, 255 on the boundary band (the ISPRS protocol)
    tiles.csv                one row per tile (tiles_table.TABLE_COLUMNS)

A DSM or nDSM a few pixels short of its orthophoto on the right or bottom edge (the official
Potsdam tile 3_13) is padded by repeating its last column or row, logged with a warning and
counted in tiles.csv; see isprs_convert.MAX_HEIGHT_PADDING_PX.

Only tiles in the train, val or test split are converted. out_dir is built under a temporary
name and renamed at the end, so an error leaves no half-written output (and an earlier output
in place).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from aerialseg.config import DataConfig
from aerialseg.datasets.errors import DatasetLayoutError
from aerialseg.datasets.isprs_convert import TilePlan, convert_tile, plan_tile
from aerialseg.datasets.isprs_files import TileFiles, find_tiles
from aerialseg.datasets.isprs_layout import DSM, LAYOUTS, NDSM, DatasetLayout
from aerialseg.datasets.tiles_table import SPLITS, TABLE_COLUMNS, TILES_CSV, read_tiles_table
from aerialseg.files import atomic_path
from aerialseg.progress import track

__all__ = [
    "SPLITS",
    "TABLE_COLUMNS",
    "TILES_CSV",
    "DatasetLayoutError",
    "assign_splits",
    "build_tiles",
    "read_tiles_table",
]

log = logging.getLogger(__name__)


def build_tiles(raw_dir: Path, out_dir: Path, data: DataConfig) -> pd.DataFrame:
    """Convert the tiles of data.source that the split uses from `raw_dir` into `out_dir`.

    Every input problem - no dataset, a missing file or tile, a grid or size mismatch, a colour
    outside the legend, an empty split - raises an error that names the file or archive.
    """
    layout = LAYOUTS[data.source]
    tiles = find_tiles(Path(raw_dir), layout, complete=True)
    splits = assign_splits(list(tiles), data)
    plans = _plan_tiles(Path(raw_dir), layout, {tile_id: tiles[tile_id] for tile_id in splits}, data.bands)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        rows = [
            _convert(tiles[tile_id], plans[tile_id], layout, data, tmp, split)
            for tile_id, split in track(splits.items(), "tiles", unit="tile")
        ]
        table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
        table.to_csv(tmp / TILES_CSV, index=False)
    return table


# --------------------------------------------------------------------------------------
# Splits


def assign_splits(available: list[str], data: DataConfig) -> dict[str, str]:
    """Tile id -> split for every tile used, in the order of `available`; unused tiles are left out.

    Whole tiles go to one split each: overlapping patches of one tile must never straddle splits,
    and test tiles are never used for training or model selection.
    """
    layout = LAYOUTS[data.source]
    val = _normalised(data.val_tiles)
    test = _normalised(data.test_tiles)
    train = None if data.train_tiles is None else _normalised(data.train_tiles)
    excluded = _normalised(data.exclude_tiles)
    _require_available(
        {
            "data.val_tiles": val,
            "data.test_tiles": test,
            "data.train_tiles": train or [],
            "data.exclude_tiles": excluded,
        },
        available,
        layout,
    )
    if data.split == "official":
        splits = _official_splits(available, val, layout)
    else:
        splits = {
            tile: "val" if tile in val else "test" if tile in test else "train"
            for tile in available
            if tile in val or tile in test or train is None or tile in train
        }
    splits = _without_excluded(splits, excluded, data, layout)
    for split in SPLITS:
        if split not in splits.values():
            raise DatasetLayoutError(_empty_split_message(split, data, available, layout))
    return splits


def _official_splits(available: list[str], val: list[str], layout: DatasetLayout) -> dict[str, str]:
    not_train = [tile for tile in val if tile not in layout.official_train]
    if not_train:
        raise DatasetLayoutError(
            f"data.val_tiles: {_ids(not_train)} are not official {layout.name} training tiles; with "
            f"data.split official, validation tiles are held out of {_ids(layout.official_train)}"
        )
    splits = {}
    for tile in available:
        if tile in val:
            splits[tile] = "val"
        elif tile in layout.official_test:
            splits[tile] = "test"
        elif tile in layout.official_train:
            splits[tile] = "train"
    return splits


def _without_excluded(
    splits: dict[str, str], excluded: list[str], data: DataConfig, layout: DatasetLayout
) -> dict[str, str]:
    """Drop data.exclude_tiles from training; an excluded val or test tile is an error.

    Excluded tiles are left out of tiles.csv altogether (not converted), so `patches` and
    `evaluate`, which read the table by split, never see them.
    """
    held_out = {tile: split for tile, split in splits.items() if tile in excluded and split != "train"}
    if held_out:
        official = data.split == "official"
        where = [
            f"{tile} is an official {layout.name} test tile"
            if official and split == "test"
            else f"{tile} is in data.{split}_tiles"
            for tile, split in held_out.items()
        ]
        raise DatasetLayoutError(
            "data.exclude_tiles: "
            + ", ".join(where)
            + "; only training tiles can be excluded (the test set is the benchmark's, and validation "
            "tiles are chosen in data.val_tiles)"
        )
    return {tile: split for tile, split in splits.items() if tile not in excluded}


def _normalised(tile_ids: tuple[str, ...]) -> list[str]:
    """'07' -> '7', '02_10' -> '2_10': ids as the tile names spell them."""
    return [_normalised_id(tile_id) for tile_id in tile_ids]


def _normalised_id(tile_id: str) -> str:
    parts = tile_id.strip().split("_")
    return "_".join(str(int(p)) for p in parts) if all(p.isdigit() for p in parts) else tile_id


def _require_available(named: dict[str, list[str]], available: list[str], layout: DatasetLayout) -> None:
    missing = {key: [t for t in tile_ids if t not in available] for key, tile_ids in named.items()}
    listed = [f"{key} {_ids(tile_ids)}" for key, tile_ids in missing.items() if tile_ids]
    if listed:
        raise DatasetLayoutError(
            f"{' and '.join(listed)}: no such {layout.name} tiles in the raw data "
            f"(available: {_ids(available)})"
        )


def _empty_split_message(split: str, data: DataConfig, available: list[str], layout: DatasetLayout) -> str:
    if split == "train":
        return (
            f"the train split is empty: every available tile is in val_tiles, test_tiles or "
            f"exclude_tiles, or none is "
            f"a training tile (available: {_ids(available)})"
        )
    if data.split == "official":
        return (
            f"the {split} split is empty: none of the official {layout.name} {split} tiles "
            f"{_ids(layout.official_test)} is in the raw data (available: {_ids(available)})"
        )
    return f"the {split} split is empty (available: {_ids(available)})"


def _ids(tile_ids: list[str] | tuple[str, ...]) -> str:
    return f"[{', '.join(tile_ids)}]"


# --------------------------------------------------------------------------------------
# Conversion


def _plan_tiles(
    raw_dir: Path, layout: DatasetLayout, tiles: dict[str, TileFiles], bands: tuple[str, ...]
) -> dict[str, TilePlan]:
    """Check that every file of every tile in use is there before converting anything.

    A conversion of real data takes minutes; a missing label should not surface at the end of it,
    and all missing files are listed at once.
    """
    plans: dict[str, TilePlan] = {}
    problems: list[str] = []
    for tile_id, tile in tiles.items():
        try:
            plans[tile_id] = plan = plan_tile(tile, layout, bands)
        except DatasetLayoutError as err:
            problems.append(str(err))
            continue
        for role in plan.roles:
            if tile.get(role) is None:
                spec = layout.role(role)
                problems.append(
                    f"{layout.tile_name(tile_id)}: missing {spec.example.format(tile=tile_id)} ({spec.where})"
                )
    if problems:
        raise DatasetLayoutError(
            f"{raw_dir}: files missing for the tiles in use:\n  " + "\n  ".join(problems)
        )
    return plans


def _convert(
    tile: TileFiles, plan: TilePlan, layout: DatasetLayout, data: DataConfig, out_dir: Path, split: str
) -> dict[str, object]:
    name = layout.tile_name(tile.tile_id)
    files = {kind: f"{name}_{kind}.tif" for kind in ("image", "label", "label_eroded")}
    converted = convert_tile(
        tile,
        plan,
        layout,
        data.bands,
        {kind: out_dir / file for kind, file in files.items()},
        data.colour_tolerance,
    )
    log.info(
        "%s (%s): %d x %d px, nDSM %s, %d + %d label pixels snapped",
        name,
        split,
        converted.width,
        converted.height,
        converted.ndsm_source,
        converted.snapped_pixels,
        converted.snapped_pixels_eroded,
    )
    if converted.height_padding:
        log.warning(
            "%s: %s",
            name,
            "; ".join(p.describe(converted.width, converted.height) for p in converted.height_padding),
        )
    dsm_cols, dsm_rows = converted.padding(DSM)
    ndsm_cols, ndsm_rows = converted.padding(NDSM)
    return {
        "tile": name,
        "tile_id": tile.tile_id,
        "split": split,
        "height": converted.height,
        "width": converted.width,
        **files,
        "ndsm_source": converted.ndsm_source,
        "snapped_pixels": converted.snapped_pixels,
        "snapped_pixels_eroded": converted.snapped_pixels_eroded,
        "dsm_padded_cols": dsm_cols,
        "dsm_padded_rows": dsm_rows,
        "ndsm_padded_cols": ndsm_cols,
        "ndsm_padded_rows": ndsm_rows,
    }
