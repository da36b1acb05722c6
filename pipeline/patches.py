"""DVC stage `patches`: training tiles -> overlapped windows in data/patches/train.h5; the
validation tiles whole (with their eroded reference) in data/patches/val.h5."""

from aerialseg.config import load_params
from aerialseg.patches import build_patches
from aerialseg.stage import run_stage


def main() -> None:
    params = load_params()
    cfg = params.patches
    done = build_patches(
        params.paths.tiles,
        params.paths.patches,
        size=cfg.size_px,
        overlap=cfg.overlap,
        bands=list(params.data.bands),
    )
    print(
        f"train: {done.train_patches} patches of {done.size} px from {done.train_tiles} tiles "
        f"-> {done.train_path}"
    )
    print(
        f"val: {done.val_tiles} whole tiles, {done.val_pixels} pixels of eroded reference -> {done.val_path}"
    )


if __name__ == "__main__":
    run_stage(main)
