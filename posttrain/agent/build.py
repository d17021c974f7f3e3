"""From an ``agent:`` config section to a ready agent: the tools, the format, the limits.

``build_agent`` is what ``rl``, ``eval`` and ``chat`` call; ``Agent.run`` drives the turn loop
(``agent.loop.run_agent``) for a batch of prompts and returns one ``Trajectory`` each per
sample, in prompt order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from posttrain.agent.loop import TOOL_FORMATS, AgentLimits, AgentPrompt, run_agent
from posttrain.agent.tools import ToolBox, environment_schemas, load_environment, load_user_tool, python_tool
from posttrain.agent.trajectory import Trajectory
from posttrain.config import AgentConfig
from posttrain.data.formats import normalise_messages
from posttrain.data.render import render_prompt
from posttrain.errors import ConfigError
from posttrain.rollout.base import SamplingParams


@dataclass
class Agent:
    """Tools, format and limits of multi-turn rollouts (one per run; trajectories share nothing)."""

    config: AgentConfig
    toolbox: ToolBox
    limits: AgentLimits
    tokenizer: Any

    def prompt(self, messages: Any, prompt_ids: Sequence[int] | None, row: dict, where: str) -> AgentPrompt:
        """The agent's view of one prompt. A format whose prompt announces the tools
        (``schemas_in_prompt``: ``chat_template``, in the template's system turn) renders the
        prompt with their schemas; the others (``inline``) keep the already rendered ids. Its text was checked for control-token strings where it was
        read (``data.audit.load_prompt_data``, an eval task's ``render_prompt``) or typed (chat)."""
        conversation = normalise_messages(messages, where)
        announce = TOOL_FORMATS[self.config.tool_format].schemas_in_prompt
        if announce or prompt_ids is None:
            schemas = self.toolbox.schemas() if announce else None
            prompt_ids = render_prompt(conversation, self.tokenizer, tools=schemas or None, where=where,
                                       allow_special_tokens_in_text=True)
        return AgentPrompt(list(prompt_ids), [dict(m) for m in conversation], dict(row))

    def run(self, engine: Any, prompts: Sequence[AgentPrompt], params: SamplingParams) -> list[Trajectory]:
        return run_agent(engine, list(prompts), params, tokenizer=self.tokenizer, tool_format=self.config.tool_format,
                         toolbox=self.toolbox, limits=self.limits, environment=self.config.environment)


def build_agent(config: AgentConfig, tokenizer: Any, *, max_new_tokens: int, isolation: str = "auto",
                unsafe_process_isolation: bool = False) -> Agent:
    """The tools named in ``config.tools`` ('python', 'module:function' or 'file.py:function')
    and the environment class (``config.environment``, 'module:Class' or 'file.py:Class'),
    both resolved here so a bad path fails before any model loads (``posttrain.plugins``, as
    ``reward:`` resolves); ``max_new_tokens`` is the per-turn cap (each turn is clamped further
    to what is left of the budget). Raises ConfigError (one line naming the key)."""
    if not config.enabled:
        raise ConfigError("agent: name at least one tool (agent.tools: [python]) or an environment")
    tools = []
    for index, spec in enumerate(config.tools):
        if spec == "python":
            tools.append(python_tool(session=config.python_session, isolation=isolation,
                                     unsafe_process_isolation=unsafe_process_isolation))
        elif ":" in spec:
            tools.append(load_user_tool(spec, key=f"agent.tools.{index}"))
        else:
            raise ConfigError(f"agent.tools.{index}: unknown tool {spec!r}; use 'python', 'module:function' "
                              "or 'file.py:function'")
    declared = environment_schemas(load_environment(config.environment)) if config.environment else []
    limits = AgentLimits(max_turns=config.max_turns, max_tool_calls=config.max_tool_calls,
                         max_total_tokens=config.max_total_tokens, max_new_tokens=max_new_tokens,
                         max_tool_output_tokens=config.max_tool_output_tokens,
                         tool_concurrency=config.tool_concurrency, tool_timeout=config.tool_timeout)
    return Agent(config, ToolBox(tools, declared), limits, tokenizer)
