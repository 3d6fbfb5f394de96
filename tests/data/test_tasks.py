import json

import pytest

from reflow.data.tasks import TASKS, write_task


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_addition_files_and_answers(tmp_path):
    files = write_task("addition", tmp_path, n_train=200, n_test=50, seed=1)
    assert set(files) == {"train", "test", "sft", "pairs"}
    train, test, sft, pairs = (read(files[k]) for k in ("train", "test", "sft", "pairs"))
    assert len(train) == len(sft) == len(pairs) == 200 and len(test) == 50
    for row in train + test:
        a, b = row["prompt"].removesuffix("=").split("+")
        assert row["prompt"] == f"{int(a)}+{int(b)}="
        assert row["answer"] == str(int(a) + int(b))
        assert 0 <= int(a) <= 999 and 0 <= int(b) <= 999
    assert [r["prompt"] for r in sft] == [r["prompt"] for r in train]
    assert [r["response"] for r in sft] == [r["answer"] for r in train]
    for row, ref in zip(pairs, train):
        assert row["prompt"] == ref["prompt"] and row["chosen"] == ref["answer"]
        assert row["rejected"] != row["chosen"] and row["rejected"].isdigit()


def test_addition_is_deterministic_and_disjoint(tmp_path):
    a = write_task("addition", tmp_path / "a", n_train=300, n_test=100, seed=3)
    b = write_task("addition", tmp_path / "b", n_train=300, n_test=100, seed=3)
    for key in a:
        assert a[key].read_bytes() == b[key].read_bytes()
    train = {r["prompt"] for r in read(a["train"])}
    test = {r["prompt"] for r in read(a["test"])}
    assert len(train) == 300 and len(test) == 100 and not train & test
    c = write_task("addition", tmp_path / "c", n_train=300, n_test=100, seed=4)
    assert read(c["train"]) != read(a["train"])
    # Changing n_train leaves the test split alone.
    d = write_task("addition", tmp_path / "d", n_train=50, n_test=100, seed=3)
    assert d["test"].read_bytes() == a["test"].read_bytes()


def test_addition_digit_options(tmp_path):
    files = write_task("addition", tmp_path, n_train=50, n_test=10, min_digits=2, max_digits=2)
    for row in read(files["train"]):
        assert all(10 <= int(x) <= 99 for x in row["prompt"][:-1].split("+"))
    # 1-digit operands: exactly 100 distinct questions exist.
    write_task("addition", tmp_path / "all", n_train=90, n_test=10, max_digits=1)
    with pytest.raises(ValueError, match="only 100 distinct questions"):
        write_task("addition", tmp_path / "x", n_train=95, n_test=10, max_digits=1)


def test_multiplication_answers(tmp_path):
    files = write_task("multiplication", tmp_path, n_train=100, n_test=20)
    for row in read(files["train"]) + read(files["test"]):
        a, b = row["prompt"][:-1].split("*")
        assert int(a) < 100 and int(b) < 100
        assert row["answer"] == str(int(a) * int(b))


def test_reverse_answers(tmp_path):
    files = write_task("reverse", tmp_path, n_train=100, n_test=20)
    for row in read(files["train"]) + read(files["test"]):
        s = row["prompt"].removeprefix("reverse ").removesuffix("=")
        assert 3 <= len(s) <= 8 and s.isalpha() and s.islower()
        assert row["answer"] == s[::-1]
    for row in read(files["pairs"]):
        assert row["rejected"] != row["chosen"]


def test_corrupt_handles_palindromes():
    import random

    rng = random.Random(0)
    for answer in ["aaa", "aba", "b"]:
        assert TASKS["reverse"].corrupt(rng, answer) != answer
    for answer in ["0", "5", "10", "999"]:
        wrong = TASKS["addition"].corrupt(rng, answer)
        assert wrong != answer and int(wrong) >= 0


