"""What the examples share: the transformer block, optimizers, the mesh, and
the training loop (progress bar, CSV and TensorBoard logs, orbax checkpoints).

Kept small on purpose: copy it with an example into your own project.
"""

import collections
import csv
import dataclasses
import functools
import itertools
import math
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_spectral
from optax_spectral import diagnostics

# Params are sharded FSDP-style over the one mesh axis, which also splits the
# batch (data parallel): on one device both are no-ops.
AXIS = 'fsdp'


def sharded(init, names):
  return nnx.with_partitioning(init, names)


def kernel_init(init_std: float | None):
  """LeCun normal (std 1/sqrt(fan_in), variance-preserving) by default, or
  a plain normal of ``init_std`` (GPT-2 and ViT use 0.02): the small inits
  under which a bound relative to σ1(W) would throttle early training."""
  if init_std is None:
    return nnx.initializers.lecun_normal()
  return nnx.initializers.normal(init_std)


# --- model --------------------------------------------------------------------

# The crash signal is measured on this many examples of a logging step's batch.
PROBE_BATCH = 8


def attention(q, k, v, causal: bool, probe: bool = False):
  """Softmax attention; with ``probe``, also each head's mean entropy (nats).

  ``q, k, v``: ``(batch, time, heads, head_dim)``. Training steps use the
  fused kernel (``jax.nn.dot_product_attention``: cuDNN's flash attention
  where the backend has it, XLA's otherwise) and return ``None`` for the
  entropy. The probe materialises the probabilities in float32 to read the
  paper's crash signal: the entropy collapsing towards 0, each query
  attending to a single key.
  """
  if not probe:
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal), None
  t = q.shape[1]
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32)
  logits /= math.sqrt(q.shape[-1])
  if causal:
    logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum('bhqk,bkhd->bqhd', probs.astype(v.dtype), v)
  return out, diagnostics.attention_entropy(probs).mean(axis=(0, 2))


class Block(nnx.Module):
  """Pre-LN transformer block: self-attention and a GELU MLP.

  ``dtype`` is the compute dtype (``'bfloat16'`` for mixed precision);
  params stay float32, and so does the optimizer state.
  """

  def __init__(self, d: int, n_head: int, causal: bool, rngs: nnx.Rngs,
               init_std: float | None = None, dtype: str = 'float32'):
    self.n_head, self.causal = n_head, causal
    kernel = sharded(kernel_init(init_std), (AXIS, None))
    linear = lambda i, o: nnx.Linear(i, o, kernel_init=kernel, dtype=dtype,
                                     rngs=rngs)
    self.ln1 = nnx.LayerNorm(d, dtype=dtype, rngs=rngs)
    self.qkv = linear(d, 3 * d)
    self.proj = linear(d, d)
    self.ln2 = nnx.LayerNorm(d, dtype=dtype, rngs=rngs)
    self.fc = linear(d, 4 * d)
    self.fc_out = linear(4 * d, d)

  def __call__(self, x, probe: bool = False):
    b, t, d = x.shape
    q, k, v = jnp.split(self.qkv(self.ln1(x)), 3, axis=-1)
    heads = lambda z: z.reshape(b, t, self.n_head, d // self.n_head)
    y, entropy = attention(heads(q), heads(k), heads(v), self.causal, probe)
    x = x + self.proj(y.reshape(b, t, d))
    x = x + self.fc_out(nnx.gelu(self.fc(self.ln2(x))))
    return x, entropy


class Blocks(nnx.Module):
  """``n`` blocks, as a Python list or stacked and run with ``nnx.scan``.

  Stacked, every param gains a leading layer axis: ``(layers, d_in, d_out)``
  kernels, which adamw2 bounds per layer (:func:`dimension_numbers`).
  """

  def __init__(self, n: int, d: int, n_head: int, causal: bool, scan: bool,
               rngs: nnx.Rngs, init_std: float | None = None,
               dtype: str = 'float32'):
    self.scan = scan
    if scan:
      @nnx.split_rngs(splits=n)
      @nnx.vmap(in_axes=(0,), out_axes=0,
                transform_metadata={nnx.PARTITION_NAME: None})
      def make(rngs):
        return Block(d, n_head, causal, rngs, init_std, dtype)
      self.layers = make(rngs)
    else:
      self.layers = nnx.List([Block(d, n_head, causal, rngs, init_std, dtype)
                              for _ in range(n)])

  def __call__(self, x, probe: bool = False):
    """The output, and with ``probe`` the attention entropy ``(layers,
    heads)`` (else ``None``)."""
    if self.scan:
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0),
                transform_metadata={nnx.PARTITION_NAME: None})
      def run(x, block):
        return block(x, probe)
      return run(x, self.layers)
    entropies = []
    for block in self.layers:
      x, entropy = block(x, probe)
      entropies.append(entropy)
    return x, jnp.stack(entropies) if probe else None


