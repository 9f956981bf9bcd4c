"""What TensorBoard shows of the data, by task, once per epoch, from batches the loop already computed.

- classification ((N, classes) scores, integer targets, image inputs): inputs captioned with the true
  and predicted labels (logger/images.py `sample_grid`);
- segmentation ((N, classes, H, W) scores, (N, H, W) integer masks): image, true mask, predicted mask;
- regression (one number per sample): predicted against true values, with the line y = x;
- anything else: one log line saying there is no view.

The samples shown are fixed across epochs (the validation order is). For classification they are spread
over the classes: the first sample of each class in the loader's order, then the second of each, and
so on, up to MAX_SAMPLES, shown in class order (with more classes than that: one sample each of
MAX_SAMPLES evenly spaced classes). Otherwise they are spread over the split (MAX_SAMPLES
positions from its start to its end), not its first ones.
"""
from __future__ import annotations

import torch

from logger.images import class_names, regression_plot, sample_grid, segmentation_grid
from logger.logging import get_logger

MAX_SAMPLES = 10  # one per class of a 10-class task; few enough to stay readable in TensorBoard's card
MAX_POINTS = 4096  # predicted/true pairs kept for the regression plot
_explained: set[str] = set()  # tags whose missing view was logged once


class SampleViews:
    def __init__(self, total: int, max_samples: int = MAX_SAMPLES):
        """`total`: the number of samples the pass will see (this process's share of the split)."""
        if total <= max_samples:
            self.wanted = list(range(total))
        else:
            self.wanted = sorted({round(i * (total - 1) / (max_samples - 1)) for i in range(max_samples)})
        self.max_samples = max_samples
        self.seen = 0
        self.rows: list[tuple] = []
        self.by_class: dict[int, list[tuple]] = {}  # classification: the samples kept of each class
        self.classes_done = False
        self.class_filter: set[int] | None = None
        self.points: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.n_points = 0

    def collect(self, inputs, target, output) -> None:
        """One batch: keep copies of the wanted samples (a compiled model may reuse its output buffers)."""
        n = next((t.shape[0] for t in (output, inputs, target) if isinstance(t, torch.Tensor) and t.dim()), 0)
        low, self.seen = self.seen, self.seen + n
        if _classification(target, output, n):
            self._collect_classes(inputs, target, output, n)
        else:
            picks = [p - low for p in self.wanted if low <= p < low + n]
            if picks:
                index = torch.tensor(picks)
                self.rows.append(tuple(_pick(t, index, n) for t in (inputs, target, output)))
        if (self.n_points < MAX_POINTS and isinstance(output, torch.Tensor) and isinstance(target, torch.Tensor)
                and output.numel() == n == target.numel() and target.is_floating_point()):
            self.points.append((output.detach().reshape(-1).float().clone(), target.detach().reshape(-1).float().clone()))
            self.n_points += n

    def _collect_classes(self, inputs, target, output, n: int) -> None:
        """Keep a sample when it makes the classes kept more even: at most max_samples in all, the first
        ones of each class in the loader's order. Reads the batch's labels (one small copy per batch) until
        max_samples classes have one sample each: then no later sample can change the picture."""
        if self.classes_done:
            return
        if self.class_filter is None:  # more classes than samples: evenly spaced classes, one sample each
            classes, most = output.shape[1], self.max_samples
            self.class_filter = set(range(classes)) if classes <= most else \
                {round(i * (classes - 1) / (most - 1)) for i in range(most)}
        kept = self.by_class
        counts = {label: len(rows) for label, rows in kept.items()}
        total, picks = sum(counts.values()), []
        for i, label in enumerate(target.detach().cpu().tolist()):
            if label not in self.class_filter:
                continue
            mine = counts.get(label, 0)
            if total >= self.max_samples:
                largest = max(counts, key=counts.get)
                if mine + 1 >= counts[largest]:
                    continue  # would not make the classes more even
                counts[largest] -= 1
                total -= 1
                newest = next((j for j in range(len(picks) - 1, -1, -1) if picks[j][1] == largest), None)
                if newest is not None:
                    del picks[newest]
                else:
                    kept[largest].pop()
                if not counts[largest]:
                    del counts[largest]
            counts[label] = mine + 1
            total += 1
            picks.append((i, label))
        if picks:
            index = torch.tensor([i for i, _ in picks])
            parts = [_pick(t, index, n) for t in (inputs, target, output)]
            for j, (_, label) in enumerate(picks):
                kept.setdefault(label, []).append(tuple(p[j:j + 1] if p is not None else None for p in parts))
        for label in [label for label, rows in kept.items() if not rows]:
            del kept[label]
        self.classes_done = bool(counts) and max(counts.values()) == 1 and \
            total >= min(self.max_samples, len(self.class_filter))

    def picture(self, classes: list[str] | None = None) -> tuple[torch.Tensor | None, str]:
        """((H, W, 3) uint8 picture or None, what it shows or why there is none)."""
        if self.by_class:  # in class order
            self.rows = [row for label in sorted(self.by_class) for row in self.by_class[label]]
        if not self.rows:
            return None, "no samples"
        inputs, target, output = (_cat([row[i] for row in self.rows]) for i in range(3))
        if output is None or target is None:
            return None, "the step returned no 'output' and 'target'"
        images = inputs is not None and inputs.dim() == 4 and inputs.shape[1] in (1, 3)
        if output.dim() == 2 and output.shape[1] >= 2 and target.dim() == 1 and not target.is_floating_point():
            if not images:
                return None, f"classification of inputs that are not images ({_shape(inputs)})"
            return sample_grid(inputs, target, output, classes=classes), "classification"
        if output.dim() == 4 and target.dim() == 3 and not target.is_floating_point() \
                and output.shape[2:] == target.shape[1:]:
            return segmentation_grid(inputs if images else None, target, output.argmax(dim=1)), "segmentation"
        if self.points:
            predicted, true = (torch.cat(parts)[:MAX_POINTS].cpu() for parts in zip(*self.points))
            return regression_plot(predicted, true), "regression"
        return None, f"output {_shape(output)} and target {_shape(target)} fit no view"

    def draw(self, writer, tag: str, step: int, loader=None) -> None:
        picture, why = self.picture(class_names(loader))
        if picture is not None:
            writer.add_picture(tag, picture, step)
        elif tag not in _explained:
            _explained.add(tag)
            get_logger().info(f"TensorBoard {tag}: no sample view ({why}); views exist for classification, "
                              f"segmentation and regression (trainer.images: false turns this off)")


def _classification(target, output, n: int) -> bool:
    return (isinstance(target, torch.Tensor) and isinstance(output, torch.Tensor) and target.dim() == 1
            and not target.is_floating_point() and target.shape[0] == n and output.dim() == 2
            and output.shape[0] == n and output.shape[1] >= 2)


def _pick(tensor, index: torch.Tensor, n: int):
    if isinstance(tensor, torch.Tensor) and tensor.dim() and tensor.shape[0] == n:
        return tensor.detach().index_select(0, index.to(tensor.device)).cpu()
    return None


def _cat(parts: list):
    if any(p is None for p in parts):
        return None
    try:
        return torch.cat(parts)
    except RuntimeError:  # samples of different sizes (a padded sequence batch): no picture of them
        return None


def _shape(tensor) -> str:
    return f"shape {tuple(tensor.shape)}" if isinstance(tensor, torch.Tensor) else "none"
