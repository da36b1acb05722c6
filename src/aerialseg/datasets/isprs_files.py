"""Find a dataset's files in raw_dir, whether the official zips or the folders extracted from them.

Zip members are never extracted: GDAL reads them in place through `/vsizip/` paths, with
windowed (random) access, so a 6000 x 6000 Potsdam tile costs no extra disk and no more
memory than the block being read.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from aerialseg.datasets.errors import DatasetLayoutError
from aerialseg.datasets.isprs_layout import LAYOUTS, DatasetLayout

MAX_FILE_DEPTH = 4
"""Files are looked for down to raw_dir/a/b/c/file: an archive extracted into a folder of its own
whose members sit under a top-level folder (raw_dir/x/ISPRS_semantic_labeling_Vaihingen/top/...)."""
MAX_ARCHIVE_DEPTH = 2
"""Archives are looked for in raw_dir and one folder down (raw_dir/downloads/x.zip)."""


@dataclass(frozen=True)
class RasterSource:
    """A raster file on disk, or a member of a zip archive."""

    path: Path
    """The file itself, or the zip archive that holds it."""
    member: str | None = None
    """The path inside the archive, with forward slashes; None for a file on disk."""

    @property
    def uri(self) -> str:
        """What rasterio opens: the path itself, or GDAL's in-place reader for zip members."""
        if self.member is None:
            return str(self.path)
        return f"/vsizip/{self.path.resolve()}/{self.member}"

    @property
    def name(self) -> str:
        return PurePosixPath(self.member).name if self.member is not None else self.path.name

    @property
    def folder(self) -> str:
        """The name of the folder the file sits in ('' at the top of an archive)."""
        if self.member is not None:
            return PurePosixPath(self.member).parent.name
        return self.path.parent.name

    def __str__(self) -> str:
        return str(self.path) if self.member is None else f"{self.path}!{self.member}"


@dataclass(frozen=True)
class TileFiles:
    """Every file found for one tile, by role (see isprs_layout)."""

    tile_id: str
    files: dict[str, RasterSource] = field(default_factory=dict)

    def get(self, role: str) -> RasterSource | None:
        return self.files.get(role)


def find_tiles(raw_dir: Path, layout: DatasetLayout, *, complete: bool = False) -> dict[str, TileFiles]:
    """Every tile of `layout` that has an orthophoto in `raw_dir`, by tile id, sorted.

    With `complete` (the tiles stage), a tile that has other files but no orthophoto is an error
    naming it, instead of a tile silently left out of `train_tiles: null`'s "all the others".

    When a file is found twice (an archive and its extracted folder, or the participant and the
    COMPLETE ground truth), files on disk win over zip members, then the first path in sorted order.
    """
    if not raw_dir.is_dir():
        raise DatasetLayoutError(f"{raw_dir}: folder does not exist; {_expected(layout)}")
    sources, nested_archives = _scan(raw_dir)
    found: dict[str, dict[str, RasterSource]] = {}
    for source in sources:
        for role in layout.roles:
            tile_id = role.tile_id(source.name, source.folder)
            if tile_id is not None:
                found.setdefault(tile_id, {}).setdefault(role.role, source)
                break
    tiles = {
        tile_id: TileFiles(tile_id, files)
        for tile_id, files in sorted(found.items(), key=lambda item: layout.sort_key(item[0]))
        if any(role in files for role in layout.ortho_roles)
    }
    if not tiles:
        raise DatasetLayoutError(_nothing_found(raw_dir, layout, sources, nested_archives))
    orphans = [tile_id for tile_id in found if tile_id not in tiles]
    if complete and orphans:  # a failed download, a deleted file
        spec = layout.role(layout.ortho_roles[0])
        raise DatasetLayoutError(
            f"{raw_dir}: no orthophoto for tile(s) with other files: "
            + "; ".join(
                f"{layout.tile_name(t)} (has {', '.join(s.name for s in found[t].values())}; missing "
                f"{spec.example.format(tile=t)} ({spec.where}))"
                for t in orphans
            )
        )
    return tiles


def _scan(raw_dir: Path) -> tuple[list[RasterSource], list[str]]:
    """Every file in raw_dir's folders, then every member of its zip archives.

    Also returns archives found inside archives (Potsdam.zip holds 1_DSM.zip, ...), which GDAL
    would have to decompress twice and which are therefore reported instead of read.
    """
    on_disk = sorted(_walk(raw_dir, MAX_FILE_DEPTH))
    members: list[RasterSource] = []
    nested: list[str] = []
    for path in on_disk:
        if path.suffix.lower() != ".zip" or len(path.relative_to(raw_dir).parts) > MAX_ARCHIVE_DEPTH:
            continue
        names = _archive_members(path)
        members += [RasterSource(path, name) for name in sorted(names) if not name.endswith("/")]
        nested += [f"{path}!{name}" for name in names if name.lower().endswith(".zip")]
    files = [RasterSource(path) for path in on_disk if path.suffix.lower() != ".zip"]
    return files + members, nested


def _walk(folder: Path, depth: int) -> Iterator[Path]:
    """Files down to `depth` levels below `folder`, skipping hidden ones (.dvc caches, .DS_Store)."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_file():
                yield Path(entry.path)
            elif entry.is_dir() and depth > 1:
                yield from _walk(Path(entry.path), depth - 1)


def _archive_members(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        raise DatasetLayoutError(f"{path}: not a readable zip archive ({err})") from err


def _expected(layout: DatasetLayout) -> str:
    archives = "; ".join(layout.archives)
    return f"expected the official ISPRS {layout.name} archives or their extracted folders: {archives}"


def _nothing_found(
    raw_dir: Path, layout: DatasetLayout, sources: list[RasterSource], nested_archives: list[str]
) -> str:
    message = f"{raw_dir}: no ISPRS {layout.name} orthophotos found; {_expected(layout)}"
    others = sorted(
        {
            other.name
            for other in LAYOUTS.values()
            if other is not layout
            and any(role.tile_id(s.name, s.folder) for s in sources for role in other.roles)
        }
    )
    if others:
        message += f". It holds ISPRS {' and '.join(others)} files: is data.source right?"
    if nested_archives:
        message += (
            f". Archives inside archives are not read; extract these first: {', '.join(nested_archives[:5])}"
        )
    return message
