"""Self-training: pseudo-labels from the engine on an unlabelled image (known discs), and 'ignore' boxes
that leave their pixels out of the training loss."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from affine import Affine

pytest.importorskip("torch")


def test_pseudo_labels_of_known_discs_and_the_score_cut(tmp_path, write_geotiff, disc_scene):
    from models.pseudo_labels import write_pseudo_labels
    from tests.tiny_models import write_crown_model

    discs = [(30, 30, 12), (30, 90, 10), (90, 40, 14), (95, 100, 11)]
    (tmp_path / "unlabelled").mkdir()
    img = tmp_path / "unlabelled" / "OSBS_101.tif"
    write_geotiff(img, disc_scene(128, discs), Affine(0.1, 0, 400000, 0, -0.1, 3000000), "EPSG:32617")
    write_geotiff(tmp_path / "unlabelled" / "OSBS_029.tif", disc_scene(128, discs),
                  Affine(0.1, 0, 400000, 0, -0.1, 3000000), "EPSG:32617")
    model = write_crown_model(tmp_path / "m.onnx", tile_size=128, overlap_px=48,
                              postprocess={"min_area_m2": 0.5, "seed_min_distance_m": 1.5})
    images = sorted((tmp_path / "unlabelled").glob("*.tif"))
    df = write_pseudo_labels(images, tmp_path, model, tmp_path / "pseudo.csv", min_score=0.0)
    assert set(df["plot"]) == {"OSBS_101"}  # OSBS_029 is never pseudo-labelled
    assert (df["image_path"] == "unlabelled/OSBS_101.tif").all() and (df["site"] == "OSBS").all()
    assert len(df) == 4 and (df["label"] == "Tree").all()
    centres = sorted(zip(((df.ymin + df.ymax) / 2).round(), ((df.xmin + df.xmax) / 2).round(), strict=True))
    for (cy, cx), (r, c, _) in zip(centres, sorted(discs), strict=True):
        assert abs(cy - r) <= 2 and abs(cx - c) <= 2  # each box sits on its disc (pixel grid, top-left)
    again = write_pseudo_labels(images, tmp_path, model, tmp_path / "p2.csv", min_score=1.01)
    assert (again["label"] == "ignore").all()  # nothing confident enough: every crown left out of the loss
    assert pd.read_csv(tmp_path / "pseudo.csv").shape == (4, 10)


def test_ignore_boxes_leave_their_pixels_out_of_the_loss(tmp_path):
    from PIL import Image

    from models.datasets.boxes import BoxSet
    from models.datasets.chips import IGNORE, load_box_scene

    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(tmp_path / "a.png")
    boxes = pd.DataFrame({"xmin": [2.0, 30.0], "ymin": [2.0, 10.0], "xmax": [22.0, 50.0],
                          "ymax": [22.0, 30.0],
                          "label": ["Tree", "ignore"]})
    s = load_box_scene(BoxSet(tmp_path / "a.png", boxes))
    assert s.target[12, 12] == 1 and s.target[20, 40] == IGNORE  # crown interior; the unsure crown's centre
    assert s.target[35, 5] == 0  # plain background still teaches background
    assert len(s.instances) == 1 and len(s.boxes) == 1  # the ignore box is not a crown (bank, validation)
