"""X/Y grid images: cells in rows and columns with their labels, as A1111's X/Y plot draws them."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont


def compose(cells: list[Image.Image], columns: list[str], rows: list[str], *, pad: int = 4) -> Image.Image:
    """One image of ``len(rows) or 1`` × ``len(columns)`` cells (row-major), labels on top and at the left."""
    font = ImageFont.load_default()
    w, h = cells[0].size
    n_rows = max(1, len(rows))
    draw0 = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def size(text: str) -> tuple[int, int]:
        box = draw0.textbbox((0, 0), text, font=font)
        return box[2] - box[0], box[3] - box[1]

    left = max((size(r)[0] for r in rows), default=0) + (2 * pad if rows else 0)
    top = max((size(c)[1] for c in columns), default=0) + 2 * pad
    grid = Image.new("RGB", (left + len(columns) * (w + pad), top + n_rows * (h + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(columns):
        tw, _ = size(label)
        draw.text((left + j * (w + pad) + max(0, (w - tw) // 2), pad), label, fill="black", font=font)
    for i, label in enumerate(rows):
        _, th = size(label)
        draw.text((pad, top + i * (h + pad) + max(0, (h - th) // 2)), label, fill="black", font=font)
    for k, cell in enumerate(cells):
        i, j = divmod(k, len(columns))
        grid.paste(cell.convert("RGB"), (left + j * (w + pad), top + i * (h + pad)))
    return grid
