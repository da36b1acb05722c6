"""The user's commands beyond DVC: `aerialseg --help`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from aerialseg import presets
from aerialseg.config import ConfigError

app = typer.Typer(help="Semantic segmentation of ISPRS aerial imagery: helpers around the DVC pipeline.")


@app.callback()
def main() -> None:
    """Run from the project root (where params.yaml and dvc.yaml are)."""


@app.command()
def preset(
    name: Annotated[str, typer.Argument(help="a preset in presets/, e.g. lecture, benchmark-vaihingen")],
    params: Annotated[Path, typer.Option(help="the params file to update")] = Path("params.yaml"),
) -> None:
    """Switch params.yaml to a named setup (dataset, split, bands, model, epochs), keeping its comments."""
    try:
        presets.apply_preset(name, params)
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{params}: applied preset {name!r}; `dvc repro` reruns what it changes")


@app.command("prefetch-weights")
def prefetch_weights(
    encoder: Annotated[str, typer.Argument(help="an smp encoder name, e.g. resnet50")] = "resnet50",
) -> None:
    """Download an encoder's ImageNet weights into the Hugging Face cache (HF_HOME), on a machine with
    internet, so that compute nodes sharing that cache train with train.pretrained: imagenet offline."""
    import segmentation_models_pytorch as smp

    smp.encoders.get_encoder(encoder, weights="imagenet")
    typer.echo(f"ImageNet weights for {encoder} are in the Hugging Face cache (HF_HOME)")
