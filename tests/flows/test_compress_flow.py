"""compress_flow end to end at toy size: train, compress two methods, fine-tune, export, evaluate, report;
a rerun is all cache hits. Slow (torch training), so marked ``slow``."""

from __future__ import annotations

import json

import pytest

from tests.flows.conftest import REPO
from tests.flows.test_inventory_flow import task_states

pytest.importorskip("torch")
pytest.importorskip("segmentation_models_pytorch")

pytestmark = [pytest.mark.prefect, pytest.mark.slow]

TOY_TRAINING = {"iterations": 2, "batch_size": 2, "chip_px": 64, "tile_size": 128, "overlap_px": 32,
                "warmup": 1, "checkpoint_every": 1, "block_px": 64, "threads": 2,
                "net": {"arch": "unet", "encoder": "resnet18", "classes": 3, "decoder_channels": [16, 16, 8],
                        "encoder_depth": 3}}


def test_compress_flow_builds_evaluates_reports_and_caches(prefect_api, tmp_path):
    import torch

    from flows.compress import compress_flow
    from pipeline.onnx_model import OnnxModel

    torch.set_num_threads(2)
    kwargs = dict(out=str(tmp_path / "compress"), train_config=TOY_TRAINING, methods=["l1", "uniform"],
                  ratios=[0.5], finetune_steps=1, shifts=["brightness"], threads=2, distill=0.5,
                  image=str(REPO / "sample_data" / "OSBS_029.tif"),
                  truth_csv=str(REPO / "sample_data" / "OSBS_029.csv"))
    state = compress_flow(**kwargs, return_state=True)
    assert state.is_completed(), state.message
    paths = state.result()
    results = json.loads((tmp_path / "compress" / "compression_results.json").read_text())
    assert set(results["runs"]) == {"l1@0.5", "uniform@0.5"}
    for run in results["runs"].values():
        assert 0.0 <= run["f1"] <= 1.0 and set(run["f1_shift"]) == {"brightness"}
        assert run["params"] < results["dense"]["params"]
        model = OnnxModel(run["onnx"])  # loadable by the engine, metadata contract intact
        assert model.meta.compression["method"] == run["method"]
        assert model.meta.compression["finetune"]["distillation"]["weight"] == 0.5
    assert (tmp_path / "compress" / "COMPRESSION.md").is_file()
    assert paths["markdown"].endswith("COMPRESSION.md")

    again = compress_flow(**kwargs, return_state=True)
    states = task_states(again.state_details.flow_run_id, expected=8)
    assert all(name == "Cached" for names in states.values() for name in names), states
    assert sum(len(v) for v in states.values()) == 8  # train, 2 compress, shifts, 3 evaluate, report
