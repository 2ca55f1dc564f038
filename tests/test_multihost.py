"""Two CPU processes under jax.distributed (gloo) match one process."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import subprocess_env

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      'multihost_worker.py')


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _env():
  return dict(subprocess_env(1), JAX_PLATFORMS='cpu')


@pytest.mark.slow
def test_two_processes_match_one():
  reference = json.loads(subprocess.run(
      [sys.executable, WORKER, '0', '0', '0'], capture_output=True,
      text=True, check=True, env=_env(), timeout=300).stdout.strip())
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, WORKER, str(i), '2', str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env()) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  if any(p.returncode for p in procs):
    err = '\n'.join(o[1][-2000:] for o in outs)
    if 'gloo' in err.lower() and 'not' in err.lower() and (
        'support' in err.lower() or 'available' in err.lower()):
      pytest.skip(f'this jaxlib has no gloo CPU collectives: {err[-300:]}')
    raise AssertionError(err)
  losses = json.loads(outs[0][0].strip().splitlines()[-1])
  # Only process 0 writes (gloo itself may log a connection line).
  assert not [line for line in outs[1][0].splitlines()
              if line.startswith('[') and not line.startswith('[Gloo]')]
  np.testing.assert_allclose(losses, reference, rtol=1e-5)
  assert losses[-1] < losses[0]
