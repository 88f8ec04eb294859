"""Node-crossing traffic of a dispatch: flat all-to-all vs the hierarchical node hop.

At DeepEP's shape (4096 tokens per rank, hidden 7168 in bf16, top-8 of 256
experts) for EP16 (2 nodes x 8 GPUs) and EP64 (8 x 8), per rank, averaged over
every rank of the job:

- flat: one row per (token, destination rank on another node), what an
  all-to-all over the ranks sends over the network (and, for scale, every
  (token, other rank) copy it sends);
- hierarchical: one row per distinct (token, destination node != home node),
  what ``Buffer(mesh, ("node", "local"))`` sends over its node hop;
- the padded sizes the xla backend actually moves (a slot of N rows per rank
  pair flat; a slot of F rows per (rank, node) pair hierarchical, F = N by
  default, or the largest slot this routing filled);
- the node-hop time at 400 Gb/s (50 GB/s) per GPU, one way.

Routings: DeepEP's tests' (``tests/legacy/test_internode.py``: scores
|randn| + 1, the top min(nodes, 4) nodes by their best expert, then the top-8
experts inside them: node-limited, as DeepSeek-V3 routes) and plain uniform
top-8 for comparison. Combine moves the same rows back (the hierarchical one
sums on the forwarder first). Usage: ``python tools/hier_traffic.py [--seed S]``.
"""
from __future__ import annotations

import argparse

import numpy as np

TOKENS, HIDDEN, TOPK, EXPERTS, ROW_BYTES = 4096, 7168, 8, 256, 7168 * 2
LINK_BYTES_PER_S = 400e9 / 8  # 400 Gb/s per GPU


def routing(rng, num_tokens, num_nodes, node_limited: bool) -> np.ndarray:
  scores = np.abs(rng.standard_normal((num_tokens, EXPERTS), dtype=np.float32)) + 1
  if node_limited:
    best = scores.reshape(num_tokens, num_nodes, -1).max(axis=2)
    groups = np.argsort(-best, axis=1)[:, :min(num_nodes, 4)]
    keep = np.zeros((num_tokens, num_nodes), bool)
    np.put_along_axis(keep, groups, True, axis=1)
    scores = np.where(np.repeat(keep, EXPERTS // num_nodes, axis=1), scores, 0.0)
  return np.argpartition(-scores, TOPK - 1, axis=1)[:, :TOPK]


def traffic(num_nodes, num_local, node_limited, seed):
  R = num_nodes * num_local
  rng = np.random.default_rng(seed)
  flat = hier = copies = 0
  largest_slot = 0
  for s in range(R):
    rank = routing(rng, TOKENS, num_nodes, node_limited) // (EXPERTS // R)
    in_rank = np.zeros((TOKENS, R), bool)
    np.put_along_axis(in_rank, rank, True, axis=1)
    in_node = in_rank.reshape(TOKENS, num_nodes, num_local).any(axis=2)
    home = s // num_local
    other = np.arange(num_nodes) != home
    copies += int(np.delete(in_rank, s, axis=1).sum())
    flat += int(in_rank.reshape(TOKENS, num_nodes, num_local)[:, other].sum())
    hier += int(in_node[:, other].sum())
    largest_slot = max(largest_slot, int(in_node.sum(axis=0).max()))
  return copies / R, flat / R, hier / R, largest_slot


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)
  mb = lambda rows: rows * ROW_BYTES / 1e6
  print(f"per rank, one dispatch, {TOKENS} tokens x {HIDDEN} bf16 ({ROW_BYTES} B rows), "
        f"top-{TOPK} of {EXPERTS}")
  print(f"{'EP':>5} {'routing':>12} {'copies':>7} {'flat rows':>10} {'flat MB':>8} {'hier rows':>10} "
        f"{'hier MB':>8} {'flat/hier':>9} {'hier ms':>8} | {'xla padded MB: flat':>19} "
        f"{'hier F=N':>8} {'F':>5} {'hier F':>7}")
  for num_nodes, num_local in ((2, 8), (8, 8)):
    for node_limited in (True, False):
      copies, flat, hier, slot = traffic(num_nodes, num_local, node_limited, args.seed)
      crossing_pairs = (num_nodes - 1) * num_local  # rank pairs across nodes, per rank
      print(f"{num_nodes * num_local:>5} {'DeepEP' if node_limited else 'uniform':>12} "
            f"{copies:>7.0f} {flat:>10.0f} {mb(flat):>8.1f} {hier:>10.0f} {mb(hier):>8.1f} "
            f"{flat / hier:>9.2f} {mb(hier) / LINK_BYTES_PER_S * 1e9:>8.2f} | "
            f"{mb(crossing_pairs * TOKENS):>19.1f} {mb((num_nodes - 1) * TOKENS):>8.1f} "
            f"{slot:>5} {mb((num_nodes - 1) * slot):>7.1f}")
  print("copies: (token, rank) rows a flat dispatch sends to other ranks, any node; "
        "rows: (token, destination) rows that cross to another node, averaged over ranks; "
        "hier ms: the hierarchical node hop at 400 Gb/s per GPU; xla padded: what the "
        "xla backend's padded all_to_all moves across nodes (F: the largest "
        "(rank, node) slot this routing filled, the smallest num_worst_forward_tokens "
        "that drops nothing here)")


if __name__ == "__main__":
  main()
