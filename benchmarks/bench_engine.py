"""The inference engine's choices on the default pipeline's own model and test tiles.

Needs the trained model and tiles of `make repro` (models/model.ckpt, data/tiles); without them it
records why it was skipped. Measures, each against a baseline in the same run:

- blending (`evaluate.blend`): mean F1 on the eroded reference and seams, per choice; a seam is
  measured as how much more often the predicted class changes between two neighbouring pixels
  across a window edge than across any other pixel boundary (1.0 = no seam);
- precision (`evaluate.precision`): bfloat16 autocast against float32, share of pixels with the
  same class and seconds per megapixel;
- streaming: `predict_file` (GeoTIFF in, GeoTIFF out, rows in blocks) against the in-memory path
  `evaluate` takes (read_raster, predict_probabilities, write_raster), seconds per megapixel.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import record

from aerialseg.checkpoint import load_checkpoint
from aerialseg.datasets.tiles_table import read_tiles_table
from aerialseg.devices import native_bf16
from aerialseg.inference import BLENDS, Settings, predict_probabilities
from aerialseg.metrics import confusion_matrix, scores
from aerialseg.predict import PredictOptions, predict_file
from aerialseg.raster import read_raster, write_raster
from aerialseg.windows import window_grid

ROOT = Path(__file__).resolve().parents[1]
MODEL, TILES = ROOT / "models" / "model.ckpt", ROOT / "data" / "tiles"
ROUNDS = 5
"""Rounds of the streaming comparison, alternating the two paths; each keeps its fastest."""


def seam_ratio(classes: np.ndarray, window: int, overlap: float) -> float:
    """Class changes across window edges per boundary, over class changes per boundary elsewhere."""
    height, width = classes.shape
    grid = window_grid(height, width, window, overlap)
    edge_cols = sorted({c for w in grid for c in (w.col, w.col + window) if 0 < c < width})
    edge_rows = sorted({r for w in grid for r in (w.row, w.row + window) if 0 < r < height})
    across_cols = classes[:, 1:] != classes[:, :-1]  # boundary between column c-1 and c at index c-1
    across_rows = classes[1:] != classes[:-1]
    col_mask = np.zeros(width - 1, bool)
    col_mask[[c - 1 for c in edge_cols]] = True
    row_mask = np.zeros(height - 1, bool)
    row_mask[[r - 1 for r in edge_rows]] = True
    at_edges = across_cols[:, col_mask].sum() + across_rows[row_mask].sum()
    n_edges = across_cols[:, col_mask].size + across_rows[row_mask].size
    elsewhere = across_cols[:, ~col_mask].sum() + across_rows[~row_mask].sum()
    n_else = across_cols[:, ~col_mask].size + across_rows[~row_mask].size
    return float((at_edges / n_edges) / max(elsewhere / n_else, 1e-12))


def timed(run: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = run()
    return out, time.perf_counter() - start


def main() -> None:
    if not MODEL.exists() or not (TILES / "tiles.csv").exists():
        record("engine", {"skipped": f"no {MODEL} or {TILES}: run `make repro` first"})
        return
    torch.manual_seed(0)
    model, card = load_checkpoint(MODEL, "cpu")
    tiles = read_tiles_table(TILES, "test")
    base = Settings(
        window=card.window, overlap=0.5, batch_size=4, blend="uniform", precision="32", device="cpu"
    )
    images = [card.normalise(read_raster(TILES / str(r.image))[0]) for r in tiles.itertuples()]
    eroded = [read_raster(TILES / str(r.label_eroded))[0][0] for r in tiles.itertuples()]
    megapixels = sum(i.shape[1] * i.shape[2] for i in images) / 1e6

    def run(settings: Settings) -> tuple[list[np.ndarray], float]:
        preds, seconds = [], 0.0
        for image in images:
            probs, s = timed(lambda image=image: predict_probabilities(model, image, settings))
            preds.append(probs.argmax(axis=0).astype(np.uint8))
            seconds += s
        return preds, seconds

    figures: dict[str, Any] = {}
    uniform_preds, fp32_seconds = run(base)
    for blend in BLENDS:
        preds = uniform_preds if blend == "uniform" else run(replace(base, blend=blend))[0]
        cm = sum(confusion_matrix(p, e) for p, e in zip(preds, eroded, strict=True))
        result = scores(np.asarray(cm))
        seams = np.mean([seam_ratio(p, card.window, base.overlap) for p in preds])
        figures[f"blend_{blend}_mean_f1"] = {
            "value": round(result["mean_f1"], 4),
            "unit": "",
            "baseline": "uniform",
        }
        figures[f"blend_{blend}_mean_f1_5"] = {"value": round(result["mean_f1_5"], 4), "unit": ""}
        figures[f"blend_{blend}_seam_ratio"] = {
            "value": round(float(seams), 3),
            "unit": "x",
            "baseline": "class changes per pixel boundary away from window edges (1.0 = no seam)",
        }
    if native_bf16(torch.device("cpu")):
        bf16_preds, bf16_seconds = run(replace(base, precision="bf16"))
        same = sum(int((a == b).sum()) for a, b in zip(bf16_preds, uniform_preds, strict=True))
        total = sum(a.size for a in uniform_preds)
        figures |= {
            "bf16_same_class": {
                "value": round(100 * same / total, 3),
                "unit": "%",
                "baseline": "fp32 classes",
            },
            "bf16_seconds_per_megapixel": {"value": round(bf16_seconds / megapixels, 3), "unit": "s/MP"},
            "fp32_seconds_per_megapixel": {"value": round(fp32_seconds / megapixels, 3), "unit": "s/MP"},
            "bf16_speedup": {"value": round(fp32_seconds / bf16_seconds, 2), "unit": "x", "baseline": "fp32"},
        }
    else:
        figures["bf16"] = "skipped: this CPU has no native bfloat16 (auto picks fp32 here)"

    # Streaming against in-memory, the same settings (fp32), the real network; best of ROUNDS.
    row = tiles.iloc[0]
    source = TILES / str(row["image"])
    options = PredictOptions(engine=base, preview=False, progress=False)  # in-memory's settings
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)

        def in_memory() -> None:
            image, georef = read_raster(source)
            probs = predict_probabilities(model, card.normalise(image), base)
            write_raster(out / "in_memory.tif", probs.argmax(axis=0).astype(np.uint8), georef, colormap=True)

        def streaming() -> None:
            predict_file(model, card, source, out, options)

        best = {"in_memory": float("inf"), "streaming": float("inf")}
        for _ in range(ROUNDS):
            for name, fn in (("in_memory", in_memory), ("streaming", streaming)):
                best[name] = min(best[name], timed(fn)[1])
    mp = int(row["height"]) * int(row["width"]) / 1e6
    figures |= {
        "streaming_seconds_per_megapixel": {"value": round(best["streaming"] / mp, 3), "unit": "s/MP"},
        "in_memory_seconds_per_megapixel": {"value": round(best["in_memory"] / mp, 3), "unit": "s/MP"},
        "streaming_over_in_memory": {
            "value": round(best["streaming"] / best["in_memory"], 3),
            "unit": "x",
            "baseline": "read_raster + predict_probabilities + write_raster (evaluate's path)",
        },
    }
    figures["measured_on"] = (
        f"{card.model_args.get('arch')}-{card.model_args.get('encoder_name')} of models/model.ckpt, "
        f"test tiles {', '.join(tiles['tile'])}, {card.window} px windows, overlap 0.5"
    )
    record("engine", figures)


if __name__ == "__main__":
    main()
