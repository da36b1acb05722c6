"""Training patches and validation tiles in self-describing, chunked HDF5 files.

- `train.h5`: overlapping windows of the training tiles (`write_patches`), one patch a chunk.
- `val.h5`: the validation tiles whole, with their eroded reference (`write_validation_tiles`),
  so that validation predicts them with the sliding window of `evaluate` and counts each
  pixel once, as the test protocol does, instead of scoring overlapping patches.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from aerialseg.classes import IGNORE_INDEX, legend
from aerialseg.datasets.tiles_table import read_tiles_table
from aerialseg.files import atomic_path
from aerialseg.progress import progress_bar, track
from aerialseg.raster import read_raster
from aerialseg.windows import stride_for, window_grid

WRITE_BATCH = 64
"""Patches copied to the HDF5 file at a time."""


@dataclass(frozen=True)
class BandStats:
    """Per-band mean and standard deviation, computed on the training tiles only."""

    mean: tuple[float, ...]
    std: tuple[float, ...]


def band_statistics(image_paths: list[Path]) -> BandStats:
    """Exact per-band mean/std over every pixel of the given tiles, one tile in memory at a time."""
    count = 0
    total: np.ndarray | None = None
    total_sq: np.ndarray | None = None
    for path in track(image_paths, "band statistics", unit="tile"):
        image, _ = read_raster(path)
        flat = image.reshape(image.shape[0], -1).astype(np.float64)
        total = flat.sum(axis=1) + (0 if total is None else total)
        total_sq = (flat**2).sum(axis=1) + (0 if total_sq is None else total_sq)
        count += flat.shape[1]
    if total is None or total_sq is None:
        raise ValueError("band statistics need at least one training tile")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    # A constant band would divide by zero; leave it unscaled instead.
    std = np.where(std > 1e-6, std, 1.0)
    return BandStats(tuple(mean.tolist()), tuple(std.tolist()))


def write_patches(
    tiles: pd.DataFrame,
    tiles_dir: Path,
    out_path: Path,
    *,
    size: int,
    overlap: float,
    stats: BandStats,
    bands: list[str],
) -> int:
    """Cut every tile of `tiles` into overlapping windows and append them to one HDF5 file.

    Images are stored raw (not normalised) in float32; the statistics travel as attributes so
    the reader normalises, and a change of statistics never needs new patches. Returns the
    number of patches written.
    """
    n_bands = len(bands)
    bar = progress_bar(f"patches {out_path.name}", total=len(tiles), unit="tile")
    with atomic_path(out_path) as tmp, h5py.File(tmp, "w") as h5, bar as tiles_done:
        image_ds = h5.create_dataset(
            "image",
            shape=(0, n_bands, size, size),
            maxshape=(None, n_bands, size, size),
            dtype="float32",
            chunks=(1, n_bands, size, size),
        )
        mask_ds = h5.create_dataset(
            "mask",
            shape=(0, size, size),
            maxshape=(None, size, size),
            dtype="uint8",
            chunks=(1, size, size),
            # Uncompressed: LZF took as long to decode as reading the 16x larger image chunk.
        )
        tile_ds = h5.create_dataset("tile", shape=(0,), maxshape=(None,), dtype="int32", chunks=(1024,))
        offset_ds = h5.create_dataset(
            "offset", shape=(0, 2), maxshape=(None, 2), dtype="int32", chunks=(1024, 2)
        )
        for tile_id, row in enumerate(tiles.itertuples()):
            image, _ = read_raster(tiles_dir / str(row.image))
            label, _ = read_raster(tiles_dir / str(row.label))
            if image.shape[0] != n_bands:
                raise ValueError(
                    f"{tiles_dir / str(row.image)}: {image.shape[0]} bands, expected {n_bands} ({bands})"
                )
            try:
                windows = window_grid(image.shape[1], image.shape[2], size, overlap)
            except ValueError as err:
                raise ValueError(f"tile {row.tile}: {err}; lower patches.size_px") from err
            start = image_ds.shape[0]
            for ds in (image_ds, mask_ds, tile_ds, offset_ds):
                ds.resize(start + len(windows), axis=0)
            tile_ds[start:] = tile_id
            offset_ds[start:] = [(w.row, w.col) for w in windows]
            # In batches: with overlap, all windows of a large tile together are several times
            # the tile's size, and memory must stay bounded by the tile.
            for first in range(0, len(windows), WRITE_BATCH):
                batch = windows[first : first + WRITE_BATCH]
                at = slice(start + first, start + first + len(batch))
                image_ds[at] = np.stack([image[(slice(None), *w.slices)] for w in batch])
                mask_ds[at] = np.stack([label[0][w.slices] for w in batch])
            tiles_done.update(1)
        h5.attrs.update(
            size=size,
            overlap=overlap,
            stride=stride_for(size, overlap),
            **_description(tiles, stats, bands),
        )
        return int(image_ds.shape[0])


VALIDATION_CHUNK = 256
"""Rows and columns of one chunk of a whole validation tile (read whole, so any size works)."""


def write_validation_tiles(
    tiles: pd.DataFrame, tiles_dir: Path, out_path: Path, *, stats: BandStats, bands: list[str]
) -> int:
    """Copy every tile of `tiles` whole into one HDF5 file: `tiles/<id>/image` (bands, H, W)
    float32 as the `tiles` stage wrote it (not normalised; the training statistics travel as
    attributes) and `tiles/<id>/reference` (H, W) uint8, the eroded reference (255 = boundary,
    not scored), as `evaluate` scores the test tiles. Returns the number of pixels scored.

    Raises ValueError naming the file when a tile has other bands than `bands`, or no tile is given.
    """
    if tiles.empty:
        raise ValueError(f"{out_path}: no validation tiles (data.val_tiles)")
    scored = 0
    with atomic_path(out_path) as tmp, h5py.File(tmp, "w") as h5:
        for row in track(list(tiles.itertuples()), f"tiles {out_path.name}", unit="tile"):
            image, _ = read_raster(tiles_dir / str(row.image))
            reference, _ = read_raster(tiles_dir / str(row.label_eroded))
            if image.shape[0] != len(bands):
                raise ValueError(
                    f"{tiles_dir / str(row.image)}: {image.shape[0]} bands, expected {len(bands)} ({bands})"
                )
            group = h5.create_group(f"tiles/{row.tile}")
            chunk = (min(VALIDATION_CHUNK, image.shape[1]), min(VALIDATION_CHUNK, image.shape[2]))
            group.create_dataset("image", data=image.astype(np.float32), chunks=(len(bands), *chunk))
            group.create_dataset("reference", data=reference[0].astype(np.uint8), chunks=chunk)
            scored += int(np.count_nonzero(reference[0] != IGNORE_INDEX))
        h5.attrs.update(kind="tiles", reference="eroded", **_description(tiles, stats, bands))
    return scored


def _description(tiles: pd.DataFrame, stats: BandStats, bands: list[str]) -> dict[str, Any]:
    """The attributes both files carry: bands, legend, ignore index, training statistics, tiles."""
    return {
        "bands": json.dumps(bands),
        "classes": json.dumps(legend()),
        "ignore_index": IGNORE_INDEX,
        "mean": np.asarray(stats.mean, dtype=np.float64),
        "std": np.asarray(stats.std, dtype=np.float64),
        "tiles": json.dumps([str(t) for t in tiles["tile"]]),
    }


@dataclass(frozen=True)
class TileFileInfo:
    """What a file of whole validation tiles says about itself."""

    path: Path
    tiles: list[str]
    bands: list[str]
    stats: BandStats


def read_tile_file_info(path: Path) -> TileFileInfo:
    """Raises FileNotFoundError or ValueError (naming `path`) when it is missing or not a tile file."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no validation tile file; run the `patches` stage first")
    with open_h5(path) as h5:
        kind = h5.attrs.get("kind")
        if kind != "tiles":
            found = "no attribute `kind`" if kind is None else f"attribute `kind` {kind!r}"
            raise PatchFileError(
                f"{path}: not a file of whole validation tiles ({found}, expected `kind` 'tiles'); "
                f"{RERUN_PATCHES}"
            )
        return TileFileInfo(
            path=path,
            tiles=json.loads(h5_attr(h5, "tiles")),
            bands=json.loads(h5_attr(h5, "bands")),
            stats=BandStats(tuple(h5_attr(h5, "mean").tolist()), tuple(h5_attr(h5, "std").tolist())),
        )


