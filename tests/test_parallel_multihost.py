"""Sequence parallelism across processes: 2 processes x 4 CPU devices.

Starts tests/multihost/sp_worker.py twice on localhost (a free port for the
coordinator, gloo collectives between the processes); each checks ring,
Ulysses and all-gather (output and gradients) on one 8-device mesh against
the single-process reference. Fails with both workers' logs.
"""

import os
import socket
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(__file__), "multihost", "sp_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PROCESSES = 2
TIMEOUT_S = 150


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_reference(tmp_path):
  port = _free_port()
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  # The workers set their own device count and flags.
  env.pop("XLA_FLAGS", None)
  env["JAX_PLATFORMS"] = "cpu"
  procs, logs = [], []
  for pid in range(NUM_PROCESSES):
    log = open(tmp_path / f"worker{pid}.log", "w+")
    logs.append(log)
    procs.append(subprocess.Popen(
        [sys.executable, WORKER, str(pid), str(NUM_PROCESSES), str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT))
  failed = []
  try:
    for pid, p in enumerate(procs):
      try:
        rc = p.wait(timeout=TIMEOUT_S)
      except subprocess.TimeoutExpired:
        failed.append(f"worker {pid} timed out after {TIMEOUT_S}s")
        continue
      if rc != 0:
        failed.append(f"worker {pid} exited with {rc}")
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  texts = []
  for pid, log in enumerate(logs):
    log.seek(0)
    texts.append(log.read())
    log.close()
  for pid, text in enumerate(texts):
    if f"WORKER OK {pid}" not in text and not failed:
      failed.append(f"worker {pid} did not report success")
  if failed:
    tails = "\n".join(f"--- worker {i} (last 40 lines) ---\n"
                      + "\n".join(t.splitlines()[-40:])
                      for i, t in enumerate(texts))
    pytest.fail("; ".join(failed) + "\n" + tails)
