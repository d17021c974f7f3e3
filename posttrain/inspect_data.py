"""``posttrain inspect DATA``: show what training would train on, and audit it.

Renders a data file exactly as the trainers do (``posttrain.data.load_sft_data``), prints the
first n samples token by token with the trained tokens highlighted and message boundaries
labelled, then the audit summary (seed 004 sections 3.3 and 8). Exit status: 0 when clean,
1 when the data has a hard error (bad row, empty mask, consistency failure, untrained
end-of-turn), 2 for usage errors (missing model, bad option) via the CLI.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TextIO

from posttrain.config import DataConfig, ModelConfig, Section, apply_override, validate_config
from posttrain.errors import ConfigError, DataError


class InspectConfig(Section):
    """What ``inspect`` reads from a training config: its ``data`` and ``model`` sections."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()


def inspect_config(config_path: str | None, overrides: list[str]) -> InspectConfig:
    """The ``data`` and ``model`` sections of ``config_path`` (any training config), then ``overrides``."""
    import yaml

    raw: dict = {}
    source = "command line"
    if config_path is not None:
        source = config_path
        try:
            loaded = yaml.safe_load(Path(config_path).read_text()) or {}
        except OSError:
            raise ConfigError(f"config file {config_path} does not exist") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{config_path}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{config_path}: the top level must be a mapping of sections")
        raw = {key: loaded[key] for key in ("data", "model") if key in loaded}
    for override in overrides:
        apply_override(raw, override)
    return validate_config(InspectConfig, raw, source)


def use_colour(choice: str, stream: TextIO) -> bool:
    """``always``/``never``, or ``auto``: a terminal and no ``NO_COLOR`` in the environment."""
    if choice == "always":
        return True
    if choice == "never":
        return False
    return hasattr(stream, "isatty") and stream.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


def inspect_data(
    path: str,
    *,
    data_config: DataConfig,
    model: str,
    chat_template: str | None = None,
    n: int = 5,
    colour: bool = False,
    as_json: bool = False,
    html_path: str | None = None,
    dump_path: str | None = None,
    max_tokens: int | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Run the audit on ``path`` and print the views; return the exit status (0 clean, 1 hard error)."""
    from posttrain.data.audit import format_sample, load_sft_data, render_html, write_dump
    from posttrain.models import load_tokenizer

    out = out or sys.stdout
    err = err or sys.stderr
    tokenizer = load_tokenizer(model, chat_template=chat_template)
    try:
        prepared = load_sft_data(path, tokenizer, data_config, spans_for_first=max(n, 0))
    except DataError as exc:
        if as_json:
            print(json.dumps({"source": str(path), "ok": False, "error": str(exc)}), file=out)
        else:
            print(f"error: {exc}", file=err)
            if not data_config.skip_bad:
                print("(stopped at the first bad row; --skip-bad counts and skips bad rows)", file=err)
        return 1
    report = prepared.audit
    if as_json:
        print(json.dumps(report.to_dict()), file=out)
    else:
        for index, sample in enumerate(prepared.samples[: max(n, 0)]):
            print(format_sample(sample, tokenizer, colour=colour, index=index, max_tokens=max_tokens), file=out)
        if not colour and n > 0 and prepared.samples:
            print("([[...]] = trained tokens, ‹role› = where a message starts)\n", file=out)
        for line in report.summary_lines():
            print(line, file=out)
    if html_path:
        Path(html_path).write_text(render_html(prepared.samples[: max(n, 0)], tokenizer, report), encoding="utf-8")
        if not as_json:
            print(f"wrote {html_path}", file=out)
    if dump_path:
        write_dump(prepared.samples, dump_path)
        if not as_json:
            print(f"wrote {dump_path} ({len(prepared.samples)} samples)", file=out)
    return 1 if report.hard_errors else 0