def test_unknown_task_and_option(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'division'; available tasks: addition, .*, multiplication, reverse"):
        write_task("division", tmp_path, n_train=1, n_test=1)
    with pytest.raises(ValueError, match="unknown option 'digits'.*min_digits, max_digits"):
        write_task("addition", tmp_path, n_train=1, n_test=1, digits=3)
    with pytest.raises(ValueError, match="min_digits=3 is larger than max_digits=2"):
        write_task("addition", tmp_path, n_train=1, n_test=1, min_digits=3, max_digits=2)


def test_chat_addition_writes_messages_that_end_in_the_question_and_render_through_a_chat_template(tmp_path):
    from reflow.data.datasets import load_prompts, load_sft
    from reflow.models.tokenizer import build_byte_tokenizer

    files = write_task("chat_addition", tmp_path, n_train=70, n_test=29, seed=0)  # all 99: the example is never asked
    train, test, sft = read(files["train"]), read(files["test"]), read(files["sft"])
    assert "What is 2 + 3?" not in {r["messages"][-1]["content"] for r in train + test}
    assert not {r["messages"][-1]["content"] for r in train} & {r["messages"][-1]["content"] for r in test}
    for row in train + test:
        assert "prompt" not in row and [m["role"] for m in row["messages"]] == ["user", "assistant", "user"]
        a, b = row["messages"][-1]["content"].removeprefix("What is ").removesuffix("?").split(" + ")
        assert 0 <= int(a) <= 9 and 0 <= int(b) <= 9 and row["answer"] == str(int(a) + int(b))
    assert [r["response"] for r in sft] == [r["answer"] for r in train]
    tok = build_byte_tokenizer()
    examples, _ = load_prompts(files["test"], tok, max_prompt_len=256)
    q = test[0]["messages"][-1]["content"]
    assert examples[0].prompt_text.endswith(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n")
    assert len(load_sft(files["sft"], tok, max_len=256)[0]) == 70


def test_chat_calculator_asks_chat_multiplications_products_and_its_worked_example_and_answers_score_in_the_calculator_env(
        tmp_path):
    import re

    from reflow.data.datasets import load_prompts
    from reflow.data.tasks import CALCULATOR_EXAMPLE, CALCULATOR_SYSTEM
    from reflow.envs.calculator import CalculatorEnv
    from reflow.models.tokenizer import build_byte_tokenizer

    calc = write_task("chat_calculator", tmp_path / "calc", n_train=60, n_test=20, seed=0)
    direct = write_task("chat_multiplication", tmp_path / "direct", n_train=60, n_test=20, seed=0)
    question = re.compile(r"(?:What is (\d+) \* (\d+)\?|Compute (\d+) times (\d+)\.|Multiply (\d+) by (\d+)\."
                          r"|What is the product of (\d+) and (\d+)\?)")
    for split in ("train", "test"):
        calc_rows, direct_rows = read(calc[split]), read(direct[split])
        assert [(r["messages"][-1], r["answer"]) for r in calc_rows] == \
               [(r["messages"][-1], r["answer"]) for r in direct_rows]  # the same questions, asked two ways
        for row, plain in zip(calc_rows, direct_rows):
            assert row["messages"][:3] == [{"role": "system", "content": CALCULATOR_SYSTEM}, *CALCULATOR_EXAMPLE]
            assert [m["role"] for m in plain["messages"]] == ["user", "assistant", "user"]
            a, b = (int(x) for x in question.fullmatch(row["messages"][-1]["content"]).groups() if x is not None)
            assert 100 <= a <= 999 and 10 <= b <= 99 and row["answer"] == str(a * b) and (a, b) != (512, 34)
            env = CalculatorEnv()
            env.reset(row)
            assert env.step(f"CALC {a}*{b}\n") == (f"={a * b}\n", 0.0, False)
            assert env.step(f"ANSWER {a * b}") == ("", 1.0, True)
            env.reset(row)
            assert env.step(f"ANSWER {a * b + 1}") == ("", 0.0, True)
    assert not {r["messages"][-1]["content"] for r in read(calc["train"])} & \
           {r["messages"][-1]["content"] for r in read(calc["test"])}
    # the worked example's transcript is what the env answers, line by line
    call, shown, final = CALCULATOR_EXAMPLE[1]["content"].split("\n")
    env = CalculatorEnv()
    env.reset({"prompt": CALCULATOR_EXAMPLE[0]["content"], "answer": "17408"})
    assert env.step(call + "\n") == (shown + "\n", 0.0, False) and env.step(final) == ("", 1.0, True)
    example = load_prompts(calc["test"], build_byte_tokenizer(), max_prompt_len=1024)[0][0]
    assert example.prompt_text.startswith(f"<|im_start|>system\n{CALCULATOR_SYSTEM}<|im_end|>\n")
    assert example.prompt_text.endswith(f"{read(calc['test'])[0]['messages'][-1]['content']}<|im_end|>\n"
                                        "<|im_start|>assistant\n")