@dataclass(frozen=True)
class PatchFileInfo:
    """What a patch file says about itself."""

    path: Path
    length: int
    size: int
    overlap: float
    stride: int
    bands: list[str]
    tiles: list[str]
    stats: BandStats


def read_patch_info(path: Path) -> PatchFileInfo:
    """Raises FileNotFoundError or PatchFileError (naming `path`) when it is missing or not a patch file."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no patch file; run the `patches` stage first")
    with open_h5(path) as h5:
        return PatchFileInfo(
            path=path,
            length=int(h5_dataset(h5, "image").shape[0]),
            size=int(h5_attr(h5, "size")),
            overlap=float(h5_attr(h5, "overlap")),
            stride=int(h5_attr(h5, "stride")),
            bands=json.loads(h5_attr(h5, "bands")),
            tiles=json.loads(h5_attr(h5, "tiles")),
            stats=BandStats(tuple(h5_attr(h5, "mean").tolist()), tuple(h5_attr(h5, "std").tolist())),
        )


# --------------------------------------------------------------------------------------
# Opening the files for reading: every failure names the file and what to do


RERUN_PATCHES = "rerun the `patches` stage (`dvc repro patches`, or `dvc checkout` for the stored one)"


class PatchFileError(ValueError):
    """A patch or validation tile file is not HDF5, truncated, corrupt or lacks what it should hold."""


def open_h5_file(path: Path) -> h5py.File:
    """h5py.File(path, "r"); a file that is not HDF5 or is truncated raises PatchFileError naming it."""
    try:
        return h5py.File(path, "r")
    except OSError as err:
        detail = _first_line(err)
        if "truncated file" in detail:
            what = f"truncated (an interrupted write or copy? {detail})"
        elif "signature not found" in detail:
            size = path.stat().st_size if path.is_file() else 0
            what = f"not an HDF5 file ({size} bytes without the HDF5 signature)"
        else:
            what = f"cannot be opened as an HDF5 file ({detail})"
        raise PatchFileError(f"{path}: {what}; {RERUN_PATCHES}") from err


@contextmanager
def open_h5(path: Path) -> Iterator[h5py.File]:
    """open_h5_file(path) for the block; data it cannot read raises PatchFileError naming `path`."""
    with open_h5_file(path) as h5:
        try:
            yield h5
        except OSError as err:
            raise h5_read_error(path, err) from err


def h5_read_error(path: Path, err: OSError, what: str = "data") -> PatchFileError:
    """A chunk of an HDF5 file that opened cannot be read (a corrupt or partly overwritten file)."""
    return PatchFileError(
        f"{path}: {what} cannot be read (corrupt or truncated file? {_first_line(err)}); {RERUN_PATCHES}"
    )


def h5_attr(h5: h5py.File, name: str) -> Any:
    """Attribute `name` of the file; PatchFileError naming the file and the attribute when it is missing."""
    if name not in h5.attrs:
        raise PatchFileError(
            f"{h5.filename}: missing attribute `{name}` (found {sorted(h5.attrs) or 'none'}); expected a "
            f"self-describing file written by the `patches` stage; {RERUN_PATCHES}"
        )
    return h5.attrs[name]


def h5_dataset(h5: h5py.File, name: str) -> h5py.Dataset:
    """Dataset `name` of the file; PatchFileError naming the file and the dataset when it is missing."""
    found = h5.get(name)
    if not isinstance(found, h5py.Dataset):
        raise PatchFileError(
            f"{h5.filename}: missing dataset `{name}`; expected a file written by the `patches` stage; "
            f"{RERUN_PATCHES}"
        )
    return found


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# --------------------------------------------------------------------------------------
# The `patches` stage's sequence, in one place for the stage script and the test fixtures


@dataclass(frozen=True)
class PatchesSummary:
    """What `build_patches` wrote: `train_patches` windows of `size` px from `train_tiles` tiles in
    `train_path`; `val_tiles` whole tiles with `val_pixels` pixels of eroded reference in `val_path`;
    `stats`, the training tiles' band statistics both files carry."""

    train_path: Path
    train_tiles: int
    train_patches: int
    val_path: Path
    val_tiles: int
    val_pixels: int
    size: int
    stats: BandStats


