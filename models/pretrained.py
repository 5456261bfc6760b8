"""An ImageNet-derived start for the ``mobilenet_v2`` crown encoder, converted from the npm package nsfwjs.

No model hub is reachable, but the npm package ``nsfwjs`` (MIT, Infinite Red) ships a TF.js layers model of
a Keras MobileNetV2 (width 1.0, 224 px) whose layers up to ``block_10`` are marked non-trainable in the
model file: ImageNet features, most likely; the later blocks and the dense head were retrained for the
package's own task. This module

1. fetches the package with ``npm pack nsfwjs@4.4.0`` into a cache folder (:func:`fetch_nsfwjs`);
2. reads the TF.js model (:func:`read_tfjs_model`, :func:`load_tfjs_weights`): in nsfwjs both files are
   JavaScript bundles, ``model.min.js`` holds the model object (modelTopology + weightsManifest) as a JS
   object literal and ``group1-shard1of1.min.js`` the weight buffer as one base64 string; the weights are
   uint8-quantised per tensor, ``value = q * scale + min``;
3. maps the Keras names onto the state dict of smp's ``mobilenet_v2`` encoder, which is torchvision's
   ``MobileNetV2`` (:func:`keras_mobilenetv2_to_smp`), and loads them (:func:`load_pretrained_encoder`).

Differences between the Keras and the torch network, and how each is handled:

- **BatchNorm epsilon**: Keras uses 1e-3, torch 1e-5. The difference is folded into the running
  variance (``running_var = moving_variance + 1e-3 - 1e-5``), so the torch modules keep their default
  eps and a checkpoint rebuilt by :func:`models.nets.build_crown_net` is the same network. At load time
  the two BNs agree exactly; later training updates the running statistics as usual.
- **Stride-2 padding**: Keras pads stride-2 convolutions by one pixel at the bottom/right only
  (``ZeroPadding2D((0, 1), (0, 1))`` + 'valid'), torch pads one pixel on every side. Output sizes are the
  same, but each stride-2 layer samples its window one input pixel up/left of Keras. Away from the image
  border the converted network is exactly the Keras network applied to the input translated by
  1 + 2 + 4 + 8 = 15 px down/right at block_10 (31 px after block_13): the same features, sampled at a
  slightly different grid phase. Accepted for an encoder start; not changed.

Checked against the original runtime (TF.js 4.22, CPU backend, a 224 px NEON image): with Keras' padding
emulated in torch and ``absorb_input_norm=False`` the converted network reproduces TF.js at Conv1_relu,
block_10_project_BN and out_relu within 3e-5 (max abs; relative L2 <= 2.3e-6).
- **Input normalisation**: Keras MobileNetV2 expects ``x / 127.5 - 1`` (x in 0..255, RGB); this project
  feeds ``(x - 255 * mean) / (255 * std)`` with the ImageNet mean/std (:func:`models.export.normalise_uint8`).
  With ``absorb_input_norm=True`` (the default) the first convolution is rewritten so that the converted
  network takes our normalisation: ``x_keras = 2 * std_c * x_ours + (2 * mean_c - 1)``, so the kernel is
  scaled by ``2 * std_c`` per input channel and the constant ``sum_chw w * (2 * mean_c - 1)`` (the first
  conv has no bias) is subtracted from ``bn_Conv1``'s running mean. This is exact wherever the 3x3 window
  lies inside the image; on the border, Keras' zero padding is a zero in *its* input range, ours in ours.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.export import IMAGENET_MEAN, IMAGENET_STD
from pipeline.errors import InputError

NSFWJS_VERSION = "4.4.0"
NSFWJS_MODEL_SUBDIR = "package/dist/models/mobilenet_v2"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "forest-inventory" / "nsfwjs"
# sha256 of the two model files of nsfwjs 4.4.0 (a different file means a different model)
NSFWJS_SHA256 = {
    "model.min.js": "c32f104fd562b08cdff5ed69dfe1209643afa47e792fb12751d2949aa61a397a",
    "group1-shard1of1.min.js": "ef2e0a63f7d2c4960b37b024b669313f65d3c45cd59e9042636c55b39de53517",
}
IMAGENET_UPTO_BLOCK = 10  # nsfwjs marks Conv1 .. block_10 non-trainable: the ImageNet part
KERAS_BN_EPS = 1e-3
TORCH_BN_EPS = 1e-5
LAST_BLOCK = 17  # Conv_1 (1x1 to 1280 channels) counts as block 17; Conv1 + expanded_conv as block 0


# --- fetching -------------------------------------------------------------------------------------------

def fetch_nsfwjs(cache_dir: str | Path | None = None, version: str = NSFWJS_VERSION) -> Path:
    """Download nsfwjs with ``npm pack`` into ``cache_dir`` (reused when present); the mobilenet_v2 folder.

    Only the ``dist/models/mobilenet_v2`` files, ``package.json`` and ``LICENSE`` are extracted; the
    tarball is deleted afterwards. For the pinned version the model files are checked against sha256 sums.
    """
    cache = Path(cache_dir) if cache_dir else Path(os.environ.get("FOREST_NSFWJS_CACHE", DEFAULT_CACHE_DIR))
    cache = cache / version
    model_dir = cache / NSFWJS_MODEL_SUBDIR
    if not _model_files_present(model_dir):
        npm = shutil.which("npm")
        if npm is None:
            raise InputError(
                "npm not found: install Node.js/npm (e.g. apt-get install npm) to fetch the nsfwjs encoder, "
                "or train with --encoder-init ''"
            )
        cache.mkdir(parents=True, exist_ok=True)
        try:
            proc = subprocess.run(
                [npm, "pack", f"nsfwjs@{version}", "--silent"], cwd=cache, capture_output=True, text=True,
                timeout=600,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise InputError(f"npm pack nsfwjs@{version} failed ({exc}): check npm and the registry") from exc
        tarballs = sorted(cache.glob("nsfwjs-*.tgz"))
        if proc.returncode != 0 or not tarballs:
            last = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or ["no output"]
            raise InputError(
                f"npm pack nsfwjs@{version} failed in {cache}: {last[0]}; check network access to the npm "
                "registry (npm config get registry)"
            )
        _extract_model(tarballs[-1], cache)
        for t in tarballs:
            t.unlink()
        if not _model_files_present(model_dir):
            raise InputError(f"{model_dir}: nsfwjs@{version} has no mobilenet_v2 model; use {NSFWJS_VERSION}")
    if version == NSFWJS_VERSION:
        for name, digest in NSFWJS_SHA256.items():
            if _sha256(model_dir / name) != digest:
                raise InputError(f"{model_dir / name}: checksum is not nsfwjs {version}'s; delete {cache}")
    return model_dir


def _model_files_present(model_dir: Path) -> bool:
    return model_dir.is_dir() and any(model_dir.glob("model*.js*")) and any(model_dir.glob("group1-shard*"))


def _extract_model(tarball: Path, dest: Path) -> None:
    """Extract the mobilenet_v2 model files (+ package.json, LICENSE) of an npm tarball, safely."""
    wanted = (NSFWJS_MODEL_SUBDIR + "/", "package/package.json", "package/LICENSE")
    root = dest.resolve()
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar.getmembers():
            if not member.isfile() or not member.name.startswith(wanted):
                continue
            target = (dest / member.name).resolve()
            if root not in target.parents:
                raise InputError(f"{tarball}: unsafe path {member.name} in the npm tarball")
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            if src is None:
                continue
            with src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- reading the TF.js model ----------------------------------------------------------------------------

def parse_js_literal(text: str, start: int = 0) -> tuple[Any, int]:
    """Parse one JavaScript literal (object, array, string, number, ``!0``/``!1``, true/false/null).

    Object keys may be bare identifiers or strings. Returns ``(value, index after it)``.
    """
    return _JsParser(text).value(start)


class _JsParser:
    _number = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
    _ident = re.compile(r"[A-Za-z_$][A-Za-z0-9_$]*")

    def __init__(self, text: str) -> None:
        self.s = text

    def ws(self, i: int) -> int:
        while i < len(self.s) and self.s[i] in " \t\r\n":
            i += 1
        return i

    def value(self, i: int) -> tuple[Any, int]:
        i = self.ws(i)
        if i >= len(self.s):
            raise ValueError("unexpected end of JavaScript literal")
        c = self.s[i]
        if c == "{":
            return self.obj(i + 1)
        if c == "[":
            return self.arr(i + 1)
        if c in "\"'":
            return self.string(i)
        if c == "!" and self.s[i + 1: i + 2] in ("0", "1"):
            return self.s[i + 1] == "0", i + 2
        for word, val in (("true", True), ("false", False), ("null", None), ("undefined", None)):
            if self.s.startswith(word, i):
                return val, i + len(word)
        m = self._number.match(self.s, i)
        if m:
            t = m.group()
            is_int = not any(ch in t for ch in ".eE")
            return (int(t) if is_int else float(t)), m.end()
        raise ValueError(f"unexpected {self.s[i:i + 20]!r} at {i}")

    def obj(self, i: int) -> tuple[dict, int]:
        out: dict[str, Any] = {}
        while True:
            i = self.ws(i)
            if self.s[i] == "}":
                return out, i + 1
            if self.s[i] in "\"'":
                key, i = self.string(i)
            else:
                m = self._ident.match(self.s, i) or self._number.match(self.s, i)
                if not m:
                    raise ValueError(f"bad object key at {i}: {self.s[i:i + 20]!r}")
                key, i = m.group(), m.end()
            i = self.ws(i)
            if self.s[i] != ":":
                raise ValueError(f"expected ':' at {i}")
            out[key], i = self.value(i + 1)
            i = self.ws(i)
            if self.s[i] == ",":
                i += 1
            elif self.s[i] != "}":
                raise ValueError(f"expected ',' or '}}' at {i}")

    def arr(self, i: int) -> tuple[list, int]:
        out: list[Any] = []
        while True:
            i = self.ws(i)
            if self.s[i] == "]":
                return out, i + 1
            v, i = self.value(i)
            out.append(v)
            i = self.ws(i)
            if self.s[i] == ",":
                i += 1
            elif self.s[i] != "]":
                raise ValueError(f"expected ',' or ']' at {i}")

    def string(self, i: int) -> tuple[str, int]:
        quote, j, parts = self.s[i], i + 1, []
        while True:
            k = self.s.find(quote, j)
            b = self.s.find("\\", j)
            if k < 0:
                raise ValueError(f"unterminated string at {i}")
            if 0 <= b < k:
                parts.append(self.s[j:b])
                esc = self.s[b + 1]
                if esc == "u":
                    parts.append(chr(int(self.s[b + 2: b + 6], 16)))
                    j = b + 6
                else:
                    parts.append({"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f"}.get(esc, esc))
                    j = b + 2
                continue
            parts.append(self.s[j:k])
            return "".join(parts), k + 1


def _exported_value(text: str, opener: str) -> tuple[Any, int]:
    """The first ``exports=<literal>`` in a browserify bundle whose literal starts with ``opener``."""
    for m in re.finditer(r"exports\s*=\s*", text):
        if text[m.end(): m.end() + 1] == opener:
            return parse_js_literal(text, m.end())
    raise ValueError(f"no 'exports=' followed by {opener!r} found")


def read_tfjs_model(model_dir: str | Path) -> dict:
    """The TF.js model object (modelTopology, weightsManifest) from model.json or nsfwjs' model.min.js."""
    d = Path(model_dir)
    if (d / "model.json").exists():
        return json.loads((d / "model.json").read_text())
    js = sorted(d.glob("model*.js"))
    if not js:
        raise InputError(f"{d}: no model.json or model*.js; run fetch_nsfwjs() again or delete the cache")
    model, _ = _exported_value(js[0].read_text(), "{")
    if "weightsManifest" not in model:
        raise InputError(f"{js[0]}: no weightsManifest in the model object; not a TF.js layers model")
    return model


