"""`aerialseg predict`: class maps of GeoTIFFs of any size, in bounded memory.

The command's own job: collect and check the inputs (files, or folders of GeoTIFFs), then for each
open it as a `raster_source.RasterSource`, run the one sliding-window engine
(`inference.stream_blocks`, the same windows, TTA, blending and precision as `evaluate`) and write
the finished row blocks as they come.

Outputs, for an input `<stem>.tif`, in the output folder, each written under a temporary name
and renamed only when complete:

- `<stem>.tif`: uint8 class index (0-5), 255 = nodata, the input's CRS and transform, tiled
  256 x 256, deflate, the ISPRS colour table embedded;
- `<stem>_probabilities.tif` (optional): one uint8 band per class, round(255 x probability)
  (band scale 1/255 set, so GDAL-aware tools read probabilities), an internal mask for nodata;
- `<stem>.png` (optional): the class map in ISPRS colours, decimated to at most `preview_size` px
  on its longer side; nodata black.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from PIL import Image
from rasterio.io import DatasetReader, DatasetWriter
from rasterio.windows import Window as RasterWindow
from torch import nn

from aerialseg.classes import CLASSES, IGNORE_INDEX, index_to_colours
from aerialseg.devices import DeviceError
from aerialseg.files import atomic_path
from aerialseg.inference import Settings, count_windows, stream_blocks
from aerialseg.model_card import ModelCard
from aerialseg.progress import progress_bar
from aerialseg.raster_source import RasterSource, Units, check_units, open_input

NODATA = IGNORE_INDEX
"""Class value of pixels that are nodata in the input (255, also the output's nodata value)."""
TILE = 256
"""Output GeoTIFF tile size; finished rows are written in whole tile rows."""
GDAL_CACHE_MB = 64
"""GDAL's block cache, capped: its default (5% of RAM) would otherwise keep the blocks of a large
input that were already read, and hide whether prediction itself runs in bounded memory."""
RASTER_SUFFIXES = (".tif", ".tiff")


class PredictError(ValueError):
    """The command cannot run as asked (options, folders, outputs that would collide)."""


# --------------------------------------------------------------------------- GeoTIFF output


class _TileRowWriter:
    """Buffers finished rows and writes them to a dataset in whole tile rows (multiples of TILE),
    so that no compressed tile is written twice."""

    def __init__(self, dst: DatasetWriter, *, mask: bool = False) -> None:
        self.dst, self.mask = dst, mask
        self.row = 0
        self.parts: list[np.ndarray] = []
        self.valid_parts: list[np.ndarray] = []

    def add(self, data: np.ndarray, valid: np.ndarray | None) -> None:
        self.parts.append(data)
        if self.mask:
            self.valid_parts.append(np.ones(data.shape[1:], bool) if valid is None else valid)
        buffered = sum(p.shape[1] for p in self.parts)
        end = (self.row + buffered) // TILE * TILE
        if end > self.row:
            self._write(end - self.row)

    def close(self) -> None:
        buffered = sum(p.shape[1] for p in self.parts)
        if buffered:
            self._write(buffered)

    def _write(self, rows: int) -> None:
        data = np.concatenate(self.parts, axis=1)
        window = RasterWindow(0, self.row, data.shape[2], rows)
        self.dst.write(data[:, :rows], window=window)
        self.parts = [data[:, rows:]] if data.shape[1] > rows else []
        if self.mask:
            valid = np.concatenate(self.valid_parts, axis=0)
            self.dst.write_mask(np.where(valid[:rows], 255, 0).astype(np.uint8), window=window)
            self.valid_parts = [valid[rows:]] if valid.shape[0] > rows else []
        self.row += rows


def _profile(src: DatasetReader, count: int, nodata: int | None) -> dict[str, Any]:
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "height": src.height,
        "width": src.width,
        "count": count,
        "dtype": "uint8",
        "crs": src.crs,
        "transform": src.transform,
        "nodata": nodata,
        "compress": "deflate",
        "BIGTIFF": "IF_SAFER",
    }
    # GDAL tiles must be multiples of 16; rasters smaller than a tile stay striped.
    if src.height >= TILE and src.width >= TILE:
        profile.update(tiled=True, blockxsize=TILE, blockysize=TILE)
    return profile


