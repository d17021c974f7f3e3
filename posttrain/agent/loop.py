"""The engine-agnostic turn loop of agentic RL: generate, parse tool calls, run them (all live
trajectories at once), append their outputs as env tokens, generate again.

One tokenisation: sampled ids are kept exactly as the engine returned them (decoded only to
parse calls and for reward/log text, never re-encoded); env text is tokenised once, when it is
appended; each turn's input is the concatenation of every segment so far.

Turns. The first turn is one ``generate`` call on the prompts with ``n = params.n``; every
later turn is one call per distinct per-turn budget (usually one) on the full ids of each
live trajectory with ``n = 1`` and ``seed = params.seed + turn``. ``turns`` counts a
trajectory's generate calls.

Budget (``max_total_tokens``: response tokens, sampled + env). Each turn asks for
``min(max_new_tokens, tokens left)``. A tool output is first cut to ``max_tool_output_tokens``
(``truncate_to_tokens``, head and tail kept); if the env segment then does not leave the
model at least one token, it is NOT appended (a cut template header would be malformed and
the model could not answer anyway) and the trajectory ends with ``length``.

Turn ends. ``stop``: the model ended its turn with an end-of-turn token (an id the engine or
the tokenizer lists as EOS) and made no call (``inline``: an unclosed block there counts a
tool error and still ends ``stop``). An engine ``length`` without a call ends ``length``. In
``inline``, a turn that stopped on the stop string outside a ```python block continues in
the next turn with no env segment. A turn with calls past ``max_turns`` or ``max_tool_calls``
ends with that reason and its calls are not run. An environment's ``done`` ends ``stop``
without appending that last observation.

Tool formats (``agent.tool_format``) are the entries of ``TOOL_FORMATS``: each says how a
turn's calls are read, how a tool's output is laid out as env text, how calls are cut out of
the final answer, and whether the prompt announces the tools' schemas. ``inline`` (ReTool
style, ``data/inline.py``): a closed ```python block is the call, an ``<output>`` block the
output. ``chat_template`` env segment: the text the chat template adds after the assistant's
end-of-turn token for the tool messages plus the next generation prompt, as a difference of
two renders (``chat_env_text``); it includes the newline many templates write after
``<|im_end|>``, which the model never sampled.
"""

from __future__ import annotations

import copy
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from posttrain.agent.tools import (
    ToolBox,
    ToolCall,
    error_text,
    load_environment,
    parallel_map,
    parse_chat_calls,
    parse_inline,
    truncate_to_tokens,
)
from posttrain.agent.trajectory import Segment, Trajectory, answer_from_tool, answer_text, call_source
from posttrain.data import inline
from posttrain.data.render import defuse_special_tokens
from posttrain.errors import ConfigError
from posttrain.rollout.base import Completion, SamplingParams


@dataclass
class AgentLimits:
    """Per-trajectory limits; ``max_total_tokens`` counts response tokens (sampled + env)."""

    max_turns: int = 4
    max_tool_calls: int = 4
    max_total_tokens: int = 512
    max_new_tokens: int = 256
    max_tool_output_tokens: int = 128
    tool_concurrency: int = 4
    tool_timeout: float = 5.0

    def __post_init__(self) -> None:
        for key, value in vars(self).items():
            if value <= 0 and not (key == "max_tool_calls" and value == 0):
                raise ConfigError(f"agent.{key}: must be positive, got {value}")


@dataclass
class AgentPrompt:
    """A rendered prompt (its chat template rendered with the tools' schemas for
    ``chat_template``), the conversation it came from, and its data row (for environments)."""

    prompt_ids: list[int]
    messages: list[dict]
    row: dict = field(default_factory=dict)


@dataclass
class _Run:
    """One live trajectory and what belongs to it alone: tool state (sessions) and env;
    ``read``: (source, output) of each successful call whose output entered the context;
    ``unanswered``: its last call never got an output (a limit, or the budget)."""

    traj: Trajectory
    state: dict = field(default_factory=dict)
    env: Any = None
    end_of_turn: str = ""
    read: list[tuple[str, str]] = field(default_factory=list)
    unanswered: bool = False

    @property
    def used(self) -> int:
        return sum(len(segment.token_ids) for segment in self.traj.segments[1:])


TurnReader = Callable[[_Run, Completion, Any, set[int], tuple[str, ...]], list[ToolCall]]
OutputLayout = Callable[[_Run, Any, list[str], list[dict], ToolBox], str]


