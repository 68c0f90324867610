"""The preview grid: rows of images with a label strip on the left, readable at every image size.

Small images (the digits demo's 16 px) are enlarged with nearest neighbour to cells of at least GRID_MIN_CELL px;
the label strip is as wide as the widest label and each row as tall as its label, so labels never overlap.
`grid_layout` computes where everything goes (tested without OCR); `grid_image` draws it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch import Tensor

GRID_MIN_CELL = 96  # px: images smaller than this on their shorter side are enlarged (nearest, integer factor)
GRID_FONT_SIZE = 12  # px: the smallest label font; larger cells get cell // 10 so labels stay readable when shrunk
GRID_LABEL_SPACING = 4  # px between the lines of a label


@dataclass(frozen=True)
class GridLayout:
    """Where grid_image puts things, in pixels of its output; boxes are (left, top, right, bottom), right/bottom
    exclusive. Every row's images share the first row's size."""

    scale: int  # integer nearest-neighbour enlargement of every image (1 = as given)
    cell: tuple[int, int]  # (height, width) of one image after enlargement
    cols: int  # images in the longest row
    font_size: int  # label font size
    padding: int  # free space around each label
    label_width: int  # width of the label strip on the left: widest label + 2 * padding
    row_heights: tuple[int, ...]  # max(cell height, the row's label height + 2 * padding)
    label_boxes: tuple[tuple[int, int, int, int], ...]  # each row's label text block as drawn

    @property
    def row_tops(self) -> tuple[int, ...]:
        """y of each row's top edge."""
        return tuple(sum(self.row_heights[:r]) for r in range(len(self.row_heights)))

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the whole grid."""
        return sum(self.row_heights), self.label_width + self.cols * self.cell[1]

    def cell_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """Where image `col` of row `row` is pasted (vertically centred in its row)."""
        top = self.row_tops[row] + (self.row_heights[row] - self.cell[0]) // 2
        left = self.label_width + col * self.cell[1]
        return left, top, left + self.cell[1], top + self.cell[0]


def _grid_font(size: int):
    """PIL's default font (Aileron) at `size` px; the fixed bitmap font where Pillow lacks FreeType."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size)
    except (ImportError, OSError):
        return ImageFont.load_default()


def _label_bbox(label: str, font) -> tuple[int, int, int, int]:
    """Ink box of `label` drawn at (0, 0) with the grid's font and line spacing."""
    from PIL import Image, ImageDraw

    return ImageDraw.Draw(Image.new("L", (1, 1))).multiline_textbbox((0, 0), label, font=font,
                                                                      spacing=GRID_LABEL_SPACING)


def grid_layout(rows: Sequence[tuple[str, Tensor]]) -> GridLayout:
    """The layout grid_image draws `rows` with: cells >= GRID_MIN_CELL px, a label strip as wide as the widest label,
    rows as tall as their labels, each label centred vertically in its row (label boxes never overlap)."""
    height, width = (int(s) for s in rows[0][1].shape[1:3])
    scale = max(1, math.ceil(GRID_MIN_CELL / max(1, min(height, width))))
    cell = (height * scale, width * scale)
    font_size = max(GRID_FONT_SIZE, min(cell) // 10)
    padding = max(4, font_size // 2)
    font = _grid_font(font_size)
    extents = [(r - left, b - t) for left, t, r, b in (_label_bbox(label, font) for label, _ in rows)]
    label_width = max(w for w, _ in extents) + 2 * padding
    row_heights = tuple(max(cell[0], h + 2 * padding) for _, h in extents)
    boxes, top = [], 0
    for (w, h), row_height in zip(extents, row_heights):
        y = top + (row_height - h) // 2
        boxes.append((padding, y, padding + w, y + h))
        top += row_height
    return GridLayout(scale, cell, max(int(images.shape[0]) for _, images in rows), font_size, padding, label_width,
                      row_heights, tuple(boxes))


def grid_image(rows: Sequence[tuple[str, Tensor]]) -> np.ndarray:
    """Rows of images [n, H, W, 3] in 0..1 with a label strip on the left -> uint8 [H_total, W_total, 3], laid out
    by grid_layout (small images enlarged with nearest neighbour)."""
    from PIL import Image, ImageDraw

    layout = grid_layout(rows)
    height, width = layout.size
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = _grid_font(layout.font_size)
    for r, (label, images) in enumerate(rows):
        left, top, _, _ = _label_bbox(label, font)
        box = layout.label_boxes[r]
        draw.multiline_text((box[0] - left, box[1] - top), label, fill="black", font=font, spacing=GRID_LABEL_SPACING)
        for c in range(images.shape[0]):
            tile = (images[c].float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
            tile = tile.repeat(layout.scale, axis=0).repeat(layout.scale, axis=1)
            canvas.paste(Image.fromarray(tile), layout.cell_box(r, c)[:2])
    return np.asarray(canvas)


__all__ = ["GRID_MIN_CELL", "GridLayout", "grid_image", "grid_layout"]
