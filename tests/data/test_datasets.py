import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reflow.data.datasets import (
    DataError,
    PromptExample,
    load_preferences,
    load_prompts,
    load_sft,
    read_rows,
    render_prompt,
)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_load_prompts_jsonl(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1+2=", "answer": "3"}, {"prompt": "hi"}])
    examples, skipped = load_prompts(path, tokenizer, max_prompt_len=16)
    assert skipped == 0
    assert examples[0] == PromptExample(row=1, prompt_text="1+2=", prompt_ids=tokenizer("1+2=", add_special_tokens=False)["input_ids"],
                                        answer="3", meta={})
    assert len(examples[0].prompt_ids) == 4  # one token per byte
    assert examples[1].answer is None and examples[1].row == 2


def test_numeric_answers_become_strings(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "answer": 7}, {"prompt": "b", "answer": 2.0},
                                              {"prompt": "c", "answer": 0.5}])
    examples, _ = load_prompts(path, tokenizer, max_prompt_len=16)
    assert [e.answer for e in examples] == ["7", "2", "0.5"]


def test_load_prompts_parquet_uses_zero_based_rows(tmp_path, tokenizer):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["1+1=", None], "answer": ["2", "x"], "source": ["a", "b"]}), path)
    with pytest.raises(DataError, match=r"p\.parquet row 1: missing field 'prompt'"):
        load_prompts(path, tokenizer, max_prompt_len=16)
    examples, skipped = load_prompts(path, tokenizer, max_prompt_len=16, on_bad_row="skip")
    assert skipped == 1
    assert examples[0].row == 0 and examples[0].prompt_text == "1+1=" and examples[0].meta == {"source": "a"}


def test_parquet_messages_column(tmp_path, tokenizer):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"messages": [[{"role": "user", "content": "hi"}]], "answer": ["x"]}), path)
    examples, _ = load_prompts(path, tokenizer, max_prompt_len=64)
    assert examples[0].prompt_text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_messages_use_chat_template(tmp_path, tokenizer):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2="}]
    path = write_jsonl(tmp_path / "p.jsonl", [{"messages": msgs, "answer": "4"}])
    [ex], _ = load_prompts(path, tokenizer, max_prompt_len=128)
    expected = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n2+2=<|im_end|>\n<|im_start|>assistant\n"
    assert ex.prompt_text == expected
    # Special tokens in the rendered text map to their single ids.
    assert ex.prompt_ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_messages_without_chat_template(tmp_path, tokenizer_no_template):
    path = write_jsonl(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"p\.jsonl line 1: .*no chat template.*'prompt'"):
        load_prompts(path, tokenizer_no_template, max_prompt_len=64)


def test_render_prompt_direct(tokenizer, tokenizer_no_template):
    assert render_prompt({"prompt": "x"}, tokenizer, source="s") == "x"
    with pytest.raises(DataError, match=r"^src: .*chat template"):
        render_prompt({"messages": [{"role": "user", "content": "q"}]}, tokenizer_no_template, source="src")
    with pytest.raises(DataError, match="both 'prompt' and 'messages'"):
        render_prompt({"prompt": "x", "messages": [{"role": "user", "content": "q"}]}, tokenizer, source="s")


def test_missing_field_names_file_and_line(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b"}, {"question": "c"}])
    with pytest.raises(DataError) as err:
        load_prompts(path, tokenizer, max_prompt_len=16)
    msg = str(err.value)
    assert str(path) in msg and "line 3" in msg and "missing field 'prompt'" in msg
    assert "\n" not in msg


def test_wrong_types(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": 5}])
    with pytest.raises(DataError, match="'prompt' must be a string, got int"):
        load_prompts(path, tokenizer, max_prompt_len=16)
    path = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "a", "answer": [1]}])
    with pytest.raises(DataError, match="'answer' must be a string or number, got list"):
        load_prompts(path, tokenizer, max_prompt_len=16)


def test_empty_prompt(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "  "}])
    with pytest.raises(DataError, match="line 1: prompt is empty"):
        load_prompts(path, tokenizer, max_prompt_len=16)


def test_invalid_json_line(tmp_path, tokenizer):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": oops}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"p\.jsonl line 3: invalid JSON"):
        read_rows(path)


def test_non_object_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n["prompt"]\n', encoding="utf-8")
    with pytest.raises(DataError, match="line 2: expected a JSON object"):
        read_rows(path)


