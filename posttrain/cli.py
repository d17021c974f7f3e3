"""The one entry point: ``posttrain <command> ...`` (also ``python -m posttrain``).

Each command is a small function that parses its arguments and calls the Python API
(``posttrain.api``: sft, rm, dpo, rl, eval, pipeline) or ``posttrain.chat`` / ``report`` /
``inspect_data``; nothing imports this module. A user
error (``posttrain.errors.UserError``) is printed as one line, ``error: ...``, exit status 2,
never a traceback. A subcommand exists only when it works.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from posttrain import __version__
from posttrain.errors import UserError

# name -> (help line, function that adds the arguments, function that runs it)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help_line: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    def register(run: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = (help_line, add_arguments, run)
        return run

    return register


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """[CONFIG] plus key.sub=value overrides: the shape of every training command. Flags and
    overrides may come in any order (``main`` gathers overrides after a flag)."""
    parser.add_argument("config", nargs="?", default=None, metavar="CONFIG",
                        help="YAML config file (optional: without it the defaults, with the key.sub=value overrides)")
    parser.add_argument("overrides", nargs="*", default=[], metavar="key.sub=value", help="override config values")
    if parser.prog.split()[-1] in CONFIG_SCHEMAS:
        parser.epilog = (f"every config key, with its default and meaning: `posttrain config {parser.prog.split()[-1]}`; "
                         f"examples in configs/")


# ----------------------------------------------------------------------------- config
# command -> its config schema ("module:attribute"), what `posttrain config COMMAND` prints
CONFIG_SCHEMAS = {
    "sft": "posttrain.config:SFTConfig",
    "rm": "posttrain.config:RMConfig",
    "dpo": "posttrain.config:DPOConfig",
    "rl": "posttrain.config:RLConfig",
    "eval": "posttrain.config:EvalConfig",
    "pipeline": "posttrain.config:PipelineConfig",
    "chat": "posttrain.config:ChatConfig",
}


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("schema", choices=list(CONFIG_SCHEMAS), metavar="COMMAND",
                        help=f"the command whose config to print: {', '.join(CONFIG_SCHEMAS)}")


@command("config", "print a command's full config schema (every key, its default and meaning) as commented YAML",
         _config_arguments)
def _config(args: argparse.Namespace) -> int:
    from posttrain.config import describe_schema

    schema = load_attribute(CONFIG_SCHEMAS[args.schema])
    doc = " ".join((schema.__doc__ or "").split()).removeprefix(f"``posttrain {args.schema}``:").strip()
    print(f"# posttrain {args.schema}: {doc}" if doc else f"# posttrain {args.schema}")
    print("# every key with its default; override any as key.sub=value after the config file")
    print("\n".join(describe_schema(schema)))
    return 0


def config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """The CONFIG file and the overrides: a first argument holding ``=`` that is no file is an override."""
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not os.path.exists(config):
        return None, [config, *overrides]
    return config, overrides


def choose_threads(args: argparse.Namespace) -> None:
    """Pick the CPU threads for the machine's load (``posttrain.train.threads``), before the
    command loads torch: first thing in ``chat`` (the API functions behind sft, rm, dpo, rl, eval
    and pipeline choose their own). A program that had torch loaded when it called ``main`` keeps
    its threads."""
    from posttrain.train.threads import configure_threads

    configure_threads(torch_loaded=getattr(args, "torch_loaded_by_caller", "torch" in sys.modules))


def flag_overrides(args: argparse.Namespace, flags_to_keys: tuple[tuple[str, str], ...]) -> list[str]:
    """``key=value`` overrides for every command-line flag that was given (not None)."""
    return [f"{key}={getattr(args, flag)}" for flag, key in flags_to_keys if getattr(args, flag) is not None]


# ----------------------------------------------------------------------------- chat
def _chat_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the user message")
    parser.add_argument("--model", default=None, help="model spec: alias (default smollm2-135m-instruct), HF dir, .gguf, hub id")
    parser.add_argument("--system", default=None, help="system message")
    parser.add_argument("--chat-template", default=None, help="Jinja file replacing the tokenizer's chat template")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None, help="0 = greedy (default)")
    parser.add_argument("--tools", default=None, help="offer tools, comma-separated: python and/or module:function "
                                                       "(the reply is then shown turn by turn)")
    parser.add_argument("--tool-format", choices=["inline", "chat_template"], default=None, help="agent.tool_format")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override ChatConfig values")


@command("chat", "reply to one prompt with a model (renders the chat template, generates, prints)", _chat_arguments)
def _chat(args: argparse.Namespace) -> int:
    choose_threads(args)
    from posttrain.chat import chat
    from posttrain.config import ChatConfig, load_config

    overrides = list(args.overrides) + flag_overrides(args, (
        ("model", "model.name"), ("system", "system"), ("chat_template", "model.chat_template"),
        ("max_new_tokens", "max_new_tokens"), ("temperature", "temperature"), ("tool_format", "agent.tool_format")))
    if args.tools:
        overrides.append("agent.tools=[" + ",".join(tool.strip() for tool in args.tools.split(",")) + "]")
    config = load_config(ChatConfig, None, overrides)
    print(chat(config, args.prompt))
    return 0


# ----------------------------------------------------------------------------- report
def _report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory (one trainer's, or a pipeline's with one sub-run per stage)")
    parser.add_argument("--output", "-o", default=None, help="HTML file to write (default RUN_DIR/report.html)")


@command("report", "write a standalone HTML report (plots, held-out scores, samples) for a run directory",
         _report_arguments)
def _report(args: argparse.Namespace) -> int:
    from posttrain.report import write_report

    path = write_report(args.run_dir, args.output)
    print(f"report: {path}")
    return 0


def _push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a finished run directory (holding final/ and config.yaml)")
    parser.add_argument("repo_id", metavar="org/name", help="the Hugging Face model repo (created if missing)")


@command("push", "upload a run's final/ model to the Hugging Face hub with a model card generated from the run",
         _push_arguments)
def _push(args: argparse.Namespace) -> int:
    from posttrain.api import push

    print(f"pushed {os.path.join(args.run_dir, 'final')} to {push(args.run_dir, args.repo_id)}")
    return 0


# ----------------------------------------------------------------------------- rollout-server
def _rollout_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model spec: alias (default smollm2-135m-instruct), HF dir, "
                                                       ".gguf, hub id; the RL run's starting model")
    parser.add_argument("--out", default="runs/rollout-server", help="the exported model goes to OUT/model "
                                                                     "(default runs/rollout-server)")
    parser.add_argument("--host", default="0.0.0.0", help="interface to listen on (default all)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--python", default=None, help="the Python that has vLLM (default: this one if it has "
                                                       "vLLM, else .venv-vllm/bin/python)")
    parser.add_argument("--max-model-len", type=int, default=2048, help="longest prompt + completion")
    parser.add_argument("--dtype", default=None, help="server weights dtype (default bfloat16 with a GPU, else float32)")
    parser.add_argument("--lora-rank", type=int, default=None, help="serve LoRA adapters up to this rank (an RL run "
                                                                    "with model.lora pushes its adapter only)")
    parser.add_argument("--kv-cache-gb", type=float, default=2.0, help="CPU: KV-cache size in GiB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dry-run", action="store_true", help="export the model and print the command, do not start it")
    parser.add_argument("vllm_args", nargs=argparse.REMAINDER, metavar="-- VLLM_ARGS",
                        help="after --: more `vllm serve` arguments (e.g. --gpu-memory-utilization 0.8)")


@command("rollout-server", "export a model and start the vLLM server an RL run with rollout.engine=vllm_server "
                           "drives (prints its URL)", _rollout_server_arguments)
def _rollout_server(args: argparse.Namespace) -> int:
    import importlib.util
    import shlex
    import socket
    from pathlib import Path

    from posttrain.errors import ConfigError

    python = args.python
    if python is None:
        python = sys.executable if importlib.util.find_spec("vllm") else ".venv-vllm/bin/python"
    if not os.path.exists(python) and os.sep in python:
        raise ConfigError(f"rollout-server --python: {python} does not exist (make vllm-env creates .venv-vllm)")
    choose_threads(args)
    import torch

    from posttrain.models import DEFAULT_MODEL, load_model, load_tokenizer
    from posttrain.rollout.vllm import export_for_vllm
    from posttrain.rollout.vllm_server import server_command, server_env

    spec = args.model or DEFAULT_MODEL
    dtype = args.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ConfigError(f"rollout-server --dtype: {dtype} is not a torch dtype (float32, bfloat16, float16)")
    out = Path(args.out)
    model_dir = export_for_vllm(load_model(spec, dtype=torch.float32), load_tokenizer(spec), out / "model",
                                getattr(torch, dtype))
    extra = tuple(args.vllm_args[1:] if args.vllm_args[:1] == ["--"] else args.vllm_args)
    command = server_command(python, model_dir.resolve(), args.port, dtype=dtype, max_model_len=args.max_model_len,
                             seed=args.seed, lora_rank=args.lora_rank, host=args.host, extra=extra,
                             cpu=not torch.cuda.is_available())
    env = server_env(args.kv_cache_gb, args.lora_rank is not None)
    host = socket.gethostname() if args.host in ("0.0.0.0", "::") else args.host
    print(f"model {spec} exported to {model_dir}")
    print(f"server: {shlex.join(command)}")
    print(f"url: http://{host}:{args.port}   (RL: rollout.engine=vllm_server rollout.server_url=http://{host}:{args.port} "
          f"rollout.sync_dir=<a directory this machine reads>)", flush=True)
    if args.dry_run:
        return 0
    os.execvpe(command[0], command, env)
    return 0  # not reached: exec replaces this process


# ----------------------------------------------------------------------------- sft, rm, dpo, rl, eval
def config_command(name: str, help_line: str, *, dry_run: bool = True) -> None:
    """Register ``posttrain NAME [CONFIG] [key.sub=value ...] [--dry-run]``, the shape of every
    trainer: the Python API's function of the same name (``posttrain.api``, imported only when
    the command runs, so ``posttrain --help`` stays fast) loads, validates and runs the config.
    ``--dry-run`` prints the API's plan: every check that needs no model, nothing trained."""

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        add_config_arguments(parser)
        if dry_run:
            parser.add_argument("--dry-run", action="store_true",
                                help="check settings, data (the audit), schedule and run directory without loading "
                                     "a model; print what would run")

    def run(args: argparse.Namespace) -> int:
        from posttrain import api

        config, overrides = config_and_overrides(args)
        if getattr(args, "dry_run", False):
            print(getattr(api, name)(config, overrides=overrides, dry_run=True))
            return 0
        getattr(api, name)(config, overrides=overrides)
        return 0

    command(name, help_line, add_arguments)(run)