def matmul_flops_per_token(n_layer: int, d: int, context: int) -> float:
  """Model FLOPs of the blocks per token, forward and backward: 6 per
  weight of a matrix product, plus attention's scores and mixing,
  ``12 * layers * context * d`` (PaLM's estimate, appendix B; causal
  masking not discounted)."""
  return 6.0 * n_layer * 12 * d * d + 12.0 * n_layer * context * d


# --- optimizers ---------------------------------------------------------------

@dataclasses.dataclass
class OptimizerConfig:
  name: str = 'adamw2'          # adamw | adamw2
  lr: float = 1e-2
  warmup_steps: int = 0
  steps: int = 300
  weight_decay: float = 0.1
  tau: float | None = None     # None: the library default
  weight_floor: float | None = None  # None: the library default
  ramp_steps: int | None = None  # None: the library default (1 / tau)
  bound: str | None = None     # None: the library default ('all')
  b2: float = 0.95


def dimension_numbers(model: nnx.Module):
  """Which params adamw2 bounds, read from the model's modules: every
  ``nnx.Linear`` kernel and ``nnx.Embed`` table, per layer when stacked by
  ``nnx.scan``; not biases and norm scales, nor the ViT's class token and
  position table, which the ViT module holds itself (not linear maps)."""
  return optax_spectral.nnx_dimension_numbers(model, unknown='skip')


def schedule(cfg: OptimizerConfig) -> optax.Schedule:
  """Warmup (if any), then cosine decay to lr/10."""
  if cfg.warmup_steps > 0:
    return optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, cfg.warmup_steps, max(cfg.steps, cfg.warmup_steps + 1),
        end_value=cfg.lr * 0.1)
  return optax.cosine_decay_schedule(cfg.lr, max(cfg.steps, 1), alpha=0.1)


def make_optimizer(cfg: OptimizerConfig, model: nnx.Module,
                   **adamw2_options):
  """``adamw`` or ``adamw2`` on :func:`schedule` for ``model``'s
  ``nnx.Param``s; ``adamw2_options`` go to :func:`optax_spectral.adamw2`."""
  lr = schedule(cfg)
  dims = dimension_numbers(model)
  # Weight decay on the bounded matrices only: not on biases, norm scales,
  # class token and position table.
  mask = jax.tree.map(lambda s: s is not None, dims, is_leaf=lambda x: (
      x is None or isinstance(x, optax_spectral.SpectralDimensionNumbers)))
  decay = lambda params: mask
  if cfg.name == 'adamw':
    return optax.adamw(lr, b2=cfg.b2, weight_decay=cfg.weight_decay,
                       mask=decay)
  if cfg.name == 'adamw2':
    given = {k: v for k, v in [('tau', cfg.tau),
                               ('weight_floor', cfg.weight_floor),
                               ('ramp_steps', cfg.ramp_steps),
                               ('bound', cfg.bound)]
             if v is not None}
    return optax_spectral.adamw2(lr, b2=cfg.b2, weight_decay=cfg.weight_decay,
                                 mask=decay, dimension_numbers=dims,
                                 **given, **adamw2_options)
  raise ValueError(f'unknown optimizer {cfg.name!r}: use adamw or adamw2')


GROUPS = ('attention', 'MLP', 'embedding', 'head')


def matrix_group(leaf: str, leaves) -> str:
  """Which kind of matrix a bounded leaf (``'blocks/layers/0/qkv/kernel'``)
  is, by name: the attention projections as ``bound='attention'`` finds
  them, the input embeddings (token, position, patch), the output head, and
  the rest of the blocks (MLP)."""
  name = leaf.split('[')[0]
  if optax_spectral.is_attention(name, leaves):
    return 'attention'
  if name.split('/')[0] in ('wte', 'wpe', 'embed'):
    return 'embedding'
  if name.split('/')[0] == 'head':
    return 'head'
  return 'MLP'


