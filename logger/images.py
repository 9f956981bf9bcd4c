"""Pictures of samples for TensorBoard (logger/views.py picks one by task): a captioned grid for
classification, image/true/predicted masks for segmentation, predicted-vs-true for regression.

Drawn once per epoch from samples the loop already computed: no extra forward pass, no extra data
loading. `sample_grid` returns None for inputs that are not images ((N, C, H, W) with 1 or 3
channels) or outputs that are not class scores ((N, classes) with integer targets).

Sized for TensorBoard's image card (about 450 x 190 pixels at its default width, which scales a
picture down to fit): few samples, in a wide picture, with captions in a scalable font of
FONT_SIZE pixels (ink 14 px and more), so that they stay readable there, and are sharp when the card
is enlarged or "Show actual image size" is ticked.
"""
from __future__ import annotations

import functools
import struct
import zlib

import torch

try:  # ISA-L's deflate (a requirement of the checkpoint code) is ~5x zlib's at the fastest level
    from isal.isal_zlib import compress
except ImportError:
    from zlib import compress

TILE = 80          # pixels per sample image: tiny images are scaled up so a person can see them
CELL = 140         # pixels per sample in a classification grid: the caption may be wider than the image
FONT_SIZE = 21     # pixels; Pillow's own scalable font (Pillow >= 10.1 with FreeType)
LINE = 28          # pixels per caption line: the font's ascent and descent (g, p, y) with a margin
GAP = 4            # pixels between samples
COLUMNS = 5        # samples per row of a classification grid
CORRECT, WRONG, PLAIN = (80, 220, 80), (255, 90, 90), (225, 225, 225)


def class_names(loader) -> list[str] | None:
    """`classes` of the loader's dataset, looking through wrappers such as `Subset`."""
    dataset = getattr(loader, "dataset", None)
    for _ in range(4):
        if dataset is None:
            return None
        names = getattr(dataset, "classes", None)
        if names:
            return [str(name) for name in names]
        dataset = getattr(dataset, "dataset", None)
    return None


def _to_pixels(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, C, H, W) -> (N, h, w, 3) uint8, each image scaled to 0..255 on its own (inputs are often
    normalised; the grid shows shape, not level), enlarged in blocks of pixels or shrunk smoothly."""
    images = images.detach().float().cpu()
    low = images.amin(dim=(1, 2, 3), keepdim=True)
    high = images.amax(dim=(1, 2, 3), keepdim=True)
    images = (images - low) / (high - low).clamp_min(1e-12) * 255
    if size[0] >= images.shape[2] and size[1] >= images.shape[3]:
        images = torch.nn.functional.interpolate(images, size=size, mode="nearest-exact")
    else:
        images = torch.nn.functional.interpolate(images, size=size, mode="bilinear", antialias=True)
    return images.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).permute(0, 2, 3, 1)


def sample_grid(data: torch.Tensor, target: torch.Tensor, output: torch.Tensor, max_samples: int = 10,
                classes: list[str] | None = None) -> torch.Tensor | None:
    """(H, W, 3) uint8 grid of up to `max_samples` inputs, COLUMNS to a row, each captioned on two lines
    "t: <true class>" and "p: <predicted class>" (green when right, red when wrong), class names as long
    as the cell allows; None when the batch is not images with class scores."""
    if data.dim() != 4 or data.shape[1] not in (1, 3):
        return None
    if output.dim() != 2 or output.shape[1] < 2 or target.dim() != 1 or target.is_floating_point():
        return None  # not classification: no labels to show
    import numpy as np

    n = min(max_samples, data.shape[0])
    predicted = output[:n].detach().argmax(dim=1).cpu().tolist()
    true = target[:n].detach().cpu().tolist()
    scale = TILE / max(data.shape[2:])  # the longer side fills the tile, the aspect ratio is kept
    size = (max(1, round(data.shape[2] * scale)), max(1, round(data.shape[3] * scale)))
    images = _to_pixels(data[:n], size).numpy()  # (N, h, w, 3)
    columns = min(n, COLUMNS)
    rows = -(-n // columns)
    height = TILE + 2 * LINE + GAP
    canvas = np.zeros((rows * height - GAP, columns * (CELL + GAP) - GAP, 3), dtype=np.uint8)
    name = (lambda i: classes[i] if classes and 0 <= i < len(classes) else str(i))
    for k in range(n):
        x, y = (k % columns) * (CELL + GAP), (k // columns) * height
        left = x + (CELL - size[1]) // 2
        canvas[y:y + size[0], left:left + size[1]] = images[k]
        colour = CORRECT if true[k] == predicted[k] else WRONG
        canvas[y + TILE:y + TILE + LINE, x:x + CELL] = caption(f"t: {name(true[k])}", PLAIN, CELL)
        canvas[y + TILE + LINE:y + TILE + 2 * LINE, x:x + CELL] = caption(f"p: {name(predicted[k])}", colour, CELL)
    return torch.from_numpy(canvas)  # (H, W, 3)


@functools.cache
def _font():
    """Pillow's bundled scalable font at FONT_SIZE (Pillow >= 10.1 with FreeType), else None."""
    from PIL import ImageFont

    try:
        font = ImageFont.load_default(size=FONT_SIZE)
    except TypeError:  # Pillow before 10.1: no size
        return None
    return font if isinstance(font, ImageFont.FreeTypeFont) else None


