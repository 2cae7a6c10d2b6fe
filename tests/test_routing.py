"""A version's routing built on fewer classes chooses what a search over every class at once
chooses, for every test set it holds."""

import numpy as np
import pytest
import torch

from ucad.config import load_config
from ucad.data.source import TaskSource
from ucad.pipeline import Runtime
from ucad.scoring import task_distances
from ucad.stages.features import features_digest
from ucad.stages.routing import rows_of, run_routing
from ucad.store import ArtifactStore


def world(
    root, features: list[torch.Tensor], keys: list[torch.Tensor]
) -> tuple[Runtime, list[TaskSource], list[str]]:
    """A store holding each class's test-set features and keys: the classes' test sets (by
    fingerprint only: their features are in the store, so no image is read) and keys' digests."""
    rt = Runtime(load_config("smoke"), ArtifactStore(root))
    sources = [
        TaskSource(name=f"c{j}", root="/nowhere", format="folder", train="-", test=f"test-{j}")
        for j in range(len(keys))
    ]
    for source, frozen in zip(sources, features, strict=True):
        rt.store.put("features", features_digest(rt, source), {"features": frozen.numpy()})
    names = [f"{t:032x}" for t in range(len(keys))]
    for name, key in zip(names, keys, strict=True):
        rt.store.put("keys", name, {"keys": key.numpy()})
    return rt, sources, names


def test_routing_built_on_fewer_classes_is_the_argmin_over_all_classes(tmp_path):
    generator = torch.Generator().manual_seed(0)
    features = [torch.randn(n, 6, 8, generator=generator) for n in (40, 7, 1, 12, 9, 5)]
    keys = [torch.randn(5, 8, generator=generator) for _ in range(4)]
    keys.append(keys[1].clone())  # an exact tie with class 1: the earlier class wins
    keys.append(features[0][:3].flatten(0, 1))  # the nearest class for images 0..2 of class 0
    columns = [torch.stack([task_distances(f, [k])[:, 0] for k in keys], dim=1) for f in features]

    rt, sources, names = world(tmp_path / "one-at-a-time", features, keys)
    previous, chosen = None, {}
    for count in range(1, len(keys) + 1):  # one class at a time, as versions add them
        record, made = run_routing(rt, sources[:count], names[:count], previous)
        assert [r.stage for r in made] == ["features"] * count  # all in the store: lookups
        previous = record.digest
        routed = rt.store.get("routing", record.digest)
        offsets = routed.array("offsets")
        assert offsets.tolist() == np.cumsum([0] + [len(f) for f in features[:count]]).tolist()
        for j in range(count):
            among = columns[j][:, :count]
            rows = rows_of(offsets, j)
            np.testing.assert_array_equal(
                routed.array("selected")[rows], among.argmin(dim=1).numpy()
            )
            np.testing.assert_array_equal(
                routed.array("best")[rows], among.min(dim=1).values.numpy()
            )
        chosen[count] = routed.array("selected")[rows_of(offsets, 0)]
    assert 1 in chosen[5] and 4 not in chosen[5]  # the tie went to the earlier class
    assert (chosen[6][:3] == 5).all()  # their own patches are keys of class 5: distance 0

    # all classes at once, or the last four at once on the first two: in empty stores, the same
    # name and the same arrays
    rt_all, _, _ = world(tmp_path / "at-once", features, keys)
    rt_two, _, _ = world(tmp_path / "on-two", features, keys)
    two, _ = run_routing(rt_two, sources[:2], names[:2], None)
    built = [
        (rt_all, run_routing(rt_all, sources, names, None)[0]),
        (rt_two, run_routing(rt_two, sources, names, two.digest)[0]),
    ]
    for other_rt, other in built:
        assert other.digest == record.digest and not other.cached
        stored = other_rt.store.get("routing", other.digest)
        assert stored.names == routed.names == ["best", "offsets", "selected"]
        for name in routed.names:
            np.testing.assert_array_equal(stored.array(name), routed.array(name))


def test_routing_builds_only_on_fewer_classes_with_the_same_test_sets(tmp_path):
    features = [torch.zeros(2, 3, 4), torch.ones(3, 3, 4)]
    rt, sources, names = world(tmp_path, features, [torch.ones(2, 4), torch.zeros(2, 4)])
    first = run_routing(rt, sources[:1], names[:1], None)[0].digest
    both = run_routing(rt, sources, names, first)[0].digest
    other = sources[1].model_copy(update={"test": "test-other"})
    wrong = {
        "as many classes": (sources[1:], names[1:], first),
        "more classes": (sources[:1], names[:1], both),
        "other classes": (sources, names[::-1], first),
        "other test sets": ([other, sources[0]], names, first),
    }
    for test_sets, keys, previous in wrong.values():
        with pytest.raises(ValueError, match="must be the first of them, with the same test sets"):
            run_routing(rt, test_sets, keys, previous)
    with pytest.raises(ValueError, match="one test set per class: 1 for 2"):
        run_routing(rt, sources[:1], names, None)