def group_factors(row: dict) -> dict[str, float]:
  """A logged row's mean applied factor (effective lr / the schedule's) per
  :data:`GROUPS`, from its ``factor/<leaf>[layer]`` entries."""
  factors = {k[len('factor/'):]: v for k, v in row.items()
             if k.startswith('factor/')}
  leaves = {k.split('[')[0] for k in factors}
  groups = {}
  for leaf, value in factors.items():
    groups.setdefault(matrix_group(leaf, leaves), []).append(value)
  return {g: float(np.mean(v)) for g, v in groups.items()}


def bound_metrics(opt_state) -> dict[str, float]:
  """How often and where the bound was active: the fraction of matrices
  whose step it shrank, the fraction it shrank on most of the last ~100
  steps (``throttled``: it, not the learning rate, sets their pace), the
  smallest factor, and each matrix's factor and recent bounded fraction
  (``factor/<leaf>[layer]``, ``bounded_recent/...``). Plain adamw has no
  bound: zeros and one."""
  try:
    summary = diagnostics.bound_summary(opt_state)
  except ValueError:  # plain adamw
    return {'bound_active': 0.0, 'throttled': 0.0, 'min_factor': 1.0}
  row = {'bound_active': summary['bound_fraction'],
         'throttled': summary['throttled_fraction'],
         'min_factor': summary['min_factor']}
  row.update({k: v for k, v in diagnostics.scalars(opt_state).items()
              if k.startswith(('factor/', 'bounded_recent/'))})
  return row


def plot_bound(histories: dict, opt: OptimizerConfig, path: str,
               warmup_steps: int = 50) -> None:
  """What the bound did to adamw2's learning rate, per run (``{title:
  history}`` of adamw2 runs): the applied factor (effective lr / the
  schedule's) of each kind of matrix (:data:`GROUPS`) over training, beside
  what a linear warmup of ``warmup_steps`` applies (its schedule over the
  one without warmup), and the fraction of matrices it bounded."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, rows = plt.subplots(len(histories), 2,
                           figsize=(12, 4.2 * len(histories)), squeeze=False)
  warm = schedule(dataclasses.replace(opt, warmup_steps=warmup_steps))
  cold = schedule(dataclasses.replace(opt, warmup_steps=0))
  for axes, (title, history) in zip(rows, histories.items()):
    steps = np.array([r['step'] for r in history])
    factors = [group_factors(r) for r in history]
    for group in GROUPS:
      values = [f.get(group, np.nan) for f in factors]
      if not np.all(np.isnan(values)):
        axes[0].plot(steps, values, label=f'adamw2: {group} matrices')
    axes[0].plot(steps, [float(warm(t) / cold(t)) for t in steps], 'k--',
                 lw=1, label=f'linear warmup ({warmup_steps} steps)')
    axes[0].set(title=f"{title}: effective learning rate / the schedule's\n"
                '(mean over each kind of matrix)', xlabel='step',
                yscale='log', ylim=(1e-3, 1.5))
    axes[1].plot(steps, [r['bound_active'] for r in history],
                 label='bounded on this step')
    axes[1].plot(steps, [r['throttled'] for r in history],
                 label='bounded on most of the last ~100 steps')
    axes[1].set(title=f"{title}: fraction of adamw2's weight matrices",
                xlabel='step', ylim=(-0.02, 1.02))
    for ax in axes:
      ax.grid(alpha=0.3)
      ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


# --- mesh and loop --------------------------------------------------------------

def init_distributed():
  """Joins a multi-process run when launched as one; True on process 0.

  Launch each process with ``JAX_COORDINATOR_ADDRESS=host:port``,
  ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (or under SLURM, which JAX
  detects). CPU processes talk over gloo.
  """
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  address = os.environ.get('JAX_COORDINATOR_ADDRESS')
  if address:
    jax.distributed.initialize(address,
                               int(os.environ['JAX_NUM_PROCESSES']),
                               int(os.environ['JAX_PROCESS_ID']))
  elif int(os.environ.get('SLURM_NTASKS', '1')) > 1:
    jax.distributed.initialize()
  return jax.process_index() == 0


def make_mesh():
  """One axis over every device: data parallel and FSDP at once."""
  return jax.make_mesh((jax.device_count(),), (AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,))


@dataclasses.dataclass
class RunConfig:
  out_dir: str | None = None   # CSV, TensorBoard and checkpoints go here
  checkpoint_every: int = 0    # 0: no checkpoints
  resume: bool = False         # continue from the latest checkpoint
  log_every: int = 1           # metrics and the entropy probe every n steps
  desc: str = 'train'
  stop_at: int | None = None   # stop early (a simulated preemption)
  # Warn when attention collapses (a comparison reports it as a result).
  warn_on_collapse: bool = True
  peak_flops: float | None = None  # per device; None: from PEAK_FLOPS


@dataclasses.dataclass
class Workload:
  """What one step processes, for throughput and MFU."""
  tokens_per_step: int   # sequences x positions per sequence
  flops_per_token: float  # model FLOPs, forward and backward


# Dense bfloat16 peak FLOP/s per chip, by ``device_kind`` (vendor data
# sheets). MFU is reported against these whatever the compute dtype; devices
# not listed (CPUs) get no MFU unless ``--peak-tflops`` is given.
PEAK_FLOPS = {'H100': 989e12, 'H200': 989e12, 'GH200': 989e12,
              'B200': 2250e12, 'A100': 312e12, 'L4': 121e12,
              'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12,
              'TPU v5p': 459e12, 'TPU v5': 459e12, 'TPU v6 lite': 918e12,
              'TPU v6e': 918e12}


def peak_flops(device=None) -> float | None:
  """The table's peak for ``device`` (default: the first device), or None."""
  kind = (device or jax.devices()[0]).device_kind
  for name in sorted(PEAK_FLOPS, key=len, reverse=True):
    if name.lower() in kind.lower():
      return PEAK_FLOPS[name]
  return None