def extract_base64_buffer(js_text: str) -> bytes:
    """The weight bytes of a TF.js shard bundled as JavaScript: the base64 string ``exports="..."``.

    Falls back to the longest quoted base64 string in the file when there is no ``exports=`` string.
    """
    m = re.search(r"exports\s*=\s*([\"'])([A-Za-z0-9+/=\s]*)\1", js_text)
    if m:
        payload = m.group(2)
    else:
        found = re.findall(r"\"([A-Za-z0-9+/]{16,}={0,2})\"", js_text)
        if not found:
            raise ValueError("no base64 string found in the JavaScript shard")
        payload = max(found, key=len)
    return base64.b64decode("".join(payload.split()), validate=True)


def _read_shard(model_dir: Path, path: str) -> bytes:
    for candidate in (model_dir / path, model_dir / f"{path}.min.js", model_dir / f"{path}.js"):
        if candidate.is_file():
            if candidate.suffix == ".js":
                return extract_base64_buffer(candidate.read_text())
            return candidate.read_bytes()
    raise InputError(f"{model_dir}: weight shard {path} not found; delete the cache and fetch again")


_BYTES = {"uint8": 1, "uint16": 2, "float16": 2, "float32": 4, "int32": 4, "bool": 1}


def dequantise_manifest(manifest: Sequence[dict], buffer: bytes) -> dict[str, np.ndarray]:
    """Split one manifest group's concatenated ``buffer`` into float32 arrays, dequantising as declared.

    ``quantization: {dtype: uint8|uint16, min, scale}`` -> ``q * scale + min``; ``{dtype: float16}`` ->
    float16 values; unquantised float32/int32 are read as they are (little-endian, as TF.js writes them).
    """
    out: dict[str, np.ndarray] = {}
    offset = 0
    for entry in manifest:
        shape = tuple(int(s) for s in entry["shape"])
        n = int(np.prod(shape)) if shape else 1
        q = entry.get("quantization")
        dtype = (q or entry)["dtype"]
        if dtype not in _BYTES:
            raise ValueError(f"{entry['name']}: unsupported dtype {dtype}")
        nbytes = n * _BYTES[dtype]
        raw = buffer[offset: offset + nbytes]
        if len(raw) != nbytes:
            raise ValueError(f"{entry['name']}: buffer ends at {len(buffer)}, need {offset + nbytes}")
        offset += nbytes
        arr = np.frombuffer(raw, dtype=np.dtype(dtype if dtype != "bool" else "uint8").newbyteorder("<"))
        if q is not None and dtype in ("uint8", "uint16"):
            if "min" not in q or "scale" not in q:
                raise ValueError(f"{entry['name']}: affine quantisation without min/scale")
            val = arr.astype(np.float64) * float(q["scale"]) + float(q["min"])
        else:
            val = arr.astype(np.float64)
        out[entry["name"]] = val.astype(np.float32).reshape(shape)
    if offset != len(buffer):
        raise ValueError(f"buffer has {len(buffer)} bytes, the manifest describes {offset}")
    return out


