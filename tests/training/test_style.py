"""The italic style of the stack benchmark and its network-free measure (training/digits/style.py)."""

from __future__ import annotations

import torch

from training.digits.style import italic, slant


def vertical_bar(size: int = 16) -> torch.Tensor:
    image = torch.full((1, 3, size, size), -1.0)
    image[..., 3:13, 7:9] = 1.0  # white ink on black, as the digits
    return image


def test_an_upright_stroke_has_no_slant_and_the_italic_shear_gives_its_slope():
    bar = vertical_bar()
    assert abs(float(slant(bar))) < 1e-6
    for shear in (0.2, 0.45):
        measured = float(slant(italic(bar, shear)))
        assert abs(measured - shear) < 0.05, (shear, measured)  # the stroke leans right by `shear` px per px


def test_italic_keeps_the_background_and_the_ink_amount():
    bar = vertical_bar()
    sheared = italic(bar, 0.45)
    assert sheared.min() >= -1.0 - 1e-6 and sheared.max() <= 1.0 + 1e-6
    assert float(sheared[0, 0, 0, 0]) == -1.0  # corners stay background
    ink = lambda x: float(((x + 1) / 2).sum())  # noqa: E731
    assert abs(ink(sheared) - ink(bar)) / ink(bar) < 0.05
