"""Cross-check posttrain's policy losses against veRL's ``core_algos`` on the same tensors.

    python benchmarks/crosscheck_policy_losses.py          (make crosscheck)

veRL (https://github.com/volcengine/verl, ``verl/trainer/ppo/core_algos.py``) registers its
policy losses by name (``vanilla``, ``gspo``, ``cispo``). This script installs the veRL
wheel without its dependencies into a private folder (``--target``; nothing enters the
project's environment), imports ``core_algos``, and compares loss values and gradients with
posttrain's on random padded batches of unequal sequence lengths, for every
``loss_agg_mode`` both projects name the same way.

veRL's module imports packages its loss functions never call (Ray, tensordict, ...); those
import names are satisfied by empty modules here, so only the code under comparison runs.
Known convention differences, stated in the output:
- veRL's ``gspo`` is the GSPO-token form (sg[s_i] * pi / sg[pi]); posttrain has both levels.
  With one advantage per sequence they agree in value and gradient.
- veRL clamps GSPO's log-ratio at +10 only and CISPO's / PPO's at [-20, 20]; posttrain
  clamps every token log-ratio at [-20, 20]. The random ratios here stay far inside both.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import os
import subprocess
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from posttrain.algorithms.aggregate import count_trained_padded  # noqa: E402
from posttrain.algorithms.policy import cispo_policy_loss, gspo_policy_loss, ppo_policy_loss  # noqa: E402

VERL_PACKAGES = ["verl==0.9.1", "omegaconf==2.4.0", "antlr4-python3-runtime==4.9.3", "orjson"]
UNUSED_IMPORTS = {"ray", "tensordict", "codetiming", "hydra", "pylatexenc", "wandb", "torchdata",
                  "datasets", "peft", "accelerate", "math_verify", "tensorboard", "mlflow", "swanlab"}
MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


class _EmptyModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Import hook: the names in ``UNUSED_IMPORTS`` (and their submodules) load as empty
    modules whose attributes are inert placeholders, so veRL's module-level imports succeed."""

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in UNUSED_IMPORTS:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []

        def placeholder(attr):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return type(attr, (), {"__init__": lambda self, *a, **k: None,
                                   "__call__": lambda self, *a, **k: a[0] if a else None})
        module.__getattr__ = placeholder
        return module

    def exec_module(self, module):
        return None


def install_verl(target: Path) -> None:
    if (target / "verl" / "trainer" / "ppo" / "core_algos.py").exists():
        return
    print(f"installing {' '.join(VERL_PACKAGES)} into {target} (no dependencies)", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                    "--target", str(target), *VERL_PACKAGES], check=True)


def load_verl(target: Path):
    sys.meta_path.insert(0, _EmptyModules())
    sys.path.insert(0, str(target))
    from verl.trainer.ppo import core_algos
    from verl.workers.config import ActorConfig
    return core_algos, ActorConfig


def random_batch(seed: int, batch: int = 6, length: int = 9):
    """Padded [B, T] log-probs (current/old), per-sequence advantages, right-padded masks of
    unequal lengths (1..T)."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, length, generator=g) * 3.0
    sequence_shift = torch.randn(batch, 1, generator=g) * 0.3  # so sequence ratios clip too
    logp = old + sequence_shift + torch.randn(batch, length, generator=g) * 0.4
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).float()
    adv = torch.randn(batch, 1, generator=g).expand(batch, length).contiguous()
    return logp, old, adv, mask


def value_and_grad(fn, logp):
    """``fn(logp) -> (loss, metrics)``: the loss, its gradient w.r.t. logp, and the metrics."""
    leaf = logp.clone().requires_grad_()
    loss, metrics = fn(leaf)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad, metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=os.path.join(os.environ.get("POSTTRAIN_CACHE", Path.home() / ".cache/posttrain"),
                                                         "crosscheck-verl"))
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    target = Path(args.target)
    install_verl(target)
    core_algos, ActorConfig = load_verl(target)

    clip_low, clip_high = 0.2, 0.28
    rows = []
    worst = 0.0
    for loss_name in ("vanilla", "gspo", "cispo"):
        verl_fn = core_algos.get_policy_loss_fn(loss_name)
        for mode in MODES:
            max_value, max_grad, clip_fracs = 0.0, 0.0, []
            for seed in range(args.seeds):
                logp, old, adv, mask = random_batch(seed)
                tokens, sequences = count_trained_padded(mask)
                config = ActorConfig(strategy="fsdp", clip_ratio=clip_low, clip_ratio_low=clip_low,
                                     clip_ratio_high=clip_high, clip_ratio_c=3.0, loss_agg_mode=mode,
                                     ppo_micro_batch_size_per_gpu=1, rollout_n=1,
                                     global_batch_info={"dp_size": 1, "batch_num_tokens": tokens,
                                                        "global_batch_size": sequences})
                ours_kw = dict(loss_agg_mode=mode, step_trained_tokens=tokens, step_sequences=sequences)
                if loss_name == "vanilla":
                    ours = lambda lp: ppo_policy_loss(lp, old, adv, mask, clip_low=clip_low, clip_high=clip_high,
                                                      dual_clip_c=3.0, **ours_kw)
                elif loss_name == "gspo":
                    ours = lambda lp: gspo_policy_loss(lp, old, adv, mask, clip_low=clip_low, clip_high=clip_high,
                                                       importance_level="sequence", **ours_kw)
                else:
                    ours = lambda lp: cispo_policy_loss(lp, old, adv, mask, clip_low=clip_low, clip_high=clip_high,
                                                        **ours_kw)
                theirs = lambda lp: verl_fn(old, lp, adv, mask, loss_agg_mode=mode, config=config)
                v_ours, g_ours, metrics = value_and_grad(ours, logp)
                v_theirs, g_theirs, _ = value_and_grad(theirs, logp)
                clip_fracs.append(float(metrics["clip_frac"]))
                max_value = max(max_value, abs(float(v_ours) - float(v_theirs)))
                max_grad = max(max_grad, float((g_ours - g_theirs).abs().max()))
            worst = max(worst, max_value, max_grad)
            rows.append((loss_name, mode, max_value, max_grad, sum(clip_fracs) / len(clip_fracs)))

    print(f"veRL core_algos vs posttrain.algorithms.policy: {args.seeds} random batches each, "
          f"B=6 sequences of 1..9 tokens, clip {clip_low}/{clip_high}")
    print(f"{'veRL loss':<10} {'loss_agg_mode':<22} {'max |loss diff|':>16} {'max |grad diff|':>16} {'clipped tokens':>15}")
    for name, mode, dv, dg, clipped in rows:
        print(f"{name:<10} {mode:<22} {dv:>16.2e} {dg:>16.2e} {clipped:>14.0%}")
    print("posttrain counterparts: vanilla = ppo_policy_loss (dual clip c=3), gspo = gspo_policy_loss "
          "(sequence level; veRL's form is GSPO-token, equal with per-sequence advantages), cispo = cispo_policy_loss")
    if worst > 1e-5:
        raise SystemExit(f"MISMATCH: largest difference {worst:.2e} > 1e-5")
    print(f"agree: largest difference {worst:.2e}")


if __name__ == "__main__":
    main()
