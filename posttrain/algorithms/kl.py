"""KL divergence to a frozen reference policy: per-token estimators and the coefficient.

A KL penalty keeps the policy near the SFT model (Ouyang et al. 2022; Shao et al. 2024). The
tokens are sampled from the current policy pi, so KL(pi || pi_ref) = E_pi[log pi - log
pi_ref] is estimated per token from the two log-probs of the sampled token (Schulman,
"Approximating KL Divergence", 2020 blog post; r = pi_ref / pi):

- ``k1`` = log pi - log pi_ref = -log r          unbiased, high variance, can be negative
- ``k2`` = 0.5 * (log r)^2                        biased, low variance, >= 0
- ``k3`` = (r - 1) - log r                         unbiased, low variance, >= 0
  (GRPO uses k3 as a loss term: Shao et al. 2024, DeepSeekMath, eq. 4)

Use it either as a reward penalty (``advantages.AdvantageOptions.kl_coef``: per token for PPO
and REINFORCE++, summed per sequence for the group estimators) or as a loss term aggregated with ``aggregate`` (GRPO). The coefficient is a
``FixedKLController`` or the ``AdaptiveKLController`` of Ziegler et al. 2019 ("Fine-Tuning
Language Models from Human Preferences", §2.2), both with ``state_dict`` for exact resume.

Imports only torch.
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    estimator: str = "k3",
    *,
    clamp: float | None = None,
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) at the sampled tokens.

    Args:
        logp: [B, T] (any shape) log pi(token) under the current policy (may carry grad).
        ref_logp: same shape, log pi_ref(token) under the frozen reference (no grad needed).
        estimator: ``k1``, ``k2`` or ``k3`` (see module docstring).
        clamp: if given, the estimate is clamped to [-clamp, clamp] (veRL's ``low_var_kl``
            uses k3 clamped at 10); a clamped token gets zero gradient. Deviation from the
            blog: the clamp is a safety net against exp overflow when pi_ref >> pi.

    Returns:
        float32 tensor of the input shape; masking and aggregation are the caller's.
        Gradient w.r.t. logp: k1 -> 1, k2 -> log(pi/pi_ref), k3 -> 1 - pi_ref/pi.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"KL estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    log_ratio = ref_logp.float() - logp.float()  # log r, r = pi_ref / pi
    if estimator == "k1":
        kl = -log_ratio
    elif estimator == "k2":
        kl = 0.5 * log_ratio**2
    else:
        kl = torch.exp(log_ratio) - log_ratio - 1.0
    if clamp is not None:
        kl = kl.clamp(min=-clamp, max=clamp)
    return kl


class FixedKLController:
    """A constant KL coefficient (beta), with the same interface as the adaptive one."""

    def __init__(self, coef: float):
        if coef < 0:
            raise ValueError(f"KL coefficient must be >= 0, got {coef}")
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        """No change; returns the coefficient."""
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. 2019 adaptive KL coefficient: steer the measured KL to a target.

    e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n_steps / horizon)

    ``n_steps`` is how many samples (responses) the measured KL is based on, so the
    coefficient moves by about ``e`` per ``horizon`` samples whatever the batch size
    (the paper writes K_beta = 0.1 per step; the horizon form is its released code's).
    """

    def __init__(self, init_coef: float, target_kl: float, horizon: float):
        if init_coef < 0 or target_kl <= 0 or horizon <= 0:
            raise ValueError(
                f"adaptive KL needs init_coef >= 0, target_kl > 0, horizon > 0; got "
                f"{init_coef}, {target_kl}, {horizon}")
        self.value = float(init_coef)
        self.target_kl = float(target_kl)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Adjust beta from the KL measured on the last batch; returns the new beta."""
        proportional_error = min(max(float(current_kl) / self.target_kl - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "target_kl": self.target_kl, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
        self.target_kl = float(state["target_kl"])
        self.horizon = float(state["horizon"])


def make_kl_controller(
    init_coef: float, *, target_kl: float | None = None, horizon: float | None = None
) -> FixedKLController | AdaptiveKLController:
    """Adaptive controller when ``target_kl`` is given (then ``horizon`` is required),
    otherwise a fixed one."""
    if target_kl is None:
        return FixedKLController(init_coef)
    if horizon is None:
        raise ValueError("adaptive KL controller needs a horizon")
    return AdaptiveKLController(init_coef, target_kl, horizon)