def load_attribute(qualified: str):
    """``"package.module:name"`` -> that object."""
    import importlib

    module, _, attribute = qualified.partition(":")
    return getattr(importlib.import_module(module), attribute)


config_command("sft", "supervised fine-tuning (packing, exact step-wide loss, LoRA, resume; torchrun for FSDP2)")
config_command("rm", "train a reward model on preference pairs (Bradley-Terry), report held-out accuracy, export HF")
config_command("dpo", "direct preference optimisation on chosen/rejected pairs: DPO (label smoothing), IPO, SimPO; "
               "cached reference, resume, torchrun for FSDP2")
config_command("rl", "on-policy RL: GRPO, Dr. GRPO, RLOO, REINFORCE++, PPO with a critic; DAPO options; hf or vllm rollouts")
config_command("eval", "evaluate a model: HumanEval pass@k (sandboxed), reasoning-gym, JSONL tasks, perplexity",
               dry_run=False)


# ----------------------------------------------------------------------------- inspect
def _inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", nargs="?", help="data file (JSONL/JSON/Parquet) or datasets directory; default: data.train of --config")
    parser.add_argument("--config", default=None,
                        help="a training config (sft, dpo, rm, rl or pipeline): audit its data the way that command reads it")
    parser.add_argument("--model", default=None, help="model spec whose tokenizer renders the data (default smollm2-135m-instruct)")
    parser.add_argument("--chat-template", default=None, help="Jinja file replacing the tokenizer's chat template")
    parser.add_argument("-n", type=int, default=5, help="samples shown token by token (default 5)")
    parser.add_argument("--max-tokens", type=int, default=None, help="show at most this many tokens per sample")
    parser.add_argument("--html", default=None, metavar="FILE", help="write a standalone HTML page with the coloured view")
    parser.add_argument("--json", action="store_true", help="print only the summary, as one JSON object")
    parser.add_argument("--dump", default=None, metavar="FILE", help="write one JSON line per sample: line, input_ids, loss_mask, weights")
    parser.add_argument("--color", choices=["auto", "always", "never"], default="auto", help="colour the trained tokens (default: on a terminal)")
    parser.add_argument("--max-length", type=int, default=None, help="data.max_length")
    parser.add_argument("--truncation", choices=["right", "drop", "error"], default=None, help="data.truncation")
    parser.add_argument("--train-on", choices=["all_assistant", "last_assistant"], default=None, help="data.train_on")
    parser.add_argument("--no-train-tool-calls", action="store_true", help="data.train_tool_calls=false")
    parser.add_argument("--history-rewrite", choices=["split", "error"], default=None, help="data.history_rewrite")
    parser.add_argument("--tool-format", choices=["chat_template", "inline"], default=None, help="data.tool_format (SFT data)")
    parser.add_argument("--skip-bad", action="store_true", help="count and skip malformed rows instead of stopping")
    parser.add_argument("--stage", choices=["sft", "dpo", "rm", "rl"], default=None,
                        help="with a pipeline --config: the stage whose data to inspect (default: its first)")
    parser.add_argument("--limit", type=int, default=None, help="read only the first N rows")
    parser.add_argument("--probe", type=int, nargs="?", const=8, default=0, metavar="GROUPS",
                        help="with an RL --config: load the starting model, sample GROUPS groups (default 8) and "
                             "forecast the share of zero-variance groups and of prompts never solved")


