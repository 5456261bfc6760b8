"""Security properties of issue 7: inference loads ONNX only (never a pickle), torch checkpoints load with
``weights_only=True``, no network at run time (HF_HUB_OFFLINE, Prefect analytics off), a local Prefect server
binds to loopback unless the user says otherwise, and file names taken from inputs stay inside --out.

Source checks walk the AST of every module, so a call hidden in a comment or string does not count and a
renamed import (``import pickle as p``) still does.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = sorted((ROOT / "pipeline").rglob("*.py"))
MODELS = sorted((ROOT / "models").rglob("*.py"))
FLOWS = sorted((ROOT / "flows").rglob("*.py"))

# modules that deserialise arbitrary Python objects (code execution on load)
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _tree(path: Path) -> ast.AST:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _imports(tree: ast.AST) -> list[tuple[str, int, bool]]:
    """(module, line, at_module_level) for every import in ``tree``."""
    top = set(map(id, getattr(tree, "body", [])))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno, id(node) in top))
    return found


def _calls(tree: ast.AST) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)]


def _dotted(func: ast.AST) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def test_source_lists_are_not_empty():
    assert len(PIPELINE) >= 10 and len(MODELS) >= 5 and len(FLOWS) >= 5


@pytest.mark.parametrize("path", FLOWS, ids=lambda p: str(p.relative_to(ROOT)))
def test_flows_never_unpickle_and_keep_results_out_of_the_output_folder(path):
    """issue 17: flows/ loads no pickle itself, and every Prefect ``result_storage`` (Prefect pickles task
    results) comes from ``result_dir``/``cache_dir``, which lie under the Prefect home, not in --out."""
    tree = _tree(path)
    _assert_never_unpickles(path, tree)
    storages = [kw.value for call in _calls(tree) for kw in call.keywords if kw.arg == "result_storage"]
    storages += [v for node in ast.walk(tree) if isinstance(node, ast.Dict)
                 for k, v in zip(node.keys, node.values, strict=True)
                 if isinstance(k, ast.Constant) and k.value == "result_storage"]
    for value in storages:
        source = ast.unparse(value)
        assert isinstance(value, ast.Name) or any(f in source for f in ("result_dir(", "cache_dir(")), \
            f"{path}:{value.lineno}: result_storage={source} must come from flows.settings.result_dir"


def test_flow_results_live_outside_the_output_folder(tmp_path, monkeypatch):
    from flows.inventory import cache_dir
    from flows.settings import configure, result_dir, results_home
    from pipeline.errors import InputError

    monkeypatch.delenv("FOREST_INVENTORY_RESULTS", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "out"
    saved = dict(os.environ)
    try:
        configure(out)  # batch and serve put the Prefect home inside their output folder
        for folder in (cache_dir(out / "site"), result_dir("compress", out)):
            assert out not in folder.parents and folder.is_relative_to(tmp_path / "cache")
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert cache_dir(out) != cache_dir(tmp_path / "other")
    monkeypatch.setenv("FOREST_INVENTORY_RESULTS", str(out / "r"))
    assert results_home() == (out / "r").resolve()
    with pytest.raises(InputError, match="result store"):
        cache_dir(out)


@pytest.mark.parametrize("path", PIPELINE, ids=lambda p: str(p.relative_to(ROOT)))
def test_pipeline_never_unpickles(path):
    _assert_never_unpickles(path, _tree(path))


def _assert_never_unpickles(path, tree) -> None:
    """No pickle-capable module imported, no torch.load / read_pickle / jit.load, np.load without pickles."""
    bad = [(m, line) for m, line, _ in _imports(tree) if m.split(".")[0] in UNSAFE_MODULES]
    assert not bad, f"{path}: imports {bad}"
    for call in _calls(tree):
        name = _dotted(call.func)
        assert not name.endswith(("torch.load", "read_pickle", "jit.load")), f"{path}:{call.lineno}: {name}"
        if name.endswith(("np.load", "numpy.load")):
            flag = _keyword(call, "allow_pickle")
            assert flag is None or (isinstance(flag, ast.Constant) and flag.value is False), \
                f"{path}:{call.lineno}: np.load with allow_pickle"


@pytest.mark.parametrize("path", PIPELINE, ids=lambda p: str(p.relative_to(ROOT)))
def test_pipeline_never_imports_torch_or_training_code_at_module_level(path):
    """The light install (inference) runs with ONNX Runtime only."""
    top = [m for m, _, at_top in _imports(_tree(path)) if at_top]
    heavy = {"torch", "models", "flows", "segmentation_models_pytorch"}
    assert not [m for m in top if m.split(".")[0] in heavy]


def test_inference_sessions_are_onnx_runtime_only():
    """The one model loader in pipeline/ is onnxruntime.InferenceSession, on the CPU provider."""
    loaders = []
    for path in PIPELINE:
        for call in _calls(_tree(path)):
            if _dotted(call.func).endswith("InferenceSession"):
                providers = _keyword(call, "providers")
                loaders.append((path.name, ast.unparse(providers) if providers is not None else None))
    assert loaders == [("onnx_model.py", "['CPUExecutionProvider']")]


def test_a_pickle_disguised_as_a_model_is_never_executed(tmp_path):
    """A malicious pickle renamed .onnx must fail to load without running its payload."""
    import pickle

    from pipeline.errors import InputError
    from pipeline.onnx_model import OnnxModel

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    bad = tmp_path / "crowns.onnx"
    bad.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(InputError, match="crowns.onnx"):
        OnnxModel(bad)
    assert not marker.exists()


@pytest.mark.parametrize("path", MODELS, ids=lambda p: str(p.relative_to(ROOT)))
def test_torch_checkpoints_load_with_weights_only(path):
    tree = _tree(path)
    for call in _calls(tree):
        name = _dotted(call.func)
        if name == "torch.load" or name.endswith(".torch.load"):
            flag = _keyword(call, "weights_only")
            assert isinstance(flag, ast.Constant) and flag.value is True, \
                f"{path}:{call.lineno}: torch.load without weights_only=True"
        if name.endswith(("np.load", "numpy.load")):
            flag = _keyword(call, "allow_pickle")
            assert flag is None or (isinstance(flag, ast.Constant) and flag.value is False), \
                f"{path}:{call.lineno}: np.load with allow_pickle"
    bad = [(m, line) for m, line, _ in _imports(tree) if m.split(".")[0] in UNSAFE_MODULES]
    assert not bad, f"{path}: imports {bad}"


def test_checkpoint_loader_refuses_arbitrary_objects(tmp_path):
    """The real loader (models/checkpoint.py) rejects a checkpoint that smuggles a Python object."""
    torch = pytest.importorskip("torch")
    checkpoint = pytest.importorskip("models.checkpoint")
    names = [n for n in ("load_checkpoint", "load") if hasattr(checkpoint, n)]
    loader = getattr(checkpoint, names[0]) if names else None
    if loader is None:
        pytest.skip("models.checkpoint has no load_checkpoint")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "last.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "evil": Payload()}, path)
    with pytest.raises(Exception):  # noqa: B017 - torch raises UnpicklingError, wrapped or not
        loader(path)
    assert not marker.exists()


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "HF_"))}
    env["PYTHONPATH"] = str(ROOT)
    return env


def _python(code: str, env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_models_package_sets_hf_hub_offline():
    """Importing models/ (torch-free __init__) switches the model hub off before any library can call it."""
    out = _python("import os, models; print(os.environ.get('HF_HUB_OFFLINE'))", _clean_env())
    assert out == "1"
    env = _clean_env() | {"HF_HUB_OFFLINE": "0"}  # a user's explicit choice is kept
    assert _python("import os, models; print(os.environ['HF_HUB_OFFLINE'])", env) == "0"


def test_prefect_settings_offline_and_loopback(tmp_path):
    code = f"import json, flows.settings as s; e = s.configure({str(tmp_path)!r}); print(json.dumps(e))"
    env = dict(json.loads(_python(code, _clean_env())))
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert env["PREFECT_SERVER_API_HOST"] == "127.0.0.1"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert Path(env["PREFECT_HOME"]).resolve() == (tmp_path / ".prefect").resolve()
    # the user says otherwise: their host wins
    user = _clean_env() | {"PREFECT_SERVER_API_HOST": "0.0.0.0"}
    env = dict(json.loads(_python(code, user)))
    assert env["PREFECT_SERVER_API_HOST"] == "0.0.0.0"


def test_prefect_reads_the_loopback_setting(tmp_path):
    """Prefect itself (not only os.environ) sees loopback and analytics off after configure()."""
    pytest.importorskip("prefect")
    code = (f"import flows.settings as s; s.configure({str(tmp_path)!r}); "
            "from prefect.settings import get_current_settings as g; st = g(); "
            "print(st.server.api.host, st.server.analytics_enabled, st.runner.server.host)")
    host, analytics, runner_host = _python(code, _clean_env()).split()
    assert (host, analytics) == ("127.0.0.1", "False")
    assert runner_host in ("localhost", "127.0.0.1")  # a served deployment's runner webserver


def test_local_dask_cluster_binds_loopback():
    pytest.importorskip("prefect_dask")
    from flows.settings import make_task_runner

    runner = make_task_runner("dask", workers=1)
    assert runner.cluster_kwargs.get("host") == "127.0.0.1"
    assert runner.cluster_kwargs.get("dashboard_address") is None


def test_serve_points_users_at_a_loopback_server():
    """serve talks to a server the user starts; the hint it prints starts one on loopback."""
    from flows import serve

    assert "--host 127.0.0.1" in serve.SERVER_HINT and "http://127.0.0.1:" in serve.SERVER_HINT


ODD_NAMES = ["plain.tif", "spaced name.tif", "a..b.tif", "..hidden.tif", "dots...tif", "ünïcode.tiff",
             "semi;colon.vrt", "-dash.tif"]


def test_batch_output_folders_stay_inside_out(tmp_path):
    """Output folder names come from input file names: each is a direct child of --out, whatever the name;
    a symlink pointing outside the input folder still writes inside --out."""
    from flows.batch import find_orthomosaics, output_folder

    folder = tmp_path / "flights"
    folder.mkdir()
    for name in ODD_NAMES:
        (folder / name).write_bytes(b"")
    outside = tmp_path / "elsewhere" / "far.tif"
    outside.parent.mkdir()
    outside.write_bytes(b"")
    (folder / "link.tif").symlink_to(outside)
    out = tmp_path / "out"
    found = find_orthomosaics(folder)
    assert "link.tif" in {p.name for p in found} and "plain.tif" in {p.name for p in found}
    assert not [p for p in found if p.name.startswith(".")]
    for ortho in found:
        target = output_folder(out, ortho)
        assert target.resolve().parent == out.resolve(), (ortho, target)
        assert target.name not in ("", ".", "..")


def test_engine_output_names_are_fixed():
    """The engine writes only its own fixed file names (never one derived from input data)."""
    from pipeline.inventory import OUTPUT_NAMES

    for name in OUTPUT_NAMES:
        assert Path(name).name == name and not name.startswith(".") and ".." not in name
