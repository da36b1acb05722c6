"""Real pixels: the ISPRS Vaihingen crop in ../shared (never committed) decodes and windows like ours,
and goes through the official archives (tests/archive_builders.py), the tiles stage and evaluate.

Skipped where the folder is absent.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from archive_builders import (
    SMALL,
    SourceTile,
    read_band,
    vaihingen_downloads,
    vaihingen_tiles,
    write_downloads,
)
from rasterio.crs import CRS
from scipy import ndimage

from aerialseg.classes import IGNORE_INDEX, NUM_CLASSES, colours_to_index, index_to_colours
from aerialseg.config import DataConfig, Params
from aerialseg.datasets.isprs import build_tiles
from aerialseg.raster import GeoReference, read_raster
from aerialseg.windows import window_grid

# ../shared/data/isprs-vaihingen-crop beside the project, or wherever AERIALSEG_ISPRS_CROP points.
CROP = Path(
    os.environ.get("AERIALSEG_ISPRS_CROP")
    or Path(__file__).resolve().parents[2] / "shared" / "data" / "isprs-vaihingen-crop"
)
pytestmark = pytest.mark.skipif(not CROP.is_dir(), reason=f"{CROP} is not available here")


def _read(name: str) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(CROP / name) as src:
            return src.read()


@pytest.fixture(scope="module")
def crop() -> tuple[np.ndarray, np.ndarray]:
    irrg = _read("area1_0_0_512_512_irrg.png")
    # The crop's own coding: 0 = boundary, 1..6 = the classes in legend order.
    raw = _read("area1_0_0_512_512_label_eroded.png")[0]
    label = np.where(raw == 0, IGNORE_INDEX, raw.astype(np.int16) - 1).astype(np.uint8)
    return irrg, label


def test_the_eroded_label_decodes_through_the_official_colour_code(
    crop: tuple[np.ndarray, np.ndarray],
) -> None:
    _, label = crop
    # Render it as an official eroded ground-truth file would be, then decode it as the tiles stage does.
    decoded = colours_to_index(index_to_colours(label), CROP / "label", allow_boundary=True)
    np.testing.assert_array_equal(decoded, label)
    present = set(np.unique(decoded).tolist())
    assert present <= {*range(NUM_CLASSES), IGNORE_INDEX}
    assert {0, 1, 2, 3} <= present and IGNORE_INDEX in present
    # The eroded band is thin, as in the benchmark: most pixels keep their class.
    assert 0.05 < (decoded == IGNORE_INDEX).mean() < 0.4


def test_band_order_is_irrg(crop: tuple[np.ndarray, np.ndarray]) -> None:
    irrg, label = crop
    assert irrg.shape == (3, 512, 512) and irrg.dtype == np.uint8
    ir, red = irrg[0].astype(float), irrg[1].astype(float)
    # Vegetation reflects near-infrared far more than red, which false-colour IRRG shows as red;
    # on roads the two are about equal. A swapped band order breaks this.
    excess = ir - red
    for vegetation in (2, 3):
        assert excess[label == vegetation].mean() > excess[label == 0].mean() + 15


@pytest.mark.parametrize(("size", "overlap"), [(256, 0.6), (256, 0.5), (192, 0.0)])
def test_windows_cover_the_real_crop(crop: tuple[np.ndarray, np.ndarray], size: int, overlap: float) -> None:
    irrg, label = crop
    covered = np.zeros(label.shape, dtype=int)
    patches = []
    for w in window_grid(*label.shape, size, overlap):
        covered[w.slices] += 1
        patches.append(irrg[(slice(None), *w.slices)])
    assert covered.min() >= 1
    assert all(p.shape == (3, size, size) for p in patches)


# --------------------------------------------------------------------------------------
# The crop packed as official archives: through the tiles stage and evaluate


CROP_HEIGHTS = {1: 9.0, 3: 7.0, 4: 1.5}  # building, tree, car: metres above the terrain


def real_crop_tile() -> SourceTile:
    """Area 1's top-left 512 x 512 px: real IRRG and eroded labels; the full label and DSM made up."""
    ir, r, g = _read("area1_0_0_512_512_irrg.png")
    # The crop's own coding: 0 = boundary, 1..6 = the classes in legend order.
    coded = _read("area1_0_0_512_512_label_eroded.png")[0]
    eroded = np.where(coded == 0, IGNORE_INDEX, coded.astype(np.int16) - 1).astype(np.uint8)
    # Full label: each boundary pixel takes the class of the nearest labelled pixel.
    _, (rows, cols) = ndimage.distance_transform_edt(eroded == IGNORE_INDEX, return_indices=True)
    label = eroded[rows, cols]
    terrain = 250.0 + 0.01 * np.arange(512, dtype=np.float32)[:, None]
    dsm = terrain + np.vectorize(lambda c: CROP_HEIGHTS.get(int(c), 0.0), otypes=[np.float32])(label)
    georef = GeoReference(CRS.from_epsg(32632), Affine(0.09, 0, 496_200.0, 0, -0.09, 5_421_800.0))
    return SourceTile("1", {"ir": ir, "r": r, "g": g}, dsm.astype(np.float32), label, georef, eroded)


