"""The Prefect layer without a server: runner choice, per-process Runtime, Cached states, chunks.

The flows themselves run through a real server and worker in test_prefect_e2e.py.
"""

import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from flows.tasks import finish
from ucad.config import RUNTIME_FIELDS, load_config
from ucad.data.datasets import read_task
from ucad.data.source import TaskSource
from ucad.pipeline import Evaluation, Runtime, StageRecord, chunk_bounds, process_runtime
from ucad.runners import LocalRunner, runner_for
from ucad.stages.evaluate import EVALUATE
from ucad.stages.structure import run_structure, structure_maps
from ucad.store import ArtifactStore


@pytest.fixture
def config():
    return load_config("smoke", overrides={"max_workers": 3})


def test_this_process_by_default_and_a_clear_message_without_dask(config, tmp_path, monkeypatch):
    with runner_for(config, ArtifactStore(tmp_path)) as runner:
        assert isinstance(runner, LocalRunner) and runner.workers == 1
    monkeypatch.setitem(sys.modules, "distributed", None)  # not installed
    dask = config.model_copy(update={"task_runner": "dask"})
    with pytest.raises(ImportError, match=r'pip install "ucad\[dask\]"'):
        with runner_for(dask, ArtifactStore(tmp_path)):
            pass


def test_a_dask_address_needs_the_dask_task_runner():
    with pytest.raises(ValueError, match="dask_address"):
        load_config("smoke", overrides={"dask_address": "tcp://127.0.0.1:8786"})


def test_scale_out_settings_never_change_a_digest(config):
    # evaluate consumes every other stage, so its fields are all that any digest reads
    read = set(EVALUATE.field_names(config))
    # the one runtime field a digest names: products may round differently per batch size
    assert read & set(RUNTIME_FIELDS) == {"inference_batch_size"}
    assert {"task_runner", "dask_address", "max_workers"} <= set(RUNTIME_FIELDS)


def test_one_runtime_per_process_config_and_store(config, tmp_path):
    first = process_runtime(config, str(tmp_path))
    assert process_runtime(config.model_copy(), str(tmp_path)) is first
    other = process_runtime(config.model_copy(update={"epochs": 3}), str(tmp_path))
    assert other is not first and other.config.epochs == 3


def _record(cached: bool) -> StageRecord:
    return StageRecord("keys", "grain", "d" * 64, cached, 0.0)


def test_a_stage_whose_artifacts_existed_is_reported_as_cached():
    state = finish(_record(cached=True))
    assert state.name == "Cached" and state.is_completed() and state.data == _record(True)
    assert finish(_record(cached=False)) == _record(False)
    evaluation = Evaluation({"image_auroc": 1.0}, [_record(True), _record(False)])
    assert finish(evaluation) == evaluation  # one sub-stage computed: not cached
    assert finish(Evaluation({}, [_record(True)])).name == "Cached"


@pytest.mark.parametrize("count,chunks", [(1, 4), (7, 3), (8, 8), (10, 4)])
def test_chunks_cover_the_images_once(count, chunks):
    bounds = chunk_bounds(count, chunks)
    assert len(bounds) == min(count, chunks)
    assert [i for start, stop in bounds for i in range(start, stop)] == list(range(count))


def test_chunked_structure_maps_equal_one_pass(config, synth_root, tmp_path):
    source = TaskSource.from_data(str(synth_root), "mvtec", read_task(synth_root, "grain", "mvtec"))

    def in_threads(rt, source, chunks):
        with ThreadPoolExecutor(len(chunks)) as pool:
            return list(pool.map(lambda bound: structure_maps(rt, source, *bound), chunks))

    one = Runtime(config.model_copy(update={"max_workers": 1}), ArtifactStore(tmp_path / "a"))
    three = Runtime(config, ArtifactStore(tmp_path / "b"))
    whole = run_structure(one, source)
    chunked = run_structure(three, source, map_chunks=in_threads)
    assert whole.digest == chunked.digest
    maps = [rt.store.get("structure", whole.digest).array("label_maps") for rt in (one, three)]
    assert maps[0].shape[0] == len(read_task(synth_root, "grain", "mvtec").train)
    assert np.array_equal(*maps)
