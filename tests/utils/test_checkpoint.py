"""Checkpoint folders: finding the one to resume, pruning, trainer state and RNG round trips."""

import random

import pytest
import torch

from reflow.utils.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    find_resume,
    list_checkpoints,
    load_state,
    prune,
    rng_state,
    save_state,
    set_rng_state,
)


@pytest.fixture(autouse=True)
def _keep_global_rng():
    """The RNG tests reseed the global generators; leave them as other tests found them."""
    t, p = torch.get_rng_state(), random.getstate()
    yield
    torch.set_rng_state(t)
    random.setstate(p)


def make_ckpt(output_dir, step, complete=True):
    ckpt = checkpoint_dir(output_dir, step)
    (ckpt / "actor").mkdir(parents=True)
    if complete:
        save_state(ckpt, {"step": step})
    return ckpt


def test_checkpoint_dir_layout(tmp_path):
    assert checkpoint_dir(tmp_path, 42) == tmp_path / "checkpoints" / "step_000042"


def test_find_resume_latest_picks_the_highest_step(tmp_path):
    for s in (5, 120, 30):
        make_ckpt(tmp_path, s)
    assert find_resume(tmp_path, True) == checkpoint_dir(tmp_path, 120)
    assert find_resume(tmp_path, "latest") == checkpoint_dir(tmp_path, 120)
    assert load_state(find_resume(tmp_path, True))["step"] == 120


def test_find_resume_explicit_path(tmp_path):
    make_ckpt(tmp_path, 5)
    make_ckpt(tmp_path, 10)
    assert find_resume(tmp_path, str(checkpoint_dir(tmp_path, 5))) == checkpoint_dir(tmp_path, 5)


def test_find_resume_without_checkpoints_names_the_folder(tmp_path):
    with pytest.raises(CheckpointError) as e:
        find_resume(tmp_path / "run", True)
    assert str(tmp_path / "run" / "checkpoints") in str(e.value)


def test_find_resume_explicit_path_that_is_not_a_checkpoint(tmp_path):
    bad = tmp_path / "nowhere"
    with pytest.raises(CheckpointError) as e:
        find_resume(tmp_path, str(bad))
    assert str(bad) in str(e.value) and "trainer_state.pt" in str(e.value)


def test_incomplete_checkpoint_is_ignored(tmp_path):
    make_ckpt(tmp_path, 10)
    partial = make_ckpt(tmp_path, 20, complete=False)  # crashed before trainer_state.pt was written
    (checkpoint_dir(tmp_path, 30)).mkdir()  # no state at all
    (tmp_path / "checkpoints" / "notes").mkdir()  # not a step folder
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10]
    assert find_resume(tmp_path, True) == checkpoint_dir(tmp_path, 10)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        find_resume(tmp_path, str(partial))


def test_only_incomplete_checkpoints_is_an_error(tmp_path):
    make_ckpt(tmp_path, 20, complete=False)
    with pytest.raises(CheckpointError, match="no checkpoint under"):
        find_resume(tmp_path, True)


def test_save_state_writes_atomically_and_loads_back(tmp_path):
    ckpt = checkpoint_dir(tmp_path, 3)
    state = {"step": 3, "weights": torch.arange(4.0), "nested": {"lr": 0.5}}
    save_state(ckpt, state)
    assert not (ckpt / "trainer_state.pt.tmp").exists()
    back = load_state(ckpt)
    assert back["step"] == 3 and back["nested"] == {"lr": 0.5} and torch.equal(back["weights"], torch.arange(4.0))


def test_prune_keeps_the_newest(tmp_path):
    for s in (1, 2, 10, 3, 7):
        make_ckpt(tmp_path, s)
    partial = make_ckpt(tmp_path, 4, complete=False)
    prune(tmp_path, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [7, 10]
    assert not checkpoint_dir(tmp_path, 3).exists()
    assert partial.exists()  # an incomplete folder is not counted and not deleted
    prune(tmp_path, keep=0)  # 0 keeps all
    assert [s for s, _ in list_checkpoints(tmp_path)] == [7, 10]


def test_rng_state_round_trip():
    torch.manual_seed(123)
    random.seed(123)
    state = rng_state()
    expected = (torch.rand(3), random.random())
    torch.manual_seed(0)
    random.seed(0)
    assert torch.rand(3).tolist() != expected[0].tolist()
    set_rng_state(state)
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1]


def test_rng_state_survives_save_and_load(tmp_path):
    torch.manual_seed(7)
    random.seed(7)
    ckpt = checkpoint_dir(tmp_path, 1)
    save_state(ckpt, {"rng": rng_state()})
    expected = (torch.randn(2), random.randint(0, 10**9))
    set_rng_state(load_state(ckpt)["rng"])
    assert torch.equal(torch.randn(2), expected[0]) and random.randint(0, 10**9) == expected[1]
