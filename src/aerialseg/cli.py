"""The user's commands beyond DVC: `aerialseg --help`."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Annotated, Literal

import typer

from aerialseg import presets
from aerialseg.config import ConfigError
from aerialseg.grid import grid_command, grid_task_command
from aerialseg.leaderboard import leaderboard_command
from aerialseg.team_server import server_app

app = typer.Typer(help="Semantic segmentation of ISPRS aerial imagery: helpers around the DVC pipeline.")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"aerialseg {metadata.version('aerialseg')}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="print the version and exit"),
    ] = False,
) -> None:
    """Run from the project root (where params.yaml and dvc.yaml are); `predict` and `export` run anywhere."""


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

    from aerialseg.model import WeightsUnavailableError, ensure_imagenet_reachable

    try:  # at once, in one line, when the Hugging Face endpoint (HF_ENDPOINT, proxies) cannot be reached
        ensure_imagenet_reachable(encoder)
    except WeightsUnavailableError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    smp.encoders.get_encoder(encoder, weights="imagenet")
    typer.echo(f"ImageNet weights for {encoder} are in the Hugging Face cache (HF_HOME)")


MODEL_HELP = (
    "an aerialseg checkpoint (models/model.ckpt) or an MLflow model URI: runs:/<run id>/model, "
    "models:/aerialseg-synthetic@candidate (store: MLFLOW_TRACKING_URI, else ./mlflow.db)"
)


@app.command()
def predict(
    inputs: Annotated[
        list[Path],
        typer.Argument(help="GeoTIFFs, or folders of them (*.tif, *.tiff), with the model's bands"),
    ],
    model: Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP)],
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o", help="folder for <stem>.tif, <stem>.png, <stem>_probabilities.tif, <stem>.gpkg"
        ),
    ] = Path("predictions"),
    window: Annotated[
        int | None,
        typer.Option(help="window size in px, a multiple of 32 (default: the training patch size)"),
    ] = None,
    overlap: Annotated[float, typer.Option(min=0.0, max=0.99, help="overlap of neighbouring windows")] = 0.5,
    batch_size: Annotated[int, typer.Option(min=1, help="windows per forward pass")] = 4,
    # Choices are checked by the engine's registries (inference.TTA, BLENDS; devices.py), whose
    # error lists them; a test keeps this help in step with the registries.
    tta: Annotated[
        str,
        typer.Option(help="test-time augmentation: none, flip (h + v flips), d4 (flips x rotations)"),
    ] = "none",
    blend: Annotated[
        str,
        typer.Option(
            help="window blending: uniform (mean), cosine (Hann window) or gaussian (sigma = window/8)"
        ),
    ] = "cosine",
    device: Annotated[str, typer.Option(help="auto (cuda, else mps, else cpu), cpu, cuda or mps")] = "auto",
    precision: Annotated[
        str,
        typer.Option(help="auto (bfloat16 autocast where the device runs it natively, else 32), 32 or bf16"),
    ] = "auto",
    probabilities: Annotated[
        bool, typer.Option(help="also write <stem>_probabilities.tif (uint8, probability x 255, per class)")
    ] = False,
    preview: Annotated[bool, typer.Option(help="also write <stem>.png in ISPRS colours")] = True,
    preview_size: Annotated[int, typer.Option(min=16, help="longest side of the PNG preview in px")] = 2048,
    cog: Annotated[
        bool,
        typer.Option(
            help="write the GeoTIFFs as Cloud Optimized GeoTIFFs with overviews (the class map's by mode)"
        ),
    ] = False,
    vector: Annotated[
        bool,
        typer.Option(
            help="also write <stem>.gpkg: the class map as polygons per class (fields class, "
            "class_index) in the input's CRS, nodata left out"
        ),
    ] = False,
    progress: Annotated[bool, typer.Option(help="progress bar (lines when not a terminal)")] = True,
    units: Annotated[
        Literal["tiles", "isprs"],
        typer.Option(
            help="tiles: bands as the tiles stage writes them (data/tiles/*_image.tif: spectral "
            "reflectances in [0, 1], float); isprs: the ISPRS products' units, stacked in the model's "
            "band order (spectral 0-255, dsm in metres above sea level, ndsm as the grey values of "
            "Potsdam's nDSM JPEGs, decimetres). Spectral values in other units stop the command"
        ),
    ] = "tiles",
) -> None:
    """Class maps of GeoTIFFs of any size: sliding window with blending, read and written in blocks.

    Outputs keep the input's CRS and transform; 255 marks nodata. Example:
    `aerialseg predict data/tiles/7_image.tif --model models/model.ckpt --output predictions --tta flip`
    """
    from aerialseg.devices import DeviceError, resolve_device
    from aerialseg.inference import Settings
    from aerialseg.model_source import ModelSourceError, load_model
    from aerialseg.predict import PredictError, PredictOptions, PredictResult, predict_paths
    from aerialseg.raster_source import InputError

    engine = Settings(window or 0, overlap, batch_size, tta, blend, precision, device)
    options = PredictOptions(
        engine=engine,
        probabilities=probabilities,
        preview=preview,
        preview_size=preview_size,
        cog=cog,
        vector=vector,
        progress=progress,
        units=units,
    )

    def report(result: PredictResult) -> None:
        megapixels = result.height * result.width / 1e6
        written = ", ".join(str(p) for p in result.outputs.all())
        typer.echo(
            f"{result.input}: {result.width} x {result.height} px, {result.windows} windows, "
            f"{result.seconds:.1f} s ({result.seconds / megapixels:.2f} s/MP), "
            f"{result.nodata_pixels} nodata px -> {written}"
        )

    try:
        net, card = load_model(model, resolve_device(device))
        predict_paths(net, card, inputs, output, options, model_name=model, on_done=report)
    except (PredictError, InputError, DeviceError, ModelSourceError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None


@app.command()
def export(
    model: Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP)],
    output: Annotated[Path, typer.Option("--output", "-o", help="the ONNX file to write")] = Path(
        "model.onnx"
    ),
    exporter: Annotated[
        Literal["dynamo", "torchscript"],
        typer.Option(help="torch.export-based (default) or the legacy TorchScript exporter"),
    ] = "dynamo",
    check_size: Annotated[
        tuple[int, int] | None,
        typer.Option(help="height width of the parity check input (default: patch + 32, patch + 64)"),
    ] = None,
    opset: Annotated[int | None, typer.Option(help="ONNX opset (default: the exporter's)")] = None,
) -> None:
    """Write the network as ONNX (dynamic batch, height, width; metadata embedded) and check that
    onnxruntime gives PyTorch's classes; a failed check fails the command and writes nothing."""
    from aerialseg.export import ExportError, export_onnx
    from aerialseg.model_source import ModelSourceError, load_model

    try:
        net, card = load_model(model, "cpu")
        result = export_onnx(net, card, output, exporter=exporter, check_size=check_size, opset=opset)
    except (ExportError, ModelSourceError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(
        f"{result.path}: ONNX ({result.exporter} exporter); onnxruntime check: {result.parity.describe()}"
    )


app.command("leaderboard")(leaderboard_command)
app.command("grid")(grid_command)
app.command("grid-task", hidden=True)(grid_task_command)  # one array task of `grid --slurm`
app.add_typer(server_app, name="server")
