"""Bundled verifiable tasks: tiny synthetic datasets with exact answers.

They exist so a fresh install can run PPO/GRPO/SFT/DPO end to end without
downloading anything, and so that "did RL work?" has a crisp answer: accuracy
on a held-out test split that shares no question with the train split.

``write_task("addition", "data/addition", n_train=5000, n_test=500)`` writes::

    train.jsonl  {"prompt": "12+7=", "answer": "19"}        RL prompts
    test.jsonl   same shape, disjoint questions              evaluation
    sft.jsonl    {"prompt": ..., "response": "19"}           from the train split
    pairs.jsonl  {"prompt": ..., "chosen": "19", "rejected": "18"}   from the train split

A chat task (``Task.messages`` set) writes ``messages`` instead of ``prompt``: the
question as the last user turn, rendered by the model's own chat template when
loaded (``chat_addition``: ``{"messages": [... {"role": "user", "content": "What
is 4 + 7?"}], "answer": "11"}``). ``chat_multiplication`` and ``chat_calculator`` ask the
same products (a 3-digit by a 2-digit number) directly and with the calculator tool of
``rollout.env=calculator``.

Everything is deterministic given ``seed``. The test split depends only on
``seed``, ``n_test`` and the options, so growing ``n_train`` keeps the same
test set and results stay comparable.
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Task:
    """A generator of (prompt, answer) questions.

    ``sample(rng, opts)`` draws one question; the prompt text identifies the
    question, which is how train and test are kept disjoint. ``corrupt(rng,
    answer)`` returns a plausible but different wrong answer (for DPO pairs).
    ``space_size(opts)`` counts distinct questions so impossible requests fail
    fast instead of looping.
    """

    name: str
    description: str
    defaults: dict
    sample: Callable[[random.Random, dict], tuple[str, str]]
    corrupt: Callable[[random.Random, str], str]
    space_size: Callable[[dict], int]
    check_options: Callable[[dict], None]
    messages: Callable[[str], list[dict]] | None = None  # chat tasks: the prompt text -> the chat's turns


# --------------------------------------------------------------------------- numbers


def _check_digits(opts: dict) -> None:
    lo, hi = opts["min_digits"], opts["max_digits"]
    for key in ("min_digits", "max_digits"):
        if not isinstance(opts[key], int) or isinstance(opts[key], bool) or opts[key] < 1:
            raise ValueError(f"option {key} must be a positive integer, got {opts[key]!r}")
    if lo > hi:
        raise ValueError(f"option min_digits={lo} is larger than max_digits={hi}")


def _number(rng: random.Random, opts: dict) -> int:
    # Pick the digit count first so short and long operands are equally common
    # (uniform over values would make almost every operand max_digits long).
    k = rng.randint(opts["min_digits"], opts["max_digits"])
    return rng.randint(0 if k == 1 else 10 ** (k - 1), 10**k - 1)


def _numbers_in_range(opts: dict) -> int:
    return sum(10 if k == 1 else 9 * 10 ** (k - 1) for k in range(opts["min_digits"], opts["max_digits"] + 1))


def _binary_sampler(symbol: str, op: Callable[[int, int], int]):
    def sample(rng: random.Random, opts: dict) -> tuple[str, str]:
        a, b = _number(rng, opts), _number(rng, opts)
        return f"{a}{symbol}{b}=", str(op(a, b))

    return sample


def _corrupt_number(rng: random.Random, answer: str) -> str:
    """A near miss: off by a small amount, or one digit changed."""
    value = int(answer)
    while True:
        if rng.random() < 0.5 or len(answer) == 1:
            offset = rng.choice([-1, 1]) * rng.randint(1, 10)
            wrong = value + offset if value + offset >= 0 else value - offset
            text = str(wrong)
        else:
            i = rng.randrange(len(answer))
            digits = "123456789" if i == 0 else "0123456789"  # keep it a well-formed number
            text = answer[:i] + rng.choice(digits) + answer[i + 1 :]
        if text != answer:
            return text


# --------------------------------------------------------------------------- strings


def _check_lengths(opts: dict) -> None:
    for key in ("min_len", "max_len"):
        if not isinstance(opts[key], int) or isinstance(opts[key], bool) or opts[key] < 1:
            raise ValueError(f"option {key} must be a positive integer, got {opts[key]!r}")
    if opts["min_len"] > opts["max_len"]:
        raise ValueError(f"option min_len={opts['min_len']} is larger than max_len={opts['max_len']}")


def _sample_reverse(rng: random.Random, opts: dict) -> tuple[str, str]:
    s = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(opts["min_len"], opts["max_len"])))
    return f"reverse {s}=", s[::-1]


def _corrupt_string(rng: random.Random, answer: str) -> str:
    """A typical mistake: not reversing, swapping two neighbours, or one wrong letter."""
    candidates = [answer[::-1]]
    if len(answer) > 1:
        i = rng.randrange(len(answer) - 1)
        candidates.append(answer[:i] + answer[i + 1] + answer[i] + answer[i + 2 :])
    rng.shuffle(candidates)
    for text in candidates:
        if text != answer:
            return text
    # Palindromes and repeated letters survive the above; a changed letter always differs.
    i = rng.randrange(len(answer))
    letter = rng.choice([c for c in string.ascii_lowercase if c != answer[i]])
    return answer[:i] + letter + answer[i + 1 :]


# --------------------------------------------------------------------------- chat

# One worked example before the question: it shows the bare-number format, which a small instruct model
# then copies (and gets wrong more often than when it writes the sum out, which RL can discover).
_CHAT_EXAMPLE = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]


def _sample_chat_addition(rng: random.Random, opts: dict) -> tuple[str, str]:
    while True:
        a, b = _number(rng, opts), _number(rng, opts)
        question = f"What is {a} + {b}?"
        if question != _CHAT_EXAMPLE[0]["content"]:  # the worked example is never asked (its answer is shown)
            return question, str(a + b)


def _chat_addition_messages(question: str) -> list[dict]:
    return [*_CHAT_EXAMPLE, {"role": "user", "content": question}]


# Multiplication of an a_digits-digit by a b_digits-digit number, asked in one of four phrasings, for a model that
# cannot multiply in its head: `chat_multiplication` asks for the product directly (one worked example with the
# bare number), `chat_calculator` asks the same questions with the calculator of reflow.envs.calculator described
# in a system prompt and shown once (one worked example of the tool syntax). The two draw the same questions
# for the same seed and options, so their held-out splits are the same questions asked two ways.
_PRODUCT_PHRASINGS = ("What is {a} * {b}?", "Compute {a} times {b}.", "Multiply {a} by {b}.",
                      "What is the product of {a} and {b}?")
_PRODUCT_EXAMPLE_OPERANDS = (512, 34)
_PRODUCT_EXAMPLE = _PRODUCT_PHRASINGS[0].format(a=512, b=34)
CALCULATOR_SYSTEM = ("You have a calculator. To use it, write CALC followed by an arithmetic expression on its own "
                     "line; the next line then shows = and its value. When you know the answer, write ANSWER "
                     "followed by the number.")
CALCULATOR_EXAMPLE = [{"role": "user", "content": _PRODUCT_EXAMPLE},
                      {"role": "assistant", "content": "CALC 512*34\n=17408\nANSWER 17408"}]


def _check_operand_digits(opts: dict) -> None:
    for key in ("a_digits", "b_digits"):
        if not isinstance(opts[key], int) or isinstance(opts[key], bool) or opts[key] < 1:
            raise ValueError(f"option {key} must be a positive integer, got {opts[key]!r}")


def _digits_range(k: int) -> tuple[int, int]:
    return (0 if k == 1 else 10 ** (k - 1)), 10**k - 1


def _sample_chat_product(rng: random.Random, opts: dict) -> tuple[str, str]:
    while True:
        a, b = rng.randint(*_digits_range(opts["a_digits"])), rng.randint(*_digits_range(opts["b_digits"]))
        question = rng.choice(_PRODUCT_PHRASINGS).format(a=a, b=b)
        if (a, b) != _PRODUCT_EXAMPLE_OPERANDS:  # the worked example is never asked, in any phrasing
            return question, str(a * b)


def _product_space(opts: dict) -> int:
    (a0, a1), (b0, b1) = _digits_range(opts["a_digits"]), _digits_range(opts["b_digits"])
    example_drawable = (opts["a_digits"], opts["b_digits"]) == (3, 2)  # 512 and 34
    return ((a1 - a0 + 1) * (b1 - b0 + 1) - example_drawable) * len(_PRODUCT_PHRASINGS)


def _chat_multiplication_messages(question: str) -> list[dict]:
    return [{"role": "user", "content": _PRODUCT_EXAMPLE}, {"role": "assistant", "content": "17408"},
            {"role": "user", "content": question}]


def _chat_calculator_messages(question: str) -> list[dict]:
    return [{"role": "system", "content": CALCULATOR_SYSTEM}, *CALCULATOR_EXAMPLE, {"role": "user", "content": question}]


def _chat_product_task(name: str, description: str, messages: Callable[[str], list[dict]]) -> Task:
    """A task of the chat products: the same questions (sampler, options), asked through `messages`."""
    return Task(name=name, description=description, defaults={"a_digits": 3, "b_digits": 2},
                sample=_sample_chat_product, corrupt=_corrupt_number, space_size=_product_space,
                check_options=_check_operand_digits, messages=messages)


# --------------------------------------------------------------------------- registry

TASKS: dict[str, Task] = {
    "addition": Task(
        name="addition",
        description="a+b= with operands of min_digits..max_digits digits",
        defaults={"min_digits": 1, "max_digits": 3},
        sample=_binary_sampler("+", lambda a, b: a + b),
        corrupt=_corrupt_number,
        space_size=lambda o: _numbers_in_range(o) ** 2,
        check_options=_check_digits,
    ),
    "multiplication": Task(
        name="multiplication",
        description="a*b= with operands of min_digits..max_digits digits",
        defaults={"min_digits": 1, "max_digits": 2},
        sample=_binary_sampler("*", lambda a, b: a * b),
        corrupt=_corrupt_number,
        space_size=lambda o: _numbers_in_range(o) ** 2,
        check_options=_check_digits,
    ),
    "reverse": Task(
        name="reverse",
        description="reverse a random lowercase string of min_len..max_len letters",
        defaults={"min_len": 3, "max_len": 8},
        sample=_sample_reverse,
        corrupt=_corrupt_string,
        space_size=lambda o: sum(26**k for k in range(o["min_len"], o["max_len"] + 1)),
        check_options=_check_lengths,
    ),
    "chat_addition": Task(
        name="chat_addition",
        description="'What is a + b?' as a chat (one worked example first) for pretrained chat models",
        defaults={"min_digits": 1, "max_digits": 1},
        sample=_sample_chat_addition,
        corrupt=_corrupt_number,
        space_size=lambda o: _numbers_in_range(o) ** 2 - (o["min_digits"] == 1),  # less the worked example
        check_options=_check_digits,
        messages=_chat_addition_messages,
    ),
    "chat_multiplication": _chat_product_task(
        "chat_multiplication", "'What is a * b?' (four phrasings) as a chat, answered directly (one worked example "
        "first)", _chat_multiplication_messages),
    "chat_calculator": _chat_product_task(
        "chat_calculator", "chat_multiplication's questions with the calculator tool (rollout.env=calculator) "
        "described in a system prompt and shown once", _chat_calculator_messages),
}


def get_task(name: str) -> Task:
    """Look up a bundled task, with an error listing the available ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def _resolve_options(task: Task, options: dict) -> dict:
    unknown = sorted(set(options) - set(task.defaults))
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r} for task {task.name!r}; "
                         f"available options: {', '.join(task.defaults)}")
    opts = {**task.defaults, **options}
    task.check_options(opts)
    return opts


