"""``posttrain eval`` configuration: a model, sampling settings and a list of tasks.

Example (``configs/eval_cpu.yaml``)::

    model: {name: smollm2-135m-instruct}
    sampling: {n: 1, temperature: 0.0, max_new_tokens: 384}
    limit: 20
    tasks:
      - {name: humaneval, limit: 10}
      - {name: reasoning_gym, dataset: basic_arithmetic}
      - {name: jsonl, path: examples/data/math_eval.jsonl}
      - {name: perplexity, path: examples/data/chat_val.jsonl}
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from posttrain.config import ModelConfig, RunConfig, Section


class SamplingConfig(Section):
    n: int = Field(1, gt=0, description="completions per prompt (pass@k needs n >= k)")
    temperature: float = Field(0.0, ge=0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 = off")
    max_new_tokens: int = Field(256, gt=0)
    seed: int | None = Field(0, description="generation seed")


class EvalTaskConfig(Section):
    name: Literal["humaneval", "reasoning_gym", "jsonl", "perplexity"] = Field(description="task loader")
    label: str | None = Field(None, description="name shown in the table and files (default: derived)")
    dataset: str | None = Field(None, description="reasoning_gym: dataset name, e.g. basic_arithmetic")
    params: dict[str, Any] = Field(default_factory=dict, description="reasoning_gym: dataset parameters")
    path: str | None = Field(None, description="jsonl / perplexity: the data file")
    limit: int | None = Field(None, gt=0, description="problems (or conversations) used; default: the top-level limit")
    seed: int | None = Field(None, description="subset / generation seed; default: the top-level seed")
    reward: Any = Field(None, description="jsonl: reward spec (name + params), default math or code by row keys")
    format: dict[str, Any] | None = Field(
        None, description="format reward parameters (pattern, required_tags, tool_call) for a compliance rate"
    )
    system_prompt: str | None = Field("default", description="reasoning_gym: SYSTEM_PROMPTS key, text, or null")
    max_new_tokens: int | None = Field(None, gt=0, description="overrides sampling.max_new_tokens for this task")

    @model_validator(mode="after")
    def _required_fields(self) -> "EvalTaskConfig":
        if self.name == "reasoning_gym" and not self.dataset:
            raise ValueError("a reasoning_gym task needs 'dataset' (e.g. basic_arithmetic)")
        if self.name in ("jsonl", "perplexity") and not self.path:
            raise ValueError(f"a {self.name} task needs 'path'")
        return self


class EvalConfig(Section):
    """``posttrain eval``: generate, score, and report pass@k / accuracy / perplexity."""

    run: RunConfig = RunConfig(name="eval")
    model: ModelConfig = ModelConfig()
    device: str = Field("auto", description="auto (cuda if available), cpu, cuda, cuda:1, ...")
    batch_size: int = Field(16, gt=0, description="prompts generated together")
    sampling: SamplingConfig = SamplingConfig()
    pass_k: list[int] = Field(default_factory=lambda: [1], description="k values reported as pass@k (k <= n)")
    limit: int | None = Field(20, gt=0, description="default problems per task (null = all)")
    seed: int = Field(0, description="default subset seed")
    sandbox_workers: int | None = Field(None, gt=0, description="parallel sandboxed runs (default min(8, cores))")
    code_timeout: float = Field(10.0, gt=0, description="seconds per sandboxed program")
    unsafe_process_isolation: bool = Field(
        False, description="allow HumanEval to run model code in 'process' isolation (no namespaces: the code "
        "sees the filesystem, behind a bypassable audit hook) where namespace isolation is unavailable")
    tasks: list[EvalTaskConfig] = Field(min_length=1, description="what to evaluate")

    @model_validator(mode="after")
    def _k_fits_n(self) -> "EvalConfig":
        for k in self.pass_k:
            if k < 1 or k > self.sampling.n:
                raise ValueError(f"pass_k: {k} needs 1 <= k <= sampling.n ({self.sampling.n})")
        return self
