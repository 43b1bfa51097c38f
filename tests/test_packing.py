import numpy as np
import pytest

from gl_ray.data.packing import RowLayout, concat_documents, epoch_order, pack_rows, stream_segments


def test_pack_rows_cuts_exact_rows_and_counts_the_drop():
    rows, dropped = pack_rows(np.arange(10), 4)
    assert rows.shape == (2, 4) and rows.dtype == np.int32 and dropped == 2
    assert rows.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    rows, dropped = pack_rows(np.arange(3), 4)
    assert rows.shape == (0, 4) and dropped == 3


def test_concat_documents_keeps_every_token():
    docs = [np.array([5, 6, 0]), np.array([7, 0]), np.array([0])]
    flat = concat_documents(docs)
    assert flat.tolist() == [5, 6, 0, 7, 0, 0] and flat.dtype == np.int32
    assert len(concat_documents([])) == 0


def _flat(lengths):
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return np.asarray(lengths), offsets


def _read(segs, corpus):
    return np.concatenate([corpus[a:a + n] for a, n in segs])


def test_stream_epoch0_is_manifest_order_and_later_epochs_are_permutations():
    lengths, offsets = _flat([3, 5, 2, 4])
    corpus = np.arange(14)
    assert stream_segments(lengths, offsets, 2, 9, seed=0) == [(2, 7)]
    epoch1 = _read(stream_segments(lengths, offsets, 14, 28, seed=0), corpus)
    assert sorted(epoch1.tolist()) == list(range(14))  # every token once in each epoch
    order = epoch_order([4], 1, 0)
    expect = np.concatenate([corpus[offsets[d]:offsets[d] + lengths[d]] for d in order])
    assert epoch1.tolist() == expect.tolist()
    # reads across the epoch boundary and in pieces agree with one big read
    whole = _read(stream_segments(lengths, offsets, 0, 40, seed=3), corpus)
    pieces = np.concatenate([_read(stream_segments(lengths, offsets, a, min(a + 5, 40), seed=3), corpus)
                             for a in range(0, 40, 5)])
    assert whole.tolist() == pieces.tolist()


def test_epoch_order_is_deterministic_by_seed():
    assert epoch_order([50], 2, 7).tolist() == epoch_order([50], 2, 7).tolist()
    assert epoch_order([50], 2, 7).tolist() != epoch_order([50], 2, 8).tolist()
    assert epoch_order([5], 0, 0).tolist() == [0, 1, 2, 3, 4]  # seed 0: epoch 0 in manifest order
    assert epoch_order([50], 0, 7).tolist() != list(range(50))  # other seeds shuffle epoch 0 too


def test_seeded_stream_shuffles_epoch0_and_still_covers_every_token_once():
    lengths, offsets = _flat([3, 5, 2, 4, 6, 1])
    corpus = np.arange(21)
    epoch0 = _read(stream_segments(lengths, offsets, 0, 21, seed=5), corpus)
    expect = np.concatenate([corpus[offsets[d]:offsets[d] + lengths[d]] for d in epoch_order([6], 0, 5)])
    assert epoch0.tolist() == expect.tolist() != corpus.tolist()
    assert sorted(epoch0.tolist()) == corpus.tolist()


def test_shuffled_epochs_read_one_shard_at_a_time():
    shard_docs = [4, 3, 5]
    order = epoch_order(shard_docs, 1, 2)
    assert sorted(order.tolist()) == list(range(12))
    shard_of = np.repeat([0, 1, 2], shard_docs)[order]
    assert (np.diff(shard_of) != 0).sum() == 2  # three runs: each shard's documents come together
    lengths, offsets = _flat([2, 3, 1, 4, 2, 2, 3, 1, 2, 5, 1, 2])
    corpus = np.arange(28)
    epoch = _read(stream_segments(lengths, offsets, 28, 56, seed=2, shard_docs=shard_docs), corpus)
    expect = np.concatenate([corpus[offsets[d]:offsets[d] + lengths[d]] for d in order])
    assert epoch.tolist() == expect.tolist()


@pytest.mark.parametrize("world, mb, ga", [(1, 4, 2), (2, 2, 2), (4, 1, 2)])
def test_row_layout_covers_each_step_once_across_ranks(world, mb, ga):
    L, seqs = 16, world * mb * ga
    per = mb * ga
    starts = []
    for rank in range(world):
        local = np.arange(3 * per)  # three steps
        layout = RowLayout(stage_start_token=1000, seq_len=L, sequences_per_step=seqs, rows_per_rank_step=per,
                           rank=rank, start_step=0, stage_steps=3)
        assert layout.num_rows == len(local)
        starts.append(layout.token_starts(local))
    allstarts = np.sort(np.concatenate(starts))
    assert allstarts.tolist() == list(range(1000, 1000 + 3 * seqs * L, L))


