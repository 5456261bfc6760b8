"""Tiny crown and species ONNX models built with onnx.helper, carrying the full metadata contract.

They do real, predictable work so engine tests have known answers:
- crown model: p(crown) = sigmoid(sharpness * (mean(R,G,B)/255 - brightness_threshold)); bright discs on a
  dark background are crowns; p(boundary) is ~0 and p(background) the rest (softmax over 3 logits).
- species model: softmax over K logits = W @ mean(R,G,B)/255 of the chip; with the default two species the
  red-dominant chips are class 0 and the green-dominant chips class 1.

Usage: ``from tests.tiny_models import write_crown_model, write_species_model``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _meta(model: onnx.ModelProto, props: dict[str, str]) -> None:
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def crown_model_proto(tile_size: int = 128, gsd_m: float = 0.1, overlap_px: int = 48,
                      brightness_threshold: float = 0.4, sharpness: float = 40.0,
                      postprocess: dict | None = None, metadata: dict | None = None) -> onnx.ModelProto:
    """A crown_segmentation model with input ``image`` uint8 [N,3,T,T] and output ``probs`` [N,3,T,T]."""
    t = tile_size
    inits = [
        numpy_helper.from_array(np.array(1.0 / 255.0, dtype=np.float32), "scale"),
        numpy_helper.from_array(np.array(brightness_threshold, dtype=np.float32), "thr"),
        numpy_helper.from_array(np.array(sharpness, dtype=np.float32), "sharp"),
        numpy_helper.from_array(np.array(-10.0, dtype=np.float32), "boundary_logit"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
    ]
    nodes = [
        helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x", "scale"], ["xs"]),
        helper.make_node("ReduceMean", ["xs"], ["bright"], axes=[1], keepdims=1),
        helper.make_node("Sub", ["bright", "thr"], ["d"]),
        helper.make_node("Mul", ["d", "sharp"], ["crown_logit"]),
        helper.make_node("Mul", ["bright", "zero"], ["bg_logit"]),
        helper.make_node("Add", ["bg_logit", "boundary_logit"], ["bd_logit"]),
        helper.make_node("Concat", ["bg_logit", "crown_logit", "bd_logit"], ["logits"], axis=1),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny_crowns",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 3, t, t])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 3, t, t])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tests")
    model.ir_version = 8
    props = {
        "task": "crown_segmentation",
        "class_names": json.dumps(["background", "crown", "boundary"]),
        "gsd_m": str(gsd_m), "tile_size": str(t), "overlap_px": str(overlap_px),
        "bands": json.dumps(["red", "green", "blue"]),
        "model_version": "tiny-crowns-0", "training_data": "none (test model)",
        "validation_metrics": json.dumps({}),
    }
    if postprocess is not None:
        props["postprocess"] = json.dumps(postprocess)
    props.update(metadata or {})
    _meta(model, props)
    onnx.checker.check_model(model)
    return model


def species_model_proto(chip_size: int = 32, gsd_m: float = 0.1, class_names: list[str] | None = None,
                        weights: np.ndarray | None = None, unknown_threshold: float = 0.4,
                        metadata: dict | None = None) -> onnx.ModelProto:
    """A species_classification model: input ``image`` uint8 [N,3,C,C], output ``probs`` [N,K]."""
    names = class_names or ["Pinus palustris", "Quercus laevis"]
    k = len(names)
    if weights is None:
        weights = np.zeros((3, k), dtype=np.float32)
        weights[0, 0], weights[1, 0] = 30.0, -30.0
        if k > 1:
            weights[0, 1], weights[1, 1] = -30.0, 30.0
    inits = [numpy_helper.from_array(np.array(1.0 / 255.0, dtype=np.float32), "scale"),
             numpy_helper.from_array(np.asarray(weights, dtype=np.float32), "W")]
    nodes = [
        helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x", "scale"], ["xs"]),
        helper.make_node("ReduceMean", ["xs"], ["m"], axes=[2, 3], keepdims=0),
        helper.make_node("MatMul", ["m", "W"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny_species",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 3, chip_size, chip_size])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", k])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tests")
    model.ir_version = 8
    props = {
        "task": "species_classification", "class_names": json.dumps(names),
        "gsd_m": str(gsd_m), "tile_size": str(chip_size), "unknown_threshold": str(unknown_threshold),
        "bands": json.dumps(["red", "green", "blue"]), "model_version": "tiny-species-0",
        "training_data": "none (test model)", "validation_metrics": json.dumps({}),
    }
    props.update(metadata or {})
    _meta(model, props)
    onnx.checker.check_model(model)
    return model


def write_crown_model(path: str | Path, **kwargs) -> Path:
    """Write :func:`crown_model_proto` to ``path``; returns the path."""
    path = Path(path)
    onnx.save(crown_model_proto(**kwargs), str(path))
    return path


def write_species_model(path: str | Path, **kwargs) -> Path:
    """Write :func:`species_model_proto` to ``path``; returns the path."""
    path = Path(path)
    onnx.save(species_model_proto(**kwargs), str(path))
    return path
