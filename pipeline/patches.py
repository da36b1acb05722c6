"""DVC stage `patches`: training tiles -> overlapped windows in data/patches/train.h5; the
validation tiles whole (with their eroded reference) in data/patches/val.h5."""

from aerialseg.config import load_params
from aerialseg.datasets.tiles_table import read_tiles_table
from aerialseg.patches import band_statistics, write_patches, write_validation_tiles
from aerialseg.stage import run_stage


def main() -> None:
    params = load_params()
    tiles_dir, cfg = params.paths.tiles, params.patches
    bands: list[str] = list(params.data.bands)
    train_tiles = read_tiles_table(tiles_dir, "train")
    # Statistics from the training tiles only: nothing of val or test may shape the inputs.
    stats = band_statistics([tiles_dir / name for name in train_tiles["image"]])
    out = params.paths.patches / "train.h5"
    count = write_patches(
        train_tiles, tiles_dir, out, size=cfg.size_px, overlap=cfg.overlap, stats=stats, bands=bands
    )
    print(f"train: {count} patches of {cfg.size_px} px from {len(train_tiles)} tiles -> {out}")
    val_tiles = read_tiles_table(tiles_dir, "val")
    out = params.paths.patches / "val.h5"
    scored = write_validation_tiles(val_tiles, tiles_dir, out, stats=stats, bands=bands)
    print(f"val: {len(val_tiles)} whole tiles, {scored} pixels of eroded reference -> {out}")


if __name__ == "__main__":
    run_stage(main)
