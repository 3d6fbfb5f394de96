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
