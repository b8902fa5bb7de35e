"""benchmarks/schedule_mini.py's timestep lists are what their rows say: on the N = 25 grid, walked exactly by the
scheduler they name, and the rows marked "its own" are that scheduler's default schedule at that step count."""

import sys
from pathlib import Path

import pytest
from diffusers import LCMScheduler, TCDScheduler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import schedule_mini as sch  # noqa: E402

GRID = {40 * i - 1 for i in range(1, 26)}  # 39, 79, …, 999: LCMScheduler's original_inference_steps = 25


@pytest.mark.parametrize("name,preset,eta,timesteps", sch.SCHEDULES)
def test_schedules_lie_on_the_grid_and_are_walked_exactly(name, preset, eta, timesteps):
    cls = {"lcm": LCMScheduler, "tcd": TCDScheduler}[preset]
    make = lambda: cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,  # noqa: E731
                       original_inference_steps=25)
    assert set(timesteps) <= GRID and timesteps == sorted(timesteps, reverse=True)
    assert str(len(timesteps)) in name and str(timesteps[-1]) in name
    walked = make()
    walked.set_timesteps(timesteps=timesteps)
    assert walked.timesteps.tolist() == timesteps
    default = make()
    default.set_timesteps(len(timesteps))
    assert (default.timesteps.tolist() == timesteps) == ("its own" in name)
