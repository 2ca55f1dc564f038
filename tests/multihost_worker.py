"""One process of the two-process test in test_multihost.py.

    python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT

Trains a small MLP with adamw2 on a global batch split across processes
(data parallel, params sharded FSDP-style over the same axis) and prints the
losses as JSON from process 0. With NUM_PROCESSES=0 it runs the same training
in one plain process, as the reference.
"""

import json
import sys

STEPS = 5


def data():
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = rng.normal(size=(8, 16)).astype(np.float32)
  y = rng.normal(size=(8, 4)).astype(np.float32)
  w = {'w1': (rng.normal(size=(16, 32)) * 0.3).astype(np.float32),
       'w2': (rng.normal(size=(32, 4)) * 0.3).astype(np.float32)}
  return x, y, w


def train(x, y, params):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import optax_spectral  # pylint: disable=g-import-not-at-top
  tx = optax_spectral.adamw2(0.05, tau=0.02)

  def loss_fn(p, x, y):
    return jnp.mean((jnp.tanh(x @ p['w1']) @ p['w2'] - y) ** 2)

  @jax.jit
  def step(p, s, x, y):  # global arrays must be arguments, not constants
    loss, g = jax.value_and_grad(loss_fn)(p, x, y)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  state = tx.init(params)
  losses = []
  for _ in range(STEPS):
    params, state, loss = step(params, state, x, y)
    losses.append(float(loss))
  return losses


def main(process_id, num_processes, port):
  if num_processes == 0:
    print(json.dumps(train(*data())))
    return
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(f'localhost:{port}', num_processes=num_processes,
                             process_id=process_id)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  x, y, w = data()
  per = len(x) // jax.process_count()
  mine = slice(jax.process_index() * per, (jax.process_index() + 1) * per)
  batch = NamedSharding(mesh, P('data'))
  x = jax.make_array_from_process_local_data(batch, x[mine])
  y = jax.make_array_from_process_local_data(batch, y[mine])
  # Params FSDP-sharded over the same axis: each process holds part of w1.
  params = {k: jax.make_array_from_callback(
      v.shape, NamedSharding(mesh, P('data') if k == 'w1' else P()),
      lambda idx, v=v: v[idx]) for k, v in w.items()}
  with jax.set_mesh(mesh):
    losses = train(x, y, params)
  if jax.process_index() == 0:  # only process 0 writes
    print(json.dumps(losses))
  jax.distributed.shutdown()
  del np


if __name__ == '__main__':
  main(*(int(a) for a in sys.argv[1:4]))
