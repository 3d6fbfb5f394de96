"""The experiment config schema: a role's `attention` key (padded or packed) and `layout` left to dXtYpZ."""

import pytest

from reflow.config.loader import ConfigError, load_config
from reflow.config.schema import RLConfig, SFTConfig


def test_attention_is_a_role_key_defaulting_to_padded():
    cfg = load_config(RLConfig, None, ["actor.path=m", "actor.attention=packed"])
    assert cfg.actor.attention == "packed" and cfg.critic.attention == "padded" and cfg.ref.attention == "padded"
    assert load_config(SFTConfig, None, ["model.path=m", "model.attention=packed"]).model.attention == "packed"


def test_attention_rejects_other_values():
    with pytest.raises(ConfigError, match="actor.attention"):
        load_config(RLConfig, None, ["actor.path=m", "actor.attention=ragged"])


def test_layout_is_not_a_role_key():
    # "layout" means the parallel layout dXtYpZ only (a plan's business), never the attention choice
    with pytest.raises(ConfigError) as e:
        load_config(RLConfig, None, ["actor.path=m", "actor.layout=packed"])
    msg = str(e.value)
    assert "unknown key 'actor.layout'" in msg and "attention" in msg


@pytest.mark.parametrize("overrides, message", [
    (["rollout.max_turns=0"], r"^rollout.max_turns must be >= 1, got 0$"),
    (["rollout.env_threads=0"], r"^rollout.env_threads must be >= 1, got 0$"),
    (["rollout.max_new_tokens=16", "rollout.max_turn_tokens=17"],
     r"^rollout.max_turn_tokens must be in \[1, rollout.max_new_tokens=16\] \(the episode's budget\), got 17$"),
    (["rollout.max_obs_tokens=-1"], r"^rollout.max_obs_tokens must be >= 0, got -1$"),
    (["rollout.turn_end=x"], r"^rollout.turn_end ends a model turn of a multi-turn rollout: set rollout.env too$"),
    (["rollout.env=calculator", "reward.prm=f.py:prm"], r"^reward.prm splits a single response into steps"),
    (["rollout.env=calculator", "algo.adv_estimator=remax"], r"^algo.adv_estimator=remax decodes a single-turn"),
    (["rollout.env=calculator", "rollout.partial=true"],
     r"^rollout.partial continues single-turn generations; .*: set rollout.partial=false$"),
    (["reward.fn=null"], r"^set exactly one of reward.fn .* \(or rollout.env, whose rewards can stand alone\)$"),
])
def test_multi_turn_keys_are_checked_with_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(RLConfig, None, ["actor.path=m", *overrides])
    assert "\n" not in str(e.value)


def test_an_env_rollout_may_have_no_reward_function():
    cfg = load_config(RLConfig, None, ["actor.path=m", "rollout.env=calculator", "reward.fn=null",
                                       "rollout.max_turn_tokens=8"])
    assert cfg.reward.fn is None and cfg.rollout.max_turns == 4 and cfg.rollout.max_turn_tokens == 8
