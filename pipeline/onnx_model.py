"""One ONNX Runtime CPU session per model, with everything the engine needs read from the file's metadata.

The metadata contract (ARCHITECTURE.md, "ONNX model contract") is the only source of model facts: class
names, GSD, tile/chip size, overlap, thresholds, version. There are no side files.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import InputError

CROWN_TASK = "crown_segmentation"
SPECIES_TASK = "species_classification"

_REQUIRED = ("task", "class_names", "gsd_m", "tile_size", "bands", "model_version")
_REQUIRED_BY_TASK = {CROWN_TASK: ("overlap_px",), SPECIES_TASK: ("unknown_threshold",)}


@dataclass(frozen=True)
class ModelMeta:
    """Parsed ``metadata_props`` of a crown or species model (units in the names)."""

    task: str
    class_names: list[str]
    gsd_m: float
    tile_size: int
    bands: list[str]
    model_version: str
    overlap_px: int = 0
    unknown_threshold: float = 0.0
    training_data: str = ""
    validation_metrics: dict[str, Any] = field(default_factory=dict)
    compression: dict[str, Any] | None = None
    postprocess: dict[str, Any] = field(default_factory=dict)
    postprocess_tta: dict[str, Any] = field(default_factory=dict)  # thresholds for test-time augmentation
    raw: dict[str, str] = field(default_factory=dict)


def _json_value(path: Path, key: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise InputError(f"{path}: metadata key {key!r} is not valid JSON ({text[:40]!r}); "
                         "re-export the model with models/export.py") from None


def parse_metadata(path: Path, props: dict[str, str]) -> ModelMeta:
    """Validate and parse the metadata of the model at ``path``; InputError names what is missing."""
    missing = [k for k in _REQUIRED if k not in props]
    task = props.get("task", "")
    if not missing and task not in _REQUIRED_BY_TASK:
        raise InputError(f"{path}: metadata 'task' is {task!r}, expected {CROWN_TASK!r} or {SPECIES_TASK!r}")
    missing += [k for k in _REQUIRED_BY_TASK.get(task, ()) if k not in props]
    if missing:
        raise InputError(f"{path}: ONNX metadata is missing {', '.join(missing)}; export the model with "
                         "models/export.py so it carries the metadata contract (ARCHITECTURE.md)")
    class_names = _json_value(path, "class_names", props["class_names"])
    bands = _json_value(path, "bands", props["bands"])
    if not isinstance(class_names, list) or not class_names:
        raise InputError(f"{path}: metadata 'class_names' must be a non-empty JSON list")
    try:
        gsd_m = float(props["gsd_m"])
        tile_size = int(props["tile_size"])
        overlap_px = int(props.get("overlap_px", 0))
        unknown_threshold = float(props.get("unknown_threshold", 0.0))
    except ValueError:
        raise InputError(f"{path}: metadata gsd_m/tile_size/overlap_px/unknown_threshold must be numbers"
                         ) from None
    if gsd_m <= 0 or tile_size <= 0 or overlap_px < 0 or overlap_px >= tile_size:
        raise InputError(f"{path}: metadata needs gsd_m > 0, tile_size > 0 and 0 <= overlap_px < tile_size "
                         f"(got {gsd_m}, {tile_size}, {overlap_px})")
    def optional(key: str, default: Any) -> Any:
        return _json_value(path, key, props[key]) if key in props else default

    metrics = optional("validation_metrics", {})
    compression = optional("compression", None)
    postprocess = optional("postprocess", {})
    postprocess_tta = optional("postprocess_tta", {})
    for key, value in (("postprocess", postprocess), ("postprocess_tta", postprocess_tta)):
        if not isinstance(value, dict):
            raise InputError(f"{path}: metadata {key!r} must be a JSON object of thresholds")
    return ModelMeta(task=task, class_names=[str(c) for c in class_names], gsd_m=gsd_m, tile_size=tile_size,
                     bands=[str(b) for b in bands], model_version=props["model_version"],
                     overlap_px=overlap_px,
                     unknown_threshold=unknown_threshold, training_data=props.get("training_data", ""),
                     validation_metrics=metrics if isinstance(metrics, dict) else {"value": metrics},
                     compression=compression, postprocess=postprocess, postprocess_tta=postprocess_tta,
                     raw=dict(props))


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class OnnxModel:
    """A crown or species model: one reusable CPU session plus its parsed metadata.

    ``threads``: intra-op threads (None or 0 = all cores). ``run(batch)`` takes uint8 NCHW and returns the
    ``probs`` output as float32.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None, expected_task: str | None = None):
        import onnxruntime as ort  # deferred: importing pipeline stays cheap

        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"{self.path}: model file not found; pass an existing .onnx file")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads) if threads else (os.cpu_count() or 1)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        # no busy-waiting between runs: the engine post-processes tiles on the same cores while a batch runs
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise InputError(f"{self.path}: not a loadable ONNX model ({first}); pass a valid .onnx file"
                             ) from None
        props = dict(self.session.get_modelmeta().custom_metadata_map)
        self.meta = parse_metadata(self.path, props)
        if expected_task and self.meta.task != expected_task:
            raise InputError(f"{self.path}: model task is {self.meta.task!r} but a {expected_task!r} model "
                             "is needed here; check --crown-model / --species-model")
        inputs = self.session.get_inputs()
        self._check_input(inputs)
        self.input_name = inputs[0].name
        outputs = [o.name for o in self.session.get_outputs()]
        self.output_name = "probs" if "probs" in outputs else outputs[0]
        self.sha256 = file_sha256(self.path)
        self.calls = 0  # number of run() calls (tests count them)

    def _check_input(self, inputs: list) -> None:
        """The contract's input: one uint8 NCHW tensor of 3 bands (red, green, blue), H = W = tile_size."""
        bands = [str(b).lower() for b in self.meta.bands]
        if bands != ["red", "green", "blue"]:
            raise InputError(f"{self.path}: model expects bands {self.meta.bands} but the engine feeds "
                             "red, green, blue; pass an RGB model (choose the image bands with --bands)")
        shape = list(inputs[0].shape) if inputs else []
        fixed = [d if isinstance(d, int) else None for d in shape]
        if len(inputs) != 1 or len(shape) != 4 or fixed[1] not in (None, 3) \
                or inputs[0].type != "tensor(uint8)":
            got = [(i.name, i.type, i.shape) for i in inputs]
            raise InputError(f"{self.path}: model input must be one uint8 [N, 3, H, W] tensor (got {got}); "
                             "re-export it with models/export.py")
        if any(d is not None and d != self.meta.tile_size for d in fixed[2:]):
            raise InputError(f"{self.path}: model input is {shape[2]}x{shape[3]} px but metadata tile_size "
                             f"is {self.meta.tile_size}; re-export it with models/export.py")

    @property
    def name(self) -> str:
        return self.path.stem

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run the model on a uint8 NCHW batch; return ``probs`` as float32."""
        self.calls += 1
        feed = {self.input_name: np.ascontiguousarray(batch, dtype=np.uint8)}
        out = self.session.run([self.output_name], feed)
        return np.asarray(out[0], dtype=np.float32)
