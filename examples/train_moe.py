"""Train a small mixture-of-experts language model with jax_ep expert parallelism.

    python examples/train_moe.py                  # 8 virtual CPU devices if no GPU
    python examples/train_moe.py --steps 50 --backend xla --batch 16 --seq 64

The model is a tiny pre-norm decoder (token + position embeddings, a few
blocks of causal attention and a ``jax_ep.moe.moe_block`` FFN, RMSNorm, linear
output layer). The data is synthetic and needs no download: sequences of
a fixed random Markov chain whose rows put all mass on a few successors, so
the loss can fall from ``log(vocab)`` towards the chain's entropy rate. The
script prints both bounds and the loss of the best context-free predictor
(the entropy of the token marginal): beating that means the model uses its
context.

Parallelism: one mesh axis ``ep`` over all devices (at most 8). Tokens are
data-parallel over it, the expert weights are sharded over it (each rank holds
``E/R`` experts) and every other weight is replicated. The loss is a
``shard_map`` over the axis; ``jax.grad`` of it sums the gradients of the
replicated weights over ranks, and optax's adamw updates everything under one
``jit``. The same script runs on GPUs unchanged (``--backend auto`` picks the
CUDA kernels there when the extension is built).
"""
from __future__ import annotations

import os
import sys

# Eight virtual CPU devices, set before jax is imported. The flag only affects
# the host platform, so it is harmless when an accelerator is present.
if "XLA_FLAGS" not in os.environ:
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

# Run from a source checkout when jax_ep is not installed.
import importlib.util
if importlib.util.find_spec("jax_ep") is None:
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import math
import time

import numpy as np

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

import jax_ep
from jax_ep import moe

AXIS = "ep"


# --------------------------------------------------------------------------
# Data: a fixed random sparse Markov chain.

class MarkovData:
  """Sequences of a random Markov chain with ``branching`` successors per token."""

  def __init__(self, vocab: int, branching: int, seed: int):
    rng = np.random.default_rng(seed)
    self.vocab = vocab
    self.trans = np.zeros((vocab, vocab), np.float64)
    for v in range(vocab):
      succ = rng.choice(vocab, size=branching, replace=False)
      self.trans[v, succ] = rng.dirichlet(np.ones(branching))
    self.cdf = np.cumsum(self.trans, axis=1)
    self.cdf[:, -1] = 1.0
    self.rng = np.random.default_rng(seed + 1)
    pi = np.full(vocab, 1.0 / vocab)
    for _ in range(1000):  # Stationary distribution by power iteration.
      pi = pi @ self.trans
    self.stationary = pi

  def entropy_rate(self) -> float:
    """Lowest achievable loss (nats/token) of a predictor that sees the context."""
    t = self.trans
    h_rows = -(np.where(t > 0, t * np.log(np.where(t > 0, t, 1.0)), 0.0)).sum(1)
    return float(self.stationary @ h_rows)

  def marginal_entropy(self) -> float:
    """Loss of the best context-free predictor (unigram frequencies)."""
    p = self.stationary[self.stationary > 0]
    return float(-(p * np.log(p)).sum())

  def batch(self, batch: int, length: int) -> np.ndarray:
    """``[batch, length]`` int32 token ids, each sequence starting at random."""
    out = np.empty((batch, length), np.int32)
    out[:, 0] = self.rng.integers(0, self.vocab, batch)
    for t in range(1, length):
      u = self.rng.random(batch)[:, None]
      out[:, t] = (u < self.cdf[out[:, t - 1]]).argmax(1)
    return out


# --------------------------------------------------------------------------
# Model.

def init_params(key, *, vocab, seq, dim, heads, layers, experts, ffn):
  del heads
  keys = jax.random.split(key, 3 + layers)
  normal = lambda k, shape, scale: scale * jax.random.normal(k, shape, jnp.float32)
  params = {"embed": normal(keys[0], (vocab, dim), 1.0),
            "pos": normal(keys[2], (seq, dim), 0.1),
            "final_norm": jnp.ones((dim,), jnp.float32),
            # Small output layer: the first loss is close to log(vocab).
            "unembed": normal(keys[1], (dim, vocab), 0.1 * dim ** -0.5),
            "layers": []}
  for i in range(layers):
    k_qkv, k_o, k_moe = jax.random.split(keys[3 + i], 3)
    params["layers"].append({
        "attn_norm": jnp.ones((dim,), jnp.float32),
        "wqkv": normal(k_qkv, (dim, 3 * dim), dim ** -0.5),
        "wo": normal(k_o, (dim, dim), (dim * 2 * layers) ** -0.5),
        "moe_norm": jnp.ones((dim,), jnp.float32),
        "moe": moe.init_moe_params(k_moe, dim, ffn, experts),
    })
  return params