def _copy_gcps(src: DatasetReader, dst: DatasetWriter) -> None:
    gcps, gcp_crs = src.gcps
    if gcps:  # georeferenced by ground control points rather than a transform
        dst.gcps = (gcps, gcp_crs)


# --------------------------------------------------------------------------- files and folders


@dataclass(frozen=True)
class PredictOptions:
    window: int | None = None
    """Window size in px (multiple of 32); None = the patch size the model was trained on."""
    overlap: float = 0.5
    batch_size: int = 4
    tta: str = "none"
    """none, flip or d4 (inference.TTA)."""
    blend: str = "uniform"
    """uniform, cosine or gaussian (inference.BLENDS)."""
    device: str = "auto"
    """auto, cpu, cuda or mps (devices.resolve_device)."""
    precision: str = "auto"
    """auto (bfloat16 where the device runs it natively), 32 or bf16."""
    probabilities: bool = False
    preview: bool = True
    preview_size: int = 2048
    """Longest side of the PNG preview in px; larger class maps are decimated (nearest)."""
    progress: bool = True
    units: Units = "tiles"
    """tiles: bands as the `tiles` stage writes them; isprs: the ISPRS products' own units."""


@dataclass(frozen=True)
class OutputPaths:
    classes: Path
    probabilities: Path | None
    preview: Path | None

    def all(self) -> list[Path]:
        return [p for p in (self.classes, self.probabilities, self.preview) if p is not None]


@dataclass
class PredictResult:
    input: Path
    outputs: OutputPaths
    height: int
    width: int
    windows: int
    nodata_pixels: int
    seconds: float
    class_pixels: dict[str, int] = field(default_factory=dict)


def output_paths(path: Path, output_dir: Path, options: PredictOptions) -> OutputPaths:
    stem = path.stem
    return OutputPaths(
        classes=output_dir / f"{stem}.tif",
        probabilities=output_dir / f"{stem}_probabilities.tif" if options.probabilities else None,
        preview=output_dir / f"{stem}.png" if options.preview else None,
    )


def collect_inputs(inputs: Sequence[Path]) -> list[Path]:
    """Files as given, folders as the *.tif / *.tiff files in them (not recursive), sorted."""
    files: list[Path] = []
    for path in inputs:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in RASTER_SUFFIXES)
            if not found:
                raise PredictError(f"{path}: folder has no *.tif or *.tiff files; expected GeoTIFFs")
            files.extend(found)
        else:
            files.append(path)  # a missing file is reported by open_input, with what was expected
    stems: dict[str, Path] = {}
    for path in files:
        if path.stem in stems:
            raise PredictError(
                f"{path} and {stems[path.stem]}: same name {path.stem!r}, so their outputs would collide"
            )
        stems[path.stem] = path
    return files


def engine_settings(card: ModelCard, options: PredictOptions) -> Settings:
    """The engine's settings for these options, checked and resolved for this machine (device and
    precision decided here, once); PredictError naming the option otherwise."""
    window = int(options.window or card.window)
    settings = Settings(
        window=window,
        overlap=options.overlap,
        batch_size=options.batch_size,
        tta=options.tta,
        blend=options.blend,
        precision=options.precision,
        device=options.device,
    )
    try:
        return settings.check().resolve()
    except DeviceError as err:
        raise PredictError(str(err)) from None
    except ValueError as err:
        raise PredictError(f"window {window} px, overlap {options.overlap}: {err}") from None


def predict_paths(
    model: nn.Module,
    card: ModelCard,
    inputs: Sequence[Path],
    output_dir: Path,
    options: PredictOptions,
    *,
    model_name: str = "",
    on_done: Callable[[PredictResult], object] | None = None,
) -> list[PredictResult]:
    """Predict every input (files, or folders of GeoTIFFs) into `output_dir`.

    Every input is checked (exists, is a raster, has the model's band count, or one more that is
    alpha, its spectral bands are in `options.units`) before the first is predicted, so a bad file
    in a folder fails the command before it spends any time.
    """
    settings = engine_settings(card, options)
    files = collect_inputs(inputs)
    for path in files:
        with open_input(path, card) as src:
            check_units(src, card, options.units)
        for out in output_paths(path, output_dir, options).all():
            if out.resolve() == path.resolve():
                raise PredictError(
                    f"{path}: the output {out} would overwrite the input; choose another --output"
                )
    results = []
    for path in files:
        result = predict_file(
            model, card, path, output_dir, options, model_name=model_name, settings=settings
        )
        if on_done is not None:
            on_done(result)
        results.append(result)
    return results


