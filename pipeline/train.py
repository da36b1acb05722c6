"""DVC stage `train`: FPN on the HDF5 patches with Lightning; the run goes to MLflow."""

from aerialseg.config import load_params
from aerialseg.stage import run_stage
from aerialseg.training import train


def main() -> None:
    metrics = train(load_params())
    print({k: round(v, 4) for k, v in metrics.items()})


if __name__ == "__main__":
    run_stage(main)
