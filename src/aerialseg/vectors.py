"""A class map as polygons per class in a GeoPackage (`aerialseg predict --vector`).

One polygon per 4-connected region of one class, traced by GDAL's polygonizer
(`rasterio.features.shapes` over the class map's band, GDALPolygonize), with holes where other
classes lie inside it; edges on pixel edges, coordinates in the class map's CRS and map units
(for a raster georeferenced by GCPs: the affine transform fitted to them, as GDAL's warper does
without a polynomial). Fields: `class` (the class name) and `class_index`. Pixels of the class
map's nodata value give no polygon.

No minimum area and no simplification: polygons on pixel edges tile the class map exactly (their
areas add up to the class pixel counts, neighbours share edges), which simplification would break,
and a threshold on area is the user's choice for their map, one `WHERE` in any GIS.

Memory: GDAL traces the band reading it row by row, but rasterio's `shapes` keeps every polygon
of the map in an in-memory OGR layer before handing them on; they are written to the GeoPackage in
batches of WRITE_BATCH_VERTICES vertices. So memory grows with the polygons' vertices, not with the
pixels: on a 6000 x 6000 px class map (a generated scene tiled; 3,494 polygons, 1.25 M vertices)
peak memory grew by 114 MB in 3.7 s, where reading the class map whole grew it by 86 MB
(`benchmarks/bench_gis_outputs.py`; AMD EPYC, 2 cores shared with other jobs). A noisy class map,
with many small regions, holds more.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyogrio.raw
import rasterio
import shapely
import shapely.affinity
import shapely.geometry
from rasterio.features import shapes
from rasterio.io import DatasetReader
from rasterio.transform import from_gcps

from aerialseg.files import atomic_path

LAYER = "classes"
"""Layer name of the polygons in the GeoPackage."""

WRITE_BATCH_VERTICES = 100_000
"""Polygons are written to the GeoPackage in batches of about this many vertices: as GeoJSON-like
Python objects a vertex costs ~200 bytes, so a batch ~20 MB."""

FIELDS = ("class", "class_index")
"""The polygons' attributes: the class name and its index in the class map."""

_Item = tuple[dict[str, Any], int]


def write_class_polygons(class_map: Path, out: Path, class_names: Sequence[str]) -> dict[str, int]:
    """Write the polygons of the uint8 class map GeoTIFF `class_map` (class i named class_names[i],
    its nodata value skipped) to the GeoPackage `out`, atomically; returns polygons per class name.

    Raises ValueError naming `class_map` for a value that is neither a class index nor nodata.
    """
    counts = dict.fromkeys(class_names, 0)
    with rasterio.open(class_map) as src, atomic_path(out) as tmp:
        nodata = None if src.nodata is None else int(src.nodata)
        crs = src.crs
        gcps, gcps_crs = src.gcps
        fitted = None
        if crs is None and gcps:
            # No geotransform: GDAL traces in pixel coordinates, mapped here by the GCPs' affine fit.
            fitted, crs = from_gcps(gcps), gcps_crs
        wkt = crs.to_wkt() if crs is not None else None
        written = False
        for batch in _batches(_polygons(src, nodata, len(class_names), class_map)):
            geometries = [shapely.geometry.shape(g) for g, _ in batch]
            if fitted is not None:
                a, b, c, d, e, f = fitted[:6]
                geometries = [shapely.affinity.affine_transform(g, (a, b, d, e, c, f)) for g in geometries]
            index = np.asarray([i for _, i in batch], dtype=np.int32)
            for i in index:
                counts[class_names[i]] += 1
            _write(tmp, geometries, [class_names[i] for i in index], index, wkt, append=written)
            written = True
        if not written:  # all nodata: an empty layer, so that the file still opens as one
            _write(tmp, [], [], np.zeros(0, np.int32), wkt, append=False)
    return counts


def _polygons(
    src: DatasetReader, nodata: int | None, num_classes: int, where: Path
) -> Iterator[tuple[dict[str, Any], int]]:
    """(GeoJSON-like polygon, class index) per region, in the raster's georeference."""
    for geometry, value in shapes(rasterio.band(src, 1), connectivity=4):
        index = int(value)
        if index == nodata:
            continue
        if not 0 <= index < num_classes:
            raise ValueError(
                f"{where}: class value {index} is neither a class index (0-{num_classes - 1}) "
                f"nor nodata ({nodata})"
            )
        yield geometry, index


def _batches(items: Iterator[_Item]) -> Iterator[list[_Item]]:
    """Polygons in batches of up to WRITE_BATCH_VERTICES vertices (a polygon larger than that alone)."""
    batch: list[_Item] = []
    vertices = 0
    for item in items:
        batch.append(item)
        vertices += sum(len(ring) for ring in item[0]["coordinates"])
        if vertices >= WRITE_BATCH_VERTICES:
            yield batch
            batch, vertices = [], 0
    if batch:
        yield batch


def _write(
    path: Path,
    geometries: Sequence[shapely.Geometry],
    names: Sequence[str],
    index: np.ndarray,
    crs_wkt: str | None,
    *,
    append: bool,
) -> None:
    pyogrio.raw.write(
        path,
        shapely.to_wkb(np.asarray(geometries, dtype=object)),
        [np.asarray(names, dtype=object), index],
        list(FIELDS),
        layer=LAYER,
        driver="GPKG",
        geometry_type="Polygon",
        crs=crs_wkt,
        append=append,
    )
