"""Routing built on fewer classes chooses what a search over every class at once chooses."""

import numpy as np
import pytest
import torch

from ucad.config import load_config
from ucad.pipeline import Runtime
from ucad.scoring import task_distances
from ucad.stages.routing import run_routing
from ucad.store import ArtifactStore

FEATURES = "f" * 32


def world(root, features: torch.Tensor, keys: list[torch.Tensor]) -> tuple[Runtime, list[str]]:
    """A store holding the features and each class's keys, and the keys' digests in order."""
    rt = Runtime(load_config("smoke"), ArtifactStore(root))
    rt.store.put("features", FEATURES, {"features": features.numpy()})
    names = [f"{t:032x}" for t in range(len(keys))]
    for name, key in zip(names, keys, strict=True):
        rt.store.put("keys", name, {"keys": key.numpy()})
    return rt, names


def test_routing_built_on_fewer_classes_is_the_argmin_over_all_classes(tmp_path):
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(40, 6, 8, generator=generator)
    keys = [torch.randn(5, 8, generator=generator) for _ in range(4)]
    keys.append(keys[1].clone())  # an exact tie with class 1: the earlier class wins
    keys.append(features[:3].flatten(0, 1))  # the nearest class for images 0..2
    columns = torch.stack([task_distances(features, [k])[:, 0] for k in keys], dim=1)

    rt, names = world(tmp_path / "one-at-a-time", features, keys)
    previous, chosen = None, {}
    for count in range(1, len(keys) + 1):  # one class at a time, as versions add them
        record = run_routing(rt, "test", FEATURES, names[:count], previous)
        previous = record.digest
        routed = rt.store.get("routing", record.digest)
        among = columns[:, :count]
        np.testing.assert_array_equal(routed.array("selected"), among.argmin(dim=1).numpy())
        np.testing.assert_array_equal(routed.array("best"), among.min(dim=1).values.numpy())
        chosen[count] = routed.array("selected")
    assert 1 in chosen[5] and 4 not in chosen[5]  # the tie went to the earlier class
    assert (chosen[6][:3] == 5).all()  # their own patches are keys of class 5: distance 0

    # all classes at once, or the last four at once on the first two: in empty stores, the same
    # name and the same arrays
    rt_all, _ = world(tmp_path / "at-once", features, keys)
    rt_two, _ = world(tmp_path / "on-two", features, keys)
    two = run_routing(rt_two, "test", FEATURES, names[:2], None)
    built = [
        (rt_all, run_routing(rt_all, "test", FEATURES, names, None)),
        (rt_two, run_routing(rt_two, "test", FEATURES, names, two.digest)),
    ]
    for other_rt, other in built:
        assert other.digest == record.digest and not other.cached
        stored = other_rt.store.get("routing", other.digest)
        assert stored.names == routed.names
        for name in routed.names:
            np.testing.assert_array_equal(stored.array(name), routed.array(name))


def test_routing_builds_only_on_fewer_classes(tmp_path):
    rt, names = world(tmp_path, torch.zeros(2, 3, 4), [torch.ones(2, 4), torch.zeros(2, 4)])
    first = run_routing(rt, "test", FEATURES, names[:1], None).digest
    both = run_routing(rt, "test", FEATURES, names, first).digest
    rt.store.put("features", "e" * 32, {"features": torch.ones(2, 3, 4).numpy()})
    wrong = {
        "as many classes": (FEATURES, names[1:], first),
        "more classes": (FEATURES, names[:1], both),
        "other classes": (FEATURES, names[::-1], first),
        "other features": ("e" * 32, names, first),
    }
    for features, keys, previous in wrong.values():
        with pytest.raises(ValueError, match="must be the first of them, for the same features"):
            run_routing(rt, "test", features, keys, previous)
