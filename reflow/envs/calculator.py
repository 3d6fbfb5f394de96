"""The calculator tool: arithmetic the model asks for, and the answer it gives.

    model: CALC 123*456      ->  observation "=56088\\n", reward 0, episode goes on
    model: ANSWER 56088      ->  reward 1.0 if it equals the row's answer (whitespace-stripped), else 0.0; done
    anything else            ->  observation "?\\n" (a nudge), reward 0

Expressions are integers (and decimals) with + - * / // % ** and parentheses, evaluated on Python's AST
(no names, no calls; ** exponents up to 64 and results up to 10^100, so a message cannot stall the trainer).
"""

from __future__ import annotations

import ast
import operator

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_LIMIT = 10 ** 100


def evaluate(expr: str) -> int | float:
    """The value of an arithmetic expression; ValueError for anything else (names, calls, huge powers)."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(b) > 64:
                raise ValueError("exponent too large")
            v = _OPS[type(node.op)](a, b)
            if abs(v) > _LIMIT:
                raise ValueError("result too large")
            return v
        raise ValueError(f"not arithmetic: {type(node).__name__}")

    try:
        return ev(ast.parse(expr.strip(), mode="eval"))
    except (SyntaxError, ZeroDivisionError, OverflowError, TypeError) as e:
        raise ValueError(str(e)) from None


def format_number(v: int | float) -> str:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return str(v) if isinstance(v, int) else f"{v:.6g}"


def answer_reward(message: str, answer: str | None) -> tuple[str, float, bool] | None:
    """`ANSWER x` -> ("", 1.0 if x == answer else 0.0, True); None for any other message."""
    text = message.strip()
    if not text.startswith("ANSWER"):
        return None
    given = text[len("ANSWER"):].strip()
    return "", float(answer is not None and given == str(answer).strip()), True


class AnswerToolEnv:
    """An episode with one tool: `ANSWER x` ends it (reward 1 if x is the row's answer); any other message
    goes to `tool(text)`, whose output is the observation. Subclasses implement `tool`."""

    def reset(self, row: dict) -> str | None:
        self.answer = row.get("answer")
        return None

    def step(self, message: str) -> tuple[str, float, bool]:
        done = answer_reward(message, self.answer)
        if done is not None:
            return done
        return self.tool(message.strip()), 0.0, False

    def tool(self, text: str) -> str:
        raise NotImplementedError


class CalculatorEnv(AnswerToolEnv):
    """`CALC expr` -> "=value\\n"; `ANSWER x` ends the episode with reward 1 if x is the row's answer."""

    def tool(self, text: str) -> str:
        if text.startswith("CALC"):
            try:
                return f"={format_number(evaluate(text[len('CALC'):]))}\n"
            except ValueError:
                return "=error\n"
        return "?\n"
