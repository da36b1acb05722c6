"""DVC stage `evaluate`: the ISPRS protocol on whole test tiles -> reports/ and the MLflow run."""

from aerialseg.config import load_params
from aerialseg.evaluation import evaluate
from aerialseg.stage import run_stage


def main() -> None:
    metrics = evaluate(load_params())
    summary = {k: metrics[k] for k in ("overall_accuracy", "mean_f1", "miou", "kappa")}
    print({k: None if v is None else round(v, 4) for k, v in summary.items()})


if __name__ == "__main__":
    run_stage(main)
