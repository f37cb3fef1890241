"""Models built from attnjax.nn (API section 6).

- ``LanguageModel``: decoder-only LM whose layers follow a pattern string
  ("A" softmax, "L" linear, "W" sliding window; e.g. "LLLA").
- ``generate``: cached autoregressive decoding.
- ``train``: an optax train step as pure functions.
- ``mesh``: data x sequence parallel training on a device mesh.
"""

from attnjax.models import mesh as mesh
from attnjax.models import train as train
from attnjax.models.lm import LanguageModel as LanguageModel
from attnjax.models.lm import generate as generate

__all__ = ["LanguageModel", "generate", "mesh", "train"]