def predict_file(
    model: nn.Module,
    card: ModelCard,
    path: Path,
    output_dir: Path,
    options: PredictOptions,
    *,
    model_name: str = "",
    settings: Settings | None = None,
) -> PredictResult:
    """Predict one GeoTIFF into `output_dir` (see the module doc for the outputs).

    `settings`: the engine's, resolved already by `predict_paths`, which also checked every input's
    spectral units first (so the decimated reads are not repeated); None does both here."""
    started = time.perf_counter()
    checked = settings is not None
    settings = settings or engine_settings(card, options)
    window = settings.window
    paths = output_paths(path, output_dir, options)
    output_dir.mkdir(parents=True, exist_ok=True)
    counts = np.zeros(256, dtype=np.int64)
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB), contextlib.ExitStack() as stack:
        src = stack.enter_context(open_input(path, card))
        if not checked:
            check_units(src, card, options.units)
        reader = RasterSource(src, card, options.units)
        height, width = reader.height, reader.width
        n_windows = count_windows(height, width, settings)
        # Temporary names first: on any error they are removed, and nothing appears under the final names.
        tmp_classes = stack.enter_context(atomic_path(paths.classes))
        tmp_probs = stack.enter_context(atomic_path(paths.probabilities)) if paths.probabilities else None
        tmp_preview = stack.enter_context(atomic_path(paths.preview)) if paths.preview else None
        tags = {
            "aerialseg_model": model_name,
            "aerialseg_input": path.name,
            "aerialseg_window": str(window),
            "aerialseg_overlap": str(options.overlap),
            "aerialseg_tta": settings.tta,
            "aerialseg_blend": settings.blend,
            "aerialseg_precision": settings.precision,
            "aerialseg_classes": json.dumps([dict(c) for c in card.classes]),
        }
        dst = stack.enter_context(rasterio.open(tmp_classes, "w", **_profile(src, 1, NODATA)))
        _copy_gcps(src, dst)
        dst.write_colormap(1, {**{c.index: (*c.colour, 255) for c in CLASSES}, NODATA: (0, 0, 0, 0)})
        dst.set_band_description(1, "class")
        dst.update_tags(**tags)
        class_writer = _TileRowWriter(dst)
        prob_writer = None
        if tmp_probs is not None:
            pdst = stack.enter_context(rasterio.open(tmp_probs, "w", **_profile(src, card.num_classes, None)))
            _copy_gcps(src, pdst)
            pdst.scales = (1.0 / 255.0,) * card.num_classes
            for i, name in enumerate(card.class_names, start=1):
                pdst.set_band_description(i, name)
            pdst.update_tags(**tags, aerialseg_scale="probability = value / 255")
            prob_writer = _TileRowWriter(pdst, mask=True)
        step = max(1, math.ceil(max(height, width) / options.preview_size))
        preview_rows: list[np.ndarray] = []
        desc = f"predict {path.name}" if options.progress else None
        with progress_bar(desc, total=n_windows, unit="window") as bar:
            for block in stream_blocks(model, reader, settings, progress=bar.update):
                classes = block.probabilities.argmax(axis=0).astype(np.uint8)
                if block.valid is not None:
                    classes[~block.valid] = NODATA
                counts += np.bincount(classes.ravel(), minlength=256)
                class_writer.add(classes[np.newaxis], block.valid)
                if prob_writer is not None:
                    scaled = np.rint(block.probabilities * 255.0).astype(np.uint8)
                    if block.valid is not None:
                        scaled[:, ~block.valid] = 0
                    prob_writer.add(scaled, block.valid)
                if tmp_preview is not None:
                    preview_rows.append(classes[(-block.row) % step :: step, ::step])
        class_writer.close()
        if prob_writer is not None:
            prob_writer.close()
        if tmp_preview is not None:
            Image.fromarray(index_to_colours(np.concatenate(preview_rows, axis=0))).save(tmp_preview, "PNG")
    names = card.class_names
    return PredictResult(
        input=path,
        outputs=paths,
        height=height,
        width=width,
        windows=n_windows,
        nodata_pixels=int(counts[NODATA]),
        seconds=time.perf_counter() - started,
        class_pixels={name: int(counts[i]) for i, name in enumerate(names)},
    )
