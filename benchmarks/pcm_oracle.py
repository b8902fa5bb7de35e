"""PCM (2 phases) against LCD on the Gaussian-mixture oracle, the figures behind README and tests/test_trajectory.py.

    OMP_NUM_THREADS=1 python -m benchmarks.pcm_oracle [--steps 1500] [--seeds 0,1,2]

Per training seed: the mean distance to the exact PF-ODE point from the same z_T, (a) after the first jump 999 → 499
(PCM: f(z_T, 999 → 499); LCD: x̂₀ then the deterministic DDIM re-noising to 499) and (b) at the 2-step endpoint.
"""

import argparse
import functools

import torch

from lcm.consistency import LCDSpec, lcd_loss, predict_consistency, predict_trajectory
from lcm.oracle import MLPStudent, OracleTeacher, consistency_sample, distill, make_mixture, pf_ode_endpoint
from lcm.parameterization import eps_from_x0
from lcm.schedule import NoiseSchedule, SolverGrid, scaled_linear_alphas_cumprod
from lcm.solvers import ddim_step
from lcm.trajectory import pcm_loss, phased_sample


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seeds", default="0,1,2")
    args = p.parse_args(argv)
    schedule = NoiseSchedule(scaled_linear_alphas_cumprod())
    spec = LCDSpec(schedule, SolverGrid(1000, 50), loss="l2")
    mix = make_mixture()
    teacher = OracleTeacher(mix, schedule)
    g = torch.Generator().manual_seed(1234)
    z_T, y = torch.randn(512, 2, generator=g), mix.sample_classes(512, g)
    cond, w = {"y": y}, torch.zeros(512)
    end_ref, mid_ref = pf_ode_endpoint(mix, z_T, y, w, schedule), pf_ode_endpoint(mix, z_T, y, w, schedule, t_end=499)
    t, s = torch.full((512,), 999), torch.full((512,), 499)
    (a_t, s_t), (a_s, s_s) = schedule.alpha_sigma(t, 2), schedule.alpha_sigma(s, 2)
    for seed in (int(x) for x in args.seeds.split(",")):
        row = {}
        for name, loss_fn in [("lcd", lcd_loss), ("pcm", functools.partial(pcm_loss, phases=2))]:
            torch.manual_seed(seed)
            student = MLPStudent(mix, schedule)
            distill(student, teacher, spec, steps=args.steps, batch=256, lr=2e-3, w_range=(0.0, 0.0), mu=0.9,
                    seed=seed, loss_fn=loss_fn)
            with torch.no_grad():
                if name == "lcd":
                    x = predict_consistency(student, z_T, t, cond, w, spec)
                    mid = ddim_step(x, eps_from_x0(z_T, x, a_t, s_t), a_s, s_s)
                    end = consistency_sample(student, z_T, cond, w, spec, 2)
                else:
                    mid = predict_trajectory(student, z_T, t, s, cond, w, spec)
                    end = phased_sample(student, z_T, cond, w, spec, 2)
            row[name] = {"first jump": round((mid - mid_ref).norm(dim=1).mean().item(), 4),
                         "2-step endpoint": round((end - end_ref).norm(dim=1).mean().item(), 4)}
        print(f"seed {seed} ({args.steps} steps): {row}", flush=True)


if __name__ == "__main__":
    main()
