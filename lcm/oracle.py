"""The analytic oracle: a class-conditional Gaussian mixture whose exact ε*(z, t) is a perfect CFG teacher (DESIGN §4).

Data: class c ~ π (class prior), then x₀ ~ Σ_m ρ_{c,m} N(μ_{c,m}, s_{c,m}² I) in d dimensions. Under the forward process
z_t = α_t x₀ + σ_t ε each component stays Gaussian, N(α_t μ, (α_t² s² + σ_t²) I), so the marginal p_t(z | c) is again a
mixture with a closed-form score, and the optimal noise prediction is ε*(z, t) = −σ_t ∇_z log p_t(z | c) (Tweedie's
formula; score-based SDEs, Song et al. 2021, arXiv:2011.13456). The unconditional model is the same formula over all K·M
components weighted by π_k ρ_{k,m}; it is addressed by the null class y = K, so `{"y": K}` plays the role SDXL's zero
embedding plays for the real teacher.

Everything here plugs into the same `lcd_loss`, solver and schedule code as the SDXL trainer:
    teacher(z, t, cond) -> ε*          `OracleTeacher`, cond = {"y": class index (B,) long}, null class = K
    student(z, t, cond, w) -> ε        `MLPStudent`, a small MLP with time, class and w inputs
and the reference trajectories (`pf_ode_endpoint`, `ddim_sample`) and the consistency sampler (`consistency_sample`)
are written with `lcm.solvers.ddim_step` and `lcm.consistency.predict_consistency`, so a bug there shows up here.

Endpoint convention: every sampler ends at timestep 0, i.e. at (α_0, σ_0) of the schedule (σ_0 ≈ 0.029 for SD's
scaled_linear), because that is where the consistency boundary condition f(z, 0) = z anchors training, where the LCD
target chain ends, and where diffusers' DDIM ends for SD (`set_alpha_to_one=False`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from .constants import NUM_DDIM_TIMESTEPS
from .consistency import LCDBatch, LCDSpec, guided_denoiser, lcd_loss, predict_consistency
from .ema import ema_update_
from .guidance import cfg, sample_w
from .parameterization import eps_from_x0
from .schedule import NoiseSchedule, lcm_inference_timesteps
from .solvers import ddim_solver, ddim_step


@dataclass
class GaussianMixture:
    """K classes, each a mixture of M isotropic Gaussians in d dims. Shapes: means (K, M, d), stds (K, M),
    weights (K, M) with rows summing to 1 (ρ), class_prior (K,) (π)."""

    means: torch.Tensor
    stds: torch.Tensor
    weights: torch.Tensor
    class_prior: torch.Tensor

    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[-1]

    @property
    def null_class(self) -> int:
        """The class index that means "unconditional" (the mixture over all classes)."""
        return self.num_classes

    def sample_classes(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """y ~ π, one per sample."""
        return torch.multinomial(self.class_prior.double(), batch, replacement=True, generator=generator)

    def sample(self, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x₀ ~ p(x₀ | y) for real classes y (B,), in float32: the oracle's "dataset"."""
        m = torch.multinomial(self.weights.double()[y], 1, generator=generator).squeeze(1)
        noise = torch.randn(len(y), self.dim, generator=generator, dtype=torch.float64)
        x0 = self.means.double()[y, m] + self.stds.double()[y, m, None] * noise
        return x0.float()

    def _components(self, y: torch.Tensor):
        """Per row: log weights (B, K·M) of the flattened components (−inf outside class y; π_k ρ_km for the null
        class), means (K·M, d) and stds (K·M,), all float64."""
        K, M = self.weights.shape
        log_joint = (self.class_prior.double().log()[:, None] + self.weights.double().log()).reshape(K * M)
        log_within = self.weights.double().log()  # (K, M)
        is_null = y == self.null_class
        y_real = torch.where(is_null, torch.zeros_like(y), y)
        own = torch.full((len(y), K, M), -math.inf, dtype=torch.float64)
        own[torch.arange(len(y)), y_real] = log_within[y_real]
        log_w = torch.where(is_null[:, None], log_joint[None], own.reshape(len(y), K * M))
        return log_w, self.means.double().reshape(K * M, -1), self.stds.double().reshape(K * M)

    def _marginal_terms(self, z, alpha, sigma, y):
        """At (α, σ): component log-weight + log-density (B, K·M), offsets z − α μ (B, K·M, d), variances (B, K·M)."""
        log_w, mu, s = self._components(y.long())
        z, alpha, sigma = z.double(), alpha.double().reshape(-1, 1), sigma.double().reshape(-1, 1)
        var = alpha**2 * s[None] ** 2 + sigma**2  # (B, K·M): α² s² + σ²
        diff = z[:, None, :] - alpha[:, :, None] * mu[None]  # (B, K·M, d)
        log_n = -0.5 * (diff.pow(2).sum(-1) / var + self.dim * torch.log(2 * math.pi * var))
        return log_w + log_n, diff, var

    def log_prob(self, z, alpha, sigma, y) -> torch.Tensor:
        """log p_t(z | y) of the noised marginal at (α, σ) per row; differentiable in z (float64)."""
        logits, _, _ = self._marginal_terms(z, alpha, sigma, y)
        return torch.logsumexp(logits, dim=1)

    def eps(self, z, alpha, sigma, y) -> torch.Tensor:
        """ε*(z) = −σ ∇log p_t(z | y) = σ Σ_j r_j (z − α μ_j) / (α² s_j² + σ²), r = posterior responsibilities.

        α, σ are per-row (any shape with B elements) and may be any positive reals, not only grid timesteps: the fine
        PF-ODE reference integrates in continuous time. Computed in float64, returned in z's dtype.
        """
        logits, diff, var = self._marginal_terms(z, alpha, sigma, y)
        r = torch.softmax(logits, dim=1)
        score_term = (r / var)[:, :, None] * diff  # r_j (z − α μ_j) / v_j
        return (sigma.double().reshape(-1, 1) * score_term.sum(1)).to(z.dtype)

    def guided_eps(self, z, alpha, sigma, y, w) -> torch.Tensor:
        """ε̂ = ε_c + w (ε_c − ε_u) with the exact ε* of class y and of the null class (LCM eq. 9)."""
        both = self.eps(torch.cat([z, z]), torch.cat([alpha, alpha]), torch.cat([sigma, sigma]),
                        torch.cat([y, torch.full_like(y, self.null_class)]))
        eps_c, eps_u = both.chunk(2)
        return cfg(eps_c, eps_u, w)


