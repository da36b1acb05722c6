"""DVC stage `patches`: train and val tiles -> overlapped windows in data/patches/{train,val}.h5."""

from aerialseg.config import load_params
from aerialseg.datasets.tiles_table import read_tiles_table
from aerialseg.patches import band_statistics, write_patches


def main() -> None:
    params = load_params()
    tiles_dir, cfg = params.paths.tiles, params.patches
    train_tiles = read_tiles_table(tiles_dir, "train")
    # Statistics from the training tiles only: nothing of val or test may shape the inputs.
    stats = band_statistics([tiles_dir / name for name in train_tiles["image"]])
    for split in ("train", "val"):
        tiles = train_tiles if split == "train" else read_tiles_table(tiles_dir, split)
        out = params.paths.patches / f"{split}.h5"
        count = write_patches(
            tiles,
            tiles_dir,
            out,
            size=cfg.size,
            overlap=cfg.overlap,
            stats=stats,
            bands=list(params.data.bands),
        )
        print(f"{split}: {count} patches of {cfg.size} px from {len(tiles)} tiles -> {out}")


if __name__ == "__main__":
    main()
