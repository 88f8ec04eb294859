"""Runs the pytest files given as arguments; entry point of every py_test.

Checks first that `jax_ep` and its `_C` extension come from this Bazel build
(the runfiles tree), not from a pip-installed copy. pytest's exit code is the
test's; "no tests collected" (5) counts as a failure.
"""
import os
import sys


def _hide_pip_installed_jax_ep(root):
    """A pip editable install (README's `pip install -e .`) adds an import hook
    that would win over the runfiles; drop it and put the runfiles first on the
    path, so the test runs the Bazel-built package whatever pip left here."""
    sys.meta_path[:] = [f for f in sys.meta_path
                        if not type(f).__name__.startswith("ScikitBuild")]
    if root:
        runfiles = os.path.abspath(root) + os.sep
        inside = [p for p in sys.path if os.path.abspath(p or ".").startswith(runfiles)]
        sys.path[:] = inside + [p for p in sys.path if p not in inside]


def _check_bazel_jax_ep():
    root = os.environ.get("TEST_SRCDIR") or os.environ.get("RUNFILES_DIR")
    _hide_pip_installed_jax_ep(root)
    import jax_ep
    import jax_ep._C as C

    for what, path in (("jax_ep", jax_ep.__file__), ("jax_ep._C", C.__file__)):
        if root and not os.path.abspath(path).startswith(os.path.abspath(root) + os.sep):
            sys.exit(f"jax_ep bazel test: {what} was imported from {path}, "
                     f"not from the Bazel runfiles under {root}")
    print(f"jax_ep bazel test: jax_ep from {os.path.dirname(jax_ep.__file__)}, "
          f"build_info={C.build_info()}", flush=True)


def main():
    _check_bazel_jax_ep()
    import pytest

    args = ["-q", "-p", "no:cacheprovider", *sys.argv[1:]]
    rc = int(pytest.main(args))
    if rc == pytest.ExitCode.NO_TESTS_COLLECTED:
        print("jax_ep bazel test: no tests collected", file=sys.stderr)
        rc = 1
    sys.exit(rc)


if __name__ == "__main__":
    main()