def make_mixture(dim: int = 2, num_classes: int = 3, per_class: int = 2, std: float = 0.2, seed: int = 0):
    """A fixed, well-separated class-conditional mixture with overall scale ≈ 1 (like scaled SD latents).

    Class c's components sit on the unit circle around angle 2π c/K (first two coordinates), spread over 0.7 rad, so
    each class is multi-modal, the conditional and unconditional scores differ and CFG has something to do; further dims
    get seeded offsets of scale 0.5. With std 0.2 the 2-d problem distils well in 2000 steps (std 0.1 is much harder
    for a small MLP: the map near t = 0 gets steep).
    """
    g = torch.Generator().manual_seed(seed)
    K, M = num_classes, per_class
    means = torch.zeros(K, M, dim, dtype=torch.float64)
    for c in range(K):
        for m in range(M):
            angle = 2 * math.pi * c / K + 0.7 * (m - (M - 1) / 2) / max(M - 1, 1)
            means[c, m, 0], means[c, m, 1] = math.cos(angle), math.sin(angle)
    if dim > 2:
        means[..., 2:] = 0.5 * torch.randn(K, M, dim - 2, generator=g, dtype=torch.float64)
    stds = torch.full((K, M), std, dtype=torch.float64)
    weights = torch.full((K, M), 1.0 / M, dtype=torch.float64)
    class_prior = torch.full((K,), 1.0 / K, dtype=torch.float64)
    return GaussianMixture(means, stds, weights, class_prior)