@dataclass(frozen=True)
class ToolFormat:
    """What the turn loop asks of one tool format (a line of ``TOOL_FORMATS``).

    ``read_turn(run, completion, tokenizer, eos_ids, stop) -> calls``: records one turn on
    ``run`` (its sampled segment, its assistant message, ``turns``, a finish reason when the
    trajectory ends) and returns the calls it makes ([] when it ended or goes on without one).
    ``output_text(run, tokenizer, outputs, tool_messages, toolbox) -> str``: the env text that
    answers those calls (``outputs``: each call's output, already cut to its token budget).
    ``answer_text(text) -> str``: ``text`` with every call cut out (``trajectory.answer_text``).
    ``stop``: the stop strings the format generates with (None: the caller's).
    ``schemas_in_prompt``: the prompt is rendered with the tools' schemas (the chat template
    announces them)."""

    read_turn: TurnReader
    output_text: OutputLayout
    answer_text: Callable[[str], str]
    stop: tuple[str, ...] | None = None
    schemas_in_prompt: bool = False


def run_agent(engine, prompts: list[AgentPrompt], params: SamplingParams, *, tokenizer,
              tool_format: str, toolbox: ToolBox, limits: AgentLimits | None = None,
              environment: str | None = None) -> list[Trajectory]:
    """``params.n`` trajectories per prompt, in prompt order. ``params.max_new_tokens`` is
    replaced by the limits' per-turn clamp; a format with its own stop strings (``inline``:
    ``inline.STOP``) generates with them instead of ``params.stop``."""
    limits = limits or AgentLimits()
    if tool_format not in TOOL_FORMATS:
        raise ConfigError(f"agent.tool_format: must be {' or '.join(TOOL_FORMATS)}, not {tool_format!r}")
    form = TOOL_FORMATS[tool_format]
    env_class = load_environment(environment) if environment else None
    stop = params.stop if form.stop is None else form.stop
    eos_ids = {i for i in (*getattr(engine, "eos_ids", ()), tokenizer.eos_token_id) if i is not None}
    runs = []
    for index, prompt in enumerate(prompts):
        for _ in range(params.n):
            traj = Trajectory(index, [Segment(list(prompt.prompt_ids), "prompt")], messages=copy.deepcopy(prompt.messages))
            run = _Run(traj, env=env_class() if env_class else None)
            opening = run.env.reset(copy.deepcopy(prompt.row)) if run.env is not None else None
            if opening:  # the environment's first observation, read before the first turn
                _append_env(run, tokenizer.encode(opening, add_special_tokens=False), limits)
            runs.append(run)
    live = [run for run in runs if not run.traj.finish_reason]
    turn = 0
    while live:
        pending = []
        for run, completion in _generate_turn(engine, prompts, live, params, stop, limits, turn):
            calls = form.read_turn(run, completion, tokenizer, eos_ids, stop)
            if calls:
                if run.traj.turns >= limits.max_turns:
                    run.traj.finish_reason, run.unanswered = "max_turns", True
                elif run.traj.tool_calls + len(calls) > limits.max_tool_calls:
                    run.traj.finish_reason, run.unanswered = "max_tool_calls", True
                else:
                    pending.append((run, calls))
        _run_calls(pending, tokenizer, form, toolbox, limits)
        live = [run for run in live if not run.traj.finish_reason]
        turn += 1
    for run in runs:
        _finalise(run, tokenizer, form)
    return [run.traj for run in runs]