def load_tfjs_weights(model_dir: str | Path) -> dict[str, np.ndarray]:
    """All weights of a TF.js layers model: ``"layer/param"`` -> float32 array in Keras layout."""
    d = Path(model_dir)
    model = read_tfjs_model(d)
    weights: dict[str, np.ndarray] = {}
    for group in model["weightsManifest"]:
        buffer = b"".join(_read_shard(d, p) for p in group["paths"])
        weights.update(dequantise_manifest(group["weights"], buffer))
    return weights


def frozen_upto_block(model: dict) -> int:
    """The last MobileNetV2 block whose layers are all marked non-trainable in the model topology."""
    layers = model["modelTopology"]["model_config"]["config"]["layers"]
    trainable: dict[int, bool] = {}
    for layer in layers:
        block = _keras_block(layer["name"])
        if block is not None and "trainable" in layer.get("config", {}):
            trainable[block] = trainable.get(block, False) or bool(layer["config"]["trainable"])
    last = -1
    for b in sorted(trainable):
        if trainable[b]:
            break
        last = b
    return last


# --- Keras MobileNetV2 -> smp / torchvision names -------------------------------------------------------

def _keras_block(layer: str) -> int | None:
    """Block number of a Keras MobileNetV2 layer (Conv1/expanded_conv: 0, block_N: N, Conv_1: 17)."""
    if layer.startswith(("Conv1", "bn_Conv1", "expanded_conv")):
        return 0
    m = re.match(r"block_(\d+)_", layer)
    if m:
        return int(m.group(1))
    if layer.startswith("Conv_1"):
        return LAST_BLOCK
    return None


