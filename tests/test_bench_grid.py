"""``mustafar bench``'s default grid fits the shape: a CPU-sized grid for ``tiny``; prompts past a shape's
positions are refused (issue 17).

Before issue 17, ``mustafar bench --shape tiny`` on a CPU ran the GPU-sized grid (batches to 32, prompts
to 32k, past the tiny shape's 8192 positions).
"""

import pytest

from mustafar.bench import BenchConfig
from mustafar.bench.models import SHAPES


def positions(shape):
    return SHAPES[shape].fields["max_position_embeddings"]


def test_tiny_shape_gets_a_cpu_sized_grid():
    config = BenchConfig(shape="tiny")
    assert config.batches == (1, 4) and config.prompts == (256, 1024)
    assert max(config.prompts) + config.new_tokens <= positions("tiny")


def test_default_grid_of_every_shape_fits_its_positions():
    for shape in SHAPES:
        config = BenchConfig(shape=shape)
        assert config.prompts and max(config.prompts) + config.new_tokens <= positions(shape), shape
    assert BenchConfig().batches == (1, 8, 16, 32) and BenchConfig().prompts == (4096, 16384, 32768)


def test_explicit_grid_wins_and_prompts_past_the_positions_are_refused():
    assert BenchConfig(shape="tiny", batches=(2,), prompts=(100,)).batches == (2,)
    with pytest.raises(ValueError, match=r"prompts.*8192 positions.*got prompt 8192 \+ 32 new tokens"):
        BenchConfig(shape="tiny", prompts=(512, 8192))