def _generate_turn(engine, prompts: list[AgentPrompt], live: list[_Run], params: SamplingParams, stop: tuple[str, ...],
                   limits: AgentLimits, turn: int) -> list[tuple[_Run, Completion]]:
    """One turn of generation for every live trajectory -> (run, its completion) pairs."""
    for run in live:
        if limits.max_total_tokens - run.used <= 0:
            run.traj.finish_reason = "length"
    live = [run for run in live if not run.traj.finish_reason]
    if turn == 0 and len(live) == len(prompts) * params.n and all(len(r.traj.segments) == 1 for r in live):
        budget = min(limits.max_new_tokens, limits.max_total_tokens)
        out = engine.generate([p.prompt_ids for p in prompts], replace(params, max_new_tokens=budget, stop=stop))
        by_prompt = defaultdict(list)
        for completion in out:
            by_prompt[completion.prompt_index].append(completion)
        if any(len(by_prompt[i]) != params.n for i in range(len(prompts))):
            raise RuntimeError(f"the engine returned {len(out)} completions for {len(prompts)} prompts x n={params.n}")
        return [(run, by_prompt[run.traj.prompt_index].pop(0)) for run in live]
    seed = None if params.seed is None else params.seed + turn
    groups: dict[int, list[_Run]] = defaultdict(list)
    for run in live:
        groups[min(limits.max_new_tokens, limits.max_total_tokens - run.used)].append(run)
    pairs = []
    for budget, group in sorted(groups.items(), reverse=True):
        turn_params = replace(params, n=1, max_new_tokens=budget, seed=seed, stop=stop)
        out = engine.generate([run.traj.input_ids for run in group], turn_params)
        if sorted(c.prompt_index for c in out) != list(range(len(group))):
            raise RuntimeError(f"the engine returned {len(out)} completions for {len(group)} prompts with n=1")
        pairs.extend((group[completion.prompt_index], completion) for completion in out)
    return pairs


def _inline_turn(run: _Run, completion: Completion, tokenizer, eos_ids: set[int], stop) -> list[ToolCall]:
    """Record one ``inline`` turn; its call (at most one), or [] when the trajectory ended or
    goes on without a call. Ids after the token that closes the first block are dropped."""
    traj, ids, logprobs = run.traj, list(completion.token_ids), completion.logprobs
    traj.turns += 1
    text = tokenizer.decode(ids, skip_special_tokens=True)
    call, end = parse_inline(text, f"call_{traj.tool_calls}")
    if end is not None:
        keep = _prefix_end(tokenizer, ids, text[:end])
        ids, logprobs = ids[:keep], None if logprobs is None else logprobs[:keep]
        text = tokenizer.decode(ids, skip_special_tokens=True)
    if ids:
        traj.segments.append(Segment(ids, "sampled", None if logprobs is None else list(logprobs)))
    if end is not None:
        start = text.rfind(inline.CODE_OPEN, 0, end)
        _add_assistant(traj.messages, text[:start], [call])
        return [call]
    _add_assistant(traj.messages, text, [])
    if call is not None:  # a block left open when the turn ended
        traj.tool_errors += 1
    ended_by_eos = bool(ids) and ids[-1] in eos_ids
    if completion.finish_reason == "length":
        traj.finish_reason = "length"
    elif ended_by_eos or call is not None or not ids or not any(s in text for s in stop):
        traj.finish_reason = "stop"
    return []  # stopped on the stop string outside a python block: the next turn goes on


def _chat_turn(run: _Run, completion: Completion, tokenizer, eos_ids: set[int], stop) -> list[ToolCall]:
    """Record one ``chat_template`` turn; its calls, or [] when the trajectory ended."""
    traj, ids = run.traj, list(completion.token_ids)
    traj.turns += 1
    if ids:
        logprobs = completion.logprobs
        traj.segments.append(Segment(ids, "sampled", None if logprobs is None else list(logprobs)))
    text = tokenizer.decode(ids, skip_special_tokens=False)
    ended = completion.finish_reason == "stop" and bool(ids) and ids[-1] in eos_ids
    run.end_of_turn = tokenizer.decode(ids[-1:], skip_special_tokens=False) if ended else ""
    if ended and text.endswith(run.end_of_turn):
        text = text[: len(text) - len(run.end_of_turn)]
    content, calls = parse_chat_calls(text, traj.tool_calls)
    well_formed = [call for call in calls if call.error is None]
    traj.messages.append(_assistant_message(content, well_formed))
    if not ended:
        traj.finish_reason = "length" if completion.finish_reason == "length" else "stop"
        return []
    if not calls:
        traj.finish_reason = "stop"
    return calls


