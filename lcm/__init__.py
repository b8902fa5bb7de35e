"""lcm: latent consistency distillation — turn a slow diffusion teacher into a 2–8-step sampler."""

from . import log_filters as _log_filters

__version__ = "0.1.0"

_log_filters.install()  # before anything imports transformers: see lcm/log_filters.py
