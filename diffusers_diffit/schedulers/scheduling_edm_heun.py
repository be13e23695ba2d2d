"""EDMHeunScheduler: the 2nd-order Heun sampler of Karras et al. 2022 (EDM Algorithm 1, and Algorithm 2 with churn)
in diffusers' EDM conventions, so any pipeline that loops over `scheduler.timesteps` drives it.

Noise levels t_i = (σ_max^(1/ρ) + i/(N−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ for i < N, t_N = 0. Step i:

    t̂_i = (1 + γ_i)·t_i,  γ_i = min(S_churn/N, √2 − 1) if S_tmin ≤ t_i ≤ S_tmax else 0
    x̂_i = x_i + √(t̂_i² − t_i²)·S_noise·ε                         (churn, only where γ_i > 0)
    d_i = (x̂_i − D(x̂_i; t̂_i)) / t̂_i;  x_{i+1} = x̂_i + (t_{i+1} − t̂_i)·d_i         (Euler)
    if t_{i+1} ≠ 0:  d'_i = (x_{i+1} − D(x_{i+1}; t_{i+1})) / t_{i+1};
                     x_{i+1} = x̂_i + (t_{i+1} − t̂_i)·(d_i + d'_i)/2                   (Heun correction)

N steps cost 2N − 1 model calls, so `timesteps` holds 2N − 1 entries: the noise levels [t̂_0, t_1, t̂_1, …, t_{N−1},
t̂_{N−1}] as c_noise = ln(σ)/4, the value the model is called with (HeunDiscreteScheduler's layout, EDMEulerScheduler's
timestep convention). `scale_model_input` applies c_in and `step` applies c_skip / c_out to the raw model output F_θ,
both from `diffusers_diffit.edm`. The churn noise of step i + 1 is added at the end of step i's last call (with the
`generator` given to `step`), so the sample the pipeline holds is always the one the model sees next.
"""

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..edm import edm_preconditioning
from ..utils import is_finite_number