def _run_calls(pending: list[tuple[_Run, list[ToolCall]]], tokenizer, form: ToolFormat, toolbox: ToolBox,
               limits: AgentLimits) -> None:
    """Run the calls of every pending trajectory at once and append their env segments."""
    if not pending:
        return
    if pending[0][0].env is None:
        results = toolbox.run([(calls, run.state) for run, calls in pending], concurrency=limits.tool_concurrency,
                              timeout=limits.tool_timeout)
        steps = [([r.observation for r in rs], sum(r.is_error for r in rs), sum(r.seconds for r in rs), False, None,
                  [not r.is_error for r in rs]) for rs in results]
    else:
        steps = parallel_map(lambda item: _env_step(*item), [(run.env, calls) for run, calls in pending],
                             limits.tool_concurrency)
    for (run, calls), (observations, errors, seconds, done, reward, succeeded) in zip(pending, steps):
        traj = run.traj
        traj.tool_calls += len(calls)
        traj.tool_errors += errors
        traj.tool_seconds += seconds
        if reward is not None:
            traj.turn_rewards.append(reward)
            traj.env_reward += reward
        if done:
            traj.finish_reason = "stop"
            continue
        outputs = [truncate_to_tokens(defuse_special_tokens(text, tokenizer), tokenizer, limits.max_tool_output_tokens)
                   for text in observations]
        tool_messages = [{"role": "tool", "name": defuse_special_tokens(call.name, tokenizer) or "invalid",
                          "tool_call_id": call.call_id, "content": out}
                         for call, out in zip(calls, outputs)]  # an environment answers a step with one message
        text = form.output_text(run, tokenizer, outputs, tool_messages, toolbox)
        if _append_env(run, tokenizer.encode(text, add_special_tokens=False), limits):
            traj.messages.extend(tool_messages)
            traj.last_tool_output = outputs[-1]  # what the model read last (agent.trajectory.wrong_copy)
            sources = [call_source(call.arguments) for call in calls]
            if len(observations) < len(calls):  # an environment answered every call with one observation
                sources = ["\n".join(sources)]
            run.read.extend((source, out) for source, out, ok in zip(sources, outputs, succeeded) if ok)
        else:
            run.unanswered = True


def _env_step(env, calls: list[ToolCall]) -> tuple[list[str], int, float, bool, float, list[bool]]:
    """One environment step -> ([observation], tool errors, seconds, done, reward, [no error]). Malformed
    calls are passed on as they are (``call.error`` set) and each counts a tool error; an
    exception in the environment becomes an error observation (and one more error)."""
    start = time.perf_counter()
    errors = sum(call.error is not None for call in calls)
    try:
        observation, done, reward = env.step(calls)
    except Exception as error:
        observation, done, reward, errors = error_text(error), False, 0.0, errors + 1
    return [str(observation)], errors, time.perf_counter() - start, bool(done), float(reward), [errors == 0]


def _append_env(run: _Run, ids: list[int], limits: AgentLimits) -> bool:
    """Append an env segment if it leaves the model at least one token, else end ``length``."""
    if limits.max_total_tokens - run.used - len(ids) < 1:
        run.traj.finish_reason = "length"
        return False
    if ids:
        run.traj.segments.append(Segment(ids, "env"))
    return True


def _inline_output_text(run: _Run, tokenizer, outputs: list[str], tool_messages: list[dict], toolbox: ToolBox) -> str:
    """``inline``: the one call's output as an ``<output>`` block."""
    return inline.output_text(outputs[0])


def _chat_output_text(run: _Run, tokenizer, outputs: list[str], tool_messages: list[dict], toolbox: ToolBox) -> str:
    """``chat_template``: the template's own text for the tool messages (``chat_env_text``)."""
    return chat_env_text(tokenizer, run.traj.messages, tool_messages, toolbox.schemas(), run.end_of_turn)


def _inline_call_end(call: str) -> int | None:
    """End offset of the ```python block ``call`` opens; None if it is never closed."""
    block = inline.first_closed_block(call)
    return None if block is None else block[1]


def _chat_call_end(call: str) -> int | None:
    """End offset of the ``<tool_call>`` element ``call`` opens; None if it is never closed."""
    close = call.find("</tool_call>", len("<tool_call>"))
    return None if close < 0 else close + len("</tool_call>")


def inline_answer_text(text: str) -> str:
    """``text`` without its ```python blocks (one left open runs to the end).

    >>> inline_answer_text("So:\\n```python\\nx = 42  # \\\\boxed{42}")
    'So:\\n'
    >>> inline_answer_text("A\\n```python\\nprint(1)\\n```\\nB ```python\\n```python\\n42\\n```\\nC")
    'A\\nB C'
    """
    return answer_text(text, inline.CODE_OPEN, _inline_call_end)


