"""EpochBatches: no item is ever skipped (an epoch's last partial batch is completed from the next
epoch's order), the position resumes exactly at every step, the `epoch` progress counts epochs,
and counts in messages agree with their nouns."""

from __future__ import annotations

import pytest

from mistral_train.data.epochs import EpochBatches, SmallDataError, TrainData, too_few
from mistral_train.data.packing import epoch_order
from mistral_train.wording import counted


def batches(n_items: int, batch_size: int, seed: int = 7) -> EpochBatches:
    return EpochBatches(list(range(n_items)), list, batch_size, seed=seed, tokens=n_items, source="mine")


def test_twelve_rows_in_batches_of_eight_skip_none_and_the_tail_opens_the_next_epoch():
    stream = batches(12, 8)
    served = [next(stream) for _ in range(3)]  # 24 items: exactly two epochs
    assert [len(b) for b in served] == [8, 8, 8]
    # the hand formula: batches are the epoch orders laid end to end, cut every 8 items
    expected = epoch_order(12, 7, 0) + epoch_order(12, 7, 1)
    assert [i for b in served for i in b] == expected
    assert served[1][:4] == epoch_order(12, 7, 0)[8:]  # the 4 rows the old code dropped every epoch
    for epoch in range(5):  # and over many epochs each item is served exactly once per epoch
        stream = batches(12, 8)
        flat = [i for _ in range(3 * (epoch + 1)) for i in next(stream)]
        assert sorted(flat) == sorted(list(range(12)) * 2 * (epoch + 1))


def test_progress_counts_epochs_served():
    stream = batches(12, 8)
    seen = []
    for _ in range(3):
        next(stream)
        seen.append(stream.progress)
    assert seen == pytest.approx([8 / 12, 16 / 12, 2.0])  # 0.667 -> 1.667 before: an epoch too many
    whole = batches(12, 4)
    seen = []
    for _ in range(3):
        next(whole)
        seen.append(whole.progress)
    assert seen[2] == 1.0  # exactly 1.0 at the end of the first pass
    next(whole)
    assert whole.progress == pytest.approx(1 + 4 / 12)


@pytest.mark.parametrize("n_items,batch_size", [(12, 8), (10, 3), (9, 3)])
def test_a_restored_position_gives_the_same_batches_at_every_step(n_items, batch_size):
    stream = batches(n_items, batch_size)
    for step in range(2 * n_items // batch_size + 2):  # every position over two epochs, tails included
        state = stream.state_dict()
        expected = [next(stream) for _ in range(4)]
        resumed = batches(n_items, batch_size)
        resumed.load_state_dict(state)
        assert [next(resumed) for _ in range(4)] == expected, step
        stream = batches(n_items, batch_size)
        stream.load_state_dict(state)
        next(stream)  # on to the next position


def test_batches_per_epoch_says_how_the_tail_is_served():
    assert batches(12, 4).per_epoch() == "3 batches per epoch"
    assert batches(4, 4).per_epoch() == "1 batch per epoch"
    assert batches(12, 8).per_epoch() == ("1.5 batches per epoch: the last 4 rows of an epoch go into a batch "
                                          "completed from the next epoch")
    assert batches(10, 3).per_epoch().startswith("3.33 batches per epoch: the last 1 row of an epoch goes ")
    assert batches(3, 8).per_epoch() == "3 rows per epoch, fewer than one batch of 8"


def test_the_small_data_check_waits_for_the_caller_and_counts_the_users_data():
    message = too_few("data.path a.jsonl", 5, 8, "packed 40 examples into 5 rows", ["add data"])
    assert message == ("data.path a.jsonl: packed 40 examples into 5 rows, fewer than trainer.batch_size=8; "
                       "lower trainer.batch_size to 5 or add data")
    assert too_few("x", 8, 8, "8 rows", []) is None
    data = TrainData(batches(5, 8), summary=["the table"], too_few=message)  # built: the summary can be shown
    with pytest.raises(SmallDataError, match="packed 40 examples into 5 rows"):
        data.check_batch_size()
    TrainData(batches(9, 8)).check_batch_size()  # enough: no error


def test_counts_agree_with_their_nouns():
    assert [counted(n, "batch") for n in (0, 1, 2)] == ["0 batches", "1 batch", "2 batches"]
    assert counted(1, "row") == "1 row" and counted(3, "row") == "3 rows"
    assert counted(2, "entry", "entries") == "2 entries"


def test_held_out_batches_are_collated_like_training_and_follow_a_collate_swap():
    data = TrainData(batches(12, 4), eval_items=[100, 101, 102, 103, 104, 105, 106], eval_size=3)
    assert data.eval_batches == [[100, 101, 102], [103, 104, 105], [106]]  # training's collate (list), 3 at a time
    first = next(data.train)
    data.swap_collate(lambda items: [-x for x in items])  # e.g. one that adds reference log-probs
    assert data.eval_batches == [[-100, -101, -102], [-103, -104, -105], [-106]]
    assert next(data.train) == [-i for i in epoch_order(12, 7, 0)[4:8]] and first == epoch_order(12, 7, 0)[:4]
    assert TrainData(batches(12, 4)).eval_batches is None  # no held-out split
