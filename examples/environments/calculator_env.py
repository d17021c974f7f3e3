"""A calculator environment for ``agent.environment`` (docs/AGENTIC.md, "Environments").

Use it from a config, from the repository root, without PYTHONPATH::

    agent:
      tool_format: chat_template        # the prompt announces CalculatorEnv.tools
      environment: examples/environments/calculator_env.py:CalculatorEnv

or with ``tool_format: inline`` (the bundled model's format), where every ```python block
the model writes reaches ``step`` as a call named ``python`` with ``{"code": ...}``.

The environment evaluates arithmetic only (numbers, + - * / // % **, parentheses, names
assigned earlier in the same call, ``print``, ``round``, ``abs``, ``divmod``, ``min``,
``max``): nothing the model writes is executed as Python, so it needs no sandbox. It rewards
nothing per step (``reward`` 0.0): the final answer is scored by the run's ``reward:``; a
step whose every call fails costs ``ERROR_PENALTY``, so a policy cannot farm turns.

>>> env = CalculatorEnv()
>>> env.reset({"answer": "-4144"}) is None
True
>>> from types import SimpleNamespace as Call
>>> env.step([Call(name="calculate", arguments={"expression": "56 * (12 - 86)"}, error=None)])
('-4144', False, 0.0)
>>> env.step([Call(name="python", arguments={"code": "q, r = divmod(17, 5)\\nprint(q, r)"}, error=None)])
('3 2', False, 0.0)
>>> env.step([Call(name="python", arguments={"code": "import os"}, error=None)])
('error: only arithmetic is allowed here (Import)', False, -0.1)
"""

from __future__ import annotations

import ast
import operator

ERROR_PENALTY = 0.1
MAX_POWER = 1000  # 10 ** 1000 is fine, 10 ** 10 ** 10 is refused before it is computed

CALCULATE = {
    "type": "function",
    "function": {
        "name": "calculate",
        "description": "Evaluate an arithmetic expression and return its value.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "for example (12 + 7) * 3 / 4"}},
            "required": ["expression"],
        },
    },
}

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_FUNCTIONS = {"round": round, "abs": abs, "divmod": divmod, "min": min, "max": max}


class CalculatorEnv:
    """One instance per trajectory. ``tools``: the schemas a ``chat_template`` prompt announces."""

    tools = [CALCULATE]

    def __init__(self) -> None:
        self.row: dict = {}
        self.steps = 0

    def reset(self, row: dict) -> str | None:
        """``row``: a deep copy of the prompt's data row. No opening observation."""
        self.row, self.steps = row, 0
        return None

    def step(self, calls) -> tuple[str, bool, float]:
        """``calls``: the turn's ``ToolCall``s -> (one observation for all of them, done, reward)."""
        self.steps += 1
        lines, failed = [], 0
        for call in calls:
            if call.error is not None:
                lines.append(f"error: {call.error}")
                failed += 1
                continue
            source = call.arguments.get("expression" if call.name == "calculate" else "code")
            if call.name not in ("calculate", "python") or not isinstance(source, str):
                lines.append(f"error: unknown tool {call.name!r}; call calculate(expression)")
                failed += 1
                continue
            try:
                lines.append(evaluate(source, expression=call.name == "calculate"))
            except (ArithmeticError, ValueError, TypeError, SyntaxError, RecursionError) as error:
                lines.append(f"error: {error}")
                failed += 1
        reward = -ERROR_PENALTY if calls and failed == len(calls) else 0.0
        return "\n".join(lines), False, reward


def evaluate(source: str, expression: bool = False) -> str:
    """What ``source`` prints (a program of assignments and ``print`` calls), or the value of
    one ``expression``.

    >>> evaluate("7 // 2 + 10 % 4", expression=True), evaluate("x = 3\\ny = x * -5\\nprint(y)")
    ('5', '-15')
    """
    tree = ast.parse(source.strip(), mode="eval" if expression else "exec")
    if expression:
        return _text(_value(tree.body, {}))
    names: dict = {}
    printed: list[str] = []
    for statement in tree.body:
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
            _assign(statement.targets[0], _value(statement.value, names), names)
        elif isinstance(statement, ast.Expr) and _is_print(statement.value):
            printed.append(" ".join(_text(_value(a, names)) for a in statement.value.args))
        elif isinstance(statement, ast.Expr):
            _value(statement.value, names)
        else:
            raise ValueError(f"only arithmetic is allowed here ({type(statement).__name__})")
    return "\n".join(printed)


def _is_print(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print" and not node.keywords


def _assign(target: ast.AST, value, names: dict) -> None:
    if isinstance(target, ast.Name):
        names[target.id] = value
    elif isinstance(target, ast.Tuple) and isinstance(value, tuple) and len(target.elts) == len(value):
        for element, item in zip(target.elts, value):
            _assign(element, item, names)
    else:
        raise ValueError("only arithmetic is allowed here (assign to names)")


def _value(node: ast.AST, names: dict):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    if isinstance(node, ast.Name):
        raise ValueError(f"name {node.id!r} is not defined")
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand, names))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left, names), _value(node.right, names)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_POWER:
            raise ValueError(f"exponent {right} is too large")
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.Tuple):
        return tuple(_value(element, names) for element in node.elts)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS
            and not node.keywords):
        return _FUNCTIONS[node.func.id](*(_value(a, names) for a in node.args))
    raise ValueError(f"only arithmetic is allowed here ({type(node).__name__})")


def _text(value) -> str:
    if isinstance(value, tuple):
        return " ".join(_text(v) for v in value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return str(value)