def keras_layer_to_torch(layer: str) -> tuple[str, str] | None:
    """``(torch module prefix, "conv"|"dw"|"bn")`` for a Keras MobileNetV2 layer name, or None (head)."""
    fixed = {
        "Conv1": ("features.0.0", "conv"),
        "bn_Conv1": ("features.0.1", "bn"),
        "expanded_conv_depthwise": ("features.1.conv.0.0", "dw"),
        "expanded_conv_depthwise_BN": ("features.1.conv.0.1", "bn"),
        "expanded_conv_project": ("features.1.conv.1", "conv"),
        "expanded_conv_project_BN": ("features.1.conv.2", "bn"),
        "Conv_1": ("features.18.0", "conv"),
        "Conv_1_bn": ("features.18.1", "bn"),
    }
    if layer in fixed:
        return fixed[layer]
    m = re.fullmatch(r"block_(\d+)_(expand|depthwise|project)(_BN)?", layer)
    if not m:
        return None
    idx = int(m.group(1)) + 1  # torchvision features.1 is Keras' expanded_conv (block 0)
    part = {"expand": "conv.0", "depthwise": "conv.1", "project": "conv.2"}[m.group(2)]
    if m.group(2) == "project":
        prefix = f"features.{idx}.conv.3" if m.group(3) else f"features.{idx}.conv.2"
        return prefix, ("bn" if m.group(3) else "conv")
    if m.group(3):
        return f"features.{idx}.{part}.1", "bn"
    return f"features.{idx}.{part}.0", ("dw" if m.group(2) == "depthwise" else "conv")


