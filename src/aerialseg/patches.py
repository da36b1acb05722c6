"""Training patches and validation tiles in self-describing, chunked HDF5 files.

- `train.h5`: overlapping windows of the training tiles (`write_patches`), one patch a chunk.
- `val.h5`: the validation tiles whole, with their eroded reference (`write_validation_tiles`),
  so that validation predicts them with the sliding window of `evaluate` and counts each
  pixel once, as the test protocol does, instead of scoring overlapping patches.

Both are compact (FORMAT_VERSION 2): each band in the smallest type that holds the `tiles`
stage's values exactly or to half a step (BandCoding), compressed losslessly (COMPRESSION), and
described in the attributes; `data.Decode` makes normalised floats of them on the training device.
"""

from __future__ import annotations

import json
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin
import numpy as np
import pandas as pd

from aerialseg.classes import IGNORE_INDEX, legend
from aerialseg.datasets.tiles_table import read_tiles_table
from aerialseg.files import atomic_path
from aerialseg.progress import progress_bar, track
from aerialseg.raster import read_raster, read_row_blocks
from aerialseg.windows import stride_for, window_grid

WRITE_BATCH = 64
"""Patches copied to the HDF5 file at a time."""


@dataclass(frozen=True)
class BandStats:
    """Per-band mean and standard deviation, computed on the training tiles only."""

    mean: tuple[float, ...]
    std: tuple[float, ...]


def band_statistics(image_paths: list[Path]) -> BandStats:
    """Exact per-band mean/std over every pixel of the given tiles, summed in float64 over blocks
    of rows (raster.read_row_blocks): a float64 copy of a whole 6000 x 6000 x 5 Potsdam tile and of
    its square took 3.4 GiB (`make rehearsal`)."""
    count = 0
    total: np.ndarray | None = None
    total_sq: np.ndarray | None = None
    for path in track(image_paths, "band statistics", unit="tile"):
        for block in read_row_blocks(path, dtype="float64"):
            flat = block.reshape(block.shape[0], -1)
            total = flat.sum(axis=1) + (0 if total is None else total)
            total_sq = np.einsum("ij,ij->i", flat, flat) + (0 if total_sq is None else total_sq)
            count += flat.shape[1]
    if total is None or total_sq is None:
        raise ValueError("band statistics need at least one training tile")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    # A constant band would divide by zero; leave it unscaled instead.
    std = np.where(std > 1e-6, std, 1.0)
    return BandStats(tuple(mean.tolist()), tuple(std.tolist()))


FORMAT_VERSION = 2
"""Attribute `format_version` of train.h5 and val.h5. Files without it hold float32 bands (the
format before the compact one) and are refused with one line saying to rerun the stage."""

COMPRESSION = hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE)
"""Lossless, and the fastest to read of the filters measured (patches read in random order, page
cache warm). Default pipeline (256 px, 4 bands): Blosc LZ4 with byte shuffle 0.244 of the float32
bytes at the read speed of no filter; Blosc Zstd 0.205 at 4x the read time, gzip 0.198 at 14x,
LZF 0.239 at 8x, none 0.353. Potsdam size (`benchmarks/bench_patches.py`: 512 px, 5 bands):
LZ4 0.239 at 1.9x none's read time, Zstd 0.213 at 7.8x, gzip 0.202 at 23x, LZF 0.242 at 15x,
none 0.381. The synthetic orthophotos' noise leaves the uint8 bands incompressible to LZ4: the
gain is the heights (~0.5) and labels (~0.08). LZ4HC reads as fast and stores 0.232 (0.224 with
bit shuffle for heights) but writes ~20x slower."""
COMPRESSION_NAME = "blosc lz4 level 5, byte shuffle (hdf5plugin; `import hdf5plugin` before h5py reads it)"

STORED_DATASETS = ("image", "height")
"""Where the bands go: `image` the orthophoto's spectral bands (uint8), `height` the dsm/ndsm bands
(int16); a file holds only those with bands."""


@dataclass(frozen=True)
class BandCoding:
    """How one band is stored: channel `channel` of dataset `dataset`, of type `dtype`, holding
    round((value - offset) / scale), so that value = stored * scale + offset, in `units`.

    - Spectral bands (ir, r, g, b): reflectance 0-1 in the tiles, which the `tiles` stage makes from
      8-bit orthophotos as v / 255 (`datasets.isprs_convert`; the synthetic scenes too): stored as
      uint8 v, scale 1/255, exactly (decoded bit for bit). A source not in steps of 1/255 is
      rounded to the nearest step, at most 1/510 off; values outside 0-1 are clipped (a warning).
    - Heights (dsm, ndsm; metres): int16 centimetres, scale 0.01: at most 0.5 cm off (Potsdam's
      nDSM, whole decimetres, exactly), from -327.68 m to 327.67 m (the `dsm` band is height above
      the tile's 1st percentile; beyond that range values are clipped, with a warning).
    """

    band: str
    dataset: str
    channel: int
    dtype: str
    scale: float
    offset: float
    units: str


