"""Smoke tests of the experiments' tiny configurations, and their data."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import __main__ as cli
from experiments.mqar import run as mqar
from experiments.mqar import task
from experiments.scaling import run as scaling
from experiments.sinks import corpus
from experiments.sinks import run as sinks


def test_mqar_batches_are_recall_problems():
  p, t = 6, 40
  b = task.mqar_batch(jax.random.key(0), batch_size=5, seq_len=t,
                      num_pairs=p, vocab_size=32)
  x, y, w = (np.asarray(b[k]) for k in ("inputs", "targets", "weights"))
  assert x.shape == y.shape == w.shape == (5, t)
  np.testing.assert_array_equal(w.sum(1), p)
  at = np.sort(np.asarray(b["loss_positions"]), axis=1)
  np.testing.assert_array_equal(at, np.stack(
      [np.flatnonzero(r) for r in w]))
  for row in range(5):
    keys, values = x[row, 0:2 * p:2], x[row, 1:2 * p:2]
    assert len(set(keys.tolist())) == p and keys.max() < 16 <= values.min()
    table = dict(zip(keys.tolist(), values.tolist()))
    for pos in np.flatnonzero(w[row]):
      assert pos >= 2 * p
      assert y[row, pos] == table[int(x[row, pos])]
      assert y[row, pos] == x[row, pos + 1]
  with pytest.raises(ValueError, match="num_pairs"):
    task.mqar_batch(jax.random.key(0), batch_size=1, seq_len=20,
                    num_pairs=6, vocab_size=32)


def test_mqar_hybrid_patterns_and_state_sizes():
  cfg = dataclasses.replace(mqar.FULL)
  pats = {s.name: s.pattern for s in mqar.model_specs(cfg)}
  assert pats["hybrid 7:1"] == "LLLLLLLA"
  assert pats["hybrid 3:1"] == "LLLALLLA"
  assert pats["hybrid 1:1"] == "LALALALA"
  quick = {s.name: s.pattern for s in mqar.model_specs(mqar.QUICK)}
  assert quick["hybrid 3:1"] == "LLLA" and quick["hybrid 7:1"] == "LLLLLLLA"
  spec = {s.name: s for s in mqar.model_specs(cfg)}
  # Attention's cache grows with T; a linear layer's state does not.
  assert (mqar.state_bytes(spec["attention"], cfg, 64)
          == 4 * 2 * 2 * cfg.seq_len * 64)
  assert (mqar.state_bytes(spec["gated linear"], cfg, 64)
          == 4 * 2 * 2 * 32 * 33)


def test_mqar_command_smoke(tmp_path, capsys):
  rows = mqar.main(["--models", "attention", "gla", "--widths",
                    "16", "--steps", "10", "--jobs", "1", "--out",
                    str(tmp_path)])
  assert [r["model"] for r in rows] == ["attention", "gated linear"]
  result = json.loads((tmp_path / "results.json").read_text())
  assert result["experiment"] == "mqar" and len(result["results"]) == 2
  assert all(0.0 <= r["accuracy"] <= 1.0 for r in result["results"])
  assert (tmp_path / "mqar.png").stat().st_size > 1000
  assert "| attention" in capsys.readouterr().out


def test_bigram_backcopy_rule():
  trans = corpus.bigram_matrix(16, seed=1)
  np.testing.assert_allclose(trans.sum(1), 1.0, rtol=1e-5)
  b = corpus.bb_batch(jax.random.key(2), transitions=trans, batch_size=8,
                      seq_len=40)
  seq = np.concatenate([np.asarray(b["inputs"]),
                        np.asarray(b["targets"])[:, -1:]], 1)
  np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
  assert (seq[:, 0] == corpus.BOS).all() and (seq[:, 1:] != corpus.BOS).all()
  trig = (seq[:, 1:-1] >= 1) & (seq[:, 1:-1] <= corpus.NUM_TRIGGERS)
  assert trig.any()
  np.testing.assert_array_equal(seq[:, 2:][trig], seq[:, :-2][trig])
  text = corpus.token_stream(500, seed=3)
  assert text.shape == (500,) and text.max() < len(corpus.WORDS)


def test_first_token_statistics():
  t = 6
  uniform = jnp.tril(jnp.ones((t, t))) / jnp.arange(1, t + 1)[:, None]
  stats = sinks.first_token_stats(uniform[None, None], normalised=True)
  np.testing.assert_allclose(stats["mass"], sinks.uniform_share(t),
                             rtol=1e-6)
  sink = jnp.zeros((1, 2, t, t)).at[:, 0, :, 0].set(1.0)
  sink = sink.at[:, 1].set(uniform)
  stats = sinks.first_token_stats(sink, normalised=True)
  assert stats["sink_heads"] == 0.5 and stats["per_head"][0] == 1.0


def test_sinks_variant_smoke():
  cfg = dataclasses.replace(sinks.QUICK, seq_len=16, d_model=16,
                            num_heads=2, num_layers=1, steps=10,
                            batch_size=4, measure_every=5, measure_batch=2,
                            bb_vocab=16)
  v = sinks.variants(cfg.seq_len, ("sigmoid",))[0]
  r = sinks.run_variant(v, cfg, seed=0, show_progress=False)
  assert [h["step"] for h in r["history"]] == [0, 5, 10]
  assert 0.0 <= r["history"][-1]["layers"][0]["mass"] <= 1.0
  assert np.isfinite(r["eval_loss"])


def test_scaling_command_smoke(tmp_path):
  rows = scaling.main(["--seq-lens", "48", "--implementations", "xla",
                       "xla_chunked", "linear", "--out", str(tmp_path)])
  assert len(rows) == 3
  for r in rows:
    assert r["fwd_temp_bytes"] is not None and r["fwd_bwd_seconds"] > 0
  assert (tmp_path / "scaling.png").exists()


@pytest.mark.long
def test_sinks_command(tmp_path):
  results = sinks.main(["--steps", "50", "--out", str(tmp_path)])
  assert len(results) == 3
  assert (tmp_path / "sinks.png").exists()


def test_cli_lists_experiments(capsys):
  assert cli.main([]) == 0
  assert "mqar" in capsys.readouterr().out
  assert cli.main(["nope"]) == 2
