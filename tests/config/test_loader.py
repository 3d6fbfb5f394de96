from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import pytest

from reflow.config.loader import (
    ConfigError,
    apply_overrides,
    from_dict,
    load_config,
    save_config,
    to_dict,
)


@dataclass
class Optim:
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: tuple[float, ...] = (0.9, 0.999)


@dataclass
class Actor:
    model: str = "tiny"
    optim: Optim = field(default_factory=Optim)
    grad_ckpt: bool = False
    max_steps: Optional[int] = None


@dataclass
class Rollout:
    n: int = 4
    temperature: float = 1.0
    backend: Literal["hf", "vllm"] = "hf"
    stop: list[str] = field(default_factory=list)
    extra: dict[str, int] = field(default_factory=dict)
    meta: Any = None

    def validate(self) -> None:
        if self.n < 1:
            raise ConfigError(f"rollout.n must be >= 1, got {self.n}")


@dataclass
class Train:
    name: str = "run"
    seed: int = 0
    actor: Actor = field(default_factory=Actor)
    rollout: Rollout = field(default_factory=Rollout)
    log: list[str] = field(default_factory=lambda: ["stdout"])


@dataclass
class NeedsData:
    path: str
    n: int = 1


def write(tmp_path, text, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults():
    cfg = load_config(Train)
    assert cfg == Train()
    assert cfg.actor.optim.lr == 1e-6 and cfg.log == ["stdout"]
    assert cfg.log is not Train().log  # default_factory, not a shared list


def test_yaml_load_nested(tmp_path):
    p = write(tmp_path, "seed: 3\nactor:\n  model: big\n  optim:\n    lr: 0.5\n")
    cfg = load_config(Train, p)
    assert cfg.seed == 3 and cfg.actor.model == "big" and cfg.actor.optim.lr == 0.5
    assert cfg.actor.optim.weight_decay == 0.0 and cfg.rollout == Rollout()


def test_override_beats_file(tmp_path):
    p = write(tmp_path, "seed: 3\nrollout:\n  n: 2\n")
    cfg = load_config(Train, p, ["seed=7", "rollout.n=8"])
    assert cfg.seed == 7 and cfg.rollout.n == 8


def test_nested_partial_override_keeps_siblings(tmp_path):
    p = write(tmp_path, "actor:\n  model: big\n  optim:\n    lr: 0.5\n    weight_decay: 0.1\n")
    cfg = load_config(Train, p, ["actor.optim.lr=0.25"])
    assert cfg.actor.optim == Optim(lr=0.25, weight_decay=0.1)
    assert cfg.actor.model == "big"
    # A mapping assigned to a dataclass section merges rather than replaces.
    cfg = load_config(Train, p, ["actor.optim={lr: 0.125}"])
    assert cfg.actor.optim == Optim(lr=0.125, weight_decay=0.1)


def test_unknown_key_in_file_suggests(tmp_path):
    p = write(tmp_path, "actor:\n  optim:\n    lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(Train, p)
    msg = str(e.value)
    assert "'actor.optim.lrr'" in msg and str(p) in msg
    assert "did you mean 'actor.optim.lr'" in msg and "weight_decay" in msg


def test_unknown_key_on_command_line():
    with pytest.raises(ConfigError) as e:
        load_config(Train, None, ["rollout.temprature=0.5"])
    msg = str(e.value)
    assert "'rollout.temprature'" in msg and "command line" in msg
    assert "did you mean 'rollout.temperature'" in msg


def test_unknown_key_without_close_match_lists_valid():
    with pytest.raises(ConfigError) as e:
        from_dict(Train, {"zzzzzz": 1})
    msg = str(e.value)
    assert "did you mean" not in msg and "valid keys: name, seed, actor, rollout, log" in msg


def test_wrong_type_message():
    with pytest.raises(ConfigError) as e:
        load_config(Train, None, ["rollout.n=eight"])
    assert "key 'rollout.n' expects int, got 'eight' (str)" in str(e.value)


def test_int_accepted_for_float():
    cfg = from_dict(Train, {"rollout": {"temperature": 2}})
    assert cfg.rollout.temperature == 2.0 and isinstance(cfg.rollout.temperature, float)


@pytest.mark.parametrize("data", [{"seed": True}, {"seed": 3.0}, {"rollout": {"temperature": False}}])
def test_bool_and_float_rejected_for_int(data):
    with pytest.raises(ConfigError, match="expects"):
        from_dict(Train, data)


def test_scientific_notation_in_yaml_and_cli(tmp_path):
    p = write(tmp_path, "actor:\n  optim:\n    lr: 1e-5\n")
    cfg = load_config(Train, p)
    assert cfg.actor.optim.lr == 1e-05 and isinstance(cfg.actor.optim.lr, float)
    cfg = load_config(Train, None, ["actor.optim.weight_decay=1e-5"])
    assert cfg.actor.optim.weight_decay == 1e-05 and isinstance(cfg.actor.optim.weight_decay, float)
    with pytest.raises(ConfigError, match="'actor.optim.lr' expects float"):
        load_config(Train, None, ["actor.optim.lr=fast"])


def test_literal_rejection_lists_allowed():
    with pytest.raises(ConfigError) as e:
        load_config(Train, None, ["rollout.backend=sglang"])
    msg = str(e.value)
    assert "'rollout.backend'" in msg and "'hf'" in msg and "'vllm'" in msg and "sglang" in msg
    assert load_config(Train, None, ["rollout.backend=vllm"]).rollout.backend == "vllm"


def test_optional_none():
    assert load_config(Train, None, ["actor.max_steps=5"]).actor.max_steps == 5
    assert load_config(Train, None, ["actor.max_steps=null"]).actor.max_steps is None
    with pytest.raises(ConfigError, match="'seed' expects int, got None"):
        from_dict(Train, {"seed": None})


def test_list_tuple_dict_parsing(tmp_path):
    p = write(tmp_path, 'rollout:\n  stop: ["</s>", "\\n"]\n  extra: {a: 1}\nactor:\n  optim:\n    betas: [0.5, 1]\n')
    cfg = load_config(Train, p, ["rollout.extra.b=2", "log=[a, b]"])
    assert cfg.rollout.stop == ["</s>", "\n"]
    assert cfg.rollout.extra == {"a": 1, "b": 2}
    assert cfg.actor.optim.betas == (0.5, 1.0) and isinstance(cfg.actor.optim.betas, tuple)
    assert cfg.log == ["a", "b"]
    with pytest.raises(ConfigError, match=r"'rollout.stop\[1\]' expects str"):
        from_dict(Train, {"rollout": {"stop": ["ok", 3]}})
    with pytest.raises(ConfigError, match="'rollout.extra.x' expects int"):
        from_dict(Train, {"rollout": {"extra": {"x": "many"}}})


def test_str_field_keeps_raw_override_text():
    cfg = load_config(Train, None, ["name=2024", "rollout.meta={k: [1, 2]}"])
    assert cfg.name == "2024" and cfg.rollout.meta == {"k": [1, 2]}


def test_nested_dataclass_given_non_mapping():
    with pytest.raises(ConfigError, match="'actor' expects a mapping"):
        from_dict(Train, {"actor": 5})


def test_override_through_non_dataclass():
    with pytest.raises(ConfigError, match="'seed.x'"):
        load_config(Train, None, ["seed.x=1"])


def test_missing_required_key():
    with pytest.raises(ConfigError, match="missing required key 'path'"):
        from_dict(NeedsData, {"n": 2})
    assert load_config(NeedsData, None, ["path=/data"]).path == "/data"


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as e:
        load_config(Train, missing)
    assert str(missing) in str(e.value) and "check the path" in str(e.value)


def test_bad_yaml_reports_file_and_line(tmp_path):
    p = write(tmp_path, "seed: 1\nactor:\n  model: [unclosed\n")
    with pytest.raises(ConfigError) as e:
        load_config(Train, p)
    msg = str(e.value)
    assert str(p) in msg and "line " in msg and "\n" not in msg


def test_top_level_not_mapping(tmp_path):
    p = write(tmp_path, "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Train, p)


def test_override_without_equals():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(Train, None, ["rollout.n"])


def test_apply_overrides_does_not_mutate_input():
    data = {"actor": {"model": "big"}}
    out = apply_overrides(data, ["actor.optim.lr=0.1"], Train)
    assert out == {"actor": {"model": "big", "optim": {"lr": 0.1}}}
    assert data == {"actor": {"model": "big"}}


def test_save_load_round_trip(tmp_path):
    cfg = load_config(
        Train,
        None,
        ["actor.optim.lr=1e-5", "rollout.stop=[a]", "rollout.extra.k=3", "actor.max_steps=9", "rollout.meta={x: 1}"],
    )
    out = tmp_path / "sub" / "saved.yaml"
    save_config(cfg, out)
    assert load_config(Train, out) == cfg
    d = to_dict(cfg)
    assert d["actor"]["optim"]["betas"] == [0.9, 0.999]  # tuples become YAML-safe lists
    assert list(d) == [f.name for f in dataclasses.fields(Train)]


def test_validate_hook_propagates(tmp_path):
    p = write(tmp_path, "rollout:\n  n: 0\n")
    with pytest.raises(ConfigError, match="rollout.n must be >= 1"):
        load_config(Train, p)
    # The command line can fix what the file got wrong: validation runs after overrides.
    assert load_config(Train, p, ["rollout.n=2"]).rollout.n == 2