_BN_PARAMS = {
    "gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var",
}


def keras_mobilenetv2_to_smp(
    weights: dict[str, np.ndarray],
    upto_block: int | None = None,
    absorb_input_norm: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> dict[str, torch.Tensor]:
    """Keras MobileNetV2 weights (``"layer/param"``, Keras layout) -> smp ``mobilenet_v2`` encoder state dict.

    Conv kernels HWIO -> OIHW, depthwise (H, W, C, 1) -> (C, 1, H, W); BN gamma/beta/moving_mean/
    moving_variance -> weight/bias/running_mean/running_var with the eps difference folded into running_var.
    ``upto_block`` keeps blocks 0..upto_block only (None: all; 17 is Conv_1). With ``absorb_input_norm`` the
    first conv + BN take this project's ImageNet mean/std input instead of Keras' ``x / 127.5 - 1``.
    The dense head (``dense_*``) is ignored. Keys are relative to the encoder (``features.N...``).
    """
    out: dict[str, torch.Tensor] = {}
    for name, arr in weights.items():
        layer, _, param = name.partition("/")
        block = _keras_block(layer)
        mapped = keras_layer_to_torch(layer)
        if mapped is None or block is None or (upto_block is not None and block > upto_block):
            continue
        prefix, kind = mapped
        a = np.asarray(arr, dtype=np.float32)
        if kind == "conv" and param == "kernel":
            out[f"{prefix}.weight"] = torch.from_numpy(np.ascontiguousarray(a.transpose(3, 2, 0, 1)))
        elif kind == "dw" and param == "depthwise_kernel":
            out[f"{prefix}.weight"] = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 3, 0, 1)))
        elif kind == "bn" and param in _BN_PARAMS:
            if param == "moving_variance":
                a = np.maximum(a, 0.0) + np.float32(KERAS_BN_EPS - TORCH_BN_EPS)
            out[f"{prefix}.{_BN_PARAMS[param]}"] = torch.from_numpy(a.copy())
        else:
            raise ValueError(f"{name}: unexpected weight for a Keras MobileNetV2 {kind} layer")
    if absorb_input_norm and "features.0.0.weight" in out:
        if "features.0.1.running_mean" not in out:
            raise ValueError("absorbing the input normalisation needs bn_Conv1 with Conv1")
        w = out["features.0.0.weight"].double()  # (O, 3, kh, kw) acting on Keras input x/127.5 - 1
        s = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
        m = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
        const = (w * (2.0 * m - 1.0)).sum(dim=(1, 2, 3))  # per output channel
        out["features.0.0.weight"] = (w * 2.0 * s).float()
        out["features.0.1.running_mean"] = (out["features.0.1.running_mean"].double() - const).float()
    return out


