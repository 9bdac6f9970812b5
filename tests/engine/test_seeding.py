"""The seed formulas: pure functions of the run's seed and a position, pinned to the values existing
checkpoints were written with (a change would make a resumed run replay other augmentations)."""
from agvm_ds import seeding


def test_seeds_are_the_values_checkpoints_replay():
    assert seeding.sample_seed(3, 2, 7) == (3 * 1_000_003 + 2) * 10_000_019 + 7
    assert seeding.step_seed(3, 1, 40, 1) == ((3 * 1_000_003 + 1) * 10_000_019 + 40) * 131 + 1
    assert seeding.loader_seed(3, 1) == 3 * 100_003 + 1
    assert list(seeding.shuffle_rng(3, 2).permutation(5)) == [4, 0, 1, 2, 3]


def test_each_position_gets_its_own_seed():
    seeds = {seeding.step_seed(0, rank, iteration, micro)
             for rank in range(4) for iteration in range(50) for micro in range(4)}
    assert len(seeds) == 4 * 50 * 4
    samples = {seeding.sample_seed(0, epoch, index) for epoch in range(5) for index in range(1000)}
    assert len(samples) == 5 * 1000
