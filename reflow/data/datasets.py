"""Loading and validating the user's datasets.

Three shapes of data, each a JSON Lines (``.jsonl`` / ``.json``, one object per
line) or Parquet (``.parquet``) file:

* prompts (PPO/GRPO): ``prompt`` or ``messages``, optional ``answer``;
* SFT: ``prompt`` or ``messages``, plus ``response``; or a whole conversation in ``messages`` without
  ``response`` (multi-turn SFT: the loss is on the assistant turns, user/tool turns are context);
* preferences (DPO): ``prompt`` or ``messages``, plus ``chosen`` and ``rejected``.

Every problem is reported as a :class:`DataError` whose one-line message names
the file, the row ("line 17" for JSONL, 1-based as an editor shows it; "row 17"
for Parquet, 0-based as pyarrow/pandas index it) and what to do about it. Bad
rows either stop loading at the first one (``on_bad_row="error"``, the default,
so mistakes are not silently trained on) or are skipped, counted and logged
(``on_bad_row="skip"``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

log = logging.getLogger("reflow.data")

# How many skipped rows get their own warning line before we only summarise.
_MAX_SKIP_WARNINGS = 10

_JSONL_SUFFIXES = (".jsonl", ".json")
_PARQUET_SUFFIXES = (".parquet",)

# Fields that become structured parts of an example; everything else goes to `meta`.
_PROMPT_FIELDS = ("prompt", "messages")


class DataError(ValueError):
    """A user-facing problem with a dataset file; the message says where and what to do."""


@dataclass
class PromptExample:
    """One RL prompt. ``row`` is the JSONL line (1-based) or Parquet row index (0-based)."""

    row: int
    prompt_text: str
    prompt_ids: list[int]
    answer: str | None
    meta: dict = field(default_factory=dict)


@dataclass
class SFTExample:
    """One supervised example; ``response_ids`` ends with the tokenizer's eos id (a ``response`` row) or with
    the chat template's end of the last assistant turn (a conversation). ``response_mask`` (conversations
    only; None = every response token): 1 on the tokens the loss trains, the assistant turns, 0 on the user,
    tool and system turns between them."""

    row: int
    prompt_ids: list[int]
    response_ids: list[int]
    response_mask: list[int] | None = None


@dataclass
class PreferenceExample:
    """One preference pair; ``chosen_ids`` and ``rejected_ids`` both end with eos. ``meta``: the row's other
    columns (e.g. ``task``, which the advantage model reports and regulates its scores by)."""

    row: int
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    meta: dict = field(default_factory=dict)


class _BadRow(Exception):
    """Raised inside row parsing; the loader adds file/row and decides error vs skip."""


# --------------------------------------------------------------------------- reading


def _row_word(path: Path) -> str:
    return "row" if path.suffix.lower() in _PARQUET_SUFFIXES else "line"


def _read_located(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """Read a data file into ``(row_number, row_dict)`` pairs.

    The row number is what error messages show: the 1-based line for JSONL
    (blank lines are skipped but still counted, so it matches the editor), the
    0-based row index for Parquet.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file not found: {p} (check the path in your config; relative paths are "
                        f"resolved from {Path.cwd()})")
    if p.is_dir():
        raise DataError(f"{p} is a directory; point the config at a .jsonl or .parquet file")
    suffix = p.suffix.lower()
    if suffix in _JSONL_SUFFIXES:
        return _read_jsonl(p)
    if suffix in _PARQUET_SUFFIXES:
        return _read_parquet(p)
    raise DataError(f"{p}: unknown data file extension {p.suffix!r}; use JSON Lines (.jsonl) or Parquet (.parquet)")


def _read_jsonl(p: Path) -> list[tuple[int, dict]]:
    rows: list[tuple[int, dict]] = []
    # Binary read + per-line decode so an encoding error can name its line.
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{p} line {lineno}: not valid UTF-8 ({e.reason}); re-save the file as UTF-8") from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{p} line {lineno}: invalid JSON ({e.msg} at column {e.colno}); "
                                f"{_jsonl_hint(lineno, text)}") from None
            if not isinstance(obj, dict):
                raise DataError(f"{p} line {lineno}: expected a JSON object like {{\"prompt\": ...}}, "
                                f"got {type(obj).__name__}; {_jsonl_hint(lineno, text)}")
            rows.append((lineno, obj))
    return rows


