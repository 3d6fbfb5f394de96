"""SampleBatch: packing geometry, selection, splitting, micro-batching and combining."""

import pytest
import torch

from reflow.data.batch import SampleBatch

LENS = [3, 1, 5, 2, 7, 4]


def make_batch(lens=LENS, ids=None, groups=None) -> SampleBatch:
    """A batch whose token values encode (sample position, token position) so any reordering shows."""
    ids = list(range(10, 10 + len(lens))) if ids is None else ids
    input_ids = [torch.arange(n) + 100 * (p + 1) for p, n in enumerate(lens)]
    action = [(torch.arange(n) >= n // 2).long() for n in lens]
    feats = [torch.stack([torch.arange(n).float(), torch.full((n,), float(p))], dim=1) for p, n in enumerate(lens)]
    samples = {"reward": torch.arange(len(lens)).float() * 0.5}
    if groups is not None:
        samples["group_id"] = torch.tensor(groups)
    return SampleBatch.from_sequences(
        ids,
        {"input_ids": input_ids, "action_mask": action, "feat": feats},
        samples=samples,
        meta={"text": [f"s{p}" for p in range(len(lens))]},
    )


def assert_same_batch(a: SampleBatch, b: SampleBatch):
    assert a.ids == b.ids
    assert torch.equal(a.seqlens, b.seqlens)
    for kind in ("tokens", "samples"):
        da, db = getattr(a, kind), getattr(b, kind)
        assert set(da) == set(db)
        for k in da:
            assert da[k].dtype == db[k].dtype, k
            assert torch.equal(da[k], db[k]), k
    assert a.meta == b.meta


# ----------------------------------------------------------------- construction and geometry
def test_from_sequences_packs_tokens_flat_with_offsets():
    b = make_batch()
    assert len(b) == 6 and b.num_tokens == sum(LENS)
    assert b.seqlens.tolist() == LENS
    assert b.tokens["input_ids"].shape == (sum(LENS),)
    assert b.tokens["feat"].shape == (sum(LENS), 2)
    assert b.samples["reward"].shape == (6,)
    assert b.offsets.tolist() == [0, 3, 4, 9, 11, 18, 22]
    # sample 2 owns rows 4:9
    assert b.tokens["input_ids"][4:9].tolist() == [300, 301, 302, 303, 304]


def test_sample_index_and_position_in_sample():
    b = make_batch([2, 3, 1])
    assert b.sample_index().tolist() == [0, 0, 1, 1, 1, 2]
    assert b.position_in_sample().tolist() == [0, 1, 0, 1, 2, 0]


def test_from_sequences_rejects_token_keys_of_different_lengths():
    with pytest.raises(ValueError, match="action_mask"):
        SampleBatch.from_sequences([0, 1], {"input_ids": [[1, 2], [3]], "action_mask": [[0, 1], [1, 1]]})


def test_constructor_rejects_duplicate_ids():
    with pytest.raises(ValueError, match="unique"):
        SampleBatch([1, 1], torch.tensor([1, 2]), {"input_ids": torch.zeros(3)})


def test_constructor_rejects_token_rows_not_matching_seqlens():
    with pytest.raises(ValueError, match="'input_ids' has 4 rows, expected 3"):
        SampleBatch([0, 1], torch.tensor([1, 2]), {"input_ids": torch.zeros(4)})
    with pytest.raises(ValueError, match="sample key 'reward'"):
        SampleBatch([0, 1], torch.tensor([1, 2]), {"input_ids": torch.zeros(3)}, {"reward": torch.zeros(3)})


def test_unpack_returns_per_sample_sequences():
    b = make_batch()
    parts = b.unpack("input_ids")
    assert [len(p) for p in parts] == LENS
    for p, s in enumerate(parts):
        assert s.tolist() == (torch.arange(LENS[p]) + 100 * (p + 1)).tolist()


def test_padded_right_and_left():
    b = make_batch([2, 3, 1])
    right, rmask = b.padded("input_ids", pad_value=-1)
    assert right.tolist() == [[100, 101, -1], [200, 201, 202], [300, -1, -1]]
    assert rmask.tolist() == [[True, True, False], [True, True, True], [True, False, False]]
    left, lmask = b.padded("input_ids", pad_value=-1, left=True)
    assert left.tolist() == [[-1, 100, 101], [200, 201, 202], [-1, -1, 300]]
    assert lmask.tolist() == [[False, True, True], [True, True, True], [False, False, True]]
    # masked entries in row-major order are the packed flat order
    assert torch.equal(right[rmask], b.tokens["input_ids"])
    assert torch.equal(left[lmask], b.tokens["input_ids"])


def test_padded_keeps_trailing_dims():
    b = make_batch([2, 3])
    out, mask = b.padded("feat")
    assert out.shape == (2, 3, 2)
    assert torch.equal(out[mask], b.tokens["feat"])


# ----------------------------------------------------------------- selection
def test_index_takes_samples_in_the_given_order():
    b = make_batch()
    sub = b.index([4, 0, 2])
    assert sub.ids == [14, 10, 12]
    assert sub.seqlens.tolist() == [7, 3, 5]
    assert sub.unpack("input_ids")[0].tolist() == list(range(500, 507))
    assert sub.unpack("input_ids")[1].tolist() == [100, 101, 102]
    assert sub.samples["reward"].tolist() == [2.0, 0.0, 1.0]
    assert sub.meta["text"] == ["s4", "s0", "s2"]


def test_select_by_ids_in_the_given_order():
    b = make_batch()
    assert_same_batch(b.select([13, 11]), b.index([3, 1]))


def test_select_unknown_id_raises_keyerror_naming_it():
    with pytest.raises(KeyError, match="sample id 99 is not in this batch"):
        make_batch().select([10, 99])


def test_repeat_gives_new_ids_and_group_id_of_the_source_id():
    b = make_batch([2, 3])
    r = b.repeat(3, first_id=50)
    assert r.ids == [50, 51, 52, 53, 54, 55]
    assert r.samples["group_id"].tolist() == [10, 10, 10, 11, 11, 11]
    assert r.seqlens.tolist() == [2, 2, 2, 3, 3, 3]
    assert r.unpack("input_ids")[2].tolist() == [100, 101]
    assert r.unpack("input_ids")[3].tolist() == [200, 201, 202]


def test_groups_in_order_of_first_appearance():
    b = make_batch(groups=[7, 3, 7, 5, 3, 7])
    assert b.groups() == [[0, 2, 5], [1, 4], [3]]


# ----------------------------------------------------------------- split / concat
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_split_balances_tokens(n):
    lens = [9, 1, 4, 4, 2, 7, 3, 3, 6, 1]
    parts = make_batch(lens).split(n)
    assert len(parts) == n and all(len(p) > 0 for p in parts)
    tok = [p.num_tokens for p in parts]
    assert sum(tok) == sum(lens)
    assert max(tok) - min(tok) <= max(lens)


def test_split_keeps_original_order_inside_each_part():
    parts = make_batch().split(3)
    order = {sid: p for p, sid in enumerate(make_batch().ids)}
    for part in parts:
        pos = [order[i] for i in part.ids]
        assert pos == sorted(pos)


def test_split_concat_select_restores_the_batch():
    b = make_batch(groups=[0, 0, 1, 1, 2, 2])
    parts = b.split(3)
    back = SampleBatch.concat(parts).select(b.ids)
    assert_same_batch(back, b)


def test_split_with_group_key_keeps_groups_whole():
    groups = [1, 2, 1, 3, 2, 4]
    b = make_batch(groups=groups)
    parts = b.split(3, group_key="group_id")
    seen = {}
    for k, part in enumerate(parts):
        for g in part.samples["group_id"].tolist():
            assert seen.setdefault(g, k) == k, f"group {g} cut across parts"
    assert sorted(i for p in parts for i in p.ids) == b.ids


def test_split_errors_when_fewer_units_than_parts():
    b = make_batch(groups=[1, 1, 1, 2, 2, 2])
    with pytest.raises(ValueError, match="cannot split 2 groups into 3"):
        b.split(3, group_key="group_id")
    with pytest.raises(ValueError, match="cannot split 6 samples into 7"):
        b.split(7)


def test_concat_requires_matching_keys():
    a = make_batch([2, 3])
    b = make_batch([1], ids=[99])
    del b.tokens["feat"]
    with pytest.raises(ValueError, match="different tokens keys"):
        SampleBatch.concat([a, b])


# ----------------------------------------------------------------- micro-batches and chunks
def test_micro_batches_respect_budget_and_cover_every_sample_once_in_order():
    b = make_batch()  # lens 3, 1, 5, 2, 7, 4
    mbs = b.micro_batches(8)
    assert [m.ids for m in mbs] == [[10, 11], [12, 13], [14], [15]]
    assert all(m.num_tokens <= 8 for m in mbs)
    assert [i for m in mbs for i in m.ids] == b.ids
    assert_same_batch(SampleBatch.concat(mbs), b)


def test_micro_batch_sample_longer_than_budget_goes_alone():
    b = make_batch([2, 10, 1, 1])
    mbs = b.micro_batches(4)
    assert [m.seqlens.tolist() for m in mbs] == [[2], [10], [1, 1]]


def test_micro_batches_with_group_key_never_cut_a_group():
    # groups of consecutive samples: sizes 3+1 | 5+2 | 7 | 4 tokens
    b = make_batch(groups=[0, 0, 1, 1, 2, 3])
    mbs = b.micro_batches(6, group_key="group_id")
    assert [m.samples["group_id"].tolist() for m in mbs] == [[0, 0], [1, 1], [2], [3]]
    # without the key the budget alone decides, and group 1 would be cut
    assert [m.ids for m in b.micro_batches(6)] == [[10, 11], [12], [13], [14], [15]]


def test_chunks_have_equal_sample_counts():
    b = make_batch()
    assert [c.ids for c in b.chunks(3)] == [[10, 11], [12, 13], [14, 15]]
    four = b.chunks(4)
    assert sorted(len(c) for c in four) == [1, 1, 2, 2]
    assert [i for c in four for i in c.ids] == b.ids  # consecutive, in order
    assert [len(c) for c in b.chunks(10)] == [1] * 6  # never an empty chunk


def test_shared_prefix_len_and_a_micro_batch_budget_that_counts_a_shared_prefix_once():
    seqs = [[1, 2, 3, 9], [1, 2, 3, 8, 7], [1, 2, 3], [4, 5], [4, 6, 6]]
    b = SampleBatch.from_sequences(range(5), {"input_ids": [torch.tensor(s) for s in seqs]},
                                   {"group_id": [0, 0, 0, 1, 1]})
    assert b.shared_prefix_len([0, 1, 2]) == 3  # the whole of sample 2 is the prefix
    assert b.shared_prefix_len([3, 4]) == 0  # one common token is not worth a segment
    assert b.shared_prefix_len([0]) == 0
    # group 0: 12 tokens, 12 - 2 * 3 = 6 shared; group 1: 5 tokens either way
    assert [len(m) for m in b.micro_batches(11, "group_id")] == [3, 2]
    assert [len(m) for m in b.micro_batches(11, "group_id", share_prefix=True)] == [5]
