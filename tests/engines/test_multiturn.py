"""Multi-turn rollouts (reflow/engines/multiturn.py): the transcript's masks and rewards, turn and token limits,
keyed sampling independent of how episodes are batched, concurrent env steps, and errors naming the episode."""

import threading
import time

import pytest
import torch

from reflow.engines.generate import GenerationEngine, SamplingParams, sample_seed
from reflow.engines.multiturn import Limits, episodes_to_batch, run_episodes, start_episodes
from reflow.envs import EnvError
from reflow.models.load import load_policy
from reflow.models.presets import init_model
from reflow.models.load import load_tokenizer

PARAMS = SamplingParams(max_new_tokens=12, temperature=0.9)
# a quarter of the byte tokens end a turn, so turns end at different lengths (or at their budget)
TURN_END = list(range(5, 261, 4))


@pytest.fixture(scope="module")
def model_and_tok(tmp_path_factory):
    path = init_model("debug-llama", tmp_path_factory.mktemp("multiturn") / "m", seed=2)
    model = load_policy(path).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # larger random weights: output that depends on the context (see test_generate.py)
        for name, p in model.named_parameters():
            if p.dim() >= 2 or name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model, load_tokenizer(path)


class EchoEnv:
    """Observation "obs<k>;" after turn k, reward 0.5 per turn; done after `done_after` turns (never if None)."""

    done_after = None

    def reset(self, row):
        self.k = 0
        return row.get("opening")

    def step(self, message):
        self.k += 1
        return f"obs{self.k};", 0.5, self.done_after is not None and self.k >= self.done_after


ROWS = [{"prompt": f"{a}*{b}=", "answer": str(a * b)} for a, b in [(12, 34), (5, 6), (123, 4), (7, 89), (1, 2), (40, 41)]]


def play(model_and_tok, env_cls=EchoEnv, rows=ROWS, keys=None, limits=Limits(4, 5, 12, 64), batched=True,
         seed=3, threads=8, spec="test:EchoEnv", share_prefill=True, keep_kv=True):
    model, tok = model_and_tok
    keys = list(range(100, 100 + len(rows))) if keys is None else keys
    eps = start_episodes([env_cls() for _ in rows], rows, [tok.encode(r["prompt"]) for r in rows], keys, tok, spec)
    engine = GenerationEngine(model, [tok.eos_token_id, *TURN_END], tok.pad_token_id, 4, share_prefill=share_prefill)
    times = run_episodes(engine, eps, PARAMS, limits, tok, lambda k: sample_seed(seed, k), spec, batched=batched,
                         threads=threads, keep_kv=keep_kv)
    return eps, times


def test_observation_tokens_are_context_with_no_action_mask_and_no_logprob(model_and_tok):
    _, tok = model_and_tok
    eps, _ = play(model_and_tok)
    batch = episodes_to_batch(eps, [r["prompt"] for r in ROWS], [r["answer"] for r in ROWS], list(range(6)), 100, tok)
    for i, ep in enumerate(eps):
        ids, mask = batch.unpack("input_ids")[i].tolist(), batch.unpack("action_mask")[i].tolist()
        lp, rw = batch.unpack("gen_logprobs")[i], batch.unpack("env_rewards")[i]
        p = len(ep.prompt_ids)
        assert mask[:p] == [0] * p
        # the tokens off the mask after the prompt are exactly the observations, in order
        obs = tok.decode([t for t, m in zip(ids[p:], mask[p:]) if m == 0])
        assert obs == "".join(f"obs{k};" for k in range(1, ep.turns))
        assert bool((lp[torch.tensor(mask) == 0] == 0).all()) and bool((lp[torch.tensor(mask) == 1] < 0).all())
        assert sum(mask) == batch.samples["response_len"][i] == ep.generated
        assert mask[-1] == 1, "a sample ends with a model token (the last observation is dropped)"
        # one reward of 0.5 per turn, each on the last model token before an observation (or the end)
        ends = [j for j in range(p, len(ids)) if mask[j] == 1 and (j + 1 == len(ids) or mask[j + 1] == 0)]
        assert torch.nonzero(rw).flatten().tolist() == ends and len(ends) == ep.turns
        assert torch.allclose(rw[ends], torch.full((len(ends),), 0.5))
    assert batch.samples["env_return"].tolist() == [0.5 * ep.turns for ep in eps]
    assert batch.samples["truncated"].all()  # EchoEnv never says done: a limit ended every episode


def test_turns_stop_at_max_turns_and_turn_and_episode_token_budgets(model_and_tok):
    for limits in (Limits(3, 5, 100, 64), Limits(10, 4, 9, 64), Limits(2, 9, 9, 64)):
        eps, _ = play(model_and_tok, limits=limits)
        for ep in eps:
            lengths = []
            for t, a in zip(ep.tokens, ep.action):  # lengths of the runs of model tokens = the turns
                if a and (not lengths or not prev):
                    lengths.append(0)
                lengths[-1] += a
                prev = a
            assert len(lengths) == ep.turns <= limits.max_turns
            assert max(lengths) <= limits.max_turn_tokens and sum(lengths) == ep.generated <= limits.max_new_tokens
            # the episode ran until a limit: all its turns, or its whole token budget
            assert ep.turns == limits.max_turns or ep.generated == limits.max_new_tokens
    assert any(len(set(e.messages)) > 1 for e in eps)