@command("inspect", "show the loss mask token by token and audit a data file (exit 1 on a hard error)", _inspect_arguments)
def _inspect(args: argparse.Namespace) -> int:
    from posttrain.errors import ConfigError
    from posttrain.inspect_data import inspect_config, inspect_data, use_colour

    overrides = flag_overrides(args, (
        ("model", "model.name"), ("chat_template", "model.chat_template"), ("max_length", "data.max_length"),
        ("truncation", "data.truncation"), ("train_on", "data.train_on"), ("history_rewrite", "data.history_rewrite"),
        ("tool_format", "data.tool_format"), ("limit", "data.limit")))
    if args.no_train_tool_calls:
        overrides.append("data.train_tool_calls=false")
    if args.skip_bad:
        overrides.append("data.skip_bad=true")
    target = inspect_config(args.config, overrides, args.data, args.stage)
    if args.probe and target.kind != "rl":
        raise ConfigError("inspect --probe: samples from the starting model of an RL config (give --config with an "
                          "rl, rollout or reward section, or a pipeline's --stage rl)")
    data = args.data or target.config.data.train
    if not data:
        raise ConfigError("inspect: give a DATA file (or --config with data.train)")
    return inspect_data(
        target, data, n=args.n, colour=use_colour(args.color, sys.stdout), as_json=args.json, html_path=args.html,
        dump_path=args.dump, max_tokens=args.max_tokens, probe_groups=args.probe,
    )


