"""`aerialseg predict`: class maps of GeoTIFFs of any size, in bounded memory.

The command's own job: collect and check the inputs (files, or folders of GeoTIFFs), then for each
open it as a `raster_source.RasterSource`, run the one sliding-window engine
(`inference.stream_blocks`, the same windows, TTA, blending and precision as `evaluate`) and write
the finished row blocks as they come.

Outputs, for an input `<stem>.tif`, in the output folder, each written under a temporary name
and renamed only when complete:

- `<stem>.tif`: uint8 class index (0-5), 255 = nodata, georeferenced like the input (its CRS and
  transform, or its GCPs); a palette TIFF in the ISPRS colours (`raster.geotiff_writer`: tiled
  256 x 256, deflate);
- `<stem>_probabilities.tif` (optional): one uint8 band per class, round(255 x probability)
  (band scale 1/255 set, so GDAL-aware tools read probabilities), an internal mask for nodata;
- with `cog`, both GeoTIFFs are Cloud Optimized GeoTIFFs with overviews (`raster.to_cog`; the
  class map's overviews take the most frequent class), same pixels, palette and nodata;
- `<stem>.png` (optional): the class map in ISPRS colours, decimated to at most `preview_size` px
  on its longer side; nodata black;
- `<stem>.gpkg` (optional, `vector`): the class map as polygons per class, fields `class` and
  `class_index`, in the input's CRS, nodata left out (`vectors.write_class_polygons`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import rasterio
from PIL import Image
from torch import nn

from aerialseg.classes import IGNORE_INDEX, index_to_colours
from aerialseg.devices import DeviceError
from aerialseg.files import atomic_path
from aerialseg.inference import Settings, count_windows, stream_blocks
from aerialseg.model_card import ModelCard
from aerialseg.progress import progress_bar
from aerialseg.raster import GeoReference, geotiff_writer
from aerialseg.raster_source import RasterSource, Units, check_units, open_input
from aerialseg.vectors import write_class_polygons

NODATA = IGNORE_INDEX
"""Class value of pixels that are nodata in the input (255, also the output's nodata value)."""
GDAL_CACHE_MB = 64
"""GDAL's block cache, capped: its default (5% of RAM) would otherwise keep the blocks of a large
input that were already read, and hide whether prediction itself runs in bounded memory."""
RASTER_SUFFIXES = (".tif", ".tiff")


class PredictError(ValueError):
    """The command cannot run as asked (options, folders, outputs that would collide)."""


# --------------------------------------------------------------------------- files and folders


@dataclass(frozen=True)
class PredictOptions:
    engine: Settings = field(default_factory=lambda: Settings(window=0, precision="auto", device="auto"))
    """The sliding window's choices (inference.Settings); window 0 = the model's training patch size."""
    probabilities: bool = False
    preview: bool = True
    preview_size: int = 2048
    """Longest side of the PNG preview in px; larger class maps are decimated (nearest)."""
    cog: bool = False
    """Write the GeoTIFFs as Cloud Optimized GeoTIFFs with overviews (raster.to_cog)."""
    vector: bool = False
    """Also write `<stem>.gpkg`: the class map as polygons per class (vectors.write_class_polygons)."""
    progress: bool = True
    units: Units = "tiles"
    """tiles: bands as the `tiles` stage writes them; isprs: the ISPRS products' own units."""


@dataclass(frozen=True)
class OutputPaths:
    classes: Path
    probabilities: Path | None
    preview: Path | None
    vector: Path | None = None

    def all(self) -> list[Path]:
        return [p for p in (self.classes, self.probabilities, self.preview, self.vector) if p is not None]


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
        vector=output_dir / f"{stem}.gpkg" if options.vector else None,
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
    settings = replace(options.engine, window=options.engine.window or card.window)
    try:
        return settings.check().resolve()
    except DeviceError as err:
        raise PredictError(str(err)) from None
    except ValueError as err:
        raise PredictError(f"window {settings.window} px, overlap {settings.overlap}: {err}") from None


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
        tags = {
            "aerialseg_model": model_name,
            "aerialseg_input": path.name,
            "aerialseg_window": str(window),
            "aerialseg_overlap": str(settings.overlap),
            "aerialseg_tta": settings.tta,
            "aerialseg_blend": settings.blend,
            "aerialseg_precision": settings.precision,
            "aerialseg_classes": json.dumps([dict(c) for c in card.classes]),
        }
        # Each output under a temporary name: on any error it is removed, and nothing appears under
        # the final names; the GeoTIFFs are georeferenced like the input (its transform or GCPs).
        on_input_grid = functools.partial(
            geotiff_writer, height=height, width=width, georef=GeoReference.of(src), cog=options.cog
        )
        class_writer = stack.enter_context(
            on_input_grid(
                paths.classes,
                count=1,
                dtype=np.uint8,
                nodata=NODATA,
                band_names=["class"],
                tags=tags,
                class_map=True,
            )
        )
        prob_writer = None
        if paths.probabilities is not None:
            prob_writer = stack.enter_context(
                on_input_grid(
                    paths.probabilities,
                    count=card.num_classes,
                    dtype=np.uint8,
                    band_names=card.class_names,
                    tags={**tags, "aerialseg_scale": "probability = value / 255"},
                    scales=(1.0 / 255.0,) * card.num_classes,
                    mask=True,
                )
            )
        tmp_preview = stack.enter_context(atomic_path(paths.preview)) if paths.preview else None
        step = max(1, math.ceil(max(height, width) / options.preview_size))
        preview_rows: list[np.ndarray] = []
        desc = f"predict {path.name}" if options.progress else None
        with progress_bar(desc, total=n_windows, unit="window") as bar:
            for block in stream_blocks(model, reader, settings, progress=bar.update):
                classes = block.probabilities.argmax(axis=0).astype(np.uint8)
                if block.valid is not None:
                    classes[~block.valid] = NODATA
                counts += np.bincount(classes.ravel(), minlength=256)
                class_writer.add(classes)
                if prob_writer is not None:
                    scaled = np.rint(block.probabilities * 255.0).astype(np.uint8)
                    if block.valid is not None:
                        scaled[:, ~block.valid] = 0
                    prob_writer.add(scaled, block.valid)
                if tmp_preview is not None:
                    preview_rows.append(classes[(-block.row) % step :: step, ::step])
        if tmp_preview is not None:
            Image.fromarray(index_to_colours(np.concatenate(preview_rows, axis=0))).save(tmp_preview, "PNG")
    if paths.vector is not None:  # from the finished class map: its pixels, its georeference
        write_class_polygons(paths.classes, paths.vector, card.class_names)
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
