"""The same flow on prefect-dask's DaskTaskRunner with a 2-worker LocalCluster gives identical outputs."""

from __future__ import annotations

import pytest

from flows.inventory import run_inventory_flow
from pipeline import inventory as stages
from tests.flows.conftest import SAMPLE_ORTHO, output_digest

pytestmark = pytest.mark.prefect

pytest.importorskip("prefect_dask")


def test_dask_local_cluster_gives_identical_outputs(prefect_api, tmp_path, flow_options):
    options = dict(flow_options, tiles_per_group=4)
    summary = run_inventory_flow(str(SAMPLE_ORTHO), str(tmp_path / "dask"), options=options,
                                 task_runner="dask", workers=2)
    direct = stages.run_inventory(stages.InventoryConfig(ortho=SAMPLE_ORTHO, out_dir=tmp_path / "direct",
                                                         **options))
    assert summary["n_trees"] == direct["n_trees"] > 0
    assert output_digest(tmp_path / "dask") == output_digest(tmp_path / "direct")
