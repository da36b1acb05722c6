"""DVC stage `params`: validate all of params.yaml, so that a key no stage reads still fails.

DVC reruns a stage when one of the params it names changes; a misspelt section (`trian:`) is
named by none, so without this stage `dvc repro` would say "up to date" and train with the
defaults. This stage depends on the whole file and runs only the validation (`load_params`),
plus every choice against its registry (`choices.check_choices`), so a bad `evaluate.tta` stops
`dvc repro` before hours of training rather than after.
"""

from aerialseg.choices import check_choices
from aerialseg.config import load_params
from aerialseg.stage import run_stage


def main() -> None:
    check_choices(load_params())
    print("params.yaml: valid")


if __name__ == "__main__":
    run_stage(main)