def build_patches(
    tiles_dir: Path, out_dir: Path, *, size: int, overlap: float, bands: list[str]
) -> PatchesSummary:
    """The `patches` stage: `out_dir/train.h5` (`write_patches`: `size` x `size` px windows of the
    training tiles, `overlap` a fraction of `size`) and `out_dir/val.h5` (`write_validation_tiles`:
    the validation tiles whole), both from the `tiles` stage's output in `tiles_dir` (tiles.csv).

    The band statistics come from the training tiles only: nothing of the validation or test tiles
    may shape the inputs. Raises what `read_tiles_table`, `band_statistics`, `write_patches` and
    `write_validation_tiles` raise, naming the file (no training tile, a tile with other bands).
    """
    train_tiles = read_tiles_table(tiles_dir, "train")
    val_tiles = read_tiles_table(tiles_dir, "val")
    stats = band_statistics([tiles_dir / name for name in train_tiles["image"]])
    train_path, val_path = out_dir / "train.h5", out_dir / "val.h5"
    count = write_patches(
        train_tiles, tiles_dir, train_path, size=size, overlap=overlap, stats=stats, bands=bands
    )
    scored = write_validation_tiles(val_tiles, tiles_dir, val_path, stats=stats, bands=bands)
    return PatchesSummary(train_path, len(train_tiles), count, val_path, len(val_tiles), scored, size, stats)