def param_specs(params):
  """Expert weights sharded over the axis, everything else replicated."""
  specs = jax.tree_util.tree_map(lambda _: P(), params)
  for layer in specs["layers"]:
    layer["moe"] = moe.moe_param_specs(AXIS)
  return specs


def rms_norm(x, scale, eps=1e-6):
  return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * scale


def attention(p, x, heads):
  B, S, D = x.shape
  q, k, v = jnp.split(x @ p["wqkv"], 3, axis=-1)
  q, k, v = (a.reshape(B, S, heads, D // heads) for a in (q, k, v))
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D // heads)
  causal = jnp.tril(jnp.ones((S, S), bool))
  scores = jnp.where(causal, scores, -1e30)
  out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), v)
  return out.reshape(B, S, D) @ p["wo"]


def make_loss_fn(mesh, buf, specs, args):
  """Global-batch loss as a shard_map over the ep axis (tokens data-parallel)."""
  moe_dtype = jnp.dtype(args.dtype)

  def per_rank(params, tokens):
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    B, S = inputs.shape
    h = params["embed"][inputs] + params["pos"][:S]
    dropped = jnp.zeros((), jnp.int32)
    balance = jnp.zeros((), jnp.float32)
    for layer in params["layers"]:
      h = h + attention(layer, rms_norm(h, layer["attn_norm"]), args.heads)
      x = rms_norm(h, layer["moe_norm"]).reshape(B * S, -1).astype(moe_dtype)
      y, aux = moe.moe_block(buf, layer["moe"], x, top_k=args.top_k,
                             router=args.router,
                             num_worst_tokens=args.num_worst_tokens,
                             expert_impl=args.expert_impl)
      h = h + y.astype(jnp.float32).reshape(B, S, -1)
      dropped = dropped + aux.num_dropped_tokens
      balance = balance + aux.load_balance_loss / len(params["layers"])
    logits = rms_norm(h, params["final_norm"]) @ params["unembed"]
    logp = jax.nn.log_softmax(logits, -1)
    nll = -jnp.take_along_axis(logp, targets[..., None], -1).mean()
    nll = jax.lax.pmean(nll, AXIS)
    balance = jax.lax.pmean(balance, AXIS)
    total = nll + args.aux_weight * balance
    return total, (nll, balance, jax.lax.psum(dropped, AXIS))

  return jax.shard_map(per_rank, mesh=mesh, in_specs=(specs, P(AXIS)),
                       out_specs=(P(), (P(), P(), P())))


# --------------------------------------------------------------------------
# Training.