class Loader:
  """Yields ``(step, batch)`` for ``steps``, with the next ``ahead`` batches
  already placed on the mesh (transfers run while the device computes).

  ``batch_fn(step)`` returns this process's host arrays for that step;
  ``sharding`` splits their leading axis over the devices (None: the
  default device).
  """

  def __init__(self, batch_fn: Callable[[int], tuple], steps, sharding=None,
               ahead: int = 2):
    if ahead < 1:
      raise ValueError(f'ahead must be at least 1, got {ahead}')
    self.batch_fn, self.steps = batch_fn, steps
    self.sharding, self.ahead = sharding, ahead

  def _place(self, step):
    batch = self.batch_fn(step)
    if self.sharding is None:
      return step, [jax.device_put(b) for b in batch]
    return step, [jax.make_array_from_process_local_data(self.sharding, b)
                  for b in batch]

  def __iter__(self):
    steps, queue = iter(self.steps), collections.deque()
    for step in itertools.islice(steps, self.ahead):
      queue.append(self._place(step))
    while queue:
      ready = queue.popleft()
      step = next(steps, None)
      if step is not None:
        queue.append(self._place(step))
      yield ready


def pinned(train_step: Callable, model: nnx.Module,
           optimizer: nnx.Optimizer) -> Callable:
  """``train_step`` compiled once: the model and optimizer state keep the
  shardings they have now (without this, XLA picks new ones for the outputs
  of the first step, e.g. shards a replicated bias, and the second step
  compiles again). On GPUs and TPUs their old buffers are donated to the
  new ones; not on CPUs, where donation measured slower (copies)."""
  graphdef, state = nnx.split((model, optimizer))
  shardings = jax.tree.map(lambda a: a.sharding, state)
  donate = () if jax.default_backend() == 'cpu' else (0,)

  @functools.partial(jax.jit, donate_argnums=donate,
                     out_shardings=(shardings, None))
  def step(state, *batch):
    model, optimizer = nnx.merge(graphdef, state)
    out = train_step(model, optimizer, *batch)
    return nnx.state((model, optimizer)), out

  def run(model, optimizer, *batch):
    state, out = step(nnx.state((model, optimizer)), *batch)
    nnx.update((model, optimizer), state)
    return out
  return run


