"""Pictures of samples for TensorBoard (logger/views.py picks one by task): a captioned grid for
classification, image/true/predicted masks for segmentation, predicted-vs-true for regression.

Drawn once per epoch from samples the loop already computed: no extra forward pass, no extra data
loading. `sample_grid` returns None for inputs that are not images ((N, C, H, W) with 1 or 3
channels) or outputs that are not class scores ((N, classes) with integer targets).
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


PALETTE = torch.tensor([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                        [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60]], dtype=torch.uint8)


def _tiles(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, TILE, TILE, 3) uint8, each image scaled to 0..255 on its own, blocks of pixels."""
    images = images.detach().float().cpu()
    low = images.amin(dim=(1, 2, 3), keepdim=True)
    high = images.amax(dim=(1, 2, 3), keepdim=True)
    images = (images - low) / (high - low).clamp_min(1e-12) * 255
    images = torch.nn.functional.interpolate(images, size=(TILE, TILE), mode="nearest-exact")
    return images.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).permute(0, 2, 3, 1)


def _mask_tiles(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) class indices -> (N, TILE, TILE, 3) uint8 in PALETTE colours (cycled past 10 classes)."""
    colours = PALETTE[masks.detach().cpu().long() % len(PALETTE)]  # (N, H, W, 3)
    scaled = torch.nn.functional.interpolate(colours.permute(0, 3, 1, 2).float(), size=(TILE, TILE),
                                             mode="nearest-exact")
    return scaled.to(torch.uint8).permute(0, 2, 3, 1)


def segmentation_grid(images: torch.Tensor | None, true: torch.Tensor, predicted: torch.Tensor,
                      max_samples: int = 8) -> torch.Tensor:
    """(H, W, 3) uint8: one row per sample: the input image (when there is one), the true mask and the
    predicted mask, captioned with the sample's pixel accuracy."""
    import numpy as np

    n = min(max_samples, true.shape[0])
    columns = [_mask_tiles(true[:n]), _mask_tiles(predicted[:n])]
    if images is not None:
        columns.insert(0, _tiles(images[:n]))
    width = len(columns) * (TILE + GAP) - GAP
    canvas = np.zeros((n * (TILE + CAPTION), width, 3), dtype=np.uint8)
    accuracy = (true[:n] == predicted[:n]).float().flatten(1).mean(dim=1).tolist()
    for k in range(n):
        y = k * (TILE + CAPTION)
        for c, column in enumerate(columns):
            canvas[y:y + TILE, c * (TILE + GAP):c * (TILE + GAP) + TILE] = column[k].numpy()
        labels = (["image"] if images is not None else []) + ["true", f"pred {accuracy[k]:.0%}"]
        for c, label in enumerate(labels):
            x = c * (TILE + GAP)
            canvas[y + TILE:y + TILE + CAPTION, x:x + TILE] = _caption(label, CORRECT)
    return torch.from_numpy(canvas)


def regression_plot(predicted: torch.Tensor, true: torch.Tensor, size: int = 256) -> torch.Tensor:
    """(size + CAPTION, size, 3) uint8: predicted (y) against true (x) values, one dot each, over the line
    y = x (grey), on axes spanning both; the caption gives the range."""
    import numpy as np

    predicted, true = predicted.float(), true.float()
    finite = torch.isfinite(predicted) & torch.isfinite(true)
    predicted, true = predicted[finite], true[finite]
    canvas = np.zeros((size + CAPTION, size, 3), dtype=np.uint8)
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
        text = f"x true, y pred {low:.3g}..{high:.3g}"
    else:
        text = "no finite values"
    from PIL import Image, ImageDraw

    caption = Image.new("RGB", (size, CAPTION), (0, 0, 0))
    ImageDraw.Draw(caption).text((2, 1), text, fill=CORRECT)
    canvas[size:] = np.array(caption)
    return torch.from_numpy(canvas)
