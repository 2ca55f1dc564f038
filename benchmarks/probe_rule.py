"""EXPERIMENT (not to commit): small_init.py with two more variant options:
overshoot=C (the overshoot-adaptive ramp, optax_spectral._transform
.RAMP_OVERSHOOT) and lr_ramp=R (the lr schedule times min(1, (t+1)/R), on
the cosine from step 0)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import optax  # noqa: E402
import small_init  # noqa: E402
from optax_spectral import _transform  # noqa: E402

common = small_init.stability.common
_orig_run, _orig_schedule = small_init.run_job, common.schedule
small_init.VARIANT_OPTIONS = small_init.VARIANT_OPTIONS + ('overshoot',
                                                           'lr_ramp')


def run_job(job):
  task, init, (label, name, warmup, options), lr, seed, steps, preset = job
  options = dict(options)
  _transform.RAMP_OVERSHOOT = options.pop('overshoot', None)
  ramp = options.pop('lr_ramp', None)
  if ramp:
    def schedule(cfg):
      cos = optax.cosine_decay_schedule(cfg.lr, max(cfg.steps, 1), alpha=0.1)
      return lambda t: cos(t) * optax.linear_schedule(1 / ramp, 1.0,
                                                       ramp - 1)(t)
    common.schedule = schedule
  try:
    return _orig_run((task, init, (label, name, warmup, options), lr, seed,
                      steps, preset))
  finally:
    _transform.RAMP_OVERSHOOT = None
    common.schedule = _orig_schedule


small_init.run_job = run_job

if __name__ == '__main__':
  small_init.main()