def fit(model: nnx.Module, opt: OptimizerConfig, train_step: Callable,
        probe: Callable, batch_fn: Callable[[int], tuple], run: RunConfig,
        mesh=None, workload: Workload | None = None) -> list[dict]:
  """Trains ``model``; returns one row of metrics per logged step.

  ``train_step(model, optimizer, *batch)`` returns ``(loss, extra)`` with
  ``extra`` a dict of scalars. ``probe(model, *batch)`` returns the attention
  entropy ``(layers, heads)``; it runs before the step on logging steps only.
  ``batch_fn(step)`` returns host arrays for that step, so a resumed run sees
  the same batches as an uninterrupted one. With ``workload``, rows after the
  first also carry ``step_s``, ``tokens_per_s`` and ``mfu`` (the fraction of
  the devices' peak FLOP/s; NaN when the peak is unknown), measured between
  logging steps.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  main = jax.process_index() == 0
  optimizer = nnx.Optimizer(model, make_optimizer(opt, model), wrt=nnx.Param)
  lr, steps = schedule(opt), opt.steps
  manager, start = None, 0
  if run.out_dir and run.checkpoint_every:
    manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(run.out_dir, 'checkpoints')),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=2, save_interval_steps=run.checkpoint_every))
    if run.resume and manager.latest_step() is not None:
      start = manager.latest_step()
      state = {'model': nnx.state(model), 'optimizer': nnx.state(optimizer)}
      abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
      restored = manager.restore(start, args=ocp.args.StandardRestore(abstract))
      nnx.update(model, restored['model'])
      nnx.update(optimizer, restored['optimizer'])
  writer = csv_file = tb = None
  if main and run.out_dir:
    os.makedirs(run.out_dir, exist_ok=True)
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      tb = SummaryWriter(os.path.join(run.out_dir, 'tb'))
    except ImportError:  # e.g. a GPU image without it: the CSV still has all
      print('tensorboardX is not installed: metrics go to metrics.csv only')
    csv_file = open(os.path.join(run.out_dir, 'metrics.csv'),
                    'a' if start else 'w', newline='')
  step_fn = pinned(train_step, model, optimizer)
  peak = run.peak_flops or peak_flops()
  if peak is not None:
    peak *= jax.device_count()
  batch_sharding = NamedSharding(mesh, P(AXIS)) if mesh is not None else None
  history, collapsed, last_log = [], False, None
  end = steps if run.stop_at is None else min(steps, run.stop_at)
  bar = tqdm(initial=start, total=steps, desc=run.desc, disable=not main,
             leave=False, mininterval=1)
  for step, batch in Loader(batch_fn, range(start, end), batch_sharding):
    bar.update(1)
    logging = step % run.log_every == 0 or step == end - 1
    if logging:
      entropy = probe(model, *batch)
    loss, extra = step_fn(model, optimizer, *batch)
    if manager is not None:
      manager.save(step + 1, args=ocp.args.StandardSave(
          {'model': nnx.state(model), 'optimizer': nnx.state(optimizer)}))
    if not logging:
      continue
    row = {'step': step, 'loss': float(loss), 'lr': float(lr(step))}
    now = time.perf_counter()  # the loss is on the host: the step is done
    if workload is not None:
      step_s = (now - last_log[0]) / (step - last_log[1]) if last_log else (
          float('nan'))
      rate = workload.tokens_per_step / step_s
      row.update(step_s=step_s, tokens_per_s=rate,
                 mfu=rate * workload.flops_per_token / peak if peak else
                 float('nan'))
    last_log = now, step
    entropy = np.asarray(entropy)
    if main and run.warn_on_collapse and not collapsed:  # once per run
      collapsed = diagnostics.warn_if_attention_collapsed(entropy, step)
    row.update({'entropy_min': float(entropy.min()),
                'entropy_mean': float(entropy.mean()),
                **{k: float(v) for k, v in extra.items()},
                **bound_metrics(optimizer.opt_state)})
    row.update({f'group_factor/{g}': v for g, v in group_factors(row).items()})
    history.append(row)
    bar.set_postfix(loss=f"{row['loss']:.3f}", refresh=False)
    if csv_file is not None:
      if writer is None:
        writer = csv.DictWriter(csv_file, fieldnames=list(row))
        if not start:
          writer.writeheader()
      writer.writerow(row)
      for k, v in row.items():
        if tb is not None and k != 'step' and np.isfinite(v):
          tb.add_scalar(k, v, step)
  bar.close()
  if manager is not None:
    manager.wait_until_finished()
  if csv_file is not None:
    csv_file.close()
  if tb is not None:
    tb.close()
  return history


# The crash rule of docs/notes.md's "Stability" section. A run crashed when some
# head's attention entropy (nats, averaged over queries) fell below
# COLLAPSE_NATS in the second half of training (attention collapsed onto
# single tokens), or its loss became non-finite, or the mean loss of its last
# 10 logged steps ended SPIKE_NATS above the best such mean (a spike it did
# not recover from).
COLLAPSE_NATS = 0.1
SPIKE_NATS = 0.5


def crashed(history: list[dict]) -> bool:
  """The crash rule above, on the rows :func:`fit` returns."""
  loss = np.array([r['loss'] for r in history])
  if not np.all(np.isfinite(loss)):
    return True
  window = min(10, len(loss))
  smooth = np.convolve(loss, np.ones(window) / window, mode='valid')
  late = history[len(history) // 2:]
  return bool(min(r['entropy_min'] for r in late) < COLLAPSE_NATS or
              smooth[-1] > smooth.min() + SPIKE_NATS)


def throughput(history: list[dict]) -> dict[str, float]:
  """Median step time, tokens/s and MFU over a run's logged intervals (the
  first logged step, which compiles, has none)."""
  timed = [r for r in history if np.isfinite(r.get('step_s', np.nan))]
  if not timed:
    return {'step_s': float('nan'), 'tokens_per_s': float('nan'),
            'mfu': float('nan')}
  return {k: float(np.median([r[k] for r in timed]))
          for k in ('step_s', 'tokens_per_s', 'mfu')}


def describe_throughput(history: list[dict]) -> str:
  t = throughput(history)
  mfu = '' if not np.isfinite(t['mfu']) else f", MFU {t['mfu']:.1%}"
  return (f"throughput: {t['tokens_per_s']:,.0f} tokens/s, "
          f"{t['step_s'] * 1e3:.1f} ms/step (median){mfu}")


def add_training_args(parser, batch_size: int, presets):
  """The flags both examples take."""
  parser.add_argument('--optimizer', default='adamw2',
                      choices=['adamw', 'adamw2'])
  parser.add_argument('--lr', type=float, default=1e-2)
  parser.add_argument('--warmup-steps', type=int, default=0)
  parser.add_argument('--tau', type=float, default=None,
                      help='adamw2 tau (default: the library default)')
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--batch-size', type=int, default=batch_size)
  parser.add_argument('--preset', default='small', choices=sorted(presets))
  parser.add_argument('--init-std', type=float, default=None,
                      help='init std of every kernel and embedding (default: '
                      'variance-preserving, LeCun normal; GPT-2 uses 0.02)')
  parser.add_argument('--scan', action='store_true',
                      help='stack the layers and run them with nnx.scan')
  parser.add_argument('--dtype', default='float32',
                      choices=['float32', 'bfloat16'],
                      help='compute dtype; params and optimizer state stay '
                      'float32')
  parser.add_argument('--log-every', type=int, default=1,
                      help='log metrics and probe attention every n steps')
  parser.add_argument('--peak-tflops', type=float, default=None,
                      help='peak TFLOP/s per device for MFU (default: known '
                      'GPUs and TPUs, none on CPU)')
  parser.add_argument('--out', default=None,
                      help='write CSV, TensorBoard and checkpoints here')
  parser.add_argument('--checkpoint-every', type=int, default=100)
  parser.add_argument('--resume', action='store_true',
                      help='continue from the latest checkpoint in --out')


def configs_from_args(args, desc: str) -> tuple[OptimizerConfig, RunConfig]:
  opt = OptimizerConfig(name=args.optimizer, lr=args.lr,
                        warmup_steps=args.warmup_steps, tau=args.tau,
                        steps=args.steps)
  if args.log_every < 1:
    raise ValueError(f'--log-every must be at least 1, got {args.log_every}')
  run = RunConfig(out_dir=args.out, resume=args.resume,
                  checkpoint_every=args.checkpoint_every if args.out else 0,
                  desc=f'{desc} {args.optimizer}', log_every=args.log_every,
                  peak_flops=args.peak_tflops and args.peak_tflops * 1e12)
  return opt, run


def describe_bound(last: dict) -> str:
  """One line on the bound at the end of a run, from a history row."""
  return (f"bound: shrank {last['bound_active']:.0%} of the matrices' steps "
          f"at the last step; {last['throttled']:.0%} of the matrices were "
          'bounded on most of their last ~100 steps' + (
              ' (it, not the learning rate, sets their pace: see README, '
              '"Choosing τ")'
              if last['throttled'] > 0.5 else ''))


def print_bounded(model: nnx.Module):
  """Prints what adamw2 bounds, leaf by leaf."""
  params = nnx.state(model, nnx.Param)
  for name, how in optax_spectral.bounded_leaves(
      params, dimension_numbers(model)).items():
    print(f'  {name:<40} {how}')
