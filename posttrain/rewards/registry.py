"""Build a reward from config: a built-in name with parameters, or ``module:function``.

Built-ins: ``math``, ``code``, ``format``, ``length``, ``composite``, ``reasoning_gym`` and
``model`` (a learned reward model, ``posttrain.rewards.model.ModelReward``). Each is imported only when used. A
spec is a name, or a mapping with ``name`` and its parameters (flat, or under ``params``)::

    build_reward("math")
    build_reward({"name": "format", "required_tags": ["think", "answer"]})
    build_reward({"name": "my_rewards:brevity", "params": {"limit": 50}})

For ``module:attr`` user code: with parameters ``attr(**params)`` must return the reward;
without, a class is instantiated and a function is the reward itself. User rewards may
return a ``RewardOutput`` or a plain list of floats (wrapped, component = the name).

Contract for ``model`` (and any class registered here): ``Cls(**params)`` builds a callable
``(prompts, completions, metadata) -> RewardOutput``; parameter errors raise ``ConfigError``
whose message starts with the parameter name.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any, Mapping, Sequence

from posttrain.errors import ConfigError
from posttrain.rewards.output import RewardFn, as_reward_output, check_batch

BUILTIN_REWARDS = {
    "math": "posttrain.rewards.math:MathReward",
    "code": "posttrain.rewards.code:CodeReward",
    "format": "posttrain.rewards.format:FormatReward",
    "length": "posttrain.rewards.length:LengthReward",
    "composite": "posttrain.rewards.composite:CompositeReward",
    "reasoning_gym": "posttrain.rewards.reasoning_gym:ReasoningGymReward",
    "model": "posttrain.rewards.model:ModelReward",
}


class UserReward:
    """A user callable whose output is normalised to ``RewardOutput``."""

    def __init__(self, fn, name: str):
        self.fn, self.name = fn, name

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[dict] | None = None):
        metadata = check_batch(prompts, completions, metadata)
        return as_reward_output(self.fn(prompts, completions, metadata), self.name, len(completions))


def _split_spec(spec: Any, key: str) -> tuple[str, dict]:
    if hasattr(spec, "model_dump"):
        spec = spec.model_dump()
    if isinstance(spec, str):
        return spec, {}
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ConfigError(f"{key}: a reward is a name or a mapping with 'name' (got {spec!r})")
    params = dict(spec.get("params") or {})
    if not isinstance(spec.get("params") or {}, Mapping):
        raise ConfigError(f"{key}.params: must be a mapping")
    for k, v in spec.items():
        if k not in ("name", "params"):
            params[k] = v
    return str(spec["name"]), params


def _import(path: str, key: str):
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{key}.name: {path!r} is neither a built-in reward {sorted(BUILTIN_REWARDS)} nor 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{key}.name: cannot import {module_name!r} ({e})") from None
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise ConfigError(f"{key}.name: module {module_name!r} has no attribute {attr!r}") from None
    return obj


def _known_params(target) -> set[str] | None:
    if dataclasses.is_dataclass(target):
        return {f.name for f in dataclasses.fields(target) if f.init}
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return {n for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _construct(target, params: dict, name: str, key: str):
    known = _known_params(target)
    if known is not None:
        for p in params:
            if p not in known:
                raise ConfigError(f"{key}.{p}: unknown parameter for reward {name!r} (known: {', '.join(sorted(known))})")
    try:
        return target(**params)
    except ConfigError as e:
        raise ConfigError(f"{key}.{e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key}: invalid parameters for reward {name!r} ({e})") from None


def build_reward(spec: Any, key: str = "reward") -> RewardFn:
    """Build the reward callable ``spec`` describes; ``key`` names it in error messages.

    >>> build_reward({"name": "math", "extract": ["hash"]})(["q"], ["#### 3"], [{"answer": 3}]).scores
    [1.0]
    >>> build_reward({"name": "math", "extrct": ["hash"]})
    Traceback (most recent call last):
    posttrain.errors.ConfigError: reward.extrct: unknown parameter for reward 'math' (known: answer_key, extract, name, use_math_verify)
    """
    name, params = _split_spec(spec, key)
    if name == "composite":
        return _build_composite(params, key)
    if name in BUILTIN_REWARDS:
        try:
            target = _import(BUILTIN_REWARDS[name], key)
        except ConfigError:
            raise ConfigError(f"{key}.name: reward {name!r} is not available in this installation") from None
        return _construct(target, params, name, key)
    if ":" not in name:
        raise ConfigError(f"{key}.name: unknown reward {name!r}; built-ins: {', '.join(sorted(BUILTIN_REWARDS))}, or 'module:function'")
    target = _import(name, key)
    if params:
        built = _construct(target, params, name, key)
    elif inspect.isclass(target):
        built = _construct(target, {}, name, key)
    else:
        built = target
    if not callable(built):
        raise ConfigError(f"{key}.name: {name!r} did not give a callable reward")
    return UserReward(built, name.rpartition(":")[2].rpartition(".")[2])


def _build_composite(params: dict, key: str) -> RewardFn:
    from posttrain.rewards.composite import CompositeReward, CompositeTerm

    terms_spec = params.pop("terms", None)
    if params:
        raise ConfigError(f"{key}.{sorted(params)[0]}: unknown parameter for reward 'composite' (known: terms)")
    if not isinstance(terms_spec, Mapping) or not terms_spec:
        raise ConfigError(f"{key}.terms: a composite reward needs a mapping of named terms")
    terms = []
    for term_name, term_spec in terms_spec.items():
        term_key = f"{key}.terms.{term_name}"
        term_spec = dict(term_spec or {})
        weight = term_spec.pop("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            raise ConfigError(f"{term_key}.weight: must be a number, not {weight!r}")
        reward_name = term_spec.pop("reward", term_name)
        term_spec.setdefault("params", {})
        spec = {"name": reward_name, **term_spec}
        reward = build_reward(spec, term_key)
        if hasattr(reward, "name") and isinstance(getattr(reward, "name"), str) and not isinstance(reward, UserReward):
            try:
                reward.name = term_name
            except AttributeError:
                pass
        terms.append(CompositeTerm(term_name, float(weight), reward))
    return CompositeReward(terms)