def _draw_unique(task: Task, opts: dict, rng: random.Random, n: int, exclude: set[str]) -> list[tuple[str, str]]:
    """Draw ``n`` distinct questions whose prompts are not in ``exclude``."""
    out: list[tuple[str, str]] = []
    seen = set(exclude)
    # Rejection sampling; the cap only matters when n is close to the space size.
    budget = 50 * n + 10_000
    while len(out) < n and budget > 0:
        budget -= 1
        prompt, answer = task.sample(rng, opts)
        if prompt not in seen:
            seen.add(prompt)
            out.append((prompt, answer))
    if len(out) < n:
        raise ValueError(f"task {task.name!r} could only draw {len(out)} of {n} distinct questions with options "
                         f"{opts}; ask for fewer examples or widen the options")
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_task(name: str, out_dir, *, n_train: int, n_test: int, seed: int = 0, **options) -> dict[str, Path]:
    """Generate a bundled task into ``out_dir``; returns ``{"train", "test", "sft", "pairs"}`` -> path.

    ``options`` are task-specific (see ``TASKS[name].defaults``); unknown names
    are rejected. Train and test never share a question.
    """
    task = get_task(name)
    opts = _resolve_options(task, options)
    if not isinstance(n_train, int) or n_train < 1:
        raise ValueError(f"n_train must be a positive integer, got {n_train!r}")
    if not isinstance(n_test, int) or n_test < 0:
        raise ValueError(f"n_test must be a non-negative integer, got {n_test!r}")
    space = task.space_size(opts)
    if n_train + n_test > space:
        raise ValueError(f"task {name!r} with options {opts} has only {space} distinct questions, but "
                         f"n_train + n_test = {n_train + n_test}; ask for fewer or widen the options")

    # Separate streams per split (string seeds hash deterministically), so the
    # test set does not move when n_train changes.
    test = _draw_unique(task, opts, random.Random(f"{seed}:test"), n_test, exclude=set())
    train = _draw_unique(task, opts, random.Random(f"{seed}:train"), n_train, exclude={p for p, _ in test})
    pair_rng = random.Random(f"{seed}:pairs")

    def ask(p: str) -> dict:
        return {"messages": task.messages(p)} if task.messages else {"prompt": p}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {split: out / f"{split}.jsonl" for split in ("train", "test", "sft", "pairs")}
    _write_jsonl(files["train"], [{**ask(p), "answer": a} for p, a in train])
    _write_jsonl(files["test"], [{**ask(p), "answer": a} for p, a in test])
    _write_jsonl(files["sft"], [{**ask(p), "response": a} for p, a in train])
    _write_jsonl(files["pairs"],
                 [{**ask(p), "chosen": a, "rejected": task.corrupt(pair_rng, a)} for p, a in train])
    return files
