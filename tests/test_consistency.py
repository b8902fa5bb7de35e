import pytest
import torch

from lcm.consistency import (
    LCDBatch,
    LCDSpec,
    cat_cond,
    consistency_fn,
    draw_lcd_batch,
    lcd_loss,
    predict_consistency,
    pseudo_huber_loss,
)
from lcm.schedule import NoiseSchedule, SolverGrid, scaled_linear_alphas_cumprod


class TinyEps(torch.nn.Module):
    """A small conditional ε-model on 4-d vectors: enough to exercise the loss plumbing."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(4 + 1 + 2, 32), torch.nn.SiLU(), torch.nn.Linear(32, 4))

    def forward(self, z, t, cond, w=None):
        return self.net(torch.cat([z, t[:, None].float() / 1000, cond["y"]], dim=1))


def _spec(**kw):
    return LCDSpec(NoiseSchedule(scaled_linear_alphas_cumprod()), SolverGrid(1000, 50), **kw)


def _batch(B=8, seed=0, uncond_value=0.0):
    g = torch.Generator().manual_seed(seed)
    return LCDBatch(
        z0=torch.randn(B, 4, generator=g),
        noise=torch.randn(B, 4, generator=g),
        index=torch.randint(0, 50, (B,), generator=g),
        w=torch.rand(B, generator=g) * 5,
        cond={"y": torch.randn(B, 2, generator=g)},
        uncond={"y": torch.full((B, 2), uncond_value)},
    )


def test_boundary_condition_f_z_0_is_z():
    model = TinyEps(0)
    z = torch.randn(5, 4)
    f = predict_consistency(model, z, torch.zeros(5, dtype=torch.long), {"y": torch.randn(5, 2)}, None, _spec())
    torch.testing.assert_close(f, z)


def test_consistency_fn_formula():
    z, x0 = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(consistency_fn(z, x0, 0.25, 0.75), 0.25 * z + 0.75 * x0)


def test_teacher_called_once_per_ddim_step_on_2b_rows():
    calls = []
    teacher = TinyEps(2)

    def counting_teacher(z, t, cond):
        calls.append(z.shape[0])
        return teacher(z, t, cond)

    student = TinyEps(1)
    lcd_loss(student, student, counting_teacher, _batch(B=8), _spec())
    assert calls == [16]


def test_gradient_only_through_student_side():
    # LoRA with μ = 0: student and target are the same weights; the target side must be stop-gradiented.
    model, teacher = TinyEps(1), TinyEps(2)
    batch, spec = _batch(), _spec(loss="l2")
    loss, _ = lcd_loss(model, model, teacher, batch, spec)
    loss.mean().backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    # The same loss with the target computed separately and detached by hand.
    t_nk, t_n = spec.grid.pair(batch.index)
    z_tnk = spec.schedule.add_noise(batch.z0, batch.noise, t_nk)
    from lcm.consistency import guided_denoiser
    from lcm.solvers import ddim_solver

    with torch.no_grad():
        z_tn = ddim_solver(guided_denoiser(teacher, batch.cond, batch.uncond, batch.w, spec.schedule, "epsilon"),
                           z_tnk, t_nk, t_n, spec.schedule)
        f_t = predict_consistency(model, z_tn, t_n, batch.cond, batch.w, spec)
    f_s = predict_consistency(model, z_tnk, t_nk, batch.cond, batch.w, spec)
    (f_s - f_t).pow(2).mean(1).mean().backward()
    for a, p in zip(got, model.parameters()):
        torch.testing.assert_close(a, p.grad)
    assert all(p.grad is None for p in teacher.parameters())


def test_w_zero_ignores_uncond_and_w_positive_uses_it():
    student, teacher = TinyEps(1), TinyEps(2)
    spec = _spec()
    b0, b1 = _batch(uncond_value=0.0), _batch(uncond_value=3.0)
    b0.w = b1.w = torch.zeros(8)
    l0, _ = lcd_loss(student, student, teacher, b0, spec)
    l1, _ = lcd_loss(student, student, teacher, b1, spec)
    torch.testing.assert_close(l0, l1)
    b0.w = b1.w = torch.full((8,), 4.0)
    l0, _ = lcd_loss(student, student, teacher, b0, spec)
    l1, _ = lcd_loss(student, student, teacher, b1, spec)
    assert not torch.allclose(l0, l1)


def test_pseudo_huber_limits():
    # float64: in float32 √(c² + d²) − c cancels catastrophically at d ≪ c, which is not what this test is about.
    a = torch.zeros(2, 10, dtype=torch.float64)
    small, big = torch.full_like(a, 1e-5), torch.full_like(a, 10.0)
    c = 1e-3
    # d ≪ c: quadratic d²/(2c); d ≫ c: linear |d| − c.
    torch.testing.assert_close(pseudo_huber_loss(small, a, c), torch.full((2,), 1e-10 / (2 * c), dtype=torch.float64), rtol=1e-3, atol=0)
    torch.testing.assert_close(pseudo_huber_loss(big, a, c), torch.full((2,), 10.0 - c, dtype=torch.float64), rtol=1e-6, atol=1e-6)


def test_per_sample_shapes_and_bad_names():
    student = TinyEps(1)
    loss, diag = lcd_loss(student, student, TinyEps(2), _batch(B=6), _spec())
    assert loss.shape == (6,) and "target_norm" in diag
    with pytest.raises(ValueError, match="huber"):
        _spec(loss="l1")
    with pytest.raises(ValueError, match="keys"):
        cat_cond({"a": torch.zeros(1)}, {"b": torch.zeros(1)})


def test_draw_lcd_batch_gives_each_sample_its_own_draws_whatever_its_batch():
    """A sample's z₀, ε, n and w come from its generator alone: alone or second in a batch, the same values."""
    grid = SolverGrid(1000, 50)
    mu, sigma = torch.randn(2, 4, 3, 3), torch.rand(2, 4, 3, 3)

    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    pair = draw_lcd_batch(mu, sigma, {}, {}, gens(5, 9), grid, 3.0, 15.0, "cpu")
    alone = draw_lcd_batch(mu[1:], sigma[1:], {}, {}, gens(9), grid, 3.0, 15.0, "cpu")
    for field in ("z0", "noise", "index", "w"):
        assert torch.equal(getattr(pair, field)[1:], getattr(alone, field)), field
    assert not torch.equal(pair.noise[0], pair.noise[1])  # the two generators differ, so the check could fail
    assert ((3.0 <= pair.w) & (pair.w <= 15.0)).all() and ((0 <= pair.index) & (pair.index < 50)).all()
    with pytest.raises(ValueError, match="one per sample"):
        draw_lcd_batch(mu, sigma, {}, {}, gens(5), grid, 3.0, 15.0, "cpu")


