"""Environments for multi-turn rollouts: the model talks to a tool, turn by turn (`rollout.env`).

An environment is a class in a file of yours (`rollout.env=my_env.py:MyEnv`) or a module
(`rollout.env=my_pkg.envs:MyEnv`), or a built-in (`calculator`, `python`). One instance is made per episode
(no arguments), so it may keep the episode's state in `self`:

    class MyEnv:
        def reset(self, row: dict) -> str | None:
            # row: the dataset row of the episode's prompt: {"prompt": text, "answer": str | None, **other columns}
            self.answer = row["answer"]
            return None                      # or an opening observation, placed after the prompt

        def step(self, message: str) -> tuple[str, float, bool]:
            # message: the model's turn, decoded (special tokens dropped)
            if message.startswith("ANSWER"):
                return "", float(message.split()[-1] == self.answer), True      # (observation, reward, done)
            return "unknown command\\n", 0.0, False

An episode is: prompt [+ reset's observation], then turns of [model message, observation] until `step`
says done, the model has had `rollout.max_turns` turns, or it has generated `rollout.max_new_tokens` tokens
(a turn gets at most `rollout.max_turn_tokens`). `step` is called on every model message, the last one
included (its reward counts; its observation is dropped: nothing reads it). `step` runs in a thread pool
(one call per running episode at once), so a slow tool does not hold up the others; it must not share
mutable state between instances without a lock. An exception in `reset` or `step` stops the run with one
line naming the episode (sample id, prompt) and the env.

Rewards: step's reward lands on the last token of its turn (`env_rewards`, a token field the advantage
estimators sum with the score: r_i = score_i + sum_turns reward); `reward.fn` (or `reward.model`), when set,
scores the whole transcript after the prompt as the final reward (`score`); with `reward.fn=null` the score
is 0 and the env's rewards are the whole reward.
"""

from reflow.envs.base import BUILTIN_ENVS, EnvError, load_env  # noqa: F401
