"""The one entry point: ``posttrain <command> ...`` (also ``python -m posttrain``).

Each command is a small function that parses its arguments into a typed config and calls
into ``posttrain.train`` / ``posttrain.eval`` / ...; nothing imports this module. A user
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
    """CONFIG file plus key.sub=value overrides: the shape of every training command."""
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config values")


# ----------------------------------------------------------------------------- chat
def _chat_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the user message")
    parser.add_argument("--model", default=None, help="model spec: alias (default smollm2-135m-instruct), HF dir, .gguf, hub id")
    parser.add_argument("--system", default=None, help="system message")
    parser.add_argument("--chat-template", default=None, help="Jinja file replacing the tokenizer's chat template")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None, help="0 = greedy (default)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override ChatConfig values")


@command("chat", "reply to one prompt with a model (renders the chat template, generates, prints)", _chat_arguments)
def _chat(args: argparse.Namespace) -> int:
    from posttrain.chat import chat
    from posttrain.config import ChatConfig, load_config

    overrides = list(args.overrides)
    for flag, key in (("model", "model.name"), ("system", "system"), ("chat_template", "model.chat_template"),
                      ("max_new_tokens", "max_new_tokens"), ("temperature", "temperature")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
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


# ----------------------------------------------------------------------------- sft
@command("sft", "supervised fine-tuning (packing, exact step-wide loss, LoRA, resume; torchrun for FSDP2)",
         add_config_arguments)
def _sft(args: argparse.Namespace) -> int:
    from posttrain.config import SFTConfig, load_config
    from posttrain.train.sft import run_sft

    run_sft(load_config(SFTConfig, args.config, args.overrides))
    return 0


# ----------------------------------------------------------------------------- rm
@command("rm", "train a reward model on preference pairs (Bradley-Terry), report held-out accuracy, export HF",
         add_config_arguments)
def _rm(args: argparse.Namespace) -> int:
    from posttrain.config import RMConfig, load_config
    from posttrain.train.rm import run_rm

    run_rm(load_config(RMConfig, args.config, args.overrides))
    return 0


# ----------------------------------------------------------------------------- eval
@command("eval", "evaluate a model: HumanEval pass@k (sandboxed), reasoning-gym, JSONL tasks, perplexity",
         add_config_arguments)
def _eval(args: argparse.Namespace) -> int:
    from posttrain.config import load_config
    from posttrain.eval.config import EvalConfig
    from posttrain.eval.runner import run_eval

    run_eval(load_config(EvalConfig, args.config, args.overrides))
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
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except UserError as exc:
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
        print(f"{prefix}error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