_CODING = {
    # dataset: (dtype, scale, units)
    "image": ("uint8", 1 / 255, "reflectance (0-1)"),
    "height": ("int16", 0.01, "m"),
}


def band_codings(bands: list[str]) -> list[BandCoding]:
    """The storage of each band of `bands`, in that order; ValueError for a band of no known kind."""
    # Here, not at the top: config's validators import modules that import this one.
    from aerialseg.config import HEIGHT_BANDS, SPECTRAL_BANDS

    codings: list[BandCoding] = []
    for band in bands:
        if band in SPECTRAL_BANDS:
            dataset = "image"
        elif band in HEIGHT_BANDS:
            dataset = "height"
        else:
            raise ValueError(
                f"band {band!r}: no compact storage for it; expected one of "
                f"{[*SPECTRAL_BANDS, *HEIGHT_BANDS]}"
            )
        dtype, scale, units = _CODING[dataset]
        channel = sum(c.dataset == dataset for c in codings)
        codings.append(BandCoding(band, dataset, channel, dtype, scale, 0.0, units))
    return codings


class QuantisationWarning(UserWarning):
    """Values of a tile beyond what their band's storage type holds, clipped to its range."""


def encode_bands(image: np.ndarray, codings: list[BandCoding], source: Path | str) -> dict[str, np.ndarray]:
    """(C, H, W) tile values -> the stored arrays: `{"image": (S, H, W) uint8, "height": (Hc, H, W)
    int16}`, only those with bands, each value rounded to its band's step (BandCoding).

    Values beyond a type's range are clipped, with a QuantisationWarning naming `source`, the band,
    the pixel count and the range found; a NaN raises ValueError naming them.
    """
    out: dict[str, np.ndarray] = {}
    for dataset in STORED_DATASETS:
        mine = [(i, c) for i, c in enumerate(codings) if c.dataset == dataset]
        if mine:
            out[dataset] = np.empty((len(mine), *image.shape[1:]), dtype=mine[0][1].dtype)
            for i, c in mine:
                out[dataset][c.channel] = _quantise(image[i], c, source)
    return out


def _quantise(values: np.ndarray, coding: BandCoding, source: Path | str) -> np.ndarray:
    steps = np.asarray(values, dtype=np.float32) - np.float32(coding.offset)
    # Times 1/scale (255, 100: exact in float32), not divided by scale: v / 255 comes back as v.
    steps *= np.float32(1 / coding.scale)
    np.rint(steps, out=steps)
    nan = int(np.count_nonzero(np.isnan(steps)))
    if nan:
        raise ValueError(f"{source}: band {coding.band}: {nan} pixels are NaN; expected finite values")
    info = np.iinfo(coding.dtype)
    outside = int(np.count_nonzero((steps < info.min) | (steps > info.max)))
    if outside:
        low, high = (info.min * coding.scale + coding.offset, info.max * coding.scale + coding.offset)
        found = (float(np.min(values)), float(np.max(values)))
        warnings.warn(
            f"{source}: band {coding.band}: {outside} pixels outside what {coding.dtype} in steps of "
            f"{coding.scale:g} {coding.units} holds ({low:g} to {high:g}; found {found[0]:g} to "
            f"{found[1]:g}): clipped to that range",
            QuantisationWarning,
            stacklevel=3,
        )
        np.clip(steps, info.min, info.max, out=steps)
    return steps.astype(coding.dtype)