# ----------------------------------------------------------------------------- pipeline
def _pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--dry-run", action="store_true",
                        help="validate every stage (sections, model chain, files, pre-load checks) without loading a model")
    parser.add_argument("--allow-missing-data", action="store_true",
                        help="with --dry-run: report missing data files as warnings (a config written for another machine)")


@command("pipeline", "run baseline eval -> SFT -> eval -> reward model -> RL -> eval in one run directory, then the report",
         _pipeline_arguments)
def _pipeline(args: argparse.Namespace) -> int:
    from posttrain import api
    from posttrain.pipeline import print_dry_run

    config, overrides = config_and_overrides(args)
    if args.dry_run:
        plan = api.pipeline(config, overrides=overrides, dry_run=True, allow_missing_data=args.allow_missing_data)
        print_dry_run(plan.raw, plan.config)
        return 2 if plan.errors else 0
    if args.allow_missing_data:
        raise UserError("--allow-missing-data applies to --dry-run only: a real run needs its data")
    api.pipeline(config, overrides=overrides)
    return 0


# ----------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="posttrain",
        description="Post-train language models: SFT, reward models and RL, from a laptop CPU to a GPU cluster.",
    )
    parser.add_argument("--version", action="version", version=f"posttrain {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_line, add_arguments, run) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_line, description=help_line)
        add_arguments(sub)
        sub.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from posttrain.log import install_console

    install_console()  # the library logs; the command line prints those messages as they are
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # overrides after a flag (`pipeline CONFIG --dry-run key=value`): argparse leaves them over
        unknown = [item for item in extra if item.startswith("-") or "=" not in item]
        if unknown or not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
        args.overrides = [*args.overrides, *extra]
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    args.torch_loaded_by_caller = "torch" in sys.modules
    try:
        return int(args.run(args) or 0)
    except UserError as exc:
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
        print(f"{prefix}error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print("interrupted", file=sys.stderr)
        return getattr(exc, "exit_status", 130)  # a run stopped by SIGTERM after saving: 143
    except BrokenPipeError:
        # The reader went away (`posttrain config rl | head`): stop quietly, as other
        # command-line tools do (Python docs, "Note on SIGPIPE").
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