@functools.lru_cache(maxsize=1024)  # (text, colour, width) -> pixels, drawn once: text was most of a grid's time
def caption(text: str, colour: tuple[int, int, int], width: int, centred: bool = True):
    """(LINE, width, 3) uint8: `text` on black, cut with "…" to fit `width`, centred or from the left."""
    import numpy as np
    from PIL import Image, ImageDraw

    font = _font()
    if font is None:  # Pillow's ~9 px bitmap font, drawn at half the size and doubled: blocky but readable
        small = Image.new("RGB", (width // 2, LINE // 2), (0, 0, 0))
        draw = ImageDraw.Draw(small)
        text = _fit(text, lambda t: draw.textlength(t), width // 2 - 2)
        draw.text(((width // 2 - draw.textlength(text)) // 2 if centred else 1, 1), text, fill=colour)
        return np.array(small.resize((width // 2 * 2, LINE // 2 * 2), Image.NEAREST).crop((0, 0, width, LINE)))
    image = Image.new("RGB", (width, LINE), (0, 0, 0))
    text = _fit(text, font.getlength, width - 4)
    x = (width - font.getlength(text)) / 2 if centred else 2
    ascent, descent = font.getmetrics()
    ImageDraw.Draw(image).text((x, max(0, (LINE - ascent - descent) // 2)), text, fill=colour, font=font)
    return np.array(image)


def _fit(text: str, length, width: float) -> str:
    if length(text) <= width:
        return text
    while len(text) > 1 and length(text + "…") > width:
        text = text[:-1]
    return text + "…"


def encode_png(picture) -> bytes:
    """An (H, W, 3) uint8 array as PNG file bytes. Each row is stored as its difference from the row above
    (PNG's "Up" filter: the pictures' enlarged tiles and black margins become runs of zeros) and deflated at
    the fastest level: 0.2-1 ms for a 276 x 716 grid, about as small as Pillow's PNG at compress_level=1,
    which took 5-10 ms (it tries each of PNG's five filters on every row)."""
    import numpy as np

    height, width, _ = picture.shape
    rows = np.ascontiguousarray(picture, dtype=np.uint8).reshape(height, width * 3)
    filtered = np.empty((height, width * 3 + 1), dtype=np.uint8)
    filtered[:, 0] = 2  # the filter type of each row: Up (the row above the first counts as zeros)
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # modulo 256, as PNG's filters are

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits per channel, RGB, not interlaced
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", compress(filtered.tobytes(), 1))
            + chunk(b"IEND", b""))


PALETTE = torch.tensor([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                        [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60]], dtype=torch.uint8)


def _mask_tiles(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) class indices -> (N, TILE, TILE, 3) uint8 in PALETTE colours (cycled past 10 classes)."""
    colours = PALETTE[masks.detach().cpu().long() % len(PALETTE)]  # (N, H, W, 3)
    scaled = torch.nn.functional.interpolate(colours.permute(0, 3, 1, 2).float(), size=(TILE, TILE),
                                             mode="nearest-exact")
    return scaled.to(torch.uint8).permute(0, 2, 3, 1)


def segmentation_grid(images: torch.Tensor | None, true: torch.Tensor, predicted: torch.Tensor,
                      max_samples: int = 6) -> torch.Tensor:
    """(H, W, 3) uint8: one column per sample, top to bottom the input image (when there is one), the
    true mask and the predicted mask, labelled on the left, each sample captioned with its pixel accuracy."""
    import numpy as np

    n = min(max_samples, true.shape[0])
    rows = [("true", _mask_tiles(true[:n])), ("pred", _mask_tiles(predicted[:n]))]
    if images is not None:
        rows.insert(0, ("image", _to_pixels(images[:n], (TILE, TILE))))
    label = 64
    canvas = np.zeros((len(rows) * (TILE + GAP) + LINE, label + n * (TILE + GAP) - GAP, 3), dtype=np.uint8)
    accuracy = (true[:n] == predicted[:n]).float().flatten(1).mean(dim=1).tolist()
    for r, (name, tiles) in enumerate(rows):
        y = r * (TILE + GAP)
        canvas[y + (TILE - LINE) // 2:y + (TILE - LINE) // 2 + LINE, :label] = caption(name, PLAIN, label, False)
        for k in range(n):
            x = label + k * (TILE + GAP)
            canvas[y:y + TILE, x:x + TILE] = tiles[k].numpy()
    y = len(rows) * (TILE + GAP)
    for k in range(n):
        x = label + k * (TILE + GAP)
        canvas[y:y + LINE, x:x + TILE] = caption(f"{accuracy[k]:.0%}", CORRECT, TILE)
    return torch.from_numpy(canvas)


def regression_plot(predicted: torch.Tensor, true: torch.Tensor, size: int = 256) -> torch.Tensor:
    """(size + LINE, size, 3) uint8: predicted (y) against true (x) values, one dot each, over the line
    y = x (grey), on axes spanning both; the caption gives the range."""
    import numpy as np

    predicted, true = predicted.float(), true.float()
    finite = torch.isfinite(predicted) & torch.isfinite(true)
    predicted, true = predicted[finite], true[finite]
    canvas = np.zeros((size + LINE, size, 3), dtype=np.uint8)
    for i in range(size):  # the diagonal: perfect predictions
        canvas[size - 1 - i, i] = (90, 90, 90)
    if len(true):
        low = float(torch.minimum(predicted.min(), true.min()))
        high = float(torch.maximum(predicted.max(), true.max()))
        scale = (size - 1) / max(high - low, 1e-12)
        xs = ((true - low) * scale).round().long().clamp(0, size - 1).numpy()
        ys = (size - 1 - ((predicted - low) * scale).round().long().clamp(0, size - 1)).numpy()
        for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):  # 2x2 dots
            canvas[np.clip(ys + dy, 0, size - 1), np.clip(xs + dx, 0, size - 1)] = (80, 160, 255)
        text = f"x true, y pred: {low:.3g} to {high:.3g}"
    else:
        text = "no finite values"
    canvas[size:] = caption(text, PLAIN, size)
    return torch.from_numpy(canvas)