def test_real_vaihingen_crop_through_the_official_archives(tmp_path: Path, out_dir: Path) -> None:
    real = real_crop_tile()
    # Official split: the real area 1 trains; small synthetic areas 3 and 2 fill val and test.
    tiles = [real, *vaihingen_tiles(SMALL, ("2", "3"))]
    raw = write_downloads(tmp_path / "raw", vaihingen_downloads(tiles), "zip")
    data = DataConfig(source="vaihingen", split="official", val_tiles=("3",), bands=("ir", "r", "g", "ndsm"))
    table = build_tiles(raw, out_dir, data)
    assert table.set_index("tile_id").loc["1", "split"] == "train"
    image, _ = read_raster(out_dir / "area1_image.tif")
    for i, band in enumerate(("ir", "r", "g")):
        np.testing.assert_allclose(image[i], real.bands[band] / np.float32(255), atol=1e-7)
    label = read_band(out_dir / "area1_label.tif")
    eroded = read_band(out_dir / "area1_label_eroded.tif")
    np.testing.assert_array_equal(label, real.label)
    np.testing.assert_array_equal(eroded, real.eroded)
    assert 0.05 < (eroded == IGNORE_INDEX).mean() < 0.4
    # Real vegetation is bright in the infrared band, which confirms the IR-R-G order end to end.
    excess = image[0] - image[1]
    assert excess[label == 2].mean() > excess[label == 0].mean() + 0.05
    ndsm = image[3]
    assert np.median(ndsm[label == 1]) > 7.0
    assert np.median(ndsm[np.isin(label, [0, 2])]) < 0.5


def test_real_crop_through_tiles_and_evaluate(
    tmp_path: Path, small_params: Callable[..., Params], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The evaluate stage's path on real pixels: whole-tile prediction, eroded scoring, georeference."""
    import mlflow
    import torch

    from aerialseg.checkpoint import save_checkpoint
    from aerialseg.evaluation import evaluate
    from aerialseg.model import build_model, model_args
    from aerialseg.model_card import ModelCard
    from aerialseg.patches import BandStats
    from aerialseg.tracking import RunRef

    real = real_crop_tile()
    raw = write_downloads(
        tmp_path / "raw", vaihingen_downloads([real, *vaihingen_tiles(SMALL, ("2", "3"))]), "zip"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = small_params(
        tmp_path,
        {
            "data.source": "vaihingen",
            "data.raw_dir": raw,
            "data.bands": ["ir", "r", "g"],
            "data.train_tiles": ["2"],
            "data.val_tiles": ["3"],
            "data.test_tiles": ["1"],
            "paths.tiles": "tiles",
            "evaluate.overlap": 0.5,
            "evaluate.batch_size": 4,
        },
    )
    build_tiles(raw, params.paths.tiles, params.data)
    # An untrained network: the point is the path on real pixels, not the accuracy.
    torch.manual_seed(0)
    args = model_args("fcn_skip", "resnet18", in_channels=3, num_classes=6)
    stats = BandStats((0.3, 0.3, 0.3), (0.2, 0.2, 0.2))
    card = ModelCard.for_training(args, bands=["ir", "r", "g"], mean=stats.mean, std=stats.std, window=128)
    save_checkpoint(Path("models/model.ckpt"), build_model(args), card)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.set_experiment("crop")
    with mlflow.start_run() as run:
        pass
    RunRef(run.info.run_id, experiment.experiment_id, "crop").save(Path("models/mlflow_run.json"))

    metrics = evaluate(params)

    assert metrics["pixels"] == int((real.eroded != IGNORE_INDEX).sum())
    assert list(metrics["tiles"]) == ["area1"]
    saved = json.loads(Path("reports/metrics.json").read_text())
    assert saved["mlflow_run_id"] == run.info.run_id and saved["pixels"] == metrics["pixels"]
    with rasterio.open("reports/predictions/area1.tif") as pred:
        assert pred.shape == (512, 512) and pred.transform == real.georef.transform
        assert pred.read(1).max() <= 5
