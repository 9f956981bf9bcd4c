"""A small grid of input samples, each captioned with its true and predicted label, for TensorBoard.

Drawn once per epoch from one batch the loop already computed: no extra forward pass, no extra
data loading. Inputs that are not images ((N, C, H, W) with 1 or 3 channels) and outputs that are
not class scores ((N, classes) with integer targets) are skipped.
"""
from __future__ import annotations

import torch

TILE = 96          # pixels per sample: tiny images are scaled up so a person can see them
CAPTION = 14       # pixels of caption below each tile
GAP = 4            # pixels between tiles
CORRECT, WRONG = (80, 220, 80), (255, 80, 80)


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


def sample_grid(data: torch.Tensor, target: torch.Tensor, output: torch.Tensor, max_samples: int = 16,
                classes: list[str] | None = None) -> torch.Tensor | None:
    """(H, W, 3) uint8 grid of up to `max_samples` inputs, each captioned "t:<true> p:<predicted>"
    (green when right, red when wrong); None when the batch is not images with class scores."""
    if data.dim() != 4 or data.shape[1] not in (1, 3):
        return None
    if output.dim() != 2 or output.shape[1] < 2 or target.dim() != 1 or target.is_floating_point():
        return None  # not classification: no labels to show
    import numpy as np

    n = min(max_samples, data.shape[0])
    images = data[:n].detach().float().cpu()
    predicted = output[:n].detach().argmax(dim=1).cpu().tolist()
    true = target[:n].detach().cpu().tolist()
    # Each image scaled to 0..255 on its own: inputs are often normalised, and the grid shows shape, not level.
    low = images.amin(dim=(1, 2, 3), keepdim=True)
    high = images.amax(dim=(1, 2, 3), keepdim=True)
    images = (images - low) / (high - low).clamp_min(1e-12) * 255
    # All tiles scaled in one operation: blocks of pixels when enlarged, smoothed when shrunk.
    scale = TILE / max(images.shape[2:])
    size = (max(1, round(images.shape[2] * scale)), max(1, round(images.shape[3] * scale)))
    images = torch.nn.functional.interpolate(images, size=size, mode="nearest-exact") if scale >= 1 else \
        torch.nn.functional.interpolate(images, size=size, mode="bilinear", antialias=True)
    images = images.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1)
    images = images.permute(0, 2, 3, 1).contiguous().numpy()  # (N, h, w, 3)
    columns = min(n, 8)
    rows = -(-n // columns)
    canvas = np.zeros((rows * (TILE + CAPTION), columns * (TILE + GAP) - GAP, 3), dtype=np.uint8)
    name = (lambda i: classes[i] if classes and 0 <= i < len(classes) else str(i))
    for k in range(n):
        x, y = (k % columns) * (TILE + GAP), (k // columns) * (TILE + CAPTION)
        canvas[y:y + size[0], x:x + size[1]] = images[k]
        text = f"t:{name(true[k])[:5]} p:{name(predicted[k])[:5]}"
        canvas[y + TILE:y + TILE + CAPTION, x:x + TILE] = _caption(text, CORRECT if true[k] == predicted[k] else WRONG)
    return torch.from_numpy(canvas)  # (H, W, 3)


_captions: dict = {}  # (text, colour) -> (CAPTION, TILE, 3) pixels, drawn once: text was most of a grid's time


def _caption(text: str, colour: tuple[int, int, int]):
    pixels = _captions.get((text, colour))
    if pixels is None:
        import numpy as np
        from PIL import Image, ImageDraw

        image = Image.new("RGB", (TILE, CAPTION), (0, 0, 0))
        ImageDraw.Draw(image).text((2, 1), text, fill=colour)
        if len(_captions) >= 1024:  # many classes: start over rather than grow without bound (4 KB each)
            _captions.clear()
        pixels = _captions[(text, colour)] = np.array(image)
    return pixels