def decode_bands(stored: dict[str, np.ndarray], codings: list[BandCoding]) -> np.ndarray:
    """The stored arrays (`encode_bands`' dict; channels on axis -3, e.g. (S, H, W) or (N, S, H, W))
    -> float32 (..., C, H, W) in tile units, bands in `codings`' order.

    Computed in float64 per band, then rounded to float32: a uint8 spectral value v decodes to the
    `tiles` stage's float32(v / 255) bit for bit.
    """
    first = stored[codings[0].dataset]
    out = np.empty((*first.shape[:-3], len(codings), *first.shape[-2:]), dtype=np.float32)
    for i, c in enumerate(codings):
        out[..., i, :, :] = stored[c.dataset][..., c.channel, :, :] * c.scale + c.offset
    return out


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

    Datasets (N patches of `size` px, one patch a chunk, COMPRESSION): `image` (N, S, size, size)
    uint8 and `height` (N, Hc, size, size) int16, the bands as BandCoding stores them (only those
    with bands); `mask` (N, size, size) uint8; `tile` (N,) and `offset` (N, 2) where each came from.
    Not normalised: the statistics (of the tile values) travel as attributes with each band's
    coding, and `data.Decode` turns a batch into normalised floats on the training device.
    Returns the number of patches written.
    """
    n_bands = len(bands)
    codings = band_codings(bands)
    stored = [d for d in STORED_DATASETS if any(c.dataset == d for c in codings)]
    bar = progress_bar(f"patches {out_path.name}", total=len(tiles), unit="tile")
    with atomic_path(out_path) as tmp, h5py.File(tmp, "w") as h5, bar as tiles_done:
        band_ds = {}
        for name in stored:
            channels = sum(c.dataset == name for c in codings)
            band_ds[name] = h5.create_dataset(
                name,
                shape=(0, channels, size, size),
                maxshape=(None, channels, size, size),
                dtype=_CODING[name][0],
                chunks=(1, channels, size, size),
                **COMPRESSION,
            )
        mask_ds = h5.create_dataset(
            "mask",
            shape=(0, size, size),
            maxshape=(None, size, size),
            dtype="uint8",
            chunks=(1, size, size),
            **COMPRESSION,
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
            arrays = encode_bands(image, codings, tiles_dir / str(row.image))
            del image  # the float tile: 4x the stored one
            start = mask_ds.shape[0]
            for ds in (*band_ds.values(), mask_ds, tile_ds, offset_ds):
                ds.resize(start + len(windows), axis=0)
            tile_ds[start:] = tile_id
            offset_ds[start:] = [(w.row, w.col) for w in windows]
            # In batches: with overlap, all windows of a large tile together are several times
            # the tile's size, and memory must stay bounded by the tile.
            for first in range(0, len(windows), WRITE_BATCH):
                batch = windows[first : first + WRITE_BATCH]
                at = slice(start + first, start + first + len(batch))
                for name, ds in band_ds.items():
                    ds[at] = np.stack([arrays[name][(slice(None), *w.slices)] for w in batch])
                mask_ds[at] = np.stack([label[0][w.slices] for w in batch])
            tiles_done.update(1)
        h5.attrs.update(
            size=size,
            overlap=overlap,
            stride=stride_for(size, overlap),
            **_description(tiles, stats, bands),
        )
        return int(mask_ds.shape[0])


VALIDATION_CHUNK = 256
"""Rows and columns of one chunk of a whole validation tile (read whole, so any size works)."""


def write_validation_tiles(
    tiles: pd.DataFrame, tiles_dir: Path, out_path: Path, *, stats: BandStats, bands: list[str]
) -> int:
    """Copy every tile of `tiles` whole into one HDF5 file: `tiles/<id>/image` (S, H, W) uint8 and
    `tiles/<id>/height` (Hc, H, W) int16, the bands as BandCoding stores them (not normalised; the
    training statistics travel as attributes; `read_validation_tile` decodes them), and
    `tiles/<id>/reference` (H, W) uint8, the eroded reference (255 = boundary, not scored), as
    `evaluate` scores the test tiles; chunks of VALIDATION_CHUNK px, COMPRESSION. Returns the
    number of pixels scored.

    Raises ValueError naming the file when a tile has other bands than `bands`, or no tile is given.
    """
    if tiles.empty:
        raise ValueError(f"{out_path}: no validation tiles (data.val_tiles)")
    codings = band_codings(bands)
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
            for name, array in encode_bands(image, codings, tiles_dir / str(row.image)).items():
                group.create_dataset(name, data=array, chunks=(len(array), *chunk), **COMPRESSION)
            del image
            group.create_dataset("reference", data=reference[0].astype(np.uint8), chunks=chunk, **COMPRESSION)
            scored += int(np.count_nonzero(reference[0] != IGNORE_INDEX))
        h5.attrs.update(kind="tiles", reference="eroded", **_description(tiles, stats, bands))
    return scored


def _description(tiles: pd.DataFrame, stats: BandStats, bands: list[str]) -> dict[str, Any]:
    """The attributes both files carry: the format version, bands and how each is stored, legend,
    ignore index, training statistics (of the tile values), tiles."""
    codings = band_codings(bands)
    return {
        "format_version": FORMAT_VERSION,
        "bands": json.dumps(bands),
        "band_dataset": json.dumps([c.dataset for c in codings]),
        "band_channel": np.asarray([c.channel for c in codings], dtype=np.int64),
        "band_dtype": json.dumps([c.dtype for c in codings]),
        "band_scale": np.asarray([c.scale for c in codings], dtype=np.float64),
        "band_offset": np.asarray([c.offset for c in codings], dtype=np.float64),
        "band_units": json.dumps([c.units for c in codings]),
        "compression": COMPRESSION_NAME,
        "classes": json.dumps(legend()),
        "ignore_index": IGNORE_INDEX,
        "mean": np.asarray(stats.mean, dtype=np.float64),
        "std": np.asarray(stats.std, dtype=np.float64),
        "tiles": json.dumps([str(t) for t in tiles["tile"]]),
    }


def _codings(h5: h5py.File, bands: list[str]) -> list[BandCoding]:
    """The bands' storage as the file describes it; PatchFileError for a file of another format."""
    version = h5.attrs.get("format_version")
    if version != FORMAT_VERSION:
        found = (
            "no attribute `format_version`: float32 bands, the format before the compact one"
            if version is None
            else f"format_version {version!r}"
        )
        raise PatchFileError(
            f"{h5.filename}: written in another patch format ({found}; this code reads format_version "
            f"{FORMAT_VERSION}); {RERUN_PATCHES}"
        )

    def listed(name: str) -> list[Any]:
        value = h5_attr(h5, name)
        return list(json.loads(value)) if isinstance(value, str) else np.asarray(value).tolist()

    names = ("band_dataset", "band_channel", "band_dtype", "band_scale", "band_offset", "band_units")
    described = {name: listed(name) for name in names}
    wrong = [name for name, values in described.items() if len(values) != len(bands)]
    if wrong:
        raise PatchFileError(
            f"{h5.filename}: attribute `{wrong[0]}` has {len(described[wrong[0]])} values for "
            f"{len(bands)} bands {bands}; {RERUN_PATCHES}"
        )
    return [
        BandCoding(band, str(d), int(ch), str(t), float(s), float(o), str(u))
        for band, d, ch, t, s, o, u in zip(bands, *described.values(), strict=True)
    ]