# Named sets of defaults; flags given explicitly still win.
PRESETS = {
    "tiny": {},
    # A wide model whose MoE FFNs dominate the step (run on GPUs): bf16
    # dispatch, 8 experts per rank at R = 2, 4096 tokens per rank and step.
    "deepseek-small": dict(dim=2048, heads=16, layers=2, experts=16, top_k=4, ffn=1024,
                           batch=16, seq=512, dtype="bfloat16", lr=1e-3, steps=30),
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Appends each default once: not where the help text already states it, and
  not for a default that says nothing (None, or False of an on/off flag)."""

  def _get_help_string(self, action):
    text = action.help or ""
    if "default" in text or action.default is None or action.default is False:
      return text
    return super()._get_help_string(action)


def parse_args(argv):
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
  preset = pre.parse_known_args(argv)[0].preset
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=_HelpFormatter)
  p.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                 help="a named set of defaults (default: tiny, the defaults below): " +
                 "; ".join(f"{k}: {v}" for k, v in PRESETS.items() if v))
  p.add_argument("--expert-impl", default="auto", choices=("auto", "ragged_dot", "mosaic"),
                 help="the experts' grouped matmuls (jax_ep.moe.moe_block)")
  p.add_argument("--steps", type=int, default=300, help="training steps")
  p.add_argument("--backend", default="auto", choices=jax_ep.buffer.BACKENDS,
                 help="jax_ep backend")
  p.add_argument("--batch", type=int, default=16, help="global sequences per step")
  p.add_argument("--seq", type=int, default=64, help="tokens per sequence")
  p.add_argument("--vocab", type=int, default=64, help="vocabulary size")
  p.add_argument("--branching", type=int, default=4,
                 help="successors per token in the Markov chain")
  p.add_argument("--dim", type=int, default=64, help="model width")
  p.add_argument("--heads", type=int, default=4, help="attention heads")
  p.add_argument("--layers", type=int, default=2, help="attention + MoE blocks")
  p.add_argument("--experts", type=int, default=8, help="experts per MoE block")
  p.add_argument("--top-k", type=int, default=2, help="experts per token")
  p.add_argument("--ffn", type=int, default=64, help="hidden size of each expert")
  p.add_argument("--router", default="softmax", choices=moe.ROUTERS, help="router scores")
  p.add_argument("--num-worst-tokens", type=int, default=None,
                 help="receive capacity per rank (default: never drop)")
  p.add_argument("--aux-weight", type=float, default=0.01,
                 help="weight of the load-balancing loss")
  p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="dtype of the tokens the MoE block dispatches")
  p.add_argument("--ranks", type=int, default=None,
                 help="devices on the ep axis (default: all, at most 8)")
  p.add_argument("--seed", type=int, default=0, help="seed of the data and the weights")
  p.add_argument("--plot", default=None, help="save the loss curve to this PNG")
  p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
  p.set_defaults(**PRESETS[preset])
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  devices = jax.devices()
  R = args.ranks or min(len(devices), 8)
  if args.batch % R or args.experts % R:
    raise SystemExit(f"--batch ({args.batch}) and --experts ({args.experts}) must be "
                     f"divisible by the {R} ranks.")
  mesh = Mesh(np.array(devices[:R]), (AXIS,))
  buf = jax_ep.Buffer(mesh, AXIS, backend=args.backend)
  print(f"{R} x {devices[0].device_kind} ({devices[0].platform}), {buf}")

  data = MarkovData(args.vocab, args.branching, args.seed)
  print(f"loss bounds (nats/token): uniform {math.log(args.vocab):.3f}, "
        f"best context-free {data.marginal_entropy():.3f}, "
        f"entropy rate {data.entropy_rate():.3f}")

  params = init_params(jax.random.key(args.seed), vocab=args.vocab, seq=args.seq,
                       dim=args.dim, heads=args.heads, layers=args.layers,
                       experts=args.experts, ffn=args.ffn)
  specs = param_specs(params)
  params = jax.tree_util.tree_map(
      lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), params, specs)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, args.lr, warmup_steps=min(20, max(args.steps // 10, 1)),
      decay_steps=max(args.steps, 1), end_value=args.lr * 0.1)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.adamw(schedule, weight_decay=0.01))
  opt_state = optimizer.init(params)
  loss_fn = make_loss_fn(mesh, buf, specs, args)
  # optax makes its step count on one device, and a step would return it
  # replicated over the mesh: a new input sharding, so a second compilation.
  # Place the state where the step returns it, and pin the step to that.
  replicated = NamedSharding(mesh, P())
  state_shardings = jax.tree_util.tree_map(
      lambda a: a.sharding if isinstance(a.sharding, NamedSharding) else replicated,
      (params, opt_state))
  params, opt_state = jax.device_put((params, opt_state), state_shardings)

  @jax.jit(out_shardings=(*state_shardings, replicated))
  def train_step(params, opt_state, tokens):
    (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, tokens)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, stats

  batch_sharding = NamedSharding(mesh, P(AXIS))
  tokens_per_step = args.batch * args.seq
  losses, timed_s, timed_steps, total_dropped = [], 0.0, 0, 0
  bar = tqdm(range(args.steps), desc="train", disable=args.no_progress,
             dynamic_ncols=True)
  for step in bar:
    tokens = jax.device_put(data.batch(args.batch, args.seq + 1), batch_sharding)
    start = time.perf_counter()
    params, opt_state, (nll, balance, dropped) = train_step(params, opt_state, tokens)
    nll = float(nll)  # Waits for the step.
    elapsed = time.perf_counter() - start
    if step > 0:  # Step 0 includes compilation.
      timed_s += elapsed
      timed_steps += 1
    losses.append(nll)
    total_dropped += int(dropped)
    tok_s = tokens_per_step * timed_steps / timed_s if timed_steps else float("nan")
    bar.set_postfix(loss=f"{nll:.3f}", lb=f"{float(balance):.3f}",
                    tok_s=f"{tok_s:,.0f}", dropped=total_dropped)
  bar.close()

  window = max(1, min(10, len(losses) // 5))
  final = float(np.mean(losses[-window:]))
  tok_s = tokens_per_step * timed_steps / timed_s if timed_steps else float("nan")
  print(f"first loss {losses[0]:.4f}, final loss {final:.4f} (mean of the last "
        f"{window} steps), {tok_s:,.0f} tokens/s, {total_dropped} dropped tokens")
  if args.plot:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(losses, label="train loss")
    ax.axhline(data.marginal_entropy(), ls="--", c="gray", label="best context-free")
    ax.axhline(data.entropy_rate(), ls=":", c="k", label="entropy rate")
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.legend()
    fig.savefig(args.plot, dpi=120, bbox_inches="tight")
    print(f"saved {args.plot}")
  return {"losses": losses, "first_loss": losses[0], "final_loss": final,
          "tokens_per_s": tok_s, "dropped_tokens": total_dropped,
          "marginal_entropy": data.marginal_entropy(),
          "entropy_rate": data.entropy_rate(), "uniform_loss": math.log(args.vocab)}


if __name__ == "__main__":
  main()