def test_read_rows_skips_blank_lines(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('{"a": 1}\n\n{"a": 2}\n', encoding="utf-8")
    assert read_rows(path) == [{"a": 1}, {"a": 2}]


def test_missing_file_and_bad_extension(tmp_path, tokenizer):
    with pytest.raises(DataError, match="data file not found: .*nope.jsonl"):
        load_prompts(tmp_path / "nope.jsonl", tokenizer, max_prompt_len=16)
    (tmp_path / "d.csv").write_text("prompt\nx\n")
    with pytest.raises(DataError, match=r"unknown data file extension '\.csv'"):
        read_rows(tmp_path / "d.csv")


def test_too_long_prompt(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x" * 20}])
    with pytest.raises(DataError) as err:
        load_prompts(path, tokenizer, max_prompt_len=8)
    msg = str(err.value)
    assert "20 tokens" in msg and "data.max_prompt_len=8" in msg and "data.on_bad_row=skip" in msg


def test_skip_mode_counts_and_logs(tmp_path, tokenizer, caplog):
    rows = [{"prompt": "ok"}] + [{"nope": i} for i in range(12)] + [{"prompt": "x" * 50}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="reflow.data"):
        examples, skipped = load_prompts(path, tokenizer, max_prompt_len=8, on_bad_row="skip")
    assert [e.prompt_text for e in examples] == ["ok"]
    assert skipped == 13
    lines = [r.getMessage() for r in caplog.records if r.name == "reflow.data"]
    assert len(lines) == 11  # ten per-row lines, then one summary
    assert "line 2" in lines[0]
    assert "skipped 13 of 14 rows" in lines[-1]


def test_all_rows_skipped_is_an_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"nope": 1}, {"nope": 2}])
    with pytest.raises(DataError, match="all 2 rows were skipped"):
        load_prompts(path, tokenizer, max_prompt_len=8, on_bad_row="skip")


def test_empty_file(tmp_path, tokenizer):
    path = tmp_path / "p.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match="has no rows"):
        load_prompts(path, tokenizer, max_prompt_len=8)


def test_bad_on_bad_row(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    with pytest.raises(ValueError, match="data.on_bad_row"):
        load_prompts(path, tokenizer, max_prompt_len=8, on_bad_row="ignore")


def test_extra_columns_go_to_meta(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "answer": "b", "id": 7, "tags": ["x"]}])
    [ex], _ = load_prompts(path, tokenizer, max_prompt_len=8)
    assert ex.meta == {"id": 7, "tags": ["x"]}


def test_load_sft_appends_eos(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "1+1=", "response": "2"}])
    [ex], skipped = load_sft(path, tokenizer, max_len=32)
    assert skipped == 0 and ex.row == 1
    assert ex.prompt_ids == tokenizer("1+1=", add_special_tokens=False)["input_ids"]
    assert ex.response_ids == tokenizer("2", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def test_load_sft_errors(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "a"}])
    with pytest.raises(DataError, match="line 1: missing field 'response'"):
        load_sft(path, tokenizer, max_len=32)
    # 4 prompt + 3 response + eos = 8 tokens
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "abcd", "response": "xyz"}])
    assert load_sft(path, tokenizer, max_len=8)[0]
    with pytest.raises(DataError, match="8 tokens, longer than data.max_len=7"):
        load_sft(path, tokenizer, max_len=7)


def test_load_preferences_appends_eos(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+1=", "chosen": "2", "rejected": "3", "src": "z"}])
    [ex], _ = load_preferences(path, tokenizer, max_len=32)
    eos = tokenizer.eos_token_id
    assert ex.chosen_ids[-1] == eos and ex.rejected_ids[-1] == eos
    assert ex.chosen_ids[:-1] == tokenizer("2", add_special_tokens=False)["input_ids"]


def test_load_preferences_errors(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "chosen": "b"}, {"prompt": "a", "chosen": "b", "rejected": "c"}])
    with pytest.raises(DataError, match="line 1: missing field 'rejected'"):
        load_preferences(path, tokenizer, max_len=32)
    examples, skipped = load_preferences(path, tokenizer, max_len=32, on_bad_row="skip")
    assert skipped == 1 and examples[0].row == 2
    path = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "cccccc"}])
    with pytest.raises(DataError, match="data.max_len=4"):
        load_preferences(path, tokenizer, max_len=4)


CONVERSATION = [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "calc(2+3)"},
                {"role": "tool", "content": "5"}, {"role": "assistant", "content": "5"}]


def test_a_conversation_row_trains_on_its_assistant_turns_only_not_on_user_or_tool_turns(tmp_path, tokenizer):
    from reflow.runtime.calls.supervised import sft_batch

    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}])
    [ex], _ = load_sft(path, tokenizer, max_len=256)
    whole = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert tokenizer.decode(ex.prompt_ids + ex.response_ids) == whole  # one rendering, one tokenization
    assert tokenizer.decode(ex.prompt_ids) == "<|im_start|>user\n2+3?<|im_end|>\n<|im_start|>assistant\n"
    trained = [t for t, m in zip(ex.response_ids, ex.response_mask) if m]
    context = [t for t, m in zip(ex.response_ids, ex.response_mask) if not m]
    assert tokenizer.decode(trained) == "calc(2+3)<|im_end|>\n5<|im_end|>\n"  # both turns, with their end token
    assert tokenizer.decode(context) == "<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n"
    batch = sft_batch([ex])
    assert batch.tokens["action_mask"].tolist() == [0] * len(ex.prompt_ids) + ex.response_mask


def test_conversation_rows_without_an_assistant_turn_or_with_a_template_that_rewrites_turns_are_bad_rows(
        tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION[:1]}])
    with pytest.raises(DataError, match="line 1.*no assistant turn to train on"):
        load_sft(path, tokenizer, max_len=256)
    import copy

    counting = copy.deepcopy(tokenizer)  # a template that prints the number of turns first: no turn-by-turn prefix
    counting.chat_template = "{{ messages | length }}" + tokenizer.chat_template
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CONVERSATION}])
    with pytest.raises(DataError, match="line 1.*does not render the conversation turn by turn"):
        load_sft(path, counting, max_len=256)
