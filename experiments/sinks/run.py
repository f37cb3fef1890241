"""Attention sinks over training: softmax vs sigmoid vs softmax + output gate.

``python -m experiments sinks [--quick | --full] [--out DIR]``

Trains the same tiny language model on a synthetic corpus with three
attention normalisations and records, every few steps, how much attention
each layer puts on the first token of the window. Writes ``results.json``
and ``sinks.png`` under experiments/results/sinks/. See README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax.models import LanguageModel
from experiments import common, training
from experiments.sinks import corpus

# "When Attention Sink Emerges" counts a head as a sink head when its mean
# attention on the first token exceeds this threshold.
SINK_EPSILON = 0.3


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  attention: tuple  # MultiHeadAttention kwargs as sorted items


def variants(seq_len: int, names) -> list[Variant]:
  all_ = [
      Variant("softmax", ()),
      # Sigmoid attention without normalisation, b = -log(n) (Ramapuram et
      # al.); "When Attention Sink Emerges" section 7.
      Variant("sigmoid", (("normalization", "sigmoid"),
                          ("sigmoid_bias", -math.log(seq_len)))),
      # The head-specific sigmoid gate after SDPA (Qiu et al. 2025, "G1").
      Variant("softmax + output gate", (("output_gate", True),)),
      # A learned sink logit per head (StreamingLLM / gpt-oss): a place to
      # put attention that is not a token.
      Variant("softmax + sink logit", (("sinks", True),)),
  ]
  return [v for v in all_ if v.name in names]


@dataclasses.dataclass
class Config:
  seq_len: int
  d_model: int
  num_heads: int
  num_layers: int
  steps: int
  batch_size: int
  learning_rate: float
  corpus_tokens: int
  measure_every: int
  measure_batch: int
  variants: tuple[str, ...]
  corpus: str = "bb"        # "bb" (bigram-backcopy) | "grammar"
  bb_vocab: int = 64


QUICK = Config(seq_len=64, d_model=64, num_heads=4, num_layers=2,
               steps=1000, batch_size=32, learning_rate=1e-2,
               corpus_tokens=200_000, measure_every=125, measure_batch=16,
               variants=("softmax", "sigmoid", "softmax + output gate"))
FULL = Config(seq_len=256, d_model=256, num_heads=8, num_layers=4,
              steps=4000, batch_size=64, learning_rate=3e-3,
              corpus_tokens=2_000_000, measure_every=500, measure_batch=32,
              variants=("softmax", "sigmoid", "softmax + output gate",
                        "softmax + sink logit"))


def window_batch(key, stream, *, batch_size, seq_len):
  """Random windows of the token stream (no BOS: token 0 is arbitrary)."""
  starts = jax.random.randint(key, (batch_size,), 0,
                              stream.shape[0] - seq_len - 1)
  take = jax.vmap(lambda s: jax.lax.dynamic_slice(stream, (s,),
                                                  (seq_len + 1,)))
  seq = take(starts)
  return {"inputs": seq[:, :-1], "targets": seq[:, 1:]}


def first_token_stats(weights, normalised: bool) -> dict:
  """Per-layer sink statistics from [B, N, T, T] attention weights.

  Queries t >= 1 only (query 0 can only see token 0).
  """
  w = weights[:, :, 1:, :]
  share = w[..., 0]
  if not normalised:  # sigmoid: also the share of the row's total weight
    share_norm = share / jnp.maximum(w.sum(-1), 1e-9)
  else:
    share_norm = share
  per_head = share.mean(axis=(0, 2))  # [N]
  return {"mass": float(share.mean()),
          "share": float(share_norm.mean()),
          "sink_heads": float((per_head > SINK_EPSILON).mean()),
          "per_head": per_head.tolist()}


def data(cfg: Config, seed: int):
  """(vocab_size, batch_fn, probe inputs) for the configured corpus."""
  if cfg.corpus == "bb":
    transitions = corpus.bigram_matrix(cfg.bb_vocab, seed)
    make = functools.partial(corpus.bb_batch, transitions=transitions,
                             seq_len=cfg.seq_len)
    vocab = cfg.bb_vocab
  elif cfg.corpus == "grammar":
    stream = jnp.asarray(corpus.token_stream(cfg.corpus_tokens, seed))
    make = functools.partial(window_batch, stream=stream,
                             seq_len=cfg.seq_len)
    vocab = len(corpus.WORDS)
  else:
    raise ValueError(f"corpus must be 'bb' or 'grammar', got {cfg.corpus!r}")
  batch_fn = functools.partial(make, batch_size=cfg.batch_size)
  probe = make(jax.random.key(123), batch_size=cfg.measure_batch)["inputs"]
  return vocab, batch_fn, probe


def run_variant(v: Variant, cfg: Config, seed: int,
                show_progress=True) -> dict:
  vocab, batch_fn, probe = data(cfg, seed)
  model = LanguageModel(
      vocab_size=vocab, d_model=cfg.d_model,
      num_heads=cfg.num_heads, pattern="A" * cfg.num_layers,
      attention_kwargs=dict(v.attention), rngs=nnx.Rngs(seed))
  weights_fn = nnx.jit(lambda m, x: m.attention_weights(x))
  normalised = dict(v.attention).get("normalization", "softmax") == "softmax"

  def measure(step, m):
    ws = weights_fn(m, probe)
    return {"layers": [first_token_stats(w, normalised) for w in ws]}

  at_init = dict(step=0, **measure(0, model))
  with common.Timer() as timer:
    history, losses = training.train(
        model, batch_fn, steps=cfg.steps, learning_rate=cfg.learning_rate,
        key=jax.random.key(seed), callback=measure,
        callback_every=cfg.measure_every, desc=v.name,
        steps_per_call=min(25, cfg.measure_every),
        disable=not show_progress)
  history.insert(0, at_init)
  ev = training.evaluate(model, batch_fn, jax.random.key(10_000 + seed), 4)
  return dict(variant=v.name, history=history, eval_loss=ev["loss"],
              final_train_loss=float(np.mean(losses[-20:])),
              train_seconds=timer.seconds,
              loss_curve=[float(x) for x in losses[::10]])


def uniform_share(seq_len: int) -> float:
  """First-token share of uniform causal attention, averaged over t >= 1."""
  return float(np.mean(1.0 / np.arange(2, seq_len + 1)))


def plot(results, cfg: Config, path):
  plt = common.pyplot()
  fig, axes = plt.subplots(1, len(results) + 1,
                           figsize=(4 * (len(results) + 1), 3.6),
                           sharey=False)
  base = uniform_share(cfg.seq_len)
  for ax, r in zip(axes, results):
    steps = [h["step"] for h in r["history"]]
    for layer in range(cfg.num_layers):
      ax.plot(steps, [h["layers"][layer]["mass"] for h in r["history"]],
              "-o", ms=3, label=f"layer {layer}")
    ax.axhline(base, color="gray", ls="--", lw=1, label="uniform")
    ax.set_title(r["variant"], fontsize=10)
    ax.set_xlabel("training step")
    ax.set_ylim(0, 1)
  axes[0].set_ylabel("mean attention on first token")
  axes[0].legend(fontsize=7)
  ax = axes[-1]
  for r in results:
    ax.plot(np.arange(len(r["loss_curve"])) * 10, r["loss_curve"],
            label=r["variant"], lw=1)
  ax.set_title("training loss", fontsize=10)
  ax.set_xlabel("training step")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m experiments sinks",
                              description=__doc__)
  g = p.add_mutually_exclusive_group()
  g.add_argument("--quick", action="store_true",
                 help="CPU-sized (default): 2 layers, d=64, T=64")
  g.add_argument("--full", action="store_true",
                 help="GPU-sized: 4 layers, d=256, T=256, 4 variants")
  p.add_argument("--out", help="output folder (default "
                 "experiments/results/sinks, or sinks_full with --full)")
  p.add_argument("--steps", type=int)
  p.add_argument("--corpus", choices=("bb", "grammar"),
                 help="bb: bigram-backcopy with BOS (default); grammar: "
                 "windows of a synthetic English-like text")
  p.add_argument("--variants", nargs="+", metavar="NAME",
                 help="subset of: softmax, sigmoid, 'softmax + output "
                 "gate', 'softmax + sink logit'")
  p.add_argument("--plot-only", action="store_true",
                 help="re-plot and print results.json from the output "
                 "folder")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  cfg = dataclasses.replace(FULL if args.full else QUICK)
  if args.corpus:
    cfg.corpus = args.corpus
  if args.steps:
    cfg.steps = args.steps
    cfg.measure_every = max(25, min(cfg.measure_every, cfg.steps // 4))
  if args.variants:
    cfg.variants = tuple(args.variants)
  out = common.out_dir("sinks_full" if args.full else "sinks", args.out)
  js, png = out / "results.json", out / "sinks.png"
  if args.plot_only:
    saved = json.loads(js.read_text())
    cfg = Config(**{k: tuple(v) if isinstance(v, list) else v
                    for k, v in saved["config"].items()})
    report(saved["results"], cfg, png)
    return saved["results"]

  results = []
  with common.Timer() as total:
    for v in common.progress(variants(cfg.seq_len, cfg.variants),
                             desc="sinks", unit="model", leave=True):
      results.append(run_variant(v, cfg, args.seed))
      # Written after every variant, so a cut-off run keeps what it has.
      common.write_json(js, dict(
          experiment="sinks", mode="full" if args.full else "quick",
          config=dataclasses.asdict(cfg), uniform_share=uniform_share(
              cfg.seq_len), sink_epsilon=SINK_EPSILON, results=results,
          environment=common.environment()))
  saved = json.loads(js.read_text())
  saved["total_seconds"] = total.seconds
  common.write_json(js, saved)
  report(results, cfg, png)
  print(f"wrote {js} and {png} ({total.seconds:.0f} s)")
  return results


def report(results, cfg: Config, png) -> None:
  """Prints the table; writes the PNG unless matplotlib is missing."""
  rows = []
  for r in results:
    first, last = r["history"][0], r["history"][-1]
    for layer in range(cfg.num_layers):
      rows.append([r["variant"], layer,
                   round(first["layers"][layer]["mass"], 3),
                   round(last["layers"][layer]["mass"], 3),
                   round(last["layers"][layer]["share"], 3),
                   round(last["layers"][layer]["sink_heads"], 2),
                   round(r["eval_loss"], 3)])
  print(f"uniform causal attention would put "
        f"{uniform_share(cfg.seq_len):.3f} on the first token")
  print(common.format_table(
      ["variant", "layer", "mass@0", f"mass@{cfg.steps}", "share",
       f"heads>{SINK_EPSILON}", "eval loss"], rows))
  try:
    plot(results, cfg, png)
  except ImportError as e:
    print(f"no plot ({e}); run again with --plot-only where matplotlib is")


if __name__ == "__main__":
  main()
