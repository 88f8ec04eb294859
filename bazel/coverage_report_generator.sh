#!/bin/sh
echo "jax_ep: bazel coverage is not supported in this offline build" >&2
exit 1