def _jsonl_hint(lineno: int, text: str) -> str:
    # A whole-file JSON array is the most common mistake; say how to convert it.
    if lineno == 1 and text.lstrip().startswith("["):
        return ("this looks like a JSON array; reflow expects JSON Lines, one object per line "
                "(convert with: jq -c '.[]' in.json > out.jsonl)")
    return "each line must be one JSON object"


def _read_parquet(p: Path) -> list[tuple[int, dict]]:
    import pyarrow.parquet as pq  # imported lazily: only Parquet users pay for it

    try:
        table = pq.read_table(p)
    except Exception as e:  # pyarrow raises several unrelated types for corrupt files
        raise DataError(f"{p}: could not read Parquet file ({type(e).__name__}: {_one_line(e)}); "
                        "check that it is a valid Parquet file") from None
    return list(enumerate(table.to_pylist()))


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Read every row of a JSONL or Parquet file as a dict.

    Raises :class:`DataError` for a missing file, an unknown extension, an
    invalid JSON line or a line that is not a JSON object.
    """
    return [row for _, row in _read_located(path)]


# --------------------------------------------------------------------------- fields


def _present(row: dict, key: str) -> bool:
    # Parquet files with a mix of 'prompt' and 'messages' rows store the unused
    # column as null, so None counts as absent.
    return row.get(key) is not None


def _require_str(row: dict, key: str, what: str) -> str:
    if not _present(row, key):
        raise _BadRow(f"missing field '{key}' ({what}); add it to every row")
    value = row[key]
    if not isinstance(value, str):
        raise _BadRow(f"field '{key}' must be a string, got {type(value).__name__} {_short(value)}")
    return value


def _one_line(e: Exception) -> str:
    # Third-party errors (pyarrow, jinja) can span lines; DataError messages must not.
    return " ".join(str(e).split())


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _validate_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise _BadRow("field 'messages' must be a non-empty list of {\"role\": ..., \"content\": ...} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise _BadRow(f"messages[{i}] must be an object with string 'role' and 'content', got {_short(m)}")
    return messages


def render_prompt(row: dict, tokenizer, *, source: str) -> str:
    """Turn a row's ``prompt`` or ``messages`` into the prompt text fed to the model.

    ``prompt`` (a string) is used as-is. ``messages`` (a list of ``{role, content}``)
    goes through ``tokenizer.apply_chat_template(..., add_generation_prompt=True)``
    so the text ends where the assistant's reply starts. ``source`` (e.g.
    ``"train.jsonl line 3"``) prefixes error messages.
    """
    try:
        return _render_prompt(row, tokenizer)
    except _BadRow as e:
        raise DataError(f"{source}: {e}") from None


def _render_prompt(row: dict, tokenizer) -> str:
    has_prompt, has_messages = _present(row, "prompt"), _present(row, "messages")
    if has_prompt and has_messages:
        raise _BadRow("has both 'prompt' and 'messages'; keep only one of them")
    if has_prompt:
        text = _require_str(row, "prompt", "the prompt text")
    elif has_messages:
        messages = _validate_messages(row["messages"])
        if not getattr(tokenizer, "chat_template", None):
            raise _BadRow("uses 'messages' but the tokenizer has no chat template; use a 'prompt' string "
                          "instead, or a tokenizer that has a chat template")
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # template errors come from jinja with many exception types
            reason = f"{type(e).__name__}: {_one_line(e)}"
            raise _BadRow(f"the tokenizer's chat template failed on 'messages' ({reason})") from None
    else:
        raise _BadRow("missing field 'prompt' (or 'messages'); add a 'prompt' string or a 'messages' list to every row")
    if not text.strip():
        raise _BadRow("prompt is empty; remove the row or give it a prompt")
    return text


def _answer(row: dict) -> str | None:
    value = row.get("answer")
    if value is None:
        return None
    # bool is an int subclass, but True/False as an answer is almost surely a mistake.
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _BadRow(f"field 'answer' must be a string or number, got {type(value).__name__} {_short(value)}")
    if isinstance(value, float):
        if math.isnan(value):  # pandas writes missing numbers as NaN
            return None
        if value.is_integer():  # int columns with gaps become float; 42.0 should still match "42"
            return str(int(value))
    return str(value)


def _tokenize(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _eos_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError("the tokenizer has no eos_token; responses must end with eos, so use a tokenizer "
                        "that defines one")
    return eos


def _check_total(total: int, max_len: int, what: str) -> None:
    if total > max_len:
        raise _BadRow(f"{what} is {total} tokens, longer than data.max_len={max_len}; raise data.max_len, "
                      "shorten the row, or set data.on_bad_row=skip to drop such rows")


# --------------------------------------------------------------------------- loading

T = TypeVar("T")


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _load(path, on_bad_row: str, parse: Callable[[int, dict], T]) -> tuple[list[T], int]:
    """Shared loop: parse each row, then stop at or skip bad rows per ``on_bad_row``."""
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"data.on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    located = _read_located(path)
    p = Path(path)
    word = _row_word(p)
    if not located:
        raise DataError(f"{p} has no rows; add data or point the config at another file")

    examples: list[T] = []
    skipped = 0
    first_reason = ""
    for rownum, row in located:
        try:
            examples.append(parse(rownum, row))
        except _BadRow as e:
            where = f"{p} {word} {rownum}"
            if on_bad_row == "error":
                raise DataError(f"{where}: {e}") from None
            skipped += 1
            first_reason = first_reason or f"{where}: {e}"
            if skipped <= _MAX_SKIP_WARNINGS:
                log.warning("skipping %s: %s", where, e)

    if skipped > _MAX_SKIP_WARNINGS:
        log.warning("skipped %d of %d rows in %s (only the first %d were listed)",
                    skipped, len(located), p, _MAX_SKIP_WARNINGS)
    if not examples:
        raise DataError(f"{p}: all {len(located)} rows were skipped as bad, e.g. {first_reason}")
    return examples, skipped


def load_prompts(path, tokenizer, *, max_prompt_len: int, on_bad_row: str = "error"
                 ) -> tuple[list[PromptExample], int]:
    """Load RL prompts: rows with ``prompt`` or ``messages`` and an optional ``answer``.

    Numeric answers become strings (``42.0`` -> ``"42"``). Columns other than
    prompt/messages/answer are kept in ``meta`` (so custom reward functions can
    use them later). Returns ``(examples, n_skipped)``.
    """
    _check_positive("data.max_prompt_len", max_prompt_len)

    def parse(rownum: int, row: dict) -> PromptExample:
        text = _render_prompt(row, tokenizer)
        ids = _tokenize(tokenizer, text)
        if len(ids) > max_prompt_len:
            raise _BadRow(f"prompt is {len(ids)} tokens, longer than data.max_prompt_len={max_prompt_len}; "
                          "raise data.max_prompt_len, or set data.on_bad_row=skip to drop such rows")
        meta = {k: v for k, v in row.items() if k not in (*_PROMPT_FIELDS, "answer")}
        return PromptExample(row=rownum, prompt_text=text, prompt_ids=ids, answer=_answer(row), meta=meta)

    return _load(path, on_bad_row, parse)


def _conversation(row: dict, tokenizer) -> tuple[list[int], list[int], list[int]]:
    """A multi-turn SFT row (``messages`` with assistant turns, no ``response``) -> (context ids, ids from the
    first assistant turn to the end of the last, their loss mask).

    The conversation is rendered once by the chat template and tokenized once (so the tokens are those a
    model sees in use); assistant turn i spans the characters from the end of render(messages[:i],
    add_generation_prompt) to the end of render(messages[:i+1]) -- its content and the template's end-of-turn
    tokens, without its header -- and a token is trained when it starts inside such a span (the tokenizer's
    offsets). This needs a template that renders a conversation turn by turn (each render is a prefix of the
    next), which ChatML-style templates do; one that rewrites earlier turns is refused.
    """
    messages = _validate_messages(row["messages"])
    if not getattr(tokenizer, "chat_template", None):
        raise _BadRow("uses 'messages' but the tokenizer has no chat template; use 'prompt' and 'response' strings "
                      "or a model folder whose tokenizer has a chat template")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise _BadRow("has 'messages' but no 'response' and no assistant turn to train on; add a 'response' string "
                      "or assistant messages")
    if turns[0] == 0:
        raise _BadRow("messages[0] is an assistant turn; a conversation starts with a system or user turn")

    def render(msgs, gen=False):
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)

    try:
        text = render(messages)
        turn_texts = [(i, render(messages[:i], gen=True), render(messages[:i + 1])) for i in turns]
    except Exception as e:  # noqa: BLE001 - jinja/template errors become a row error
        raise _BadRow(f"the tokenizer's chat template failed on 'messages' ({_one_line(e)})") from None
    spans = []
    for i, before, after in turn_texts:
        if not (after.startswith(before) and text.startswith(after)):
            raise _BadRow(f"the tokenizer's chat template does not render the conversation turn by turn (turn {i} "
                          "changes what comes before it), so its assistant turns cannot be located; give "
                          "'prompt'/'response' rows instead")
        spans.append((len(before), len(after)))
    if not getattr(tokenizer, "is_fast", False):
        raise _BadRow("a conversation row needs a fast tokenizer (its token offsets locate the assistant turns); "
                      "use a model folder with a tokenizer.json, or 'prompt'/'response' rows")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    mask = [int(any(a <= start < b for a, b in spans)) for start, _ in enc["offset_mapping"]]
    first, last = mask.index(1), len(mask) - mask[::-1].index(1)
    return ids[:first], ids[first:last], mask[first:last]


def load_sft(path, tokenizer, *, max_len: int, on_bad_row: str = "error") -> tuple[list[SFTExample], int]:
    """Load SFT rows: ``prompt`` or ``messages`` plus a ``response`` string, or a conversation (``messages``
    with assistant turns and no ``response``: the loss is on the assistant turns only, see `_conversation`).

    ``response_ids`` gets the eos id appended so the model learns to stop; a
    row whose prompt + response (with eos) exceeds ``max_len`` tokens is bad.
    """
    _check_positive("data.max_len", max_len)
    eos = _eos_id(tokenizer)

    def parse(rownum: int, row: dict) -> SFTExample:
        if _present(row, "messages") and not _present(row, "response"):
            prompt_ids, response_ids, mask = _conversation(row, tokenizer)
            _check_total(len(prompt_ids) + len(response_ids), max_len, "the conversation")
            return SFTExample(row=rownum, prompt_ids=prompt_ids, response_ids=response_ids, response_mask=mask)
        prompt_ids = _tokenize(tokenizer, _render_prompt(row, tokenizer))
        response_ids = _tokenize(tokenizer, _require_str(row, "response", "the target reply")) + [eos]
        _check_total(len(prompt_ids) + len(response_ids), max_len, "prompt + response")
        return SFTExample(row=rownum, prompt_ids=prompt_ids, response_ids=response_ids)

    return _load(path, on_bad_row, parse)


def load_preferences(path, tokenizer, *, max_len: int, on_bad_row: str = "error"
                     ) -> tuple[list[PreferenceExample], int]:
    """Load preference pairs: ``prompt`` or ``messages`` plus ``chosen`` and ``rejected`` strings.

    Both completions get eos appended; a row where prompt + the longer
    completion exceeds ``max_len`` tokens is bad. Other columns are kept in ``meta``.
    """
    _check_positive("data.max_len", max_len)
    eos = _eos_id(tokenizer)

    def parse(rownum: int, row: dict) -> PreferenceExample:
        prompt_ids = _tokenize(tokenizer, _render_prompt(row, tokenizer))
        chosen_ids = _tokenize(tokenizer, _require_str(row, "chosen", "the preferred reply")) + [eos]
        rejected_ids = _tokenize(tokenizer, _require_str(row, "rejected", "the dispreferred reply")) + [eos]
        _check_total(len(prompt_ids) + max(len(chosen_ids), len(rejected_ids)), max_len,
                     "prompt + longer of chosen/rejected")
        meta = {k: v for k, v in row.items() if k not in (*_PROMPT_FIELDS, "chosen", "rejected")}
        return PreferenceExample(row=rownum, prompt_ids=prompt_ids, chosen_ids=chosen_ids, rejected_ids=rejected_ids,
                                 meta=meta)

    return _load(path, on_bad_row, parse)
