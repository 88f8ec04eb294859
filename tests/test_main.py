"""``python -m jax_ep`` (the main job) on CPU: checked, explained, compiled once."""
import re

from jax_ep import __main__ as main_job
from jax_ep import testing as ept


def test_main_job_says_what_its_error_is_measured_against(capsys):
  with ept.count_compilations() as compiles:
    rc = main_job.main(["--tokens", "32", "--hidden", "64", "--iters", "3"])
  text = capsys.readouterr().out
  assert rc == 0, text
  row = next(l for l in text.splitlines() if l.split()[:1] == ["xla"])
  err, allowed, verdict = row.split()[-3:]
  assert verdict == "ok" and 0 < float(err) <= float(allowed), row
  assert re.search(r"max err: largest \|output - reference\| .* NumPy model", text), text
  # One compilation of the round trip, however many timed iterations.
  assert compiles["jit(per_rank)"] == 1, compiles
