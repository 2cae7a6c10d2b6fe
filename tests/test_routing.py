"""Routing built one class at a time chooses what a search over every class at once chooses."""

import numpy as np
import pytest
import torch

from ucad.config import load_config
from ucad.pipeline import Runtime
from ucad.scoring import task_distances
from ucad.stages.routing import run_routing
from ucad.store import ArtifactStore


def test_routing_one_class_at_a_time_is_the_argmin_over_all_classes(tmp_path):
    rt = Runtime(load_config("smoke"), ArtifactStore(tmp_path / "store"))
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(40, 6, 8, generator=generator)
    keys = [torch.randn(5, 8, generator=generator) for _ in range(4)]
    keys.append(keys[1].clone())  # an exact tie with class 1: the earlier class wins
    keys.append(features[:3].flatten(0, 1))  # the nearest class for images 0..2
    rt.store.put("features", "f" * 32, {"features": features.numpy()})
    names = []
    for t, key in enumerate(keys):
        names.append(f"{t:032x}")
        rt.store.put("keys", names[-1], {"keys": key.numpy()})

    previous, chosen = None, {}
    for count in range(1, len(keys) + 1):
        record = run_routing(rt, "test", "f" * 32, names[:count], previous)
        previous = record.digest
        routed = rt.store.get("routing", record.digest)
        columns = torch.stack([task_distances(features, [k])[:, 0] for k in keys[:count]], dim=1)
        np.testing.assert_array_equal(routed.array("distances"), columns[:, -1].numpy())
        np.testing.assert_array_equal(routed.array("selected"), columns.argmin(dim=1).numpy())
        np.testing.assert_array_equal(routed.array("best"), columns.min(dim=1).values.numpy())
        chosen[count] = routed.array("selected")
    assert 1 in chosen[5] and 4 not in chosen[5]  # the tie went to the earlier class
    assert (chosen[6][:3] == 5).all()  # their own patches are keys of class 5: distance 0


def test_routing_among_several_classes_needs_the_routing_among_one_fewer(tmp_path):
    rt = Runtime(load_config("smoke"), ArtifactStore(tmp_path / "store"))
    with pytest.raises(ValueError, match="built on the routing among the first 1"):
        run_routing(rt, "test", "f" * 32, ["a" * 32, "b" * 32], None)
    with pytest.raises(ValueError, match="built on no previous routing"):
        run_routing(rt, "test", "f" * 32, ["a" * 32], "c" * 32)
