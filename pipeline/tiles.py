"""DVC stage `tiles`: the official ISPRS archives or their extracted folders -> model-ready tiles."""

import logging

from aerialseg.config import load_params
from aerialseg.datasets.isprs import build_tiles
from aerialseg.stage import run_stage


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = load_params()
    table = build_tiles(params.raw_dir, params.paths.tiles, params.data)
    print(table.groupby("split")["tile"].apply(", ".join).to_string())
    snapped = table["snapped_pixels"] + table["snapped_pixels_eroded"]
    if snapped.any():
        print(
            f"{int(snapped.sum())} label pixels were within data.colour_tolerance "
            f"({params.data.colour_tolerance}) of a legend colour and were snapped to it; "
            f"per tile: {dict(zip(table['tile'], snapped.tolist(), strict=True))}"
        )


if __name__ == "__main__":
    run_stage(main)
