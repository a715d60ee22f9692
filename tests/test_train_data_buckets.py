"""Datasets in groups (ComfyUI's MakeTrainingDataset / ResolutionBucket shapes): pairing latents with conditionings,
grouping by latent shape, and batches drawn from one bucket, seeded and reproducible."""
from __future__ import annotations

import pytest
import torch

from hadakron.train import LatentDataset, bucket_summary, pair_conditioning, shape_buckets, split_batches


def latents_of(*hw: tuple[int, int], c: int = 4) -> list[torch.Tensor]:
    """One (C, H, W) latent per size, each filled with its index (so a batch says which samples it holds)."""
    return [torch.full((c, h, w), float(i)) for i, (h, w) in enumerate(hw)]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- split_batches


def test_split_batches_one_sample_per_row_in_order():
    a, b = torch.arange(2 * 3).reshape(2, 3, 1).float(), torch.arange(4).reshape(1, 4, 1).float()
    out = split_batches([a, b])
    assert [tuple(s.shape) for s in out] == [(3, 1), (3, 1), (4, 1)]
    assert torch.equal(out[1], a[1]) and torch.equal(out[2], b[0])


def test_split_batches_empty_dataset_says_what_it_found():
    with pytest.raises(ValueError, match=r"no latents.*found 0 latent batch"):
        split_batches([])
    with pytest.raises(ValueError, match=r"no latents.*\[0\]"):
        split_batches([torch.zeros(0, 4, 8, 8)])


# ---------------------------------------------------------------- pair_conditioning


def test_one_conditioning_is_shared_by_every_sample():
    assert pair_conditioning([["c"]], [3, 2]) == ["c"] * 5


def test_make_training_dataset_form_one_group_per_image():
    # MakeTrainingDataset: N latent dicts of one sample, N CONDITIONINGs of one entry
    assert pair_conditioning([["a"], ["b"], ["c"]], [1, 1, 1]) == ["a", "b", "c"]


def test_resolution_bucket_form_one_group_per_bucket():
    # ResolutionBucket: a batch per resolution, with the list of its conditionings
    assert pair_conditioning([["a", "b"], ["c"], ["d", "e", "f"]], [2, 1, 3]) == ["a", "b", "c", "d", "e", "f"]


def test_one_conditioning_for_a_whole_group():
    assert pair_conditioning([["a"], ["b", "c"]], [3, 2]) == ["a", "a", "a", "b", "c"]


def test_single_group_on_either_side_pairs_in_order():
    assert pair_conditioning([["a"], ["b"], ["c"]], [3]) == ["a", "b", "c"]   # one batch, a caption list
    assert pair_conditioning([["a", "b", "c"]], [1, 2]) == ["a", "b", "c"]


def test_group_count_mismatch_names_both_groupings():
    # bucketed latents (2 buckets) with the unbucketed conditioning list (one per image): pairing in order would
    # give samples the conditioning of other images
    with pytest.raises(ValueError, match=r"2 groups \[2, 1\].*3 groups \[1, 1, 1\]"):
        pair_conditioning([["a"], ["b"], ["c"]], [2, 1])


def test_group_size_mismatch_names_group_and_counts():
    with pytest.raises(ValueError, match=r"latent group 1 holds 3 sample\(s\) but its conditioning has 2"):
        pair_conditioning([["a", "b"], ["c", "d"]], [2, 3])


def test_total_mismatch_and_empty_conditioning():
    with pytest.raises(ValueError, match=r"got 2 conditionings for 3 latents"):
        pair_conditioning([["a", "b"]], [3])
    with pytest.raises(ValueError, match=r"no conditioning: expected 1 or 4"):
        pair_conditioning([[]], [4])
    with pytest.raises(ValueError, match=r"no conditioning"):
        pair_conditioning([], [1])


# ---------------------------------------------------------------- buckets and draws


def test_shape_buckets_in_order_of_first_appearance():
    lat = latents_of((8, 8), (8, 12), (8, 8), (12, 8), (8, 12))
    assert shape_buckets(lat) == {(4, 8, 8): [0, 2], (4, 8, 12): [1, 4], (4, 12, 8): [3]}
    assert bucket_summary(lat) == "5 samples in 3 buckets: 4x8x8 (2), 4x8x12 (2), 4x12x8 (1)"
    assert bucket_summary(lat[:1]) == "1 samples in 1 bucket: 4x8x8 (1)"


def test_every_batch_comes_from_one_bucket_without_repeats():
    lat = latents_of((8, 8), (8, 12), (8, 8), (12, 8), (8, 12), (8, 8))
    buckets = {i: shape for shape, idx in shape_buckets(lat).items() for i in idx}
    data = LatentDataset(lat, [f"c{i}" for i in range(len(lat))])
    for seed in range(40):
        batch = data.draw(gen(seed), 2)
        assert len({buckets[i] for i in batch.indices}) == 1
        assert len(set(batch.indices)) == len(batch.indices) == 2 or buckets[batch.indices[0]] == (4, 12, 8)
        assert [int(x[0, 0, 0]) for x in batch.x0] == list(batch.indices)   # the stacked latents are those samples
        assert batch.cond == [f"c{i}" for i in batch.indices]


def test_batch_larger_than_its_bucket_is_the_whole_bucket():
    lat = latents_of((8, 8), (8, 12), (8, 8), (12, 8))
    data = LatentDataset(lat)
    sizes = {}
    for seed in range(40):
        batch = data.draw(gen(seed), 8)
        sizes.setdefault(tuple(batch.x0.shape[1:]), set()).add(tuple(sorted(batch.indices)))
    assert sizes == {(4, 8, 8): {(0, 2)}, (4, 8, 12): {(1,)}, (4, 12, 8): {(3,)}}


def test_buckets_drawn_in_proportion_to_their_size():
    lat = latents_of(*([(8, 8)] * 3 + [(8, 12)]))
    data = LatentDataset(lat)
    firsts = [data.draw(gen(seed), 1).indices[0] for seed in range(400)]
    share = sum(i < 3 for i in firsts) / len(firsts)
    assert 0.65 < share < 0.85   # 3 of 4 samples are 8x8; 400 seeded draws (fixed numbers, not noise)


def test_draws_are_reproducible_per_generator_seed():
    lat = latents_of((8, 8), (8, 12), (8, 8), (12, 8), (8, 12), (8, 8))
    a, b = LatentDataset(lat), LatentDataset(list(lat))
    assert [a.draw(gen(s), 3).indices for s in range(10)] == [b.draw(gen(s), 3).indices for s in range(10)]
    assert len({a.draw(gen(s), 3).indices for s in range(10)}) > 1
