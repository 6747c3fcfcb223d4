"""histo_retrieval.data.sampler: P x K training batches and the validation batches, seeded per epoch
and dealt round-robin between processes."""
from __future__ import annotations

import pytest

from histo_retrieval.data.sampler import PKBatchSampler, ValidationBatches
from histo_retrieval.errors import UserError


def test_pk_sampler_batches_hold_k_images_of_p_classes() -> None:
    labels = [0] * 7 + [1] * 5 + [2] * 6 + [3] * 9 + [4] * 1  # class 4 is too small for K = 3
    sampler = PKBatchSampler(labels, batch_size=9, samples_per_class=3, seed=5)
    batches = list(sampler)
    assert len(batches) == len(sampler) == len(labels) // 9
    for batch in batches:
        classes = [labels[i] for i in batch]
        assert len(batch) == 9 and len(set(batch)) == 9
        assert sorted(classes.count(c) for c in set(classes)) == [3, 3, 3] and 4 not in classes
    assert list(sampler) == batches  # same epoch, same batches
    sampler.set_epoch(1)
    assert list(sampler) != batches

    # Two processes share the single-process batch sequence, round-robin, without overlap.
    shards = [list(PKBatchSampler(labels * 2, 9, 3, num_replicas=2, rank=r, seed=5)) for r in range(2)]
    whole = list(PKBatchSampler(labels * 2, 9, 3, num_replicas=1, rank=0, seed=5))
    assert len(shards[0]) == len(shards[1]) == len(labels) * 2 // 18
    assert shards[0] == whole[0:2 * len(shards[0]):2] and shards[1] == whole[1:2 * len(shards[1]):2]


def test_pk_sampler_rejects_impossible_batches() -> None:
    with pytest.raises(UserError, match="multiple of --samples-per-class"):
        PKBatchSampler([0, 0, 1, 1], batch_size=5, samples_per_class=2)
    with pytest.raises(UserError, match=r"P <= 2 .*got P = 8 / 2 = 4"):
        PKBatchSampler([0, 0, 1, 1, 2], batch_size=8, samples_per_class=2)


def test_validation_batches_reference_reshuffles_and_drops_the_partial_batch() -> None:
    batches = ValidationBatches(10, 4, "reference", seed=1)
    epoch0 = list(batches)
    assert len(batches) == len(epoch0) == 2 and all(len(b) == 4 for b in epoch0)
    assert len(set(sum(epoch0, []))) == 8 and set(sum(epoch0, [])) <= set(range(10))
    assert list(batches) == epoch0  # seeded: the same epoch repeats
    batches.set_epoch(1)
    assert list(batches) != epoch0
    # Dealt round-robin: two processes see the one-process batches between them, whatever their number.
    shards = [list(ValidationBatches(10, 4, "reference", seed=1, num_replicas=2, rank=r)) for r in (0, 1)]
    assert shards == [epoch0[0::2], epoch0[1::2]]
    fixed = ValidationBatches(10, 4, "fixed", seed=1)
    assert list(fixed) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]] and len(fixed) == 3
    fixed.set_epoch(5)
    assert list(fixed) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