class OracleTeacher:
    """The mixture's exact ε*(z, t) as a teacher role `(z, t, cond) -> ε` at integer timesteps of `schedule`."""

    def __init__(self, mixture: GaussianMixture, schedule: NoiseSchedule):
        self.mixture, self.schedule = mixture, schedule

    def __call__(self, z, t, cond):
        alpha, sigma = self.schedule.alpha_sigma(t, z.ndim)
        return self.mixture.eps(z, alpha, sigma, cond["y"])


class MLPStudent(torch.nn.Module):
    """A small ε-prediction MLP `(z, t, cond, w) -> ε` with Fourier time features, a class embedding and w as inputs.

    Inside, the MLP output F is preconditioned as in EDM (Karras et al. 2022, arXiv:2206.00364 §5, Table 1) in the
    x̄ = z/α, η = σ/α coordinates: x̂₀ = a_skip·x̄ + a_out·F(a_in·x̄, …) with a_skip = σ_d²/(η² + σ_d²),
    a_out = η σ_d/√(η² + σ_d²), a_in = 1/√(η² + σ_d²) (EDM's c_skip/c_out/c_in, renamed so they are not mistaken for
    the consistency boundary scalings, which `lcd_loss` applies on top as for any model); the output is
    ε = (z − α_t x̂₀)/σ_t (`eps_from_x0`). So the interface is ε-prediction like the SDXL UNet, the near-identity map
    at small t costs the MLP nothing, and its error is not amplified by σ/α ≈ 15 at t = 999 when `lcd_loss` turns ε
    back into x̂₀. There is no network to copy the teacher
    from, so the last layer is zero-initialised instead: the student starts as the exact denoiser of N(0, σ_d² I), a
    smooth guess of the right scale. The w input is zero-initialised too, like the UNet's guidance projection.
    """

    def __init__(self, mixture: GaussianMixture, schedule: NoiseSchedule, hidden: int = 128, depth: int = 2,
                 freqs: int = 8, w_scale: float = 0.25):
        super().__init__()
        self.schedule, self.freqs, self.w_scale = schedule, freqs, w_scale
        d = mixture.dim
        # σ_d: the data's per-dimension standard deviation, √(E|x₀|²/d) (taken about 0, like the denoiser's prior).
        second_moment = (mixture.means.double().pow(2).sum(-1) + d * mixture.stds.double() ** 2)
        per_class = (mixture.weights.double() * second_moment).sum(1)
        self.sigma_data = (mixture.class_prior.double() @ per_class / d).sqrt().item()
        # Conditioning (time, class incl. the null class, w) is one embedding added before every hidden layer, as a
        # UNet adds its time/guidance embedding in every ResBlock.
        self.time_emb = torch.nn.Linear(2 * freqs, hidden)
        self.class_emb = torch.nn.Embedding(mixture.num_classes + 1, hidden)
        self.w_proj = torch.nn.Linear(1, hidden)
        self.inp = torch.nn.Linear(d, hidden)
        self.hidden = torch.nn.ModuleList([torch.nn.Linear(hidden, hidden) for _ in range(depth)])
        self.out = torch.nn.Linear(hidden, d)
        for layer in (self.w_proj, self.out):
            torch.nn.init.zeros_(layer.weight)
            torch.nn.init.zeros_(layer.bias)

    def time_features(self, t):
        """sin/cos of t/T at octave frequencies: smooth in t, resolving the 20-step grid spacing."""
        u = t.float()[:, None] / self.schedule.T
        k = 2.0 ** torch.arange(self.freqs, dtype=torch.float32, device=t.device) * math.pi
        return torch.cat([torch.sin(k * u), torch.cos(k * u)], dim=1)

    def forward(self, z, t, cond, w=None):
        if w is None:
            w = torch.zeros(len(z), device=z.device)
        alpha, sigma = self.schedule.alpha_sigma(t, z.ndim)
        alpha, sigma = alpha.to(z.dtype), sigma.to(z.dtype)
        xbar, eta, s_d = z / alpha, sigma / alpha, self.sigma_data
        a_in = (eta**2 + s_d**2).rsqrt()
        a_skip, a_out = s_d**2 * a_in**2, eta * s_d * a_in
        emb = self.time_emb(self.time_features(t)) + self.class_emb(cond["y"].long())
        emb = emb + self.w_proj(self.w_scale * w.reshape(-1, 1).to(z.dtype))
        h = self.inp(a_in * xbar)
        for layer in self.hidden:
            h = layer(torch.nn.functional.silu(h + emb))
        F = self.out(torch.nn.functional.silu(h + emb))
        x0_hat = a_skip * xbar + a_out * F
        return eps_from_x0(z, x0_hat, alpha, sigma)


