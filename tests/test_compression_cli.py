"""`forest-inventory compress` on a small crown checkpoint: budget met, record in the ONNX metadata."""

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("segmentation_models_pytorch")

from typer.testing import CliRunner  # noqa: E402

from forest_inventory.cli import app  # noqa: E402
from models.export import read_metadata  # noqa: E402


def test_compress_command_writes_a_smaller_model_with_a_record(crown_checkpoint, tmp_path):
    ck, ref = crown_checkpoint
    out = tmp_path / "small.onnx"
    res = CliRunner().invoke(
        app,
        [
            "compress",
            "--model",
            str(ck),
            "--method",
            "uniform",
            "--target",
            "0.6",
            "--reference-onnx",
            str(ref),
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    meta = read_metadata(out)
    rec = json.loads(meta["compression"])
    assert rec["method"] == "uniform" and abs(rec["macs_after"] / rec["macs_before"] - 0.4) <= 0.02
    assert meta["model_version"] == "tiny+uniform60" and meta["task"] == "crown_segmentation"
    assert out.stat().st_size < ref.stat().st_size


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--method", "foo", "--target", "0.5"], "unknown"),
        (["--method", "l1", "--target", "1.5"], "between 0 and 1"),
        (["--method", "sbf", "--target", "0.5", "--score-steps", "0"], "at least 1"),
    ],
)
def test_compress_command_rejects_bad_input(crown_checkpoint, args, needle):
    ck, ref = crown_checkpoint
    res = CliRunner().invoke(app, ["compress", "--model", str(ck), "--reference-onnx", str(ref), *args])
    assert res.exit_code == 2 and needle in res.output


def test_compress_command_fine_tunes_with_distillation_from_the_dense_model(crown_checkpoint, tmp_path):
    ck, ref = crown_checkpoint
    out = tmp_path / "kd.onnx"
    args = ["compress", "--model", str(ck), "--method", "l1", "--target", "0.5", "--reference-onnx", str(ref),
            "--out", str(out), "--finetune", "2", "--distill", "0.5", "--threads", "1"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    ft = json.loads(read_metadata(out)["compression"])["finetune"]
    assert ft["steps"] == 2 and ft["distillation"] == {"weight": 0.5, "temperature": 2.0}
    bad = CliRunner().invoke(app, args[:-4] + ["--distill", "1.5"])
    assert bad.exit_code == 2 and "--distill 1.5 must be a loss weight" in bad.output


def test_compress_command_learns_scores_with_sbf(crown_checkpoint, tmp_path):
    """--method sbf: scores learned on the crown training crops, the budget met, the score history in the
    record of the ONNX file."""
    ck, ref = crown_checkpoint
    out = tmp_path / "sbf.onnx"
    res = CliRunner().invoke(app, ["compress", "--model", str(ck), "--method", "sbf", "--target", "0.5",
                                   "--score-steps", "40", "--reference-onnx", str(ref), "--out", str(out)])
    assert res.exit_code == 0, res.output
    rec = json.loads(read_metadata(out)["compression"])
    assert rec["method"] == "sbf" and abs(rec["macs_after"] / rec["macs_before"] - 0.5) <= 0.02
    first, last = rec["score_history"]
    assert rec["score_steps"] == 40 and last["step"] == 39
    assert last["soft_cost_fraction"] < first["soft_cost_fraction"]