def test_row_layout_resume_cursor_skips_nothing_and_replays_nothing():
    kw = dict(stage_start_token=0, seq_len=8, sequences_per_step=6, rows_per_rank_step=3, rank=1, stage_steps=5)
    full, resumed = RowLayout(start_step=0, **kw), RowLayout(start_step=2, **kw)
    assert (full.num_rows, resumed.num_rows) == (15, 9)
    assert resumed.token_starts(np.arange(9)).tolist() == full.token_starts(np.arange(15))[2 * 3:].tolist()
    assert resumed.steps(np.arange(9)).tolist() == full.steps(np.arange(15))[2 * 3:].tolist() == \
        [2, 2, 2, 3, 3, 3, 4, 4, 4]


def test_later_epochs_shuffle_blocks_of_documents_within_shards():
    """Documents are grouped into blocks by where they start in ~block_tokens windows of their shard; a block never
    crosses a shard; the stream of a later epoch is the blocks in epoch_order."""
    from gl_ray.data.packing import document_blocks

    lengths = np.array([3, 4, 2, 9, 1, 1, 5, 2], dtype=np.int64)  # shards: [3,4,2,9] and [1,1,5,2]
    firsts, per_shard = document_blocks(lengths, [4, 4], block_tokens=5)
    # shard 0 starts at 0,3,7,9 -> windows 0,0,1,1; shard 1 starts at 0,1,2,7 -> windows 0,0,0,1
    assert firsts.tolist() == [0, 2, 4, 7] and per_shard == [2, 2]
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    b_off = offsets[firsts]
    b_len = np.diff(np.append(b_off, lengths.sum()))
    corpus = np.arange(int(lengths.sum()))
    epoch = _read(stream_segments(b_len, b_off, 27, 54, seed=1, shard_docs=per_shard), corpus)
    expect = np.concatenate([corpus[b_off[b]:b_off[b] + b_len[b]] for b in epoch_order(per_shard, 1, 1)])
    assert epoch.tolist() == expect.tolist() and sorted(epoch.tolist()) == corpus.tolist()


def test_a_selection_of_documents_is_cut_into_blocks_at_its_gaps():
    """Documents not back to back in the flat array (a length filter's selection) start a new block, so each block
    is one read; a selection with no gap has the whole split's blocks, also one that starts past the flat start."""
    from gl_ray.data.packing import block_pieces

    lengths = np.array([3, 4, 2, 9, 1, 1, 5, 2], dtype=np.int64)  # shards [3,4,2,9] and [1,1,5,2], as above
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    b_len, b_off, per_shard = block_pieces(lengths, offsets, [4, 4], block_tokens=5)
    assert b_off.tolist() == [0, 7, 18, 25] and b_len.tolist() == [7, 11, 7, 2] and per_shard == [2, 2]
    keep = np.array([1, 0, 1, 1, 1, 1, 0, 1], bool)  # documents of shard 0: 0, 2, 3; of shard 1: 4, 5, 7
    b_len, b_off, per_shard = block_pieces(lengths[keep], offsets[keep], [3, 3], block_tokens=5)
    # shard 0: a gap after document 0, document 3 in the next window; shard 1: a gap after document 5
    assert b_off.tolist() == [0, 7, 9, 18, 25] and b_len.tolist() == [3, 2, 9, 2, 2] and per_shard == [3, 2]
    corpus = np.arange(int(lengths.sum()))
    picked = np.concatenate([corpus[a:a + n] for a, n in zip(offsets[keep], lengths[keep])])
    assert _read(stream_segments(b_len, b_off, 0, 18, seed=0, shard_docs=per_shard, whole=False),
                 corpus).tolist() == picked.tolist()
    epoch = _read(stream_segments(b_len, b_off, 18, 36, seed=4, shard_docs=per_shard, whole=False), corpus)
    assert sorted(epoch.tolist()) == picked.tolist()
    for keep in (np.arange(8) >= 5, np.arange(8) == 3):  # back to back, but not from the flat array's start
        b_len, b_off, per_shard = block_pieces(lengths[keep], offsets[keep], [0, int(keep.sum())], block_tokens=5)
        picked = np.concatenate([corpus[a:a + n] for a, n in zip(offsets[keep], lengths[keep])])
        assert b_len.sum() == lengths[keep].sum() and np.all(b_len > 0)
        assert _read(stream_segments(b_len, b_off, 0, len(picked), seed=0, shard_docs=per_shard, whole=False),
                     corpus).tolist() == picked.tolist()
