"""The defaults of the distillation, each defined once (DESIGN.md §1): the config schema, the math modules' keyword
defaults, the exported scheduler and the quality table all read them from here. No imports, so anything may.

Traps: `TIMESTEP_SCALING` must match between training (the boundary scalings) and the exported LCMScheduler, and
`NUM_DDIM_TIMESTEPS` is the N stored as the scheduler's `original_inference_steps` — sampling with another N than the
one trained on picks timesteps the student never saw.
"""

# σ_d in the boundary scalings c_skip = σ_d² / ((s·t)² + σ_d²), c_out = s·t / √((s·t)² + σ_d²) (LCM arXiv:2310.04378
# eq. 4, after Song et al. 2023 App. C).
SIGMA_DATA = 0.5
# s in the same scalings: the discrete timestep is scaled by 10 (LCM-LoRA, diffusers' LCMScheduler) so f(z, t) leaves
# the identity quickly above t = 0.
TIMESTEP_SCALING = 10.0
# c of the pseudo-Huber metric √(d² + c²) − c (Song & Dhariwal 2023, arXiv:2310.14189 §3.3), as LCM-LoRA uses it.
HUBER_C = 0.001
# N, the teacher's skipping grid: k = T / N = 20 for T = 1000 (LCM §4.2); the LCMScheduler's original_inference_steps.
NUM_DDIM_TIMESTEPS = 50
