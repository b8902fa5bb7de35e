import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler

from lcm.consistency import LCDBatch, LCDSpec, lcd_loss
from lcm.schedule import NoiseSchedule, SolverGrid, scaled_linear_alphas_cumprod
from lcm.solvers import (
    SOLVER_EVALUATIONS,
    SOLVERS,
    ddim_solver,
    get_solver,
    half_log_snr,
    lambda_midpoint_timestep,
)

SCHED = NoiseSchedule(scaled_linear_alphas_cumprod())


def test_ddim_with_exact_x0_eps_lands_on_analytic_point():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    t, s = torch.tensor([999, 519, 39]), torch.tensor([979, 499, 19])
    z_t = SCHED.add_noise(x0, eps, t)
    z_s = ddim_solver(lambda z, tt: (x0, eps), z_t, t, s, SCHED)
    alpha_s, sigma_s = SCHED.alpha_sigma(s, 4)
    torch.testing.assert_close(z_s, alpha_s * x0 + sigma_s * eps)


def test_ddim_equals_diffusers_ddim_scheduler_step():
    # One DDIM step 519 → 499 with an epsilon model; diffusers with 50 leading steps uses exactly that pair.
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=0, timestep_spacing="leading")
    sched.set_timesteps(50)
    t_int = 520
    s_int = t_int - 20
    assert t_int in sched.timesteps.tolist()
    g = torch.Generator().manual_seed(1)
    z_t, eps = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    theirs = sched.step(eps, t_int, z_t).prev_sample

    def denoise(z, t):
        alpha, sigma = SCHED.alpha_sigma(t, z.ndim)
        return (z - sigma * eps) / alpha, eps

    ours = ddim_solver(denoise, z_t, torch.tensor([t_int] * 2), torch.tensor([s_int] * 2), SCHED)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_registry_unknown_name_lists_valid():
    assert "ddim" in SOLVERS
    with pytest.raises(ValueError, match="ddim"):
        get_solver("rk45")


# ------------------------------------------------------------------------------------------------ shared oracles
# A "denoiser" here is exactly what lcd_loss hands a solver: denoise(z, t) -> (x̂₀, ε̂), consistent (z = α x̂₀ + σ ε̂).


def point_mass_denoiser(x0, schedule=SCHED):
    """Exact oracle for data = δ(x₀): x̂₀ = x₀, ε̂ = (z − α_t x₀)/σ_t. Its PF-ODE trajectory is z_t = α_t x₀ + σ_t ε."""

    def denoise(z, t):
        alpha, sigma = schedule.alpha_sigma(t, z.ndim)
        alpha, sigma = alpha.to(z.dtype), sigma.to(z.dtype)
        return x0.to(z.dtype).expand_as(z), (z - alpha * x0) / sigma

    return denoise


def gaussian_denoiser(c, schedule=SCHED):
    """Exact oracle for data ~ N(0, c² I): ε* = σ_t z/(α_t² c² + σ_t²), x̂₀* = α_t c² z/(α_t² c² + σ_t²)."""

    def denoise(z, t):
        alpha, sigma = (v.to(z.dtype) for v in schedule.alpha_sigma(t, z.ndim))
        var = alpha**2 * c**2 + sigma**2
        return alpha * c**2 * z / var, sigma * z / var

    return denoise


def gaussian_ode_solution(z_t, t, s, c, schedule=SCHED):
    """Closed-form PF-ODE map for N(0, c² I): z_s = z_t √(α_s² c² + σ_s²) / √(α_t² c² + σ_t²) (z/std_t conserved)."""
    alpha_t, sigma_t = (v.to(z_t.dtype) for v in schedule.alpha_sigma(t, z_t.ndim))
    alpha_s, sigma_s = (v.to(z_t.dtype) for v in schedule.alpha_sigma(s, z_t.ndim))
    return z_t * ((alpha_s**2 * c**2 + sigma_s**2) / (alpha_t**2 * c**2 + sigma_t**2)).sqrt()


def _full(value, batch=4):
    return torch.full((batch,), value, dtype=torch.long)


