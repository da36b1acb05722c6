"""DVC stage `tiles`: the official raw layout -> model-ready tiles and the by-tile split."""

from aerialseg.config import load_params
from aerialseg.datasets.isprs import build_tiles


def main() -> None:
    params = load_params()
    table = build_tiles(params.raw_dir, params.paths.tiles, params.data)
    print(table.groupby("split")["tile"].apply(", ".join).to_string())


if __name__ == "__main__":
    main()
