"""Backends implement the per-rank ops of ``docs/design.md``.

A backend object has ``name`` and four methods, each called inside
``shard_map`` with validated arguments (see ``jax_ep/_ops.py``):

- ``layout(topk_idx, num_experts) -> DispatchLayout``
- ``dispatch(x, topk_idx, topk_weights, layout, num_experts, num_worst_tokens)``
  ``-> (recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert, handle)``;
  ``layout`` is None when the caller passed none (the backend derives it)
- ``cached_dispatch(x, weights, handle) -> (recv_x, recv_weights)``
- ``combine(y, weights, handle) -> (combined_x, combined_weights)``

``weights`` may be None; the matching output is then None. Autodiff is not the
backends' business: ``_ops.py`` wraps them in custom_vjp.
"""