def load_pretrained_encoder(
    net: nn.Module,
    upto_block: int | None = None,
    source: str = "nsfwjs",
    cache_dir: str | Path | None = None,
    weights: dict[str, np.ndarray] | None = None,
) -> dict[str, list[str]]:
    """Load the converted MobileNetV2 blocks 0..``upto_block`` into ``net.encoder`` (an smp mobilenet_v2).

    ``upto_block=None`` loads the ImageNet part (block_10 and below, as the model file marks it frozen).
    ``weights`` (Keras layout) skips the download (tests). Returns ``{"loaded": [...], "not_loaded": [...],
    "unused": [...]}``: encoder keys set from the file, encoder keys left as they were, converted keys the
    network has no slot for (e.g. stages dropped by a smaller ``encoder_depth``); BN batch counters are
    left out of the lists.
    """
    if source != "nsfwjs":
        raise InputError(f"unknown encoder init {source!r}: use 'nsfwjs' or ''")
    encoder = getattr(net, "encoder", None)
    if encoder is None or not hasattr(encoder, "features") or not hasattr(encoder, "_out_indexes"):
        raise InputError("the nsfwjs encoder start needs an smp network with encoder 'mobilenet_v2'")
    if weights is None:
        model_dir = fetch_nsfwjs(cache_dir)
        if upto_block is None:
            upto_block = frozen_upto_block(read_tfjs_model(model_dir))
        weights = load_tfjs_weights(model_dir)
    if upto_block is None:
        upto_block = IMAGENET_UPTO_BLOCK
    converted = keras_mobilenetv2_to_smp(weights, upto_block=upto_block)
    own = encoder.state_dict()
    loadable = {}
    for key, value in converted.items():
        if key in own:
            if tuple(own[key].shape) != tuple(value.shape):
                raise InputError(
                    f"encoder {key}: shape {tuple(own[key].shape)} vs converted {tuple(value.shape)}; "
                    "the nsfwjs start needs mobilenet_v2 at width 1.0"
                )
            loadable[key] = value.to(own[key].dtype)
    encoder.load_state_dict(loadable, strict=False)
    return {
        "loaded": sorted(loadable, key=_natural),
        "not_loaded": sorted((k for k in own if k not in loadable and not k.endswith("num_batches_tracked")),
                             key=_natural),
        "unused": sorted((k for k in converted if k not in own), key=_natural),
    }


def _natural(key: str) -> list[Any]:
    """Sort key with numbers compared as numbers (features.2 before features.10)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]