def gaussian_error(name, t0, t1, c=0.5, n_steps=1, schedule=SCHED, seed=0):
    """Relative error of `n_steps` equal solver steps t0 → t1 against the closed-form Gaussian solution (float64)."""
    z = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    ts = [round(t0 - (t0 - t1) * i / n_steps) for i in range(n_steps + 1)]
    z_s = z
    for a, b in zip(ts[:-1], ts[1:]):
        z_s = get_solver(name)(gaussian_denoiser(c, schedule), z_s, _full(a), _full(b), schedule)
    exact = gaussian_ode_solution(z, _full(t0), _full(t1), c, schedule)
    return ((z_s - exact).norm() / exact.norm()).item()


FIRST_ORDER, SECOND_ORDER = ("ddim", "euler"), ("heun", "dpm_solver_2s")


# ------------------------------------------------------------------------------------------------ registry / plumbing


def test_registry_lists_all_solvers_and_their_evaluation_counts():
    assert set(SOLVERS) == {"ddim", "euler", "heun", "dpm_solver_2s"}
    assert SOLVER_EVALUATIONS == {"ddim": 1, "euler": 1, "heun": 2, "dpm_solver_2s": 2}
    with pytest.raises(ValueError) as err:
        get_solver("dpm_solver_2m")
    for name in SOLVERS:
        assert name in str(err.value)


