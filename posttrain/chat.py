"""``posttrain chat``: render one prompt with the chat template, generate, return the reply.

With tools (``agent.tools``, ``--tools python``) the reply is a multi-turn trajectory, shown
turn by turn: what the model wrote, what each tool answered (marked), and a closing line
with the turns, tool calls and errors."""

from __future__ import annotations

from posttrain.config import ChatConfig
from posttrain.models import inference_dtype, load_model, load_tokenizer
from posttrain.rollout.base import SamplingParams
from posttrain.rollout.hf import HFEngine


def chat(config: ChatConfig, prompt: str) -> str:
    tokenizer = load_tokenizer(config.model.name, chat_template=config.model.chat_template)
    model = load_model(config.model.name, dtype=inference_dtype("cpu"))  # chat generates on the CPU
    messages = ([{"role": "system", "content": config.system}] if config.system else []) + [
        {"role": "user", "content": prompt}
    ]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    params = SamplingParams(
        n=1, temperature=config.temperature, top_p=config.top_p, max_new_tokens=config.max_new_tokens, seed=config.seed
    )
    engine = HFEngine(model, tokenizer)
    if config.agent.enabled:
        return agent_reply(config, engine, tokenizer, messages, list(prompt_ids), params)
    (completion,) = engine.generate([list(prompt_ids)], params)
    return completion.text.strip()


def agent_reply(config: ChatConfig, engine, tokenizer, messages: list[dict], prompt_ids: list[int],
                params: SamplingParams) -> str:
    """One trajectory with the configured tools, rendered for a person to read."""
    from posttrain.agent.build import build_agent

    agent = build_agent(config.agent, tokenizer, max_new_tokens=config.max_new_tokens)
    (trajectory,) = agent.run(engine, [agent.prompt(messages, prompt_ids, {}, where="prompt")], params)
    return show_trajectory(trajectory, tokenizer, tool_format=config.agent.tool_format)


def show_trajectory(trajectory, tokenizer, *, tool_format: str = "inline") -> str:
    """The response segments in order, as a person reads them: what the model wrote, and each
    env segment marked ``[tool]``. Control tokens (the end of turn, a template's role markers)
    are not text and are not shown. ``chat_template`` env segments are template glue around the
    tool results, so the results themselves are shown (the tool messages the turn loop recorded,
    one group per env segment that follows a model turn)."""
    results = iter(_tool_result_groups(trajectory.messages)) if tool_format == "chat_template" else iter(())
    lines = []
    answered = False  # an env segment before the first model turn (an environment's opening) answers no call
    for segment in trajectory.segments[1:]:
        text = tokenizer.decode(segment.token_ids, skip_special_tokens=True)
        if segment.kind == "env":
            if answered:
                text = "\n".join(next(results, [text]))
            lines.append("\n".join(f"  [tool] {line}" for line in text.strip("\n").splitlines()))
        else:
            answered = True
            lines.append(text.strip("\n"))
    lines.append(f"({trajectory.turns} turns, {trajectory.tool_calls} tool calls, {trajectory.tool_errors} tool errors, "
                 f"finish: {trajectory.finish_reason})")
    return "\n".join(lines)


def _tool_result_groups(messages: list[dict]) -> list[list[str]]:
    """The contents of each run of consecutive ``tool`` messages, in order."""
    groups: list[list[str]] = []
    previous = ""
    for message in messages:
        if message.get("role") == "tool":
            if previous != "tool":
                groups.append([])
            groups[-1].append(str(message.get("content", "")))
        previous = message.get("role", "")
    return groups
