"""TeacherRows: a frozen teacher's outputs per train row, computed once per task and
served by index only for batches the runner read from that train split."""
from __future__ import annotations

import torch

from dataset.feature_set import FeatureSet
from models.base import Batch
from models.row_cache import TeacherRows


def rows(n: int = 2500, seed: int = 0) -> FeatureSet:
    g = torch.Generator().manual_seed(seed)
    return FeatureSet(image=torch.randn(n, 6, generator=g), text=torch.randn(n, 5, generator=g),
                      labels=(torch.rand(n, 3, generator=g) > 0.5).float())


class CountingTeacher:
    """A fixed per-row function of both modalities; counts the rows it was asked for."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        self.w_image, self.w_text = torch.randn(6, 4, generator=g), torch.randn(5, 4, generator=g)
        self.rows = 0

    def __call__(self, batch: Batch):
        self.rows += len(batch)
        assert not torch.is_grad_enabled()  # targets carry no graph
        return torch.tanh(batch.image @ self.w_image), torch.tanh(batch.text @ self.w_text)


def test_rows_are_computed_once_and_served_by_index():
    train, teacher, cache = rows(), CountingTeacher(), TeacherRows()
    cache.reset(train)
    for epoch in range(3):
        for idx in torch.randperm(len(train), generator=torch.Generator().manual_seed(epoch)).split(64):
            got = cache(Batch.rows(train, idx), teacher)
            with torch.no_grad():
                want = teacher(Batch.rows(train, idx))
            teacher.rows -= len(idx)  # the reference call above is not the cache's
            assert len(got) == 2
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w)  # equal up to float rounding of the row count
    assert teacher.rows == len(train)  # one pass over the train split (3 chunks), not one per epoch


def test_other_batches_get_the_teacher_on_their_own_rows():
    train, teacher, cache = rows(), CountingTeacher(), TeacherRows()
    cache.reset(train)
    idx = torch.arange(10)
    hand_built = Batch(image=train.image[idx] + 1.0, text=train.text[idx], labels=train.labels[idx], index=idx)
    got = cache(hand_built, teacher)  # same index, other features, no source: not the table's rows
    assert teacher.rows == 10
    torch.testing.assert_close(got[0], torch.tanh(hand_built.image @ teacher.w_image), rtol=0, atol=0)
    other = rows(seed=3)
    cache(Batch.rows(other, idx), teacher)  # rows of another feature set
    assert teacher.rows == 20
    cache.reset(None)  # no teacher for this task: always per batch
    cache(Batch.rows(train, idx), teacher)
    assert teacher.rows == 30


def test_reset_forgets_the_table():
    train, teacher, cache = rows(), CountingTeacher(), TeacherRows()
    cache.reset(train)
    first = cache(Batch.rows(train, torch.arange(5)), teacher)[0].clone()
    teacher.w_image.mul_(2.0)  # a new task's teacher
    cache.reset(train)
    second = cache(Batch.rows(train, torch.arange(5)), teacher)[0]
    assert teacher.rows == 2 * len(train) and not torch.equal(first, second)
