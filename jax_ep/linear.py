"""Linear maps with a hand-written transpose, as one JAX primitive.

jax_ep's ops are linear in their data operands (dispatch and combine move
rows; a grouped matmul is linear in each factor), and their transposes are
other fast ops of ours rather than whatever JAX would derive. ``custom_vjp``
expresses that for reverse mode only, which breaks ``jvp``/``jacfwd``/
``hessian``. ``jax.custom_derivatives.linear_call`` has the right idea but no
batching rule, so ``vmap`` of a gradient fails.

``linear_call(forward, transpose, residuals, operands)`` binds one primitive:
- its JVP applies the same map to the operands' tangents (it is linear in
  them), plus ``jax.jvp`` of ``forward`` in the residuals when those carry
  tangents (a bilinear op's other factor);
- its transpose is ``linear_call(transpose, forward, residuals, cotangents)``,
  so transposing twice gives the map back and every order of autodiff works;
- it batches by ``vmap``-ing both functions;
- it lowers by inlining ``forward``.

``forward(residuals, operands)`` and ``transpose(residuals, cotangents)`` take
and return tuples of arrays. ``forward`` must be linear in ``operands``, and
``transpose`` its exact transpose, for any residuals.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core
from jax.interpreters import ad, batching, mlir

linear_p = jex_core.Primitive("jax_ep_linear")
linear_p.multiple_results = True


def linear_call(forward: Callable, transpose: Callable, residuals: Sequence,
                operands: Sequence) -> tuple:
  """Apply ``forward(residuals, operands)``, linear in ``operands``, whose
  transpose is ``transpose(residuals, cotangents)``. Returns a tuple."""
  residuals, operands = tuple(residuals), tuple(operands)
  return tuple(linear_p.bind(*residuals, *operands, forward=forward,
                             transpose=transpose, num_residuals=len(residuals)))


def _flat(fn, num_residuals):
  def flat(*args):
    return tuple(fn(tuple(args[:num_residuals]), tuple(args[num_residuals:])))
  return flat


@linear_p.def_impl
def _impl(*args, forward, transpose, num_residuals):
  del transpose
  return jax.jit(_flat(forward, num_residuals))(*args)


@linear_p.def_abstract_eval
def _abstract_eval(*avals, forward, transpose, num_residuals):
  # Tracing ``forward`` keeps what JAX tracks on avals (shard_map's varying
  # axes, explicit shardings) exactly as the inlined code would have it.
  del transpose
  return jax.make_jaxpr(_flat(forward, num_residuals))(*avals).out_avals


def _is_zero(t) -> bool:
  return type(t) is ad.Zero


def _jvp(primals, tangents, *, forward, transpose, num_residuals):
  residuals, operands = primals[:num_residuals], primals[num_residuals:]
  residual_tangents = tangents[:num_residuals]
  operand_tangents = tangents[num_residuals:]
  out = linear_call(forward, transpose, residuals, operands)
  terms = []
  if not all(_is_zero(t) for t in operand_tangents):
    terms.append(linear_call(forward, transpose, residuals,
                             [ad.instantiate_zeros(t) for t in operand_tangents]))
  if not all(_is_zero(t) for t in residual_tangents):
    # The map's dependence on its residuals (nonzero only for multilinear
    # ops); differentiable as long as ``forward`` is built from such calls.
    active = [i for i, t in enumerate(residual_tangents) if not _is_zero(t)]

    def of_residuals(*active_residuals):
      res = list(residuals)
      for i, r in zip(active, active_residuals):
        res[i] = r
      return tuple(forward(tuple(res), tuple(operands)))

    terms.append(jax.jvp(of_residuals, [residuals[i] for i in active],
                         [residual_tangents[i] for i in active])[1])
  if not terms:
    return out, [ad.Zero.from_primal_value(o) for o in out]
  tangent_out = terms[0]
  for term in terms[1:]:
    tangent_out = tuple(a + b for a, b in zip(tangent_out, term))
  return out, list(tangent_out)


def _transpose(cotangents, *args, forward, transpose, num_residuals):
  residuals, operands = args[:num_residuals], args[num_residuals:]
  if any(ad.is_undefined_primal(r) for r in residuals):
    raise NotImplementedError(
        "jax_ep.linear_call: a residual is being transposed; only the operands "
        "are linear.")
  cotangents = [ad.instantiate_zeros(c) for c in cotangents]
  operand_cts = linear_call(transpose, forward, residuals, cotangents)
  # Operands that were known (not linear) get no cotangent.
  operand_cts = [ct if ad.is_undefined_primal(op) else None
                 for ct, op in zip(operand_cts, operands)]
  return [None] * num_residuals + list(operand_cts)


def _vmapped(fn, num_residuals, residual_axes, array_axes, out_axes):
  """``fn`` vmapped; ``array_axes`` None batches every non-residual on axis 0."""
  def batched(residuals, arrays):
    axes = [0] * len(arrays) if array_axes is None else list(array_axes)
    return jax.vmap(_flat(fn, num_residuals), in_axes=tuple(residual_axes + axes),
                    out_axes=out_axes)(*residuals, *arrays)
  return batched


def _batch(args, dims, *, forward, transpose, num_residuals):
  not_mapped = getattr(batching, "not_mapped", None)
  axes = [None if d is None or d is not_mapped else d for d in dims]
  size = next(a.shape[d] for a, d in zip(args, axes) if d is not None)
  residuals, residual_axes = args[:num_residuals], axes[:num_residuals]
  # Every operand is made batched, so that each has its own cotangent in the
  # transpose (an unbatched operand would need a sum over the batch instead).
  operands, operand_axes = [], []
  for a, d in zip(args[num_residuals:], axes[num_residuals:]):
    if d is None:
      a, d = jnp.broadcast_to(a[None], (size,) + a.shape), 0
    operands.append(a)
    operand_axes.append(d)
  # Outputs (the transpose's cotangents) are batched on axis 0; the transpose
  # returns each operand's cotangent batched where the operand is.
  out = linear_call(
      _vmapped(forward, num_residuals, residual_axes, operand_axes, 0),
      _vmapped(transpose, num_residuals, residual_axes, None, tuple(operand_axes)),
      residuals, operands)
  return list(out), [0] * len(out)


def _lower(ctx, *args, forward, transpose, num_residuals):
  del transpose
  return mlir.lower_fun(_flat(forward, num_residuals), multiple_results=True)(
      ctx, *args)


ad.primitive_jvps[linear_p] = _jvp
ad.primitive_transposes[linear_p] = _transpose
batching.primitive_batchers[linear_p] = _batch
mlir.register_lowering(linear_p, _lower)
