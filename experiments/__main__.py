"""``python -m experiments <name> [--quick | --full] [--out DIR] ...``.

Experiments (each writes JSON and PNG under experiments/results/<name>/):

  mqar     multi-query associative recall vs width: softmax, linear
           variants, BASED, hybrids at 7:1 / 3:1 / 1:1 (Zoology; hybrid
           linear attention analysis)
  sinks    attention mass on the first token over training: softmax,
           sigmoid, softmax + output gate (When Attention Sink Emerges;
           Gated Attention)
  scaling  peak memory and time vs sequence length for "xla",
           "xla_chunked", "pallas" and linear attention (Rabe & Staats;
           Lightning Attention)

``--quick`` (the default) runs a CPU-sized configuration in minutes;
``--full`` the GPU-sized one. ``python -m experiments <name> --help`` lists
each experiment's options.
"""

import importlib
import sys

EXPERIMENTS = {
    "mqar": "experiments.mqar.run",
    "sinks": "experiments.sinks.run",
    "scaling": "experiments.scaling.run",
}


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help") or argv[0] not in EXPERIMENTS:
    print(__doc__)
    if argv and argv[0] not in ("-h", "--help"):
      print(f"unknown experiment {argv[0]!r}; choose from "
            f"{sorted(EXPERIMENTS)}")
      return 2
    return 0
  importlib.import_module(EXPERIMENTS[argv[0]]).main(argv[1:])
  return 0


if __name__ == "__main__":
  sys.exit(main())