def test_inverse_delta_weights_are_one_over_the_step_in_edm_sigma():
    """λ_i ∝ 1/(σ(τ_i) − σ(τ_i − k)), σ = √((1 − ᾱ)/ᾱ), recomputed here from ᾱ in float64; mean 1 over the grid."""
    spec = _spec(loss_weighting="inverse_delta")
    abar = scaled_linear_alphas_cumprod().double()
    sigma = ((1 - abar) / abar).sqrt()
    hi = torch.arange(50) * 20 + 19
    lo = (hi - 20).clamp(min=0)
    expected = 1 / (sigma[hi] - sigma[lo])
    expected = expected / expected.mean()
    torch.testing.assert_close(spec.pair_weights.double(), expected, rtol=1e-4, atol=0)
    # pairs below t = 300 all weigh more than any above t = 700 (not monotone at the very bottom: the pair 19 → 0
    # moves σ more than 39 → 19)
    assert spec.pair_weights[:15].min() > 2.5 * spec.pair_weights[35:].max()
    assert torch.equal(_spec().pair_weights, torch.ones(50))


def test_loss_weighting_scales_each_sample_by_its_pairs_weight():
    student, teacher, batch = TinyEps(1), TinyEps(2), _batch(B=16)
    plain, _ = lcd_loss(student, student, teacher, batch, _spec())
    spec = _spec(loss_weighting="inverse_delta")
    weighted, _ = lcd_loss(student, student, teacher, batch, spec)
    torch.testing.assert_close(weighted, plain * spec.pair_weights[batch.index])
    assert not torch.allclose(weighted, plain)
    with pytest.raises(ValueError, match="loss weighting"):
        _spec(loss_weighting="snr")


def test_unguided_teacher_is_cfg_at_w_zero_in_one_conditional_call():
    """distill.teacher_cfg=false: the teacher's unguided x̂₀/ε̂ equal CFG at w = 0, from one B-row conditional call."""
    from lcm.consistency import guided_denoiser

    teacher, spec = TinyEps(2), _spec()
    batch = _batch(uncond_value=3.0)
    calls = []

    def counting(z, t, cond):
        calls.append((z.shape[0], cond))
        return teacher(z, t, cond)

    t = spec.grid.pair(batch.index)[0]
    z = spec.schedule.add_noise(batch.z0, batch.noise, t)
    x0_u, eps_u = guided_denoiser(counting, batch.cond, batch.uncond, batch.w, spec.schedule, "epsilon",
                                  guided=False)(z, t)
    assert len(calls) == 1 and calls[0][0] == len(z) and calls[0][1] is batch.cond
    x0_g, eps_g = guided_denoiser(teacher, batch.cond, batch.uncond, torch.zeros_like(batch.w), spec.schedule,
                                  "epsilon")(z, t)
    torch.testing.assert_close(x0_u, x0_g)
    torch.testing.assert_close(eps_u, eps_g)
    # …and differs from the guided teacher at the batch's own w > 0 (the uncond branch differs here)
    x0_w, _ = guided_denoiser(teacher, batch.cond, batch.uncond, batch.w.clamp_min(1.0), spec.schedule, "epsilon")(z, t)
    assert not torch.allclose(x0_u, x0_w, atol=1e-4)