@pytest.mark.parametrize("name", sorted(SOLVERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_solver_calls_teacher_the_stated_number_of_times_at_integer_timesteps(name, dtype):
    t, s = torch.tensor([999, 519, 39, 1]), torch.tensor([979, 499, 19, 0])
    x0 = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    oracle, calls = point_mass_denoiser(x0), []

    def denoise(z, tt):
        calls.append((z.dtype, tt.clone()))
        x0_hat, eps_hat = oracle(z.float(), tt)
        return x0_hat.to(z.dtype), eps_hat.to(z.dtype)

    z_s = get_solver(name)(denoise, SCHED.add_noise(x0, torch.randn_like(x0), t).to(dtype), t, s, SCHED)
    assert len(calls) == SOLVER_EVALUATIONS[name]
    assert z_s.dtype == dtype and z_s.shape == x0.shape
    for z_dtype, tt in calls:
        # A real UNet takes the discrete training timesteps: no float t, nothing outside [s, t].
        assert z_dtype == dtype
        assert not tt.is_floating_point() and tt.shape == t.shape
        assert bool(((tt >= s) & (tt <= t)).all())


def test_dpm_2s_intermediate_timestep_is_the_rounded_lambda_midpoint():
    t, s = torch.tensor([999, 999, 519, 19, 2, 1]), torch.tensor([499, 979, 499, 0, 0, 0])
    u = lambda_midpoint_timestep(SCHED, t, s)
    lam = half_log_snr(SCHED.alphas_cumprod)
    lam_mid = 0.5 * (lam[t] + lam[s])
    assert bool(((u > s) & (u < t))[:-1].all()) and u[-1] == 0  # strictly inside unless t − s = 1 (then u = s, r = 1)
    for i in range(len(t) - 1):
        inside = torch.arange(int(s[i]) + 1, int(t[i]))
        assert int(u[i]) == int(inside[(lam[inside] - lam_mid[i]).abs().argmin()])
    # One-step pairs: the midpoint is equidistant from t and s, and rounding alone picks t for about a quarter of them
    # (r = 0, a division by zero); u must be s there.
    t1 = torch.arange(1, 1000)
    assert bool((lambda_midpoint_timestep(SCHED, t1, t1 - 1) == t1 - 1).all())


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_zero_length_step_is_the_identity(name):
    z = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([999, 500, 20, 0])
    torch.testing.assert_close(get_solver(name)(gaussian_denoiser(0.5), z, t, t, SCHED), z)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_every_solver_runs_in_the_loss_with_one_batched_teacher_pass_per_evaluation(name):
    # Selecting a solver by name in LCDSpec is all the config does; each evaluation is one cond+uncond call (2B rows).
    B, calls = 6, []

    def teacher(z, t, cond):
        calls.append((z.shape[0], t.clone()))
        return torch.tanh(z) * 0.5 + cond["y"].mean(1, keepdim=True)

    g = torch.Generator().manual_seed(0)
    batch = LCDBatch(z0=torch.randn(B, 4, generator=g), noise=torch.randn(B, 4, generator=g),
                     index=torch.arange(B) * 9, w=torch.rand(B, generator=g) * 5,
                     cond={"y": torch.randn(B, 2, generator=g)}, uncond={"y": torch.zeros(B, 2)})
    spec = LCDSpec(SCHED, SolverGrid(1000, 50), solver=name)
    loss, _ = lcd_loss(lambda z, t, c, w: torch.tanh(z), lambda z, t, c, w: torch.tanh(z), teacher, batch, spec)
    assert loss.shape == (B,) and bool(torch.isfinite(loss).all())
    assert len(calls) == SOLVER_EVALUATIONS[name]
    assert all(rows == 2 * B and not t.is_floating_point() for rows, t in calls)


# ------------------------------------------------------------------------------------------------ analytic cases


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_every_solver_is_exact_for_a_point_mass(name):
    # For data = δ(x₀) the PF-ODE trajectory z = α x₀ + σ ε (fixed ε) is what every consistent solver integrates
    # exactly: DDIM/Euler's and Heun's slopes are constant along it, DPM-Solver++'s x̂₀ is constant.
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64)
    t, s = torch.tensor([999, 999, 519, 39, 1]), torch.tensor([499, 979, 499, 0, 0])
    z_s = get_solver(name)(point_mass_denoiser(x0), SCHED.add_noise(x0, eps, t), t, s, SCHED)
    torch.testing.assert_close(z_s, SCHED.add_noise(x0, eps, s), atol=1e-5, rtol=1e-5)


def test_euler_is_ddim_in_karras_variables():
    # With consistent (x̂₀, ε̂), d = (x − x̂₀)/σ^K = ε̂, so Euler in x = z/α, σ^K = σ/α is DDIM (EDM §3).
    z = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t, s = torch.tensor([999, 519, 259, 19]), torch.tensor([499, 499, 19, 0])
    denoise = gaussian_denoiser(0.7)
    torch.testing.assert_close(get_solver("euler")(denoise, z, t, s, SCHED), ddim_solver(denoise, z, t, s, SCHED))


def test_second_order_solvers_are_much_more_accurate_on_the_distillation_pairs():
    # The steps LCD actually takes: the k = 20 skipping-grid pairs (τ_i, τ_i − 20), from high to low noise.
    # Measured (c = 0.5): DDIM/Heun error ratio 8–30, DDIM/DPM-2S 10–60 on these pairs; we ask for 4.
    for t0 in (999, 759, 499, 259, 119, 39):
        ddim = gaussian_error("ddim", t0, t0 - 20)
        for name in SECOND_ORDER:
            assert gaussian_error(name, t0, t0 - 20) < ddim / 4, (name, t0)


def test_big_high_noise_step_dpm_2s_beats_ddim_and_heun_does_not():
    # One step 999 → 499 (σ^K: 14.6 → 1.6). DPM-Solver++(2S) integrates exactly in λ for constant x̂₀ and halves
    # DDIM's error (measured 0.017 vs 0.035). Heun does *worse* (0.26): along this stretch the trajectory is nearly
    # linear in σ^K, so Euler is already good, and z_s is a small difference of large terms that magnifies the
    # trapezoidal corrector's slope error. A property of Heun over steps far larger than LCD's k = 20, not a bug:
    # an independent scalar float64 Heun gives the same 0.26.
    ddim = gaussian_error("ddim", 999, 499)
    assert gaussian_error("euler", 999, 499) == pytest.approx(ddim, rel=1e-6)
    assert gaussian_error("dpm_solver_2s", 999, 499) < 0.7 * ddim
    assert gaussian_error("heun", 999, 499) > 2 * ddim


@pytest.mark.parametrize("t0, t1", [(999, 519), (259, 19)])
def test_error_shrinks_at_the_solvers_order_when_the_step_halves(t0, t1):
    # Global error over a fixed interval with 4 → 8 → 16 equal steps (integer timesteps throughout).
    # Measured halving ratios: DDIM/Euler 1.95–2.0, Heun 3.9–4.5, DPM-2S 3.6–4.0.
    for name in SOLVERS:
        errors = [gaussian_error(name, t0, t1, n_steps=n) for n in (4, 8, 16)]
        ratios = [errors[0] / errors[1], errors[1] / errors[2]]
        expected = (1.7, 2.3) if name in FIRST_ORDER else (3.3, 5.0)
        assert all(expected[0] < r < expected[1] for r in ratios), (name, ratios)


def test_dpm_2s_stays_second_order_when_the_intermediate_is_off_midpoint():
    # The rounded intermediate u has r = (λ_u − λ_t)/h ≠ ½ in general. A 3-timestep schedule with λ = (λ_t + h,
    # λ_t + 0.3 h, λ_t) forces r = 0.3; the one-step (local) error must then fall ~8× per halving of h (third-order
    # local error), where using x̂₀(u) alone (Alg. 1's r = ½ formula) would fall only ~4×. Measured: 8.7, 8.3.
    def three_point_schedule(h, lam_t=-1.0, r=0.3):
        lam = torch.tensor([lam_t + h, lam_t + r * h, lam_t], dtype=torch.float64)
        return NoiseSchedule(torch.sigmoid(2 * lam))  # ᾱ = α² with α/σ = e^λ

    assert lambda_midpoint_timestep(three_point_schedule(0.1), torch.tensor([2]), torch.tensor([0])).item() == 1
    errors = [gaussian_error("dpm_solver_2s", 2, 0, schedule=three_point_schedule(h)) for h in (0.2, 0.1, 0.05)]
    assert errors[0] / errors[1] > 6.5 and errors[1] / errors[2] > 6.5, errors


# ------------------------------------------------------------------------------------------------ diffusers agreement


def _eps_model(z, t):
    """A fixed nonlinear ε-model of (model input, t), so agreement also checks *where* the teacher is evaluated."""
    return torch.tanh(1.3 * z + 0.2) * (0.5 + t.reshape(-1, *([1] * (z.ndim - 1))).float() / 2000)


def _eps_denoiser(z, t):
    eps = _eps_model(z, t)
    alpha, sigma = SCHED.alpha_sigma(t, z.ndim)
    return (z - sigma * eps) / alpha, eps


def _karras_scheduler_config():
    return dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="leading",
                steps_offset=0, prediction_type="epsilon")


