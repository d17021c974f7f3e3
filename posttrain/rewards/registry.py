"""Build a reward from config: a built-in name with parameters, or ``module:function``.

Built-ins: ``math``, ``code``, ``format``, ``length``, ``composite``, ``reasoning_gym`` and
``model`` (a learned reward model, ``posttrain.rewards.model.ModelReward``). Each is imported only when used. A
spec is a name, or a mapping with ``name`` and its parameters (flat, or under ``params``)::

    build_reward("math")
    build_reward({"name": "format", "required_tags": ["think", "answer"]})
    build_reward({"name": "my_rewards:brevity", "params": {"limit": 50}})

For ``module:attr`` user code: with parameters ``attr(**params)`` must return the reward;
without, a class is instantiated and a function is the reward itself. Three calling
conventions, told apart by the signature (``calling_convention``):

- posttrain's ``fn(prompts, completions, metadata)`` (exactly these three parameters): may
  return a ``RewardOutput`` or a plain list of floats (wrapped, component = the name);
- TRL's (a ``completions`` parameter or ``**kwargs``, typically ``fn(completions, **kwargs)`` or
  ``fn(prompts, completions, ground_truth, **kwargs)``): keyword arguments ``prompts``,
  ``completions`` and one list per other column of the rows; returns floats or None
  (``TRLReward``; TRL GRPO trainer docs, "Using a custom reward function",
  https://huggingface.co/docs/trl/grpo_trainer#using-a-custom-reward-function);
- veRL's ``compute_score(data_source, solution_str, ground_truth, extra_info)`` (a
  ``solution_str`` parameter): called once per completion, ``ground_truth`` the row's
  ``answer`` (or ``reward_model.ground_truth``), ``data_source`` and ``extra_info`` its columns;
  returns a number or a dict with ``score`` (``VerlReward``; veRL docs, "Implement Reward
  Function for Dataset", https://verl.readthedocs.io/en/latest/preparation/reward_function.html).
  The batched form ``(data_sources, solution_strs, ground_truths, extra_infos)`` is called
  once per batch and returns one score per completion.

Any other signature is refused when the reward is built, in one line showing it and these forms.

**Correctness.** ``math``, ``code`` and ``reasoning_gym`` are correctness checks: their output's
``correct`` says per sample whether the answer was right (all tests passed), and accuracy
(``acc``, ``eval/acc``, ``posttrain eval``'s ``accuracy``) is the share of correct samples.
``format``, ``length`` and ``model`` are not: a reward made only of them has no accuracy. A
``module:function`` reward declares that its score is a correctness check with
``correctness: true`` beside its name (in a composite, in its term); a sample is then correct
when it scores 1.0 or more::

    build_reward({"name": "my_rewards.py:exact_match", "correctness": True})

A posttrain-style function may instead return ``RewardOutput(..., correct=[...])`` itself.

``reward_fields(spec)`` says which row fields a reward reads, so the RL prompt audit can
refuse rows that lack them before any model loads.

``preflight: false`` beside a reward's name (or in a composite's term) is the pre-flight's
setting, taken out here: that reward is not called on sample rows before training
(``rewards.preflight``).

Contract for ``model`` (and any class registered here): ``Cls(**params)`` builds a callable
``(prompts, completions, metadata) -> RewardOutput``; parameter errors raise ``ConfigError``
whose message starts with the parameter name.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
from typing import Any, Mapping, Sequence

from posttrain.config import plain_reward_spec
from posttrain.errors import ConfigError
from posttrain.plugins import load_object, split_path
from posttrain.rewards.output import RewardFn, RewardOutput, as_reward_output, check_batch, correct_at_full_score
from posttrain.rewards.composite import CompositeReward, CompositeTerm

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
    """A user callable whose output is normalised to ``RewardOutput``; ``correctness``: its
    score is a correctness check (correct at 1.0 or more) unless its output says otherwise.

    >>> exact = lambda prompts, completions, metadata: [float(c == m["answer"]) for c, m in zip(completions, metadata)]
    >>> UserReward(exact, "exact", correctness=True)(["q", "q"], ["4", "5"], [{"answer": "4"}] * 2).correct
    [True, False]
    >>> UserReward(exact, "exact")(["q"], ["4"], [{"answer": "4"}]).correct is None
    True
    """

    def __init__(self, fn, name: str, correctness: bool = False):
        self.fn, self.name, self.correctness = fn, name, correctness

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[dict] | None = None):
        metadata = check_batch(prompts, completions, metadata)
        out = as_reward_output(self.fn(prompts, completions, metadata), self.name, len(completions))
        return declared_correctness(out, self.correctness)


def declared_correctness(out: RewardOutput, correctness: bool) -> RewardOutput:
    """``out`` with ``correct`` read from its scores when the reward was declared a correctness
    check and did not say per sample itself."""
    if correctness and out.correct is None:
        out.correct = correct_at_full_score(out.scores)
    return out


TRL_ARGUMENTS = ("prompts", "completions", "completion_ids", "trainer_state")
logger = logging.getLogger(__name__)


class TRLReward:
    """A reward function written for TRL's ``GRPOTrainer``, called the way TRL calls it.

    ``fn(prompts=..., completions=..., **columns)``: ``columns`` holds one list per field of
    the rows' metadata (every field but the prompt, None where a row lacks it); a function
    without ``**kwargs`` gets only the columns it names. A row whose prompt was a list of
    messages is *conversational* (TRL's word): its prompt is passed as those messages and its
    completion as ``[{"role": "assistant", "content": text}]``; otherwise both are strings. The
    function returns one float per completion, or None where it does not apply: that sample
    scores 0.0 (TRL sums rewards with nansum, so None adds nothing) and is counted in
    ``details``. Not passed: ``completion_ids`` and ``trainer_state`` (the reward sees text).

    >>> def correct(completions, ground_truth, **kwargs):
    ...     return [1.0 if c[0]["content"] == g else 0.0 for c, g in zip(completions, ground_truth)]
    >>> from posttrain.rewards.output import PromptText
    >>> prompts = [PromptText("2+2?", [{"role": "user", "content": "2+2?"}])] * 2
    >>> TRLReward(correct, "correct")(prompts, ["4", "5"], [{"ground_truth": "4"}] * 2).scores
    [1.0, 0.0]
    """

    def __init__(self, fn, name: str, correctness: bool = False):
        self.fn, self.name, self.correctness = fn, name, correctness
        parameters = _parameters(fn)
        self.takes_any = parameters is None or any(p.kind == p.VAR_KEYWORD for p in parameters.values())
        self.names = set(parameters or ())

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[dict] | None = None):
        metadata = check_batch(prompts, completions, metadata)
        messages = [getattr(prompt, "messages", None) for prompt in prompts]
        arguments: dict[str, Any] = {
            "prompts": [m if m is not None else str(p) for p, m in zip(prompts, messages)],
            "completions": [[{"role": "assistant", "content": c}] if m is not None else c
                            for c, m in zip(completions, messages)],
        }
        columns = dict.fromkeys(key for meta in metadata for key in meta if key not in TRL_ARGUMENTS)
        for key in columns:
            if self.takes_any or key in self.names:
                arguments[key] = [meta.get(key) for meta in metadata]
        if not self.takes_any:
            arguments = {key: value for key, value in arguments.items() if key in self.names}
        values = self.fn(**arguments)
        if values is None or not hasattr(values, "__len__") or len(values) != len(completions):
            got = "None" if values is None else f"{len(values)} values" if hasattr(values, "__len__") else type(values).__name__
            raise ValueError(f"reward {self.name!r} returned {got} for a batch of {len(completions)} completions")
        scores = [0.0 if value is None else float(value) for value in values]
        unscored = sum(value is None for value in values)
        if unscored:
            logger.debug("reward %r returned None for %d of %d completions (scored 0)", self.name, unscored, len(values))
        details = [{"reward_none": True} if value is None else {} for value in values]
        return declared_correctness(RewardOutput(scores, {self.name: list(scores)}, details=details), self.correctness)


def _parameters(fn) -> Mapping[str, inspect.Parameter] | None:
    try:
        return inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None


def is_trl_style(fn) -> bool:
    """True when ``fn`` is called TRL's way (``calling_convention(fn) == "trl"``)."""
    return calling_convention(fn) == "trl"


ACCEPTED_FORMS = ("posttrain fn(prompts, completions, metadata) -> RewardOutput | list[float]; "
                  "TRL fn(prompts, completions, **kwargs) -> list[float | None]; "
                  "veRL compute_score(data_source, solution_str, ground_truth, extra_info) -> float | dict with 'score'")


def calling_convention(fn) -> str | None:
    """How a user reward is called, read from its signature: ``"posttrain"`` (exactly
    ``prompts, completions, metadata``; also a callable whose signature cannot be read),
    ``"verl"`` (a ``solution_str`` parameter), ``"verl_batch"`` (``solution_strs``), ``"trl"``
    (a ``completions`` parameter, or ``**kwargs``), else None (refused by ``build_reward``).

    >>> calling_convention(lambda prompts, completions, metadata: [])
    'posttrain'
    >>> calling_convention(lambda data_source, solution_str, ground_truth, extra_info=None: 0.0)
    'verl'
    >>> calling_convention(lambda completions, **kwargs: []), calling_convention(lambda text: 0.0)
    ('trl', None)
    """
    parameters = _parameters(fn)
    if parameters is None:
        return "posttrain"
    positional = [name for name, p in parameters.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    has_kwargs = any(p.kind == p.VAR_KEYWORD for p in parameters.values())
    if positional == ["prompts", "completions", "metadata"] and not has_kwargs:
        return "posttrain"
    if "solution_str" in parameters:
        return "verl"
    if "solution_strs" in parameters:
        return "verl_batch"
    if has_kwargs or "completions" in parameters:
        return "trl"
    return None


def signature_text(fn) -> str:
    """``fn``'s parameters as written, for error messages (``(x, y=1)``)."""
    try:
        return str(inspect.signature(fn))
    except (TypeError, ValueError):
        return "(?)"


VERL_ARGUMENTS = ("data_source", "solution_str", "ground_truth", "extra_info")


def verl_ground_truth(meta: Mapping[str, Any]) -> Any:
    """The ``ground_truth`` veRL passes for a row: its ``answer``, else ``reward_model.ground_truth``.

    >>> verl_ground_truth({"reward_model": {"ground_truth": "72"}}), verl_ground_truth({"answer": 4})
    ('72', 4)
    """
    if meta.get("answer") is not None:
        return meta["answer"]
    reward_model = meta.get("reward_model")
    return reward_model.get("ground_truth") if isinstance(reward_model, Mapping) else None


class VerlReward:
    """A veRL ``compute_score`` (``custom_reward_function.path`` + ``.name`` in veRL), called the
    way veRL's reward manager calls it: with keyword arguments ``data_source`` (the row's
    ``data_source``), ``solution_str`` (the completion), ``ground_truth`` (``verl_ground_truth``)
    and ``extra_info`` (the row's ``extra_info``), each only if the function takes it (all with
    ``**kwargs``). Once per completion; with ``batched`` (the ``solution_strs`` form) once per
    batch with the plural names and lists. A result is a number or a dict whose ``score`` is one
    (its other entries go to ``details``).

    >>> def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    ...     return {"score": float(solution_str.strip() == ground_truth), "source": data_source}
    >>> out = VerlReward(compute_score, "compute_score")(["2+2?"] * 2, ["4", "5"], [{"answer": "4", "data_source": "toy"}] * 2)
    >>> out.scores, out.details[0]
    ([1.0, 0.0], {'source': 'toy'})
    """

    def __init__(self, fn, name: str, correctness: bool = False, batched: bool = False):
        self.fn, self.name, self.correctness, self.batched = fn, name, correctness, batched
        parameters = _parameters(fn) or {}
        takes_any = any(p.kind == p.VAR_KEYWORD for p in parameters.values())
        names = [n + "s" if batched else n for n in VERL_ARGUMENTS]
        self.arguments = [n for n in names if takes_any or n in parameters]

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[dict] | None = None):
        metadata = check_batch(prompts, completions, metadata)
        columns = {"data_source": [m.get("data_source") for m in metadata], "solution_str": list(completions),
                   "ground_truth": [verl_ground_truth(m) for m in metadata],
                   "extra_info": [m.get("extra_info") for m in metadata]}
        if self.batched:
            values = self.fn(**{n: columns[n[:-1]] for n in self.arguments})
            if values is None or not hasattr(values, "__len__") or len(values) != len(completions):
                got = "None" if values is None else f"{len(values)} values" if hasattr(values, "__len__") else type(values).__name__
                raise ValueError(f"reward {self.name!r} returned {got} for a batch of {len(completions)} completions")
        else:
            values = [self.fn(**{n: columns[n][i] for n in self.arguments}) for i in range(len(completions))]
        scores, details = [], []
        for value in values:
            score, detail = _verl_score(value, self.name)
            scores.append(score)
            details.append(detail)
        return declared_correctness(RewardOutput(scores, {self.name: list(scores)}, details=details), self.correctness)


def _verl_score(value: Any, name: str) -> tuple[float, dict]:
    """``(score, details)`` of one veRL result: a number, or a dict with a numeric ``score``."""
    detail: dict = {}
    if isinstance(value, Mapping):
        if "score" not in value:
            raise ValueError(f"reward {name!r} returned a dict without 'score' (keys: {', '.join(map(str, value))})")
        detail = {k: v for k, v in value.items() if k != "score"}
        value = value["score"]
    if not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise ValueError(f"reward {name!r} returned {value!r}, not a number or a dict with a numeric 'score'")
    return float(value), detail


def reward_fields(spec: Any, key: str = "reward") -> dict[str, str]:
    """``{field: reward name}``: the row fields the reward ``spec`` reads and cannot score without,
    found without building it (a ``model`` reward would load a model). ``math`` reads its
    ``answer_key``, ``code`` its ``tests_key``, a composite what its terms read, a TRL-style
    function the columns it names without a default; anything else: nothing declared.

    >>> reward_fields({"name": "composite", "terms": {"math": {}, "format": {"pattern": "x"}}})
    {'answer': 'math'}
    """
    name, params = _split_spec(spec, key)
    params.pop("correctness", None)
    params.pop("preflight", None)
    if name == "composite":
        found: dict[str, str] = {}
        for term_name, term in (params.get("terms") or {}).items():
            term = dict(term or {})
            term.pop("weight", None)
            found.update(reward_fields({"name": term.pop("reward", None) or term_name, **term}, f"{key}.terms.{term_name}"))
        return found
    if name == "math":
        return {str(params.get("answer_key", "answer")): name}
    if name == "code":
        return {str(params.get("tests_key", "tests")): name}
    if ":" in name and not params:
        target = _import(name, key)
        convention = calling_convention(target) if callable(target) and not inspect.isclass(target) else None
        short = name.rpartition(":")[2]
        if convention == "trl":
            return {field: short for field, p in (_parameters(target) or {}).items()
                    if field not in TRL_ARGUMENTS and p.default is p.empty
                    and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if convention in ("verl", "verl_batch"):
            return {"answer": short}  # ground_truth: the row's answer (reward_model.ground_truth is read as it)
    return {}


def _split_spec(spec: Any, key: str) -> tuple[str, dict]:
    spec = plain_reward_spec(spec)  # config.RewardSpec: back to what the user wrote
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
    """The object ``module:function`` / ``file.py:function`` names (``posttrain.plugins``, the
    resolver ``agent.tools`` and ``agent.environment`` use too); errors start with ``<key>.name``."""
    if split_path(path) is None:
        raise ConfigError(f"{key}.name: {path!r} is neither a built-in reward {sorted(BUILTIN_REWARDS)} nor 'module:function'")
    return load_object(path, f"{key}.name")


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
    posttrain.errors.ConfigError: reward.extrct: unknown parameter for reward 'math' (known: answer_key, extract, name, use_math_verify, verify_seconds)
    """
    name, params = _split_spec(spec, key)
    correctness = _correctness_declared(name, params, key)
    if not isinstance(params.pop("preflight", None), (bool, type(None))):
        raise ConfigError(f"{key}.preflight: true or false")
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
    short = name.rpartition(":")[2].rpartition(".")[2]
    convention = calling_convention(built)
    if convention is None:
        raise ConfigError(f"{key}.name: {name} takes {signature_text(built)}, which is no reward calling convention "
                          f"posttrain knows; accepted: {ACCEPTED_FORMS}")
    if convention == "trl":
        return TRLReward(built, short, correctness)
    if convention in ("verl", "verl_batch"):
        return VerlReward(built, short, correctness, batched=convention == "verl_batch")
    return UserReward(built, short, correctness)


def _correctness_declared(name: str, params: dict, key: str) -> bool:
    """The ``correctness`` a ``module:function`` reward's spec declares (taken out of its
    parameters); built-in rewards declare their own and refuse the key."""
    if "correctness" not in params:
        return False
    declared = params.pop("correctness")
    if name in BUILTIN_REWARDS:
        raise ConfigError(f"{key}.correctness: reward {name!r} declares its own (math, code and reasoning_gym "
                          "check correctness; format, length and model do not); the key is for module:function rewards")
    if not isinstance(declared, bool):
        raise ConfigError(f"{key}.correctness: true or false, not {declared!r}")
    return declared


def _build_composite(params: dict, key: str) -> RewardFn:
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
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight):
            raise ConfigError(f"{term_key}.weight: must be a finite number, not {weight!r}")
        reward_name = term_spec.pop("reward", None) or term_name
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
