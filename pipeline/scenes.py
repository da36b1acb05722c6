"""DVC stage `scenes`: procedural Vaihingen-like scenes, written in the official Vaihingen layout."""

from aerialseg.config import load_params
from aerialseg.datasets.synthetic import write_vaihingen_layout
from aerialseg.stage import run_stage


def main() -> None:
    params = load_params()
    out = params.paths.raw / "synthetic"
    areas = write_vaihingen_layout(out, params.synthetic)
    print(f"wrote {len(areas)} synthetic areas of {params.synthetic.size_px} px to {out}")


if __name__ == "__main__":
    run_stage(main)