def test_euler_equals_diffusers_euler_discrete_step():
    # diffusers' Euler state is the σ-scaled sample x = z/α = z·√(σ^K² + 1); the UNet sees scale_model_input(x) = z.
    # One step between two consecutive timesteps of its 50-step leading schedule: 520 → 500.
    sched = EulerDiscreteScheduler(**_karras_scheduler_config())
    sched.set_timesteps(50)
    i = sched.timesteps.tolist().index(520)
    sched.set_begin_index(i)
    t_int, s_int = int(sched.timesteps[i]), int(sched.timesteps[i + 1])
    assert (t_int, s_int) == (520, 500)
    z_t = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    x_t = z_t * (sched.sigmas[i] ** 2 + 1) ** 0.5
    t = torch.tensor([t_int] * 2)
    eps = _eps_model(sched.scale_model_input(x_t, sched.timesteps[i]), t)
    x_s = sched.step(eps, sched.timesteps[i], x_t).prev_sample  # its own (float) timestep: ints read as indices
    theirs = x_s / (sched.sigmas[i + 1] ** 2 + 1) ** 0.5  # back to z = α x
    ours = get_solver("euler")(_eps_denoiser, z_t, t, torch.tensor([s_int] * 2), SCHED)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_heun_equals_diffusers_heun_discrete_step():
    # HeunDiscreteScheduler interleaves its schedule (timesteps t0, t1, t1, t2, t2, …; sigmas σ0, σ1, σ1, σ2, …): one
    # Heun step t_j → t_{j+1} is two `step` calls starting at index 2j — the first stores the Euler slope and returns
    # the predictor, the second evaluates the model there at t_{j+1} and applies the trapezoidal corrector.
    sched = HeunDiscreteScheduler(**_karras_scheduler_config())
    sched.set_timesteps(50)
    j = 23
    sched.set_begin_index(2 * j)
    t_int, s_int = int(sched.timesteps[2 * j]), int(sched.timesteps[2 * j + 1])
    assert (t_int, s_int) == (520, 500)
    z_t = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(3))
    x_t = z_t * (sched.sigmas[2 * j] ** 2 + 1) ** 0.5
    t, s = torch.tensor([t_int] * 2), torch.tensor([s_int] * 2)
    t_d, s_d = sched.timesteps[2 * j], sched.timesteps[2 * j + 1]
    x_pred = sched.step(_eps_model(sched.scale_model_input(x_t, t_d), t), t_d, x_t).prev_sample
    x_s = sched.step(_eps_model(sched.scale_model_input(x_pred, s_d), s), s_d, x_pred).prev_sample
    theirs = x_s / (sched.sigmas[2 * j + 1] ** 2 + 1) ** 0.5
    ours = get_solver("heun")(_eps_denoiser, z_t, t, s, SCHED)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
