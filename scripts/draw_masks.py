"""Regenerates the drawings in docs/masks.md from attnjax.masks.

Run: python scripts/draw_masks.py > docs/masks.md (tests/test_docs.py checks
that the committed page matches).
"""

import numpy as np

from attnjax import masks

EXAMPLES = [
    ("Causal()", masks.Causal(), 8, 8,
     "Top-left aligned causal attention (`is_causal=True`)."),
    ("Causal(offset=4)", masks.Causal(offset=4), 4, 8,
     "Bottom-right aligned: 4 new queries over an 8-key cache "
     "(offset = S - T)."),
    ("LocalWindow(2, 1)", masks.LocalWindow(2, 1), 8, 8,
     "`local_window_size=(2, 1)`: i - 2 <= j <= i + 1."),
    ("Causal() & LocalWindow(3, 0)",
     masks.Causal() & masks.LocalWindow(3, 0), 8, 8,
     "Sliding-window causal attention (Mistral, Gemma local layers)."),
    ("ChunkedCausal(3)", masks.ChunkedCausal(3), 8, 8,
     "Causal within chunks of 3 (Llama-4 chunked attention)."),
    ("(LocalWindow(2, 0) | Prefix(2)) & Causal()",
     (masks.LocalWindow(2, 0) | masks.Prefix(2)) & masks.Causal(), 8, 8,
     "StreamingLLM: a sliding window plus the first 2 tokens as sinks."),
    ("BlockSparse(layout, (2, 2)) & Causal()",
     masks.BlockSparse(np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0],
                                 [1, 0, 0, 1]], bool), (2, 2))
     & masks.Causal(), 8, 8,
     "Explicit block layout (MoBA-style routing: each query block picks key "
     "blocks, causal inside the diagonal block). Layout rows: "
     "[1000], [1100], [0110], [1001]."),
    ("FromFunction(lambda q, k: (k <= q) & ((q - k) % 2 == 0))",
     masks.FromFunction(lambda q, k: (k <= q) & ((q - k) % 2 == 0)), 8, 8,
     "Any elementwise predicate (FlexAttention's mask_mod): here a dilated "
     "causal pattern."),
]


def draw(m, t, s):
  d = np.asarray(m.as_array(t, s))
  return "\n".join(" ".join("#" if x else "." for x in row) for row in d)


def page():
  out = ["# Masks", "",
         "`attnjax.masks` holds hashable mask objects (usable as static jit "
         "arguments) that compose with `&` and `|` and are passed as "
         "`mask=` to `attnjax.dot_product_attention` (also "
         "`sequence_parallel_attention`). Kernels classify each (query "
         "tile, key tile) pair as empty (never loaded), partial (masked "
         "elementwise) or full (no masking), so a sparse mask costs time in "
         "proportion to its visible tiles. `mask.as_array(T, S)` gives the "
         "dense boolean form; `mask.block_kinds(T, S, bq, bk)` the tile "
         "classification.", "",
         "Rows are queries (i), columns keys (j); `#` = visible. Drawn by "
         "`python scripts/draw_masks.py` from the code itself.", ""]
  for title, m, t, s, text in EXAMPLES:
    out += [f"## `{title}`", "", text, "", "```text", draw(m, t, s), "```",
            ""]
  out += [
      "## Dynamic masks", "",
      "Per-example information stays in arrays, not mask objects: "
      "`segment_ids` (packed documents: query i sees key j only when their "
      "ids match; pass `(q_ids, kv_ids)` for cross attention), "
      "`query_seq_lengths` / `key_value_seq_lengths` (padding), and a "
      "boolean `mask` array broadcastable to [B, N, T, S]. A query row "
      "with no visible key returns zeros.", "",
      "## Using a mask", "",
      "```python",
      "import jax, attnjax",
      "from attnjax import masks",
      "q = jax.random.normal(jax.random.key(0), (1, 64, 4, 32))",
      "streaming = (masks.LocalWindow(16, 0) | masks.Prefix(4)) & "
      "masks.Causal()",
      "out = attnjax.dot_product_attention(q, q, q, mask=streaming)",
      "kinds, _ = streaming.block_kinds(64, 64, 16, 16)",
      "print(kinds[0])  # 0 empty, 1 partial, 2 full",
      "```", ""]
  return "\n".join(out)


if __name__ == "__main__":
  print(page(), end="")
