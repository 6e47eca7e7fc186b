"""The compiled host layout (csrc/cpu/plan_layout.cpp) against plan.py's numpy layout: the same arrays, counts and
capacity errors for random trees, every path, windows, fixed chunks and capacities, and device profiles that make
the cost model choose both paths and split kv chunks."""
from __future__ import annotations

import random

import numpy as np
import pytest

from o1kernels import TreeAttentionPlan
from o1kernels import plan as plan_module
from o1kernels.plan import DeviceProfile, PlanCapacity, layout_arrays, layout_needs
from attention_reference import positioned_tree, random_tree

pytestmark = pytest.mark.skipif(not plan_module.compiled_layout_available(),
                                reason="o1kernels._C (the compiled host layout) is not built")

PROFILES = [DeviceProfile(2, 32 << 20, 20.0),  # our CPU: grids fill at once
            DeviceProfile(132, 50 << 20, 4300.0),  # H200-like: small trees split kv chunks to fill the grid
            DeviceProfile(132, 1 << 10, 4300.0)]  # tiny L2: nothing re-read from L2, every shared segment shared


def numpy_layout(plan, key):
    kind, path, group, kv_heads, head_dim, elem_bytes, window = key
    segs = plan._windowed(window)
    direct, chunks, tile = plan._paths(segs, kind, path, group, kv_heads, head_dim, elem_bytes)
    return layout_arrays(segs, direct, chunks, tile, plan.num_queries, plan.capacity,
                         external_pages=plan.page_table is not None), layout_needs(segs, direct, chunks, tile)


@pytest.mark.parametrize("profile", PROFILES, ids=["cpu", "h200", "no-l2"])
@pytest.mark.parametrize("seed", range(8))
def test_compiled_layout_equals_numpy(seed, profile, monkeypatch):
    monkeypatch.setattr(plan_module, "device_profile", lambda device: profile)
    rng = random.Random(seed)
    nodes, leaves = random_tree(rng.randint(1, 12), rng.randint(1, 4), rng.choice([20, 300, 5000]), rng)
    page_size = rng.choice([1, 4, 16])
    segments, positions, _ = positioned_tree(nodes, leaves, page_size, rng, max_new=rng.choice([1, 4]))
    options = dict(kv_chunk_size=rng.choice([None, None, 64]), queries_per_tile=rng.choice([None, 2]))
    plan = TreeAttentionPlan(segments, len(positions), page_size, positions=positions, **options)
    keys = [plan._layout_key("split", 4, 8, 128, 2, None)]
    for path in ("auto", "cascade", "decode"):
        plan.path = path
        for window in (None, 7, 100):
            keys.append(plan._layout_key("fused", rng.choice([1, 4, 8]), rng.choice([1, 8]), rng.choice([64, 128]),
                                         rng.choice([2, 4]), window))
    for key in keys:
        plan.path = key[1] or "auto"
        (arrays, meta), needs = numpy_layout(plan, key)
        got, got_meta = plan._compiled_arrays(*key)
        assert list(got) == list(arrays), key
        for name in arrays:
            np.testing.assert_array_equal(got[name], arrays[name], err_msg=f"{name} of {key}")
        assert {k: got_meta[k] for k in meta} == meta, key
        assert plan._compiled_arrays(*key, count_only=True) == needs, key


@pytest.mark.parametrize("seed", range(4))
def test_capacity_padding_and_overflow_match(seed):
    rng = random.Random(seed)
    nodes, leaves = random_tree(8, 3, 60, rng)
    segments, positions, _ = positioned_tree(nodes, leaves, 4, rng, max_new=2)
    probe = TreeAttentionPlan(segments, len(positions), 4, positions=positions)
    need = probe.needs("fused", 8, 2, 64)
    for scale, fits in ((2, True), (0, False)):
        capacity = PlanCapacity(**{k: scale * v + (8 if fits else 0) for k, v in need.items()})
        plan = TreeAttentionPlan(segments, len(positions), 4, positions=positions, capacity=capacity if fits else None)
        plan.capacity = capacity
        key = plan._layout_key("fused", 4, 2, 64, 2, None)
        if fits:
            (arrays, meta), _ = numpy_layout(plan, key)
            got, got_meta = plan._compiled_arrays(*key)
            for name in arrays:
                np.testing.assert_array_equal(got[name], arrays[name], err_msg=name)
            assert {k: got_meta[k] for k in meta} == meta
        else:
            with pytest.raises(ValueError, match="does not fit its capacity") as numpy_error:
                numpy_layout(plan, key)
            with pytest.raises(ValueError, match="does not fit its capacity") as compiled_error:
                plan._compiled_arrays(*key)
            assert str(compiled_error.value) == str(numpy_error.value)