def test_terminal_pure_noise_feeds_eps_at_the_top_timestep_and_changes_nothing_else():
    from lcm.consistency import terminal_as_pure_noise

    sched = NoiseSchedule(scaled_linear_alphas_cumprod())
    # The premise: an SD-style schedule leaks z₀ into z_999 (√ᾱ_999 ≈ 0.068), so the two inputs differ.
    assert 0.05 < sched.alphas_cumprod[999].sqrt() < 0.08
    z0, eps = torch.randn(4, 4, 2, 2), torch.randn(4, 4, 2, 2)
    t = torch.tensor([999, 959, 0, 999])
    z_t = sched.add_noise(z0, eps, t)
    out = terminal_as_pure_noise(z_t, eps, t, 1000)
    torch.testing.assert_close(out[[0, 3]], eps[[0, 3]], rtol=0, atol=0)
    torch.testing.assert_close(out[[1, 2]], z_t[[1, 2]], rtol=0, atol=0)
    assert not torch.allclose(z_t[0], eps[0])

    seen = []
    student, teacher = TinyEps(1), TinyEps(2)

    def spy(z, t, cond, w=None):
        seen.append((z.detach().clone(), t.clone()))
        return student(z, t, cond, w)

    batch = _batch(B=8)
    batch.index[:3] = 49  # t_{n+k} = 999 for three rows
    batch.index[3:] = torch.tensor([0, 10, 20, 30, 48])
    plain, _ = lcd_loss(student, student, teacher, batch, _spec())
    pure, _ = lcd_loss(spy, student, teacher, batch, _spec(terminal_pure_noise=True))
    z_student, t_student = seen[0]  # the student's call comes first
    assert (t_student[:3] == 999).all()
    torch.testing.assert_close(z_student[:3], batch.noise[:3], rtol=0, atol=0)
    # Rows below the top keep the forward-diffused input, so their loss is bit for bit the plain one.
    torch.testing.assert_close(pure[3:], plain[3:], rtol=0, atol=0)
    assert not torch.allclose(pure[:3], plain[:3])


def test_terminal_pure_noise_off_by_default_and_in_the_config():
    from lcm.config import DistillConfig

    assert LCDSpec.__dataclass_fields__["terminal_pure_noise"].default is False
    assert DistillConfig().terminal_pure_noise is False


def test_self_generated_z0_share_zero_is_the_batch_and_draws_nothing():
    from lcm.consistency import with_self_generated_z0

    batch, gens = _batch(), [torch.Generator().manual_seed(i) for i in range(8)]
    states = [g.get_state() for g in gens]
    assert with_self_generated_z0(TinyEps(1), batch, _spec(), 0.0, gens) is batch
    assert all(g.get_state().equal(s) for g, s in zip(gens, states))


def test_self_generated_z0_replaces_the_chosen_rows_by_the_targets_estimate_from_above():
    """Chosen rows (u < share, not at the top pair) get z₀' = f_θ⁻(α_s z₀ + σ_s ε', s) with s a grid timestep above
    t_{n+k}, from the draws u, v, ε' in that order per sample; other rows keep z₀ exactly."""
    from lcm.consistency import per_sample_randn, with_self_generated_z0

    spec, target = _spec(), TinyEps(1)
    batch = _batch(B=64)
    batch.index[:4] = spec.grid.N - 1  # top pairs: nothing above them
    gens = [torch.Generator().manual_seed(100 + i) for i in range(64)]
    twins = [torch.Generator().manual_seed(100 + i) for i in range(64)]
    out = with_self_generated_z0(target, batch, spec, 0.5, gens)
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in twins])
    v = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in twins])
    eps = per_sample_randn(batch.z0.shape, twins)
    chosen = (u < 0.5) & (batch.index < spec.grid.N - 1)
    assert 10 < int(chosen.sum()) < 54 and not chosen[:4].any()
    for i in range(64):
        if not chosen[i]:
            assert out.z0[i].equal(batch.z0[i])
            continue
        above = spec.grid.N - 1 - int(batch.index[i])
        j = int(batch.index[i]) + 1 + int(v[i] * above)
        s = spec.grid.pair(torch.tensor([j]))[0]
        assert s.item() > spec.grid.pair(batch.index[i:i + 1])[0].item()
        z_s = spec.schedule.add_noise(batch.z0[i:i + 1], eps[i:i + 1], s)
        expected = predict_consistency(target, z_s, s, {"y": batch.cond["y"][i:i + 1]}, batch.w[i:i + 1], spec)
        torch.testing.assert_close(out.z0[i:i + 1], expected)
        assert not out.z0[i].equal(batch.z0[i])
    # the rest of the batch is untouched, and the input batch is not modified in place
    assert out.noise.equal(batch.noise) and out.index.equal(batch.index) and out.w.equal(batch.w)
    assert not out.z0.equal(batch.z0) and batch.z0.equal(_batch(B=64).z0)
