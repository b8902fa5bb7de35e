"""SDXL-Lightning's math (lcm/lightning.py): the stage timesteps are EulerDiscreteScheduler's trailing ones, the
trained sampler is the stock Euler loop, the teacher's multi-step flow is exact on a point mass (and not on two
modes), the schedule of stages, the MSE stage's oracle, and the pair discriminator's losses in closed form."""

import math

import pytest
import torch
from diffusers import EulerDiscreteScheduler

from lcm.consistency import CLEAN_END, LCDBatch, LCDSpec
from lcm.lightning import (StageGrid, check_stages, lightning_discriminator_loss, lightning_loss, lightning_sample,
                           make_stage, stage_at, stage_timesteps, teacher_flow, teacher_timesteps)
from lcm.schedule import NoiseSchedule, SolverGrid

BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def _schedule():
    return NoiseSchedule(EulerDiscreteScheduler(**BETAS).alphas_cumprod)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6, 7, 8, 16, 24, 333, 1000])
def test_stage_timesteps_are_euler_trailing(n):
    euler = EulerDiscreteScheduler(**BETAS, timestep_spacing="trailing")
    euler.set_timesteps(n)
    assert stage_timesteps(n).tolist() == euler.timesteps.long().tolist()
    grid = StageGrid(n)
    assert grid.ends.tolist() == [*stage_timesteps(n)[1:].tolist(), CLEAN_END]


def _toy_eps(z, t):
    """A smooth, t-dependent ε-model (not a true denoiser): enough to compare two samplers' arithmetic."""
    u = t.float().view(-1, *[1] * (z.ndim - 1)) / 1000
    return torch.tanh(0.7 * z + u) * (0.5 + u)


@pytest.mark.parametrize("n,prediction_type", [(1, "epsilon"), (2, "epsilon"), (4, "epsilon"), (8, "epsilon"),
                                               (1, "sample")])
