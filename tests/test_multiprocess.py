"""The N-process launcher that emulates N ranks (used for the GPU tests), on CPU."""
import pytest

from jax_ep.multiprocess import RankFailure, launch


def test_launch_runs_every_rank_as_one_job():
  res = launch("jax_ep.testing:describe_rank", 3, timeout_s=240)
  assert [r["rank"] for r in res] == [0, 1, 2]
  assert [r["process_index"] for r in res] == [0, 1, 2]
  assert all(r["process_count"] == 3 for r in res)


def test_launch_reports_the_failing_rank_and_its_error():
  with pytest.raises(RankFailure, match=r"ranks \[1\] failed") as info:
    launch("jax_ep.testing:describe_rank", 2, timeout_s=240,
           kwargs={"fail_on_rank": 1})
  assert "rank 1 was asked to fail" in str(info.value)