@dataclass(frozen=True)
class TileFileInfo:
    """What a file of whole validation tiles says about itself."""

    path: Path
    tiles: list[str]
    bands: list[str]
    stats: BandStats
    codings: list[BandCoding]


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
        tiles = json.loads(h5_attr(h5, "tiles"))
        bands = json.loads(h5_attr(h5, "bands"))
        stats = BandStats(tuple(h5_attr(h5, "mean").tolist()), tuple(h5_attr(h5, "std").tolist()))
        return TileFileInfo(path=path, tiles=tiles, bands=bands, stats=stats, codings=_codings(h5, bands))


def read_validation_tile(info: TileFileInfo, tile: str) -> tuple[np.ndarray, np.ndarray]:
    """Tile `tile` of a val.h5 described by `info`: the (C, H, W) float32 image in tile units
    (decoded, `decode_bands`; not normalised) and the (H, W) uint8 eroded reference (255 = not
    scored). PatchFileError naming the file when a dataset is missing or cannot be read."""
    with open_h5(info.path) as h5:
        stored = {
            name: h5_dataset(h5, f"tiles/{tile}/{name}")[:]
            for name in STORED_DATASETS
            if any(c.dataset == name for c in info.codings)
        }
        reference = h5_dataset(h5, f"tiles/{tile}/reference")[:]
    return decode_bands(stored, info.codings), reference


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
    codings: list[BandCoding]


def read_patch_info(path: Path) -> PatchFileInfo:
    """Raises FileNotFoundError or PatchFileError (naming `path`) when it is missing or not a patch file."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no patch file; run the `patches` stage first")
    with open_h5(path) as h5:
        size = int(h5_attr(h5, "size"))
        overlap = float(h5_attr(h5, "overlap"))
        stride = int(h5_attr(h5, "stride"))
        bands = json.loads(h5_attr(h5, "bands"))
        tiles = json.loads(h5_attr(h5, "tiles"))
        stats = BandStats(tuple(h5_attr(h5, "mean").tolist()), tuple(h5_attr(h5, "std").tolist()))
        codings = _codings(h5, bands)
        length = int(h5_dataset(h5, "mask").shape[0])
        for name in {c.dataset for c in codings}:
            found = h5_dataset(h5, name).shape
            channels = sum(c.dataset == name for c in codings)
            if found != (length, channels, size, size):
                raise PatchFileError(
                    f"{path}: dataset `{name}` has shape {found}, expected {(length, channels, size, size)} "
                    f"from its attributes; {RERUN_PATCHES}"
                )
        return PatchFileInfo(path, length, size, overlap, stride, bands, tiles, stats, codings)


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
        except RuntimeError as err:
            # h5py raises RuntimeError for a damaged group structure ("Object visitation failed
            # (wrong B-tree signature)"); a RuntimeError of other code passes through.
            if not _raised_by_h5py(err):
                raise
            raise h5_read_error(path, err) from err


def _raised_by_h5py(err: BaseException) -> bool:
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and "h5py" in Path(frames[-1].filename).parts  # h5py/h5o.pyx, .../h5py/_hl/...


def h5_read_error(path: Path, err: Exception, what: str = "data") -> PatchFileError:
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
