"""Random routings through every op against the NumPy reference (issue 11).

``jax_ep.testing.check_random_routings`` draws configurations (R, N, K, E,
capacity, dtype, weights) and fresh routings with -1 and out-of-range ids, and
checks layout, dispatch, combine and cached dispatch of each. CI runs the
fixed seed below on the xla backend (about 30 s on 2 cores) and a shorter run
on ragged (emulated collective); ``tools/gpu_check.sh random`` runs the same
count on the cuda backend. ``JAX_EP_RANDOM_ROUTINGS`` changes the count.
"""
import os

import pytest

from jax_ep import testing as ept

COUNT = int(os.environ.get("JAX_EP_RANDOM_ROUTINGS", "1008"))


def _assert_covers_the_space(configs):
  assert {c["R"] for c in configs} == {1, 2, 4, 8}
  assert {0, 1} <= {c["N"] for c in configs}
  assert {c["K"] for c in configs} == set(range(1, 9))
  assert any(c["E"] < c["K"] for c in configs)  # tokens name every expert
  assert {c["M"] is None for c in configs} == {True, False}  # loose and tight
  assert any(c["M"] is not None and c["M"] < c["N"] for c in configs)  # heavy drops
  assert {c["dtype"] for c in configs} == {"float32", "bfloat16"}
  assert {c["weighted"] for c in configs} == {True, False}


def test_random_routings_xla():
  summary = ept.check_random_routings(0, 1, count=COUNT, seed=0, backend="xla",
                                      per_config=24)
  assert summary["routings"] == COUNT >= 1000
  _assert_covers_the_space(summary["configs"])


@pytest.mark.parametrize("backend", ["ragged"], indirect=True)
def test_random_routings_ragged(backend):
  summary = ept.check_random_routings(0, 1, count=96, seed=1, backend="ragged",
                                      per_config=12)
  assert summary["routings"] == 96
