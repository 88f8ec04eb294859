"""The N-process launcher that emulates N ranks (used for the GPU tests), on CPU."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

import jax_ep
from jax_ep import _ext
from jax_ep.multiprocess import RankFailure, launch


def test_launch_runs_every_rank_as_one_job():
  res = launch("jax_ep.testing:describe_rank", 3, timeout_s=240)
  assert [r["rank"] for r in res] == [0, 1, 2]
  assert [r["process_index"] for r in res] == [0, 1, 2]
  assert all(r["process_count"] == 3 for r in res)
  # The children import this process's jax_ep (under Bazel: the runfiles' build).
  c = _ext.load()
  for r in res:
    assert r["jax_ep"] == jax_ep.__file__
    assert r["jax_ep._C"] == (None if c is None else c.__file__)


def test_launch_reports_the_failing_rank_and_its_error():
  with pytest.raises(RankFailure, match=r"ranks \[1\] failed") as info:
    launch("jax_ep.testing:describe_rank", 2, timeout_s=240,
           kwargs={"fail_on_rank": 1})
  assert "rank 1 was asked to fail" in str(info.value)


PARENT = '''
import json, sys
# As bazel/pytest_main.py does: drop an editable install's import hook and
# put another copy of jax_ep first on the path.
sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__name__.startswith("ScikitBuild")]
sys.path.insert(0, sys.argv[1])
import jax_ep
from jax_ep import _ext
from jax_ep.multiprocess import launch
c = _ext.load()
me = {"jax_ep": jax_ep.__file__, "jax_ep._C": None if c is None else c.__file__}
kids = launch("jax_ep.testing:describe_rank", 2, timeout_s=240)
print("FILES " + json.dumps({"parent": me, "children": kids}))
'''


def test_children_import_the_parents_copy_of_jax_ep(tmp_path):
  # Issue 11.6: a parent running another jax_ep than the interpreter's own
  # (Bazel's runfiles next to a pip or stale editable install).
  copy = tmp_path / "copy"
  source = pathlib.Path(jax_ep.__file__).parent
  shutil.copytree(source, copy / "jax_ep",
                  ignore=shutil.ignore_patterns("__pycache__", "_C*.so"))
  c = _ext.load()
  if c is not None:
    shutil.copy(c.__file__, copy / "jax_ep" / os.path.basename(c.__file__))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-c", PARENT, str(copy)], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-4000:]
  files = json.loads(next(l for l in res.stdout.splitlines()
                          if l.startswith("FILES "))[len("FILES "):])
  parent = files["parent"]
  assert parent["jax_ep"].startswith(str(copy)), parent
  if c is not None:
    assert parent["jax_ep._C"].startswith(str(copy)), parent
  for child in files["children"]:
    assert (child["jax_ep"], child["jax_ep._C"]) == (parent["jax_ep"], parent["jax_ep._C"])
