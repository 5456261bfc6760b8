"""Pseudo-labels for self-training: crowns predicted on unlabelled plot images become training boxes.

A crown model (ONNX, through the engine's own crown stages) segments each unlabelled image. Crowns whose
score (mean crown probability) is at least ``min_score`` become ``Tree`` boxes; the less confident ones
become ``ignore`` boxes, whose pixels are left out of the loss (see
:func:`models.datasets.chips.load_box_scene`): a crown the model is unsure of is taught neither as a crown
nor as background. The result is a DeepForest CSV with ``site`` and ``plot`` columns that
``train crowns --plots-csv`` reads like hand labels (plots in neither list of the split train).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from models.datasets.chips import IGNORE_LABEL
from pipeline.errors import InputError


def pseudo_label_rows(crowns, image: Path, rel_path: str, min_score: float) -> list[dict]:
    """Rows (DeepForest CSV) of one image's predicted crowns: ``Tree`` at score >= ``min_score``, else
    ``ignore``; boxes are the crowns' envelopes in the image's pixel grid."""
    from pipeline.evaluation.multi import crowns_to_pixel_boxes

    boxes = crowns_to_pixel_boxes(crowns, image)
    stem = image.stem
    site = stem.split("_")[0]
    rows = []
    for b, score in zip(boxes, crowns["score"].to_numpy(float), strict=True):
        x0, y0, x1, y1 = b.bounds
        rows.append({"image_path": rel_path, "xmin": round(x0, 1), "ymin": round(y0, 1), "xmax": round(x1, 1),
                     "ymax": round(y1, 1), "label": "Tree" if score >= min_score else IGNORE_LABEL,
                     "site": site, "plot": stem, "year": "", "score": round(float(score), 4)})
    return rows


def write_pseudo_labels(
    images: Sequence[str | os.PathLike],
    image_root: str | os.PathLike,
    crown_model: str | os.PathLike,
    out_csv: str | os.PathLike,
    min_score: float = 0.6,
    threads: int | None = 1,
    exclude_plots: Sequence[str] = ("OSBS_029",),
    progress: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """Pseudo-label ``images`` (paths under ``image_root``) with ``crown_model``; write ``out_csv``.

    Images whose plot (file stem) is in ``exclude_plots`` are skipped (OSBS_029 and, for example, plots that
    already have hand labels)."""
    from pipeline.atomic import atomic_path
    from pipeline.evaluation.run import predict_crowns_on_image

    root = Path(image_root)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="pseudo_") as work:
        for k, img in enumerate(images):
            img = Path(img)
            if img.stem in exclude_plots:
                continue
            if not img.exists():
                raise InputError(f"{img}: unlabelled image not found; check the image folder")
            if progress:
                progress(f"[{k + 1}/{len(images)}] {img.name}")
            crowns, _ = predict_crowns_on_image(img, Path(work) / f"{k:03d}", crown_model, threads)
            rows += pseudo_label_rows(crowns, img, os.path.relpath(img, root), min_score)
    df = pd.DataFrame(rows, columns=["image_path", "xmin", "ymin", "xmax", "ymax", "label", "site", "plot",
                                     "year", "score"])
    with atomic_path(Path(out_csv)) as tmp:
        df.to_csv(tmp, index=False)
    return df


def main(argv: list[str] | None = None) -> int:
    """``python -m models.pseudo_labels MODEL.onnx IMAGES_DIR OUT.csv [--root R] [--min-score S]``."""
    import argparse

    ap = argparse.ArgumentParser(description="pseudo-label unlabelled plot images with a crown model")
    ap.add_argument("model", help="crown ONNX model")
    ap.add_argument("images", help="folder of unlabelled GeoTIFF plot images")
    ap.add_argument("out", help="CSV to write (DeepForest + site, plot, year, score)")
    ap.add_argument("--root", default=None, help="folder the CSV's image paths are relative to "
                    "(default: the parent of IMAGES)")
    ap.add_argument("--min-score", type=float, default=0.6, help="crowns below this become 'ignore' boxes")
    ap.add_argument("--exclude", default="OSBS_029", help="comma-separated plots never pseudo-labelled")
    a = ap.parse_args(argv)
    images = sorted(Path(a.images).glob("*.tif"))
    if not images:
        raise SystemExit(f"error: {a.images}: no .tif images; pass the folder of unlabelled plot images")
    df = write_pseudo_labels(images, a.root or Path(a.images).parent, a.model, a.out, a.min_score,
                             exclude_plots=tuple(a.exclude.split(",")), progress=print)
    print(f"{a.out}: {int((df.label == 'Tree').sum())} Tree and {int((df.label == IGNORE_LABEL).sum())} "
          f"ignore boxes on {df['plot'].nunique()} images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