def distill(student, teacher: OracleTeacher, spec: LCDSpec, *, steps: int = 2000, batch: int = 256, lr: float = 2e-3,
            w_range=(0.0, 2.0), mu: float = 0.9, seed: int = 0, loss_fn=lcd_loss) -> list[float]:
    """Latent consistency distillation of `student` from the oracle (LCM arXiv:2310.04378 Alg. 1); returns the losses.

    Every step draws a fresh batch from the mixture (the oracle's "dataset") and calls the trainer's `lcd_loss`.
    μ > 0 keeps a separate EMA target θ⁻ (full LCD); μ = 0 uses the online student as the target (LCM-LoRA), which
    `lcd_loss` evaluates under no_grad. On this problem μ = 0.9 distils markedly better than μ = 0 at 2000 steps.
    `loss_fn(student, target, teacher, batch, spec)` is any consistency objective of that signature (e.g. PCM's).
    """
    mixture = teacher.mixture
    g = torch.Generator().manual_seed(seed)
    target = copy.deepcopy(student).requires_grad_(False) if mu > 0 else student
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    losses = []
    for _ in range(steps):
        # 1. Draw the "dataset" batch: classes, clean x₀, noise, grid indices and guidance scales.
        y = mixture.sample_classes(batch, g)
        lcd_batch = LCDBatch(
            z0=mixture.sample(y, g),
            noise=torch.randn(batch, mixture.dim, generator=g),
            index=spec.grid.sample_index(batch, g),
            w=sample_w(batch, *w_range, generator=g),
            cond={"y": y},
            uncond={"y": torch.full_like(y, mixture.null_class)},
        )
        # 2. The same loss the SDXL trainer uses; 3. step; 4. EMA target.
        loss, _ = loss_fn(student, target, teacher, lcd_batch, spec)
        loss = loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if mu > 0:
            ema_update_(target.parameters(), student.parameters(), mu)
        losses.append(loss.item())
    return losses


def consistency_sample(model, z_T, cond, w, spec: LCDSpec, num_steps: int, noises=None):
    """Multistep consistency sampling on LCMScheduler's timesteps (Song et al. 2023, arXiv:2303.01469 Alg. 1).

    Each step takes x̂ = f_θ(z, t); before the next timestep s it re-noises z_s = α_s x̂ + σ_s ε. LCMScheduler draws a
    fresh ε (pass `noises`, one tensor per re-noising); that gives a sample from the right distribution but not the
    PF-ODE endpoint of *this* z_T. With `noises=None` ε is the noise the step itself implies, ε = (z_t − α_t x̂)/σ_t, so
    z_s is the DDIM step from z_t with x̂₀ := x̂: deterministic, a function of z_T alone, and comparable per sample with
    the PF-ODE endpoint from the same z_T. (Even a perfect consistency function does not land exactly on it at 2+
    steps, since z_s lies on the chord, not the curved trajectory; `ideal_consistency_sample` measures that floor.)
    """
    z = z_T
    timesteps = lcm_inference_timesteps(num_steps, spec.grid.N, spec.grid.T)
    for i, t in enumerate(timesteps):
        t_b = torch.full((len(z),), t, dtype=torch.long)
        x_hat = predict_consistency(model, z, t_b, cond, w, spec)
        if i + 1 == len(timesteps):
            return x_hat
        s_b = torch.full((len(z),), timesteps[i + 1], dtype=torch.long)
        if noises is None:
            alpha_t, sigma_t = spec.schedule.alpha_sigma(t_b, z.ndim)
            eps = eps_from_x0(z, x_hat, alpha_t, sigma_t)
        else:
            eps = noises[i]
        alpha_s, sigma_s = spec.schedule.alpha_sigma(s_b, z.ndim)
        z = ddim_step(x_hat, eps, alpha_s, sigma_s)


