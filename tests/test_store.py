import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import zarr
from ordinary_user import run_locked_out

from ucad.digests import digest, fingerprint_files
from ucad.store import (
    DEFAULT_ROOT,
    ENV_VAR,
    ArtifactStore,
    ModelVersionConflict,
    StoreError,
    resolve_root,
)

REPO = Path(__file__).resolve().parents[1]
BAD_NAMES = ["../x", "/abs", "a/b", "", ".hidden", "..", "x" * 101, "a b", "a\\b"]


@pytest.fixture
def store(tmp_path):
    return ArtifactStore(tmp_path / "store")


@pytest.fixture
def memory_root():
    root = f"memory://ucad-test-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def run_threads(target, n):
    """Run target(i) in n threads released together; return results (or exceptions) by index."""
    barrier = threading.Barrier(n)
    results = [None] * n

    def work(i):
        barrier.wait()
        try:
            results[i] = target(i)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


# --- root ----------------------------------------------------------------------------------------


def test_resolve_root_explicit_then_env_then_default(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_root(None) == DEFAULT_ROOT == "artifacts"
    monkeypatch.setenv(ENV_VAR, "/env/store")
    assert resolve_root(None) == "/env/store"
    assert resolve_root(Path("/cli/store")) == "/cli/store"


def test_root_that_is_a_file_is_a_clear_error(tmp_path):
    path = tmp_path / "not_a_folder"
    path.write_text("x")
    with pytest.raises(StoreError, match="not_a_folder.*not a folder"):
        ArtifactStore(path)


def test_unknown_url_protocol_is_a_clear_error():
    with pytest.raises(StoreError, match="nosuchfs://x"):
        ArtifactStore("nosuchfs://x")


UNREADABLE_ROOT = """
import sys
from ucad.store import ArtifactStore, StoreError
root = sys.argv[1]
try:
    ArtifactStore(root)
except StoreError as err:
    print(err)
else:
    sys.exit("ArtifactStore accepted an unreadable root")
"""


def test_unreadable_root_is_a_clear_error(tmp_path):
    root = tmp_path / "locked"
    root.mkdir()
    child = run_locked_out(UNREADABLE_ROOT, root)
    assert child.returncode == 0, child.stderr
    assert re.search(r"locked.*permission denied", child.stdout), child.stdout
    assert f"artifact store {str(root)!r} is not readable" in child.stdout


def test_missing_root_is_an_empty_store(tmp_path):
    store = ArtifactStore(tmp_path / "new")
    assert store.artifacts() == [] and store.models() == []
    assert not (tmp_path / "new").exists()


# --- digest and fingerprint ----------------------------------------------------------------------


def test_digest_is_sha256_of_canonical_json():
    expected = hashlib.sha256(
        b'{"code_version":"1","config":{"a":1,"b":[2,3]},"inputs":{"data":"f0"},"stage":"keys"}'
    ).hexdigest()[:32]
    assert digest("keys", "1", {"b": (2, 3), "a": 1}, {"data": "f0"}) == expected
    assert digest("keys", "1", {"a": 1, "b": [2, 3]}, {"data": "f0"}) == expected


@pytest.mark.parametrize(
    "changed",
    [
        ("masks", "1", {"a": 1}, {"data": "f0"}),
        ("keys", "2", {"a": 1}, {"data": "f0"}),
        ("keys", "1", {"a": 2}, {"data": "f0"}),
        ("keys", "1", {"a": 1.0}, {"data": "f0"}),
        ("keys", "1", {"a": 1}, {"data": "f1"}),
        ("keys", "1", {"a": 1}, {"data": "f0", "masks": "d9"}),
    ],
)
def test_digest_changes_with_each_part(changed):
    assert digest(*changed) != digest("keys", "1", {"a": 1}, {"data": "f0"})


def test_digest_rejects_non_json_config():
    with pytest.raises(ValueError, match="plain JSON"):
        digest("keys", "1", {"path": Path("/x")}, {})
    with pytest.raises(ValueError, match="plain JSON"):
        digest("keys", "1", {"x": float("nan")}, {})


def write_files(folder, contents):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in contents.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
        paths.append(folder / name)
    return paths


def test_fingerprint_by_hand(tmp_path):
    (path,) = write_files(tmp_path / "d", {"a.png": b"abc"})
    line = f"a.png\0{3}\0{hashlib.sha256(b'abc').hexdigest()}\n".encode()
    assert fingerprint_files([path]) == hashlib.sha256(line).hexdigest()


def test_fingerprint_depends_on_content_and_names_only(tmp_path):
    contents = {"good/a.png": b"\x89PNG" + bytes(3000), "bad/b.png": b"\x00\x01", "c.png": b""}
    paths = write_files(tmp_path / "d1", contents)
    reference = fingerprint_files(paths)
    assert fingerprint_files(reversed(paths)) == reference
    assert fingerprint_files(paths + paths[:1]) == reference
    assert fingerprint_files(write_files(tmp_path / "moved" / "d2", contents)) == reference
    os.utime(paths[0], (1_000_000, 1_000_000))
    assert fingerprint_files(paths) == reference

    paths[1].write_bytes(b"\x00\x02")  # one byte changed, same size
    assert fingerprint_files(paths) != reference
    paths[1].write_bytes(b"\x00\x01")
    assert fingerprint_files(paths) == reference
    renamed = paths[1].with_name("b2.png")
    paths[1].rename(renamed)
    assert fingerprint_files([paths[0], renamed, paths[2]]) != reference


def test_fingerprint_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        fingerprint_files([tmp_path / "missing.png"])
    with pytest.raises(ValueError, match="no files"):
        fingerprint_files([])
    (path,) = write_files(tmp_path / "d", {"a.png": b"x"})
    with pytest.raises(ValueError, match="not inside"):
        fingerprint_files([path], root=tmp_path / "elsewhere")


# --- stage artifacts -----------------------------------------------------------------------------


def test_put_get_roundtrip_with_provenance(store):
    arrays = {
        "keys": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
        "labels": np.array([[-1, 2**40]], dtype=np.int64),
        "mask": np.array([True, False, True]),
        "empty": np.zeros((0, 5), dtype=np.float16),
    }
    attrs = {"config": {"layer": 5}, "inputs": {"data": "f0"}, "code_version": "1"}
    assert not store.has("keys", "d1")
    put = store.put("keys", "d1", arrays, attrs)
    got = store.get("keys", "d1")
    assert store.has("keys", "d1")
    assert got.names == ["empty", "keys", "labels", "mask"]
    for name, array in arrays.items():
        read = got.array(name)
        assert read.dtype == array.dtype and read.shape == array.shape
        np.testing.assert_array_equal(read, array)
    assert got.attrs == put.attrs
    assert {k: got.attrs[k] for k in attrs} == attrs
    assert got.attrs["stage"] == "keys" and got.attrs["digest"] == "d1"
    assert got.attrs["complete"] is True
    assert got.attrs["created_utc"].endswith("+00:00")
    assert set(got.attrs["library_versions"]) >= {"python", "numpy", "zarr", "ucad"}
    assert store.artifacts() == [("keys", "d1")] == store.artifacts("keys")
    assert store.artifacts("masks") == []
    with pytest.raises(KeyError, match="no array 'prompts'"):
        got.array("prompts")


def test_arrays_are_one_chunk_and_only_integers_are_compressed(store):
    """Stages read arrays whole: one chunk each; floats barely compress and read faster raw."""
    arrays = {
        "features": np.random.default_rng(0).normal(size=(6, 5, 4)).astype(np.float32),
        "labels": np.repeat(np.arange(3, dtype=np.int32), 4000).reshape(3, 4000),
    }
    store.put("features", "d1", arrays, {})
    group = store.get("features", "d1").group
    for name, array in arrays.items():
        assert group[name].chunks == array.shape
    assert group["features"].compressors == ()
    assert group["labels"].compressors != ()
    assert group["labels"].nbytes_stored() < arrays["labels"].nbytes


def test_put_of_an_existing_digest_keeps_the_first(store):
    first = store.put("keys", "d1", {"x": np.ones(3)}, {"run": 1})
    again = store.put("keys", "d1", {"x": np.zeros(3)}, {"run": 2})
    assert again.attrs == first.attrs
    np.testing.assert_array_equal(store.get("keys", "d1").array("x"), np.ones(3))


def test_nothing_is_pickled_and_bad_attrs_are_refused(store):
    with pytest.raises(ValueError, match="'names' has dtype object"):
        store.put("keys", "d1", {"names": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(ValueError, match="numeric and boolean arrays only"):
        store.put("keys", "d1", {"names": np.array(["a.png"])})
    with pytest.raises(ValueError, match=r"\['stage'\] are reserved"):
        store.put("keys", "d1", {}, {"stage": "x"})
    with pytest.raises(ValueError, match="plain JSON"):
        store.put("keys", "d1", {}, {"array": np.ones(2)})
    assert not store.has("keys", "d1")
    assert list(Path(store.root).rglob("*.zarr")) == []


def test_missing_artifact_is_a_clear_error(store):
    with pytest.raises(FileNotFoundError, match="no complete artifact keys/d0"):
        store.get("keys", "d0")


def unfinished_group(url):
    """A group with data but no completion marker, as left by a killed writer."""
    group = zarr.create_group(store=url, attributes={"stage": "keys"})
    group.create_array("x", data=np.full(4, 9.0))


@pytest.mark.parametrize("where", ["local", "memory"])
def test_unfinished_groups_are_never_trusted(where, tmp_path, memory_root):
    root = str(tmp_path / "store") if where == "local" else memory_root
    store = ArtifactStore(root)
    unfinished_group(f"{root}/.tmp/keys-d1-0.zarr")
    unfinished_group(f"{root}/stages/keys/d1.zarr")
    assert not store.has("keys", "d1")
    assert store.artifacts() == []
    with pytest.raises(FileNotFoundError):
        store.get("keys", "d1")

    store.put("keys", "d1", {"x": np.arange(4.0)})
    assert store.has("keys", "d1")
    np.testing.assert_array_equal(store.get("keys", "d1").array("x"), np.arange(4.0))


ROOT_METADATA_DAMAGE = {
    "not JSON": b"{not json",
    "not an object": b"[1, 2]",
    "an array's metadata": json.dumps(
        {"zarr_format": 3, "node_type": "array", "attributes": {"complete": True}}
    ).encode(),
    "another Zarr format": json.dumps(
        {"zarr_format": 2, "node_type": "group", "attributes": {"complete": True}}
    ).encode(),
    "attributes not an object": json.dumps(
        {"zarr_format": 3, "node_type": "group", "attributes": ["complete"]}
    ).encode(),
}


@pytest.mark.parametrize("where", ["local", "memory"])
@pytest.mark.parametrize("damage", sorted(ROOT_METADATA_DAMAGE))
def test_root_metadata_that_is_not_a_finished_group_reads_as_absent(
    where, damage, tmp_path, memory_root
):
    """What a lookup reads is the group's zarr.json alone: anything but a Zarr 3 group with the
    marker is an unfinished group, which the next put replaces."""
    root = str(tmp_path / "store") if where == "local" else memory_root
    store = ArtifactStore(root)
    store.put("keys", "d1", {"x": np.arange(4.0)})
    with fsspec.open(f"{root}/stages/keys/d1.zarr/zarr.json", "wb") as f:
        f.write(ROOT_METADATA_DAMAGE[damage])
    assert not store.has("keys", "d1") and store.artifacts() == []
    assert store.check("keys", "d1") == ["unfinished (no completion marker)"]
    store.put("keys", "d1", {"x": np.arange(4.0)})
    np.testing.assert_array_equal(store.get("keys", "d1").array("x"), np.arange(4.0))


def test_a_lookup_does_not_open_the_zarr_group(store, monkeypatch):
    """has/get check files, sizes and attributes from the root metadata; the Zarr group is
    opened at the first array read, once per artifact."""
    store.put("keys", "d1", {"x": np.arange(4.0), "y": np.ones(3)}, {"task": "nut"})
    opened = []
    open_group = zarr.open_group
    monkeypatch.setattr(zarr, "open_group", lambda *a, **k: opened.append(1) or open_group(*a, **k))
    assert store.has("keys", "d1")
    artifact = store.get("keys", "d1")
    assert artifact.attrs["task"] == "nut" and artifact.names == ["x", "y"] and opened == []
    np.testing.assert_array_equal(artifact.array("x"), np.arange(4.0))
    np.testing.assert_array_equal(artifact.array("y"), np.ones(3))
    assert artifact.shape("x") == (4,) and opened == [1]


def test_fsspec_url_roundtrip(memory_root):
    store = ArtifactStore(memory_root)
    store.put("prompts", "d2", {"p": np.eye(3, dtype=np.float32)}, {"config": {"n": 3}})
    again = ArtifactStore(memory_root)
    assert again.has("prompts", "d2") and again.artifacts() == [("prompts", "d2")]
    np.testing.assert_array_equal(again.get("prompts", "d2").array("p"), np.eye(3))
    assert again.get("prompts", "d2").attrs["config"] == {"n": 3}
    assert fsspec.filesystem("memory").find(f"{memory_root}/.tmp") == []


CHILD = """
import sys, time
import numpy as np
import ucad.store as store

write = store._write_array

def write_then_stall(group, name, array):
    write(group, name, array)
    print("wrote", name, flush=True)
    time.sleep(60)

store._write_array = write_then_stall
arrays = {"a": np.ones((256, 256), np.float32), "b": np.arange(10)}
store.ArtifactStore(sys.argv[1]).put("knowledge", "d3", arrays, {"run": "killed"})
"""


def test_killed_writer_leaves_nothing_trusted_and_next_run_finishes(tmp_path):
    root = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(root)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert child.stdout.readline() == "wrote a\n"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert any((root / ".tmp").iterdir())  # the killed run's half-written group

    store = ArtifactStore(root)
    assert not store.has("knowledge", "d3") and store.artifacts() == []
    arrays = {"a": np.full((256, 256), 2, np.float32), "b": np.arange(10)}
    store.put("knowledge", "d3", arrays, {"run": "second"})
    assert store.has("knowledge", "d3")
    got = store.get("knowledge", "d3")
    assert got.attrs["run"] == "second"
    np.testing.assert_array_equal(got.array("a"), arrays["a"])


def test_racing_writers_of_one_digest(store):
    results = run_threads(lambda i: store.put("keys", "d4", {"x": np.arange(1000) * 1.5}), 6)
    assert all(not isinstance(r, Exception) for r in results), results
    assert all(r.attrs == results[0].attrs for r in results)  # everyone got the one winner
    np.testing.assert_array_equal(store.get("keys", "d4").array("x"), np.arange(1000) * 1.5)
    assert list((Path(store.root) / ".tmp").iterdir()) == []


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_names_that_escape_the_store_are_refused(store, bad, tmp_path):
    for call in (
        lambda: store.put(bad, "d1", {}),
        lambda: store.put("keys", bad, {}),
        lambda: store.put("keys", "d1", {bad: np.ones(1)}),
        lambda: store.has(bad, "d1"),
        lambda: store.get("keys", bad),
        lambda: store.write_model(bad, 1, {}),
        lambda: store.read_model(bad),
        lambda: digest(bad, "1", {}, {}),
    ):
        with pytest.raises(ValueError, match="invalid") as error:
            call()
        assert repr(bad) in str(error.value)
    assert list(tmp_path.iterdir()) == []


# --- models --------------------------------------------------------------------------------------


def test_model_versions_roundtrip(store):
    assert store.model_versions("line1") == []
    v1 = {"tasks": [{"task": "bottle", "keys": "k1", "prompts": "p1", "knowledge": "n1"}]}
    v2 = {
        "tasks": v1["tasks"] + [{"task": "cable", "keys": "k2", "prompts": "p2", "knowledge": "n2"}]
    }
    store.write_model("line1", 1, v1)
    store.write_model("line1", 2, v2)
    assert store.model_versions("line1") == [1, 2]
    assert store.models() == ["line1"]
    assert store.read_model("line1") == v2
    assert store.read_model("line1", 1) == v1
    path = Path(store.root) / "models" / "line1" / "v0002.json"
    assert json.loads(path.read_text()) == v2
    with pytest.raises(FileNotFoundError, match="no version 3"):
        store.read_model("line1", 3)
    with pytest.raises(FileNotFoundError, match="no model 'other'"):
        store.read_model("other")


def test_existing_version_is_a_conflict_and_stays_untouched(store):
    store.write_model("m", 1, {"tasks": ["a"]})
    store.write_model("m", 2, {"tasks": ["a", "b"]})
    path = Path(store.root) / "models" / "m" / "v0001.json"
    before = path.read_bytes()
    for version in (1, 2):
        with pytest.raises(ModelVersionConflict, match=f"version {version} exists"):
            store.write_model("m", version, {"tasks": ["evil"]})
    assert path.read_bytes() == before
    with pytest.raises(ValueError, match="at version 2; cannot write version 4"):
        store.write_model("m", 4, {})
    with pytest.raises(ValueError, match="JSON object"):
        store.write_model("m", 3, ["not", "an", "object"])
    with pytest.raises(ValueError, match="plain JSON"):
        store.write_model("m", 3, {"keys": np.ones(2)})
    assert store.model_versions("m") == [1, 2]


def test_corrupt_manifest_is_a_clear_error(store):
    store.write_model("m", 1, {"tasks": []})
    path = Path(store.root) / "models" / "m" / "v0001.json"
    path.write_text('{"tasks": [')
    with pytest.raises(ValueError, match="corrupt model manifest .*v0001.json"):
        store.read_model("m")
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        store.read_model("m")


def test_racing_creators_of_one_version_exactly_one_wins(store):
    store.write_model("m", 1, {"tasks": ["a"]})
    results = run_threads(lambda i: store.write_model("m", 2, {"tasks": ["a", f"t{i}"]}), 8)
    conflicts = [r for r in results if isinstance(r, ModelVersionConflict)]
    winners = [i for i, r in enumerate(results) if r is None]
    assert len(winners) == 1 and len(conflicts) == 7
    assert store.read_model("m") == {"tasks": ["a", f"t{winners[0]}"]}
    assert store.model_versions("m") == [1, 2]
    assert [p.name for p in (Path(store.root) / "models" / "m").iterdir() if p.name[0] == "."] == []


def test_racing_appends_lose_no_version(store):
    def add(i):
        return store.append_model(
            "m", lambda prev: {"tasks": (prev or {"tasks": []})["tasks"] + [i]}
        )

    results = run_threads(add, 6)
    assert sorted(results) == [1, 2, 3, 4, 5, 6]
    assert sorted(store.read_model("m")["tasks"]) == list(range(6))
    for version in range(1, 7):  # each version extends the one before it by one task
        assert len(store.read_model("m", version)["tasks"]) == version


def test_models_on_an_fsspec_url(memory_root):
    store = ArtifactStore(memory_root)
    assert store.append_model("m", lambda prev: {"tasks": ["a"]}) == 1
    with pytest.raises(ModelVersionConflict):
        store.write_model("m", 1, {"tasks": ["b"]})
    assert ArtifactStore(memory_root).read_model("m") == {"tasks": ["a"]}