def test_the_env_ending_the_episode_stops_it_and_reset_observation_follows_the_prompt(model_and_tok):
    _, tok = model_and_tok

    class TwoTurns(EchoEnv):
        done_after = 2

    rows = [{**r, "opening": "go:"} for r in ROWS]
    eps, _ = play(model_and_tok, TwoTurns, rows=rows, limits=Limits(6, 4, 100, 64))
    for ep, r in zip(eps, rows):
        assert ep.turns == 2 and ep.done
        assert ep.prompt_ids == tok.encode(r["prompt"]) + tok.encode("go:", add_special_tokens=False)
        assert tok.decode([t for t, a in zip(ep.tokens, ep.action) if not a]) == "obs1;"


def test_observations_are_cut_to_max_obs_tokens(model_and_tok):
    eps, _ = play(model_and_tok, limits=Limits(3, 3, 100, 2))
    _, tok = model_and_tok
    for ep in eps:
        assert tok.decode([t for t, a in zip(ep.tokens, ep.action) if not a]) == "ob" * (ep.turns - 1)


def test_episodes_are_the_same_batched_one_at_a_time_in_any_order_or_split(model_and_tok):
    whole, _ = play(model_and_tok)
    alone, _ = play(model_and_tok, batched=False)
    keys = list(range(100, 106))
    rev, _ = play(model_and_tok, rows=ROWS[::-1], keys=keys[::-1])
    halves = play(model_and_tok, rows=ROWS[:3], keys=keys[:3])[0] + play(model_and_tok, rows=ROWS[3:], keys=keys[3:])[0]
    assert len({tuple(e.tokens) for e in whole}) == len(ROWS)
    for other in (alone, rev[::-1], halves):
        assert [(e.key, e.tokens, e.action, e.turns) for e in whole] == [(e.key, e.tokens, e.action, e.turns) for e in other]
        for x, y in zip(whole, other):
            torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5, rtol=0)
    other_seed, _ = play(model_and_tok, seed=4)
    assert [e.tokens for e in other_seed] != [e.tokens for e in whole]


def test_groups_of_episodes_are_the_same_with_and_without_shared_prefill(model_and_tok):
    rows = [r for r in ROWS[:3] for _ in range(3)]  # 3 prompts x 3 samples: a group's first turns share a prompt
    keys = list(range(200, 209))
    shared, _ = play(model_and_tok, rows=rows, keys=keys)
    alone, _ = play(model_and_tok, rows=rows, keys=keys, share_prefill=False)
    assert len({tuple(e.tokens) for e in shared}) == len(rows)
    assert [(e.tokens, e.action, e.turns) for e in shared] == [(e.tokens, e.action, e.turns) for e in alone]
    for x, y in zip(shared, alone):
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5, rtol=0)


def test_kept_kv_gives_the_episodes_of_reprefilling_each_turn_and_feeds_only_new_tokens(model_and_tok):
    fed = []  # tokens of each prefill forward (more than one column)
    hook = model_and_tok[0].register_forward_pre_hook(
        lambda m, a, kw: fed.append(kw["input_ids"].numel()) if kw["input_ids"].shape[1] > 1 else None, with_kwargs=True)
    try:
        kept, _ = play(model_and_tok, limits=Limits(4, 5, 20, 64))
        kept_fed, fed[:] = sum(fed), []
        again, _ = play(model_and_tok, limits=Limits(4, 5, 20, 64), keep_kv=False)
        again_fed = sum(fed)
    finally:
        hook.remove()
    assert max(e.turns for e in kept) >= 3
    assert [(e.tokens, e.action, e.turns) for e in kept] == [(e.tokens, e.action, e.turns) for e in again]
    for x, y in zip(kept, again):
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5, rtol=0)
    assert kept_fed < again_fed / 2, (kept_fed, again_fed)


def test_the_env_steps_of_a_round_run_at_the_same_time(model_and_tok):
    live, peak, lock = [0], [0], threading.Lock()

    class Slow(EchoEnv):
        def step(self, message):
            with lock:
                live[0] += 1
                peak[0] = max(peak[0], live[0])
            time.sleep(0.1)
            with lock:
                live[0] -= 1
            return super().step(message)

    t0 = time.perf_counter()
    _, times = play(model_and_tok, Slow, limits=Limits(2, 3, 100, 64))
    assert peak[0] == len(ROWS)  # every episode's step was in flight at once
    assert times.rounds == 2 and times.tool_s < 2 * 0.1 * len(ROWS) / 2  # far below 12 sleeps in a row
    assert 0 < times.tool_fraction < 1 and time.perf_counter() - t0 < 0.1 * len(ROWS)
    _, serial = play(model_and_tok, Slow, limits=Limits(2, 3, 100, 64), batched=False)
    assert serial.rounds == 2 * len(ROWS) and serial.tool_s >= 0.1 * 2 * len(ROWS)


@pytest.mark.parametrize("where", ["step", "reset", "result"])
def test_an_env_that_fails_stops_with_one_line_naming_the_sample_prompt_and_env(model_and_tok, where):
    class Broken(EchoEnv):
        def reset(self, row):
            if where == "reset" and row["prompt"] == "123*4=":
                raise KeyError("level")
            return super().reset(row)

        def step(self, message):
            if self.k == 1 and where != "reset":
                if where == "result":
                    return "obs", "high"  # two values and no done
                raise ZeroDivisionError("tool crashed")
            return super().step(message)

    with pytest.raises(EnvError) as e:
        play(model_and_tok, Broken, spec="envs.py:Broken")
    msg = str(e.value)
    assert "\n" not in msg and "rollout.env 'envs.py:Broken'" in msg
    if where == "reset":
        assert "reset raised KeyError: 'level' on sample 102 (prompt '123*4=')" in msg
    elif where == "step":
        assert "step raised ZeroDivisionError: tool crashed on sample 100 (prompt '12*34='), turn 2" in msg
    else:
        assert "step returned ('obs', 'high') for sample 100 (prompt '12*34=')" in msg