def test_lightning_sampler_is_the_stock_euler_trailing_loop(n, prediction_type):
    schedule = _schedule()
    euler = EulerDiscreteScheduler(**BETAS, timestep_spacing="trailing", prediction_type=prediction_type)
    euler.set_timesteps(n)
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x = noise * euler.init_noise_sigma
    for t in euler.timesteps:
        model_in = euler.scale_model_input(x, t)
        x = euler.step(_toy_eps(model_in, t.long().repeat(3)), t, x).prev_sample
    ours = lightning_sample(_toy_eps, noise, n, schedule, prediction_type)
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-5)
    if n > 1:  # a different step count walks other timesteps: the comparison can fail
        other = lightning_sample(_toy_eps, noise, n // 2, schedule, prediction_type)
        assert (other - x).abs().max() > 1e-3


def test_stage_schedule_split_and_errors():
    assert check_stages([8, 4, 2, 1], None, 10) == [2, 2, 2, 4]
    assert check_stages([4, 2], [3, 7], 10) == [3, 7]
    assert [stage_at(s, [2, 2, 2, 4]) for s in range(12)] == [0, 0, 1, 1, 2, 2, 3, 3, 3, 3, 3, 3]
    for stages, steps, total, match in (([4, 4], None, 10, "strictly decrease"), ([], None, 10, "at least one"),
                                        ([4, 2], [3, 3], 10, "sum to"), ([8, 4, 2, 1], None, 3, "fewer than")):
        with pytest.raises(ValueError, match=match):
            check_stages(stages, steps, total)
    with pytest.raises(ValueError, match="mse_stages"):
        check_stages([4, 2], None, 10, mse_stages=3)
    stage = make_stage(2, [8, 4, 1], 1, True, 8, "epsilon")
    assert (stage.grid.n, stage.mse, stage.prediction_type, stage.teacher_steps) == (1, False, "sample", 8)
    first = make_stage(0, [8, 4, 1], 1, True, 8, "epsilon")
    assert (first.mse, first.prediction_type, first.teacher_steps) == (True, "epsilon", 1)
    assert make_stage(2, [8, 4, 1], 1, False, 8, "epsilon").prediction_type == "epsilon"


def test_teacher_timesteps_run_from_t_to_the_end():
    t, end = torch.tensor([999, 499]), torch.tensor([749, CLEAN_END])
    points = teacher_timesteps(t, end, 4)
    assert points[0].tolist() == [999, 499] and points[-1].tolist() == [749, 0]
    assert all((a > b).all() for a, b in zip(points, points[1:]))


def _point_mass_denoiser(x_star, schedule):
    """The exact (x̂₀, ε̂) for data that is the single point x*: the PF-ODE of a point mass is a straight DDIM line."""
    def denoise(z, t):
        alpha, sigma = schedule.alpha_sigma(t, z.ndim)
        return x_star.expand_as(z), (z - alpha * x_star) / sigma
    return denoise


def _two_mode_denoiser(schedule):
    """The exact denoiser of two equal point masses at ±1 (per element): the posterior mean moves with t."""
    def denoise(z, t):
        alpha, sigma = schedule.alpha_sigma(t, z.ndim)
        x0 = torch.tanh(alpha * z / sigma**2)
        return x0, (z - alpha * x0) / sigma
    return denoise


def test_teacher_flow_is_exact_on_a_point_mass_and_not_on_two_modes():
    schedule = _schedule()
    x_star = torch.full((1, 4, 4, 4), 0.3)
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    t, end = torch.tensor([999, 749]), torch.tensor([499, CLEAN_END])
    point = _point_mass_denoiser(x_star, schedule)
    one, many = teacher_flow(point, z, t, end, 1, schedule), teacher_flow(point, z, t, end, 7, schedule)
    torch.testing.assert_close(one, many, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(many[1:], x_star, rtol=0, atol=1e-6)  # the clean end is the point itself
    two = _two_mode_denoiser(schedule)
    assert (teacher_flow(two, z, t, end, 1, schedule) - teacher_flow(two, z, t, end, 7, schedule)).abs().max() > 1e-2


def _spec():
    return LCDSpec(schedule=_schedule(), grid=SolverGrid(1000, 25))


def _batch(n=4):
    g = torch.Generator().manual_seed(3)
    grid = StageGrid(4)
    cond = {"encoder_hidden_states": torch.randn(n, 2, 8, generator=g)}
    return LCDBatch(z0=torch.randn(n, 4, 4, 4, generator=g), noise=torch.randn(n, 4, 4, 4, generator=g),
                    index=grid.sample_index(n, g), w=torch.rand(n, generator=g), cond=cond,
                    uncond={"encoder_hidden_states": torch.zeros(n, 2, 8)})


def _teacher(z, t, cond):
    bias = cond["encoder_hidden_states"].mean((1, 2)).view(-1, 1, 1, 1)
    return torch.tanh(z * 0.5 + bias) + t.float().view(-1, 1, 1, 1) / 2000


def test_mse_stage_is_zero_for_the_teachers_own_one_step_flow_and_positive_otherwise():
    """Oracle: a student that predicts the guided teacher's ε at the batch's w, with one teacher step per segment,
    lands exactly on the teacher's flow (MSE 0); a perturbed student does not, and only it gets the gradient."""
    spec, batch = _spec(), _batch()
    stage = make_stage(1, [8, 4, 2], 2, False, 4, "epsilon")  # n = 4, MSE, m = 1
    assert (stage.grid.n, stage.mse, stage.teacher_steps) == (4, True, 1)

    def guided_student(z, t, cond, w):
        c, u = _teacher(z, t, cond), _teacher(z, t, batch.uncond)
        return c + w.view(-1, 1, 1, 1) * (c - u)

    loss, diag, handoff = lightning_loss(guided_student, _teacher, None, batch, spec, stage, "hinge", 1.0)
    assert loss.shape == (4,) and float(loss.abs().max()) < 1e-10
    scale = torch.tensor(1.1, requires_grad=True)
    loss, _, handoff = lightning_loss(lambda *a: scale * guided_student(*a), _teacher, None, batch, spec, stage,
                                      "hinge", 1.0)
    assert float(loss.detach().min()) > 0
    loss.mean().backward()
    assert scale.grad is not None and scale.grad.abs() > 0
    assert set(handoff) == {"real", "fake", "start", "t", "t_end", "cond"} and not handoff["fake"].requires_grad


def test_adversarial_stage_is_the_generator_term_times_the_weight():
    spec, batch = _spec(), _batch()
    stage = make_stage(1, [8, 4], 1, False, 4, "epsilon")
    seen = {}

    def disc(x_end, t_end, x_start, t_start, cond):
        seen.update(t_end=t_end, t_start=t_start)
        return x_end.flatten(1).mean(1, keepdim=True).repeat(1, 2)

    def student(z, t, cond, w):
        return torch.tanh(z)

    loss, diag, handoff = lightning_loss(student, _teacher, disc, batch, spec, stage, "hinge", 0.5)
    torch.testing.assert_close(loss, -0.5 * handoff["fake"].flatten(1).mean(1))
    t, end = stage.grid.pair(batch.index)
    assert seen["t_start"].equal(t) and seen["t_end"].equal(end)
    assert diag["g_adv"] == pytest.approx(float(-handoff["fake"].flatten(1).mean(1).mean()), rel=1e-6)
    kept = make_stage(1, [8, 4], 1, False, 4, "epsilon", mse_weight=2.0)  # + λ·MSE beside the adversarial term
    loss2, _, handoff2 = lightning_loss(student, _teacher, disc, batch, spec, kept, "hinge", 0.5)
    mse = (handoff2["fake"] - handoff2["real"]).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(loss2, -0.5 * handoff2["fake"].flatten(1).mean(1) + 2.0 * mse)


def test_pair_discriminator_loss_hinge_and_r1_closed_forms():
    """D(x) = −Σx² / 2 per sample (one level): hinge L_D = relu(1 − D(real)) + relu(1 + D(fake)); R1 = ‖∇D‖² = Σx²."""
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(3, 2, 2, 2, generator=g), torch.randn(3, 2, 2, 2, generator=g)

    def disc(x_end, t_end, x_start, t_start, cond):
        return (-(x_end ** 2).flatten(1).sum(1) / 2).unsqueeze(1)

    handoff = {"real": real, "fake": fake, "start": torch.zeros_like(real), "t": torch.tensor([999] * 3),
               "t_end": torch.tensor([CLEAN_END] * 3), "cond": {}}
    loss, diag = lightning_discriminator_loss(disc, handoff, "hinge", r1_gamma=0.0)
    d_real, d_fake = -(real ** 2).flatten(1).sum(1) / 2, -(fake ** 2).flatten(1).sum(1) / 2
    torch.testing.assert_close(loss, torch.relu(1 - d_real) + torch.relu(1 + d_fake))
    loss_r1, diag_r1 = lightning_discriminator_loss(disc, handoff, "hinge", r1_gamma=2.0)
    torch.testing.assert_close(diag_r1["r1"], (real ** 2).flatten(1).sum(1).mean())
    torch.testing.assert_close(loss_r1, loss + (real ** 2).flatten(1).sum(1))
    assert math.isclose(float(diag["d_acc_real"]), float((d_real > 0).float().mean()))


def test_start_latents_are_pure_noise_at_the_top_timestep_only():
    from lcm.lightning import start_latents

    schedule = _schedule()
    z0, noise = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    t = torch.tensor([999, 749])
    out = start_latents(z0, noise, t, schedule)
    alpha, sigma = schedule.alpha_sigma(t, 4)
    torch.testing.assert_close(out[0], sigma[0] * noise[0])
    torch.testing.assert_close(out[1], alpha[1] * z0[1] + sigma[1] * noise[1])
    assert alpha[0].item() > 0.05  # SDXL's betas: ᾱ_999 ≠ 0, so the fix changes the input
