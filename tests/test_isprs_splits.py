"""Splits and tile ids of the ISPRS sources: the official split, custom lists, zero-padded ids, and
the error that lists the tiles there are."""

from __future__ import annotations

from pathlib import Path

import pytest
from archive_builders import (
    SMALL,
    assert_no_output,
    band_names,
    vaihingen_downloads,
    vaihingen_tiles,
    write_downloads,
)

from aerialseg.config import DataConfig
from aerialseg.datasets.isprs import DatasetLayoutError, build_tiles
from aerialseg.datasets.isprs_layout import POTSDAM, VAIHINGEN


def test_vaihingen_official_split_converts_only_the_tiles_used(
    vaihingen_raw: dict[str, Path], out_dir: Path
) -> None:
    data = DataConfig(source="vaihingen", split="official", val_tiles=("3",))
    table = build_tiles(vaihingen_raw["zip"], out_dir, data)
    # Area 9 is in neither official list: skipped, not converted.
    assert dict(zip(table["tile_id"], table["split"], strict=True)) == {"1": "train", "2": "test", "3": "val"}
    assert sorted(p.name for p in out_dir.iterdir() if "area9" in p.name) == []
    assert len(list(out_dir.iterdir())) == 1 + 3 * 3


def test_synthetic_source_reads_the_participant_layout_with_the_official_split(
    synthetic_raw: Path, out_dir: Path
) -> None:
    # conftest's synthetic areas 1..4: official train 1, 3 and test 2, 4.
    data = DataConfig(source="synthetic", split="official", val_tiles=(3,), bands=("ndsm", "ir"))
    table = build_tiles(synthetic_raw, out_dir, data)
    assert dict(zip(table["tile_id"], table["split"], strict=True)) == {
        "1": "train",
        "2": "test",
        "3": "val",
        "4": "test",
    }
    assert band_names(out_dir / "area1_image.tif") == ("ndsm", "ir")


def test_potsdam_official_split(potsdam_raw: dict[str, Path], out_dir: Path) -> None:
    table = build_tiles(
        potsdam_raw["zip"], out_dir, DataConfig(source="potsdam", split="official", val_tiles=("2_11",))
    )
    assert dict(zip(table["tile_id"], table["split"], strict=True)) == {
        "2_10": "train",
        "2_11": "val",
        "2_13": "test",
    }


def test_tile_ids_may_be_zero_padded(potsdam_raw: dict[str, Path], out_dir: Path) -> None:
    data = DataConfig(source="potsdam", bands=("r",), val_tiles=("02_11",), test_tiles=("2_13",))
    assert build_tiles(potsdam_raw["zip"], out_dir, data)["split"].tolist() == ["train", "val", "test"]


@pytest.mark.parametrize(
    ("split", "match"),
    [
        ({"val_tiles": ("4_12",), "test_tiles": ("2_13",)}, r"data\.val_tiles \[4_12\]"),
        ({"val_tiles": ("2_11",), "test_tiles": ("7_13", "2_13")}, r"data\.test_tiles \[7_13\]"),
        (
            {"train_tiles": ("6_7",), "val_tiles": ("2_11",), "test_tiles": ("2_13",)},
            r"data\.train_tiles \[6_7\]",
        ),
    ],
)
def test_tile_not_in_the_data_lists_what_is_available(
    potsdam_raw: dict[str, Path], out_dir: Path, split: dict[str, tuple[str, ...]], match: str
) -> None:
    with pytest.raises(DatasetLayoutError, match=match) as info:
        build_tiles(potsdam_raw["zip"], out_dir, DataConfig(source="potsdam", **split))
    assert "available: [2_10, 2_11, 2_13]" in str(info.value)
    assert_no_output(out_dir)


def test_official_val_tile_must_be_an_official_train_tile(
    potsdam_raw: dict[str, Path], out_dir: Path
) -> None:
    data = DataConfig(source="potsdam", split="official", val_tiles=("2_13",))
    with pytest.raises(DatasetLayoutError, match=r"\[2_13\] are not official Potsdam training tiles"):
        build_tiles(potsdam_raw["zip"], out_dir, data)
    assert_no_output(out_dir)


def test_official_split_without_test_tiles(tmp_path: Path, out_dir: Path) -> None:
    tiles = vaihingen_tiles(SMALL, ("1", "3"))
    raw = write_downloads(tmp_path / "raw", vaihingen_downloads(tiles), "zip")
    data = DataConfig(source="vaihingen", split="official", val_tiles=("3",))
    with pytest.raises(DatasetLayoutError, match=r"test split is empty: none of the official Vaihingen test"):
        build_tiles(raw, out_dir, data)
    assert_no_output(out_dir)


def test_layouts_name_the_official_tiles() -> None:
    assert len(VAIHINGEN.official_train) == 16 and len(VAIHINGEN.official_test) == 17
    assert len(POTSDAM.official_train) == 24 and len(POTSDAM.official_test) == 14
    assert not set(VAIHINGEN.official_train) & set(VAIHINGEN.official_test)
    assert not set(POTSDAM.official_train) & set(POTSDAM.official_test)