@dataclass
class EDMHeunSchedulerOutput(BaseOutput):
    """
    Args:
        prev_sample: the sample for the next model call: x_{i+1} after a full step (plus the next step's churn),
            the Euler estimate of x_{i+1} after the first call of a Heun step.
        pred_original_sample: D(x; σ), the denoised estimate at this call.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class EDMHeunScheduler(SchedulerMixin, ConfigMixin):
    """Karras et al.'s deterministic Heun sampler (optional stochastic churn), for EDM-preconditioned denoisers F_θ.

    Args:
        sigma_min, sigma_max: the smallest nonzero and the largest noise level (EDM: 0.002, 80).
        sigma_data: σ_d of the EDM preconditioning (0.5 for images in [-1, 1]).
        rho: ρ of the noise-level spacing (7).
        s_churn, s_tmin, s_tmax, s_noise: EDM Algorithm 2's stochasticity; `s_churn=0` is the deterministic sampler.
            Churn applies where s_tmin <= t_i <= s_tmax; `s_tmax=None` means no upper bound (kept out of the
            config as JSON has no infinity).
    """

    _compatibles = ["EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"]
    order = 2

    @register_to_config
    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        rho: float = 7.0,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float | None = None,
        s_noise: float = 1.0,
    ):
        values = dict(
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            sigma_data=sigma_data,
            rho=rho,
            s_churn=s_churn,
            s_tmin=s_tmin,
            s_noise=s_noise,
            **({} if s_tmax is None else {"s_tmax": s_tmax}),
        )
        not_finite = {k: v for k, v in values.items() if not is_finite_number(v)}
        if not_finite:
            raise ValueError(
                f"EDMHeunScheduler arguments must be finite numbers (s_tmax=None for no bound), got {not_finite}."
            )
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"Need 0 < `sigma_min` < `sigma_max`, got sigma_min={sigma_min}, sigma_max={sigma_max}.")
        if s_churn < 0:
            raise ValueError(f"`s_churn` must be >= 0, got {s_churn}.")
        self.num_inference_steps = None
        self.timesteps = None
        self.sigmas = None  # [2N − 1] noise level of each model call
        self.noise_levels = None  # [N + 1] t_0 … t_N
        self._state = None  # (x̂_i, d_i) between the two calls of a Heun step
        self._begin_index = None
        self._step_index = None

    @property
    def init_noise_sigma(self) -> float:
        """Std of the initial noise: t_0 (σ_max), or that of x̂_0 when churn applies at the first step."""
        if self.sigmas is None:
            return float(self.config.sigma_max)
        t0, t0_hat = float(self.noise_levels[0]), float(self.sigmas[0])
        return (t0**2 + self.config.s_noise**2 * (t0_hat**2 - t0**2)) ** 0.5

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        self._begin_index = begin_index

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None):
        """N = `num_inference_steps` noise levels from σ_max to σ_min, then 0; 2N − 1 model calls."""
        if num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be >= 1, got {num_inference_steps}.")
        cfg = self.config
        self.num_inference_steps = num_inference_steps
        ramp = torch.linspace(0, 1, num_inference_steps, dtype=torch.float64)
        max_inv_rho, min_inv_rho = cfg.sigma_max ** (1 / cfg.rho), cfg.sigma_min ** (1 / cfg.rho)
        t = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** cfg.rho  # [N]
        gamma = min(cfg.s_churn / num_inference_steps, 2**0.5 - 1)
        s_tmax = float("inf") if cfg.s_tmax is None else cfg.s_tmax
        t_hat = torch.where((cfg.s_tmin <= t) & (t <= s_tmax), t * (1 + gamma), t)  # [N]

        self.noise_levels = torch.cat([t, t.new_zeros(1)]).float()  # [N + 1] t_0 … t_N = 0
        # call 2i evaluates D(x̂_i; t̂_i), call 2i + 1 evaluates D(x_{i+1}; t_{i+1}); there is none at t_N = 0.
        self.sigmas = torch.stack([t_hat, self.noise_levels[1:].double()], dim=1).flatten()[:-1].float()  # [2N − 1]
        self.timesteps = edm_preconditioning(self.sigmas, cfg.sigma_data).c_noise.to(device)
        self._state = None
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep: float | torch.Tensor) -> int:
        """Index of the call a sampling loop starting at `timestep` begins with. Without churn a Heun correction
        and the next Euler call share a noise level; a fresh start takes the Euler call (the last match)."""
        matches = (self.timesteps.cpu() == torch.as_tensor(timestep).cpu()).nonzero()
        if len(matches) == 0:
            raise ValueError(f"`timestep` {float(timestep)} is not one of `scheduler.timesteps`.")
        return int(matches[-1])

    def _init_step_index(self, timestep: float | torch.Tensor):
        self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor) -> torch.Tensor:
        """c_in(σ)·x for the current call."""
        if self.timesteps is None:
            raise ValueError("Call `set_timesteps` before `scale_model_input`.")
        if self._step_index is None:
            self._init_step_index(timestep)
        c_in = edm_preconditioning(self.sigmas[self._step_index], self.config.sigma_data).c_in
        return sample * c_in.to(sample.device, sample.dtype)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> EDMHeunSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One model call's update. `model_output` is F_θ(c_in·x, c_noise); `sample` is x (not scaled)."""
        if self.timesteps is None:
            raise ValueError("Call `set_timesteps` before `step`.")
        if self._step_index is None:
            self._init_step_index(timestep)
        k = self._step_index
        if k >= len(self.sigmas):
            raise ValueError(f"`step` was called {k + 1} times but this schedule has {len(self.sigmas)} model calls.")
        sigma, target = self.sigmas[k], self.noise_levels[k // 2 + 1]  # this call's level, t_{i+1}
        c_skip, c_out, _, _ = edm_preconditioning(sigma, self.config.sigma_data)

        x = sample.float()
        denoised = c_skip * x + c_out * model_output.float()
        derivative = (x - denoised) / sigma
        if k % 2 == 0:  # Euler from x̂_i at t̂_i to t_{i+1}
            prev_sample = x + (target - sigma) * derivative
            self._state = (x, derivative)
        else:  # Heun correction at t_{i+1}, then the churn of step i + 1
            x_hat, derivative_hat = self._state
            prev_sample = x_hat + (target - self.sigmas[k - 1]) * (derivative_hat + derivative) / 2
            prev_sample = self._churn(prev_sample, k + 1, generator)
            self._state = None

        self._step_index += 1
        prev_sample, denoised = prev_sample.to(model_output.dtype), denoised.to(model_output.dtype)
        if not return_dict:
            return prev_sample, denoised
        return EDMHeunSchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)

    def _churn(self, sample: torch.Tensor, next_call: int, generator: torch.Generator | None) -> torch.Tensor:
        """x_{i+1} -> x̂_{i+1} = x_{i+1} + √(t̂² − t²)·S_noise·ε, when the next call is at t̂_{i+1} > t_{i+1}."""
        if next_call >= len(self.sigmas):
            return sample
        t, t_hat = self.noise_levels[next_call // 2], self.sigmas[next_call]
        if t_hat <= t:
            return sample
        noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        return sample + (t_hat**2 - t**2).sqrt() * self.config.s_noise * noise
