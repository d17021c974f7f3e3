"""The ``inline`` tool format (ReTool style, for templates without tool support): inside one
assistant turn the model writes a fenced Python block; generation stops once the block is
closed; the sandbox runs it and its output is appended as an ``<output>`` block of env
tokens; the model goes on in the same turn.

    ...text the model writes...```python
    print(123 * 456)
    ```
    <output>
    56088
    </output>
    The answer is 56088.<end of turn>

SFT data use OpenAI messages (an assistant ``tool_calls`` entry calling ``python`` with
``{"code": ...}``, then a ``tool`` message with the output); the renderer (``render.py``)
and the RL turn loop (``agent/loop.py``) both lay them out with these strings, each piece
tokenised on its own, so SFT trains on exactly the token layout RL samples. The strings
live in ``data/`` because the renderer, below the agent, needs them too.
"""

from __future__ import annotations

import re

CODE_OPEN = "```python\n"
CODE_CLOSE = "\n```\n"
OUTPUT_OPEN = "<output>\n"
OUTPUT_CLOSE = "\n</output>\n"
# Generation stops once a block is closed. The opener "```python\n" never ends with this.
STOP = ("```\n",)

_BLOCK = re.compile(r"```python\n(.*?)\n```(?:\n|$)", re.DOTALL)


def call_text(content: str, code: str) -> str:
    """What the model writes for one tool call: its text, then the fenced block.

    >>> call_text("Let me compute.\\n", "print(2 + 2)")
    'Let me compute.\\n```python\\nprint(2 + 2)\\n```\\n'
    """
    return f"{content}{CODE_OPEN}{code}{CODE_CLOSE}"


def output_text(output: str) -> str:
    """The env block appended after a call's execution.

    >>> output_text("4")
    '<output>\\n4\\n</output>\\n'
    """
    return f"{OUTPUT_OPEN}{output}{OUTPUT_CLOSE}"


def first_closed_block(text: str) -> tuple[str, int] | None:
    """(code, end offset) of the first closed ```python block in ``text``; None if there is
    none. The end offset is just past the closing fence (and its newline when present).

    >>> first_closed_block("x\\n```python\\nprint(1)\\n```\\nmore")
    ('print(1)', 25)
    >>> first_closed_block("```python\\nprint(1)") is None
    True
    """
    match = _BLOCK.search(text)
    return None if match is None else (match.group(1), match.end())


def has_unclosed_block(text: str) -> bool:
    """True when ``text`` opens a ```python block it never closes.

    >>> has_unclosed_block("```python\\nprint(1)"), has_unclosed_block("no code")
    (True, False)
    """
    last_open = text.rfind(CODE_OPEN)
    return last_open >= 0 and _BLOCK.search(text, last_open) is None
