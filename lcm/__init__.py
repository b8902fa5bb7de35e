"""lcm: latent consistency distillation — turn a slow diffusion teacher into a 2–8-step sampler."""

__version__ = "0.1.0"
