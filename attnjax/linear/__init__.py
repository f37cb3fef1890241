"""The linear attention family: chunked-scan kernels, gates, the delta rule.

Public functions (see ``attnjax/linear/api.py`` and docs/linear/):

* ``linear_attention``: plain, normalised (Katharopoulos), fixed-decay
  (RetNet, Lightning Attention-2, TransNormerLLM), scalar-gated (Mamba-2,
  simple GLA) and per-channel-gated (GLA) linear attention, with feature
  maps, GQA, initial/final state and packed-sequence resets.
* ``delta_rule_attention``: DeltaNet and Gated DeltaNet.
* ``linear_attention_step`` / ``delta_rule_step``: one decoding token.
"""

from attnjax.linear.api import delta_rule_attention as delta_rule_attention
from attnjax.linear.api import delta_rule_step as delta_rule_step
from attnjax.linear.api import linear_attention as linear_attention
from attnjax.linear.api import linear_attention_step as linear_attention_step

__all__ = (
    "delta_rule_attention",
    "delta_rule_step",
    "linear_attention",
    "linear_attention_step",
)