def chat_answer_text(text: str) -> str:
    """``text`` without its ``<tool_call>`` elements (one left open runs to the end).

    >>> chat_answer_text('Hi <tool_call>{"name": "f"}</tool_call> there <tool_call>{"code": "42"')
    'Hi  there '
    """
    return answer_text(text, "<tool_call>", _chat_call_end)


def chat_env_text(tokenizer, messages: list[dict], tool_messages: list[dict], tools: list[dict] | None,
                  end_of_turn: str) -> str:
    """The env text after an assistant turn that called tools: render A = ``messages`` (ending
    with that assistant turn), render B = A's messages + ``tool_messages`` + the generation
    prompt; B must extend A; the env text is B after the last ``end_of_turn`` in A."""
    before = tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False, add_generation_prompt=False)
    after = tokenizer.apply_chat_template(messages + tool_messages, tools=tools or None, tokenize=False,
                                          add_generation_prompt=True)
    if not after.startswith(before):
        raise ConfigError("agent.tool_format: the chat template is not append-only for tool turns (adding tool "
                          "results changes the text before them); use tool_format: inline or another template")
    cut = before.rfind(end_of_turn) if end_of_turn else -1
    if cut < 0 or before[cut + len(end_of_turn) :].strip():
        raise ConfigError(f"agent.tool_format: the chat template does not end the assistant turn with {end_of_turn!r}, "
                          "the token the model ended its turn with")
    return after[cut + len(end_of_turn) :]


def _prefix_end(tokenizer, ids: list[int], prefix: str) -> int:
    """Smallest k such that ``ids[:k]`` decodes to text starting with ``prefix`` (len(ids) if none)."""
    low, high = 1, len(ids)
    while low < high:
        middle = (low + high) // 2
        if tokenizer.decode(ids[:middle], skip_special_tokens=True).startswith(prefix):
            high = middle
        else:
            low = middle + 1
    return high


def _assistant_message(content: str, calls: list[ToolCall]) -> dict:
    message: dict = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [{"type": "function", "id": call.call_id,
                                  "function": {"name": call.name, "arguments": call.arguments}} for call in calls]
    return message


def _add_assistant(messages: list[dict], content: str, calls: list[ToolCall]) -> None:
    """``inline``: text the model wrote across turns without a call in between is one message."""
    if messages and messages[-1]["role"] == "assistant" and not messages[-1].get("tool_calls"):
        messages[-1] = _assistant_message(messages[-1]["content"] + content, calls)
    else:
        messages.append(_assistant_message(content, calls))


def _finalise(run: _Run, tokenizer, form: ToolFormat) -> None:
    """Decode the response. The final answer is the sampled text after the last env segment
    with every tool call cut out (``answer_text``: a call left open runs to the end), and
    nothing when the last call never got its output (a turn, call or token limit): a reward
    never reads an answer from code (``x = 6 * 7  # \\boxed{42}``), whatever ended the
    trajectory. Calls are found in the text with special tokens kept (a template may make
    ``<tool_call>`` one); those tokens are dropped after."""
    traj = run.traj
    traj.text = tokenizer.decode(traj.response_ids, skip_special_tokens=False)
    if run.unanswered:
        traj.final_text, traj.answer_from_tool, traj.last_tool_output = "", False, None
        return
    last_env = max((i for i, s in enumerate(traj.segments) if s.kind != "sampled"), default=0)
    final = [i for segment in traj.segments[last_env + 1 :] for i in segment.token_ids]
    text = form.answer_text(tokenizer.decode(final, skip_special_tokens=False))
    for token in sorted(_special_strings(tokenizer), key=len, reverse=True):
        text = text.replace(token, "")
    traj.final_text = text
    traj.answer_from_tool = answer_from_tool(text, run.read)


def _special_strings(tokenizer) -> set[str]:
    """The text of every special token and every added token marked special."""
    strings = {token for token in getattr(tokenizer, "all_special_tokens", ()) if token}
    for added in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(added, "special", False) and getattr(added, "content", ""):
            strings.add(added.content)
    return strings


# The tool formats ``agent.tool_format`` names; config.py's Literal lists the same names.
TOOL_FORMATS: dict[str, ToolFormat] = {
    "inline": ToolFormat(_inline_turn, _inline_output_text, inline_answer_text, stop=inline.STOP),
    "chat_template": ToolFormat(_chat_turn, _chat_output_text, chat_answer_text, schemas_in_prompt=True),
}