def ddim_timesteps(num_steps: int, T: int = 1000) -> list[int]:
    """diffusers DDIM "trailing" spacing: round(arange(T, 0, −T/n)) − 1, so the first step starts at t = T − 1."""
    return [int(round(T - i * T / num_steps)) - 1 for i in range(num_steps)]


def ddim_sample(teacher, z_T, cond, uncond, w, schedule: NoiseSchedule, num_steps: int):
    """The guided teacher sampled with DDIM (η = 0) on trailing timesteps, ending at timestep 0 (SD's final ᾱ_0)."""
    denoise = guided_denoiser(teacher, cond, uncond, w, schedule, "epsilon")
    timesteps = ddim_timesteps(num_steps, schedule.T) + [0]
    z = z_T
    for t, s in zip(timesteps[:-1], timesteps[1:]):
        t_b, s_b = (torch.full((len(z),), v, dtype=torch.long) for v in (t, s))
        z = ddim_solver(denoise, z, t_b, s_b, schedule)
    return z


def pf_ode_endpoint(mixture: GaussianMixture, z_T, y, w, schedule: NoiseSchedule, t_start: int = None,
                    t_end: int = 0, steps: int = 100):
    """The exact guided PF-ODE from timestep t_start to t_end, solved with RK4 in continuous time (float64).

    In x̄ = z/α and η = σ/α the PF-ODE is dx̄/dη = ε̂(α x̄; η) (DDIM, arXiv:2010.02502 eq. 14), with α = 1/√(1+η²),
    σ = η α on the continuous path between the schedule's η values. Steps are uniform in log η, where the mixture's
    structure appears (η ≈ s … 1). `y` (B,) may include the null class; `w` is a float or (B,).
    """
    t_start = schedule.T - 1 if t_start is None else t_start
    ts = torch.tensor([t_start, t_end])
    alpha, sigma = schedule.alpha_sigma(ts)
    eta = (sigma.double() / alpha.double()).reshape(-1)
    log_eta = torch.linspace(eta[0].log().item(), eta[1].log().item(), steps + 1, dtype=torch.float64)
    y = y.long()
    w = torch.as_tensor(w, dtype=torch.float64).expand(len(z_T))

    def velocity(xbar, e):
        a = (1.0 + e * e) ** -0.5
        alpha_b = torch.full((len(xbar),), a, dtype=torch.float64)
        return mixture.guided_eps(a * xbar, alpha_b, e * alpha_b, y, w)

    xbar = z_T.double() / alpha[0].double()
    for i in range(steps):
        e0, e1 = log_eta[i].exp().item(), log_eta[i + 1].exp().item()
        h, em = e1 - e0, 0.5 * (e0 + e1)  # classical RK4 in η; only the step sizes follow log η
        k1 = velocity(xbar, e0)
        k2 = velocity(xbar + 0.5 * h * k1, em)
        k3 = velocity(xbar + 0.5 * h * k2, em)
        k4 = velocity(xbar + h * k3, e1)
        xbar = xbar + h / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
    return (alpha[1].double() * xbar).to(z_T.dtype)


def ideal_consistency_sample(mixture: GaussianMixture, z_T, y, w, schedule: NoiseSchedule, num_steps: int,
                             original_steps: int = NUM_DDIM_TIMESTEPS):
    """`consistency_sample` (deterministic) with the perfect consistency function f*(z, t) = exact PF-ODE endpoint."""
    z = z_T
    timesteps = lcm_inference_timesteps(num_steps, original_steps, schedule.T)
    for i, t in enumerate(timesteps):
        x_hat = pf_ode_endpoint(mixture, z, y, w, schedule, t_start=t)
        if i + 1 == len(timesteps):
            return x_hat
        t_b, s_b = (torch.full((len(z),), v, dtype=torch.long) for v in (t, timesteps[i + 1]))
        alpha_t, sigma_t = schedule.alpha_sigma(t_b, z.ndim)
        alpha_s, sigma_s = schedule.alpha_sigma(s_b, z.ndim)
        z = ddim_step(x_hat, eps_from_x0(z, x_hat, alpha_t, sigma_t), alpha_s, sigma_s)
