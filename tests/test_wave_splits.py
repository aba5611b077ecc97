"""The CUDA launcher's split count (``launch.common.wave_splits``): whole waves of long CTAs."""

import pytest

from mustafar.launch.common import wave_splits

SLOTS = 528  # an H200 at 4 decode CTAs per multiprocessor


@pytest.mark.parametrize("batch_heads,expected", [(8, 66), (64, 8), (128, 4), (256, 2)])
def test_one_wave_when_it_fills_the_device(batch_heads, expected):
    assert wave_splits(batch_heads, blocks=512, slots=SLOTS) == expected


def test_more_waves_when_one_wave_fills_too_little():
    splits = wave_splits(192, blocks=512, slots=SLOTS)  # 24 x 8 heads: 2 splits would fill 73 % of one wave
    ctas = 192 * splits
    waves = -(-ctas // SLOTS)
    assert splits == 8 and ctas / (waves * SLOTS) >= 0.95 and waves <= 4


def test_bounded_by_the_tokens_and_at_least_one():
    assert wave_splits(8, blocks=3, slots=SLOTS) == 3
    assert wave_splits(4096, blocks=512, slots=SLOTS) == 1
    assert wave_splits(1, blocks=1, slots=SLOTS) == 1
