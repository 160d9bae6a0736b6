"""The content-addressed lookup task of chapter 05."""

from __future__ import annotations

import pytest
import torch

from rbf_tutorial.lookup import IGNORE_INDEX, LookupTask


def test_every_question_is_answered_by_the_pair_with_its_key():
    task = LookupTask(n_keys=6, n_values=5, n_pairs=4, length=11, n_fillers=7)
    inputs, targets = task.batch(50, generator=torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (50, task.context) == (50, 15)
    assert inputs.dtype == targets.dtype == torch.int64
    assert int(inputs.min()) >= 0 and int(inputs.max()) < task.vocab_size
    assert (targets[:, : task.length] == IGNORE_INDEX).all()
    for row_inputs, row_targets in zip(inputs, targets, strict=True):
        slots, questions = row_inputs[: task.length], row_inputs[task.length :]
        pairs = slots[slots < task.first_question]
        assert len(pairs) == task.n_pairs  # the rest are fillers
        assert ((slots >= task.first_filler) | (slots < task.first_question)).all()
        table = {int(pair) // task.n_values: int(pair) % task.n_values for pair in pairs}
        assert len(table) == task.n_pairs, "the keys of a row are distinct"
        asked = sorted(int(question) - task.first_question for question in questions)
        assert asked == sorted(table), "every key of the row is asked once"
        for question, answer in zip(questions, row_targets[task.length :], strict=True):
            assert int(answer) - task.first_answer == table[int(question) - task.first_question]


def test_batches_are_reproducible_and_vary():
    task = LookupTask()
    first = task.batch(8, generator=torch.Generator().manual_seed(3))
    again = task.batch(8, generator=torch.Generator().manual_seed(3))
    other = task.batch(8, generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])


def test_bad_sizes_are_named():
    with pytest.raises(ValueError, match="n_pairs"):
        LookupTask(n_keys=3, n_pairs=4)
    with pytest.raises(ValueError, match="length"):
        LookupTask(n_pairs=4, length=3)
    with pytest.raises(TypeError, match="batch_size"):
        LookupTask().batch(2.0)
