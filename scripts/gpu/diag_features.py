"""Which feature breaks a backend on GPU: each alone, then combined."""
import sys
import jax, jax.numpy as jnp
import attnjax
from attnjax import testing

impls = sys.argv[1].split(",") if len(sys.argv) > 1 else ["pallas_mosaic_gpu", "pallas_triton"]
inp = testing.attention_inputs(jax.random.key(1), batch=2, q_len=777, num_heads=6,
                               num_kv_heads=3, head_dim=64, dtype=jnp.bfloat16)
seg = testing.random_segment_ids(jax.random.key(2), 2, 777, 3)
cases = {
  "causal": dict(is_causal=True),
  "seg": dict(segment_ids=seg),
  "seg_causal": dict(segment_ids=seg, is_causal=True),
  "sinks": dict(sinks=jnp.linspace(-1, 1, 6)),
  "softcap": dict(logits_soft_cap=20.0),
  "window": dict(is_causal=True, local_window_size=(300, 0)),
  "all": dict(segment_ids=seg, sinks=jnp.linspace(-1, 1, 6), logits_soft_cap=20.0,
              is_causal=True, local_window_size=(300, 0)),
}
for impl in impls:
  for name, kw in cases.items():
    try:
      got = attnjax.dot_product_attention(inp.q, inp.k, inp.v, implementation=impl, **kw)
      want = attnjax.dot_product_attention(inp.q, inp.k, inp.v, implementation="xla", **kw)
      err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
      print(f"{impl:20s} {name:12s} max_abs_err {err:.4f} {'OK' if err < 0.03 else 'BAD'}", flush=True)
    except Exception as e:
      print(f"{impl:20s} {name:12s} {type(e).__name__}: {str(e)[:150]}", flush=True)
