"""Predict with a checkpoint on inputs without labels:
`python predict.py -r CHECKPOINT --input PATH [--output predictions.csv] [-d DEVICE]`.

PATH is a folder of images (searched recursively) or one image, read as the config's test split reads
its images (the dataset's own mode and transform); a .npy or .pt file of inputs, one sample per row
(a .pt file may hold a dict of tensors, e.g. {"tokens", "attention_mask"}); or `split:test`, the
config's test split without its labels. The model and the trainer come from the checkpoint as in
test.py; every batch goes through the trainer's `predict_step`, in eval mode, under the run's AMP
setting. One CSV row per input: `input` (the image's path, or the index of the row or test sample),
then `class`,
`class_name` (when the dataset names its classes) and `probability` for classification, `value`
(or `value_0`, `value_1`, ...) for regression, `mask` (a PNG of class indices, in `<output stem>_masks/`)
for segmentation, and `error`, empty unless that input could not be predicted.

Exit status: 0 every input was predicted; 1 some could not be (each is named on stderr and in the
`error` column; the others are predicted and written); 2 the command line, checkpoint, config or input
is wrong (one line on stderr, nothing written).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from errors import UserError, one_line, problem_lines

TEST_SPLIT = "split:test"
# Losses whose model outputs values, not class scores: a 2-D output of several columns is then not classes.
REGRESSION_LOSSES = ("mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Predict with a checkpoint on inputs without labels.")
    parser.add_argument("-r", "--resume", required=True,
                        help="checkpoint file, or a run directory (its best.pth, else last.pth)")
    parser.add_argument("--input", required=True,
                        help=f"a folder of images (or one image), a .npy or .pt file (one sample per row), or "
                             f"{TEST_SPLIT} (the config's test split without its labels)")
    parser.add_argument("--output", default="predictions.csv", help="the CSV to write (default: predictions.csv)")
    parser.add_argument("-c", "--config", help="config to use instead of the one stored in the checkpoint")
    parser.add_argument("-d", "--device", help="device: auto, cpu, cuda, cuda:N, mps")
    parser.add_argument("--batch-size", type=int, help="inputs per batch (default: the config's batch_size)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    return args


def input_kind(spec: str) -> str:
    from data_loader.datasets import IMAGE_SUFFIXES
    from data_loader.unlabeled import TENSOR_SUFFIXES

    path = Path(spec)
    if spec == TEST_SPLIT:
        return "split"
    if path.is_dir() or (path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES):
        return "images"
    if path.is_file() and path.suffix.lower() in TENSOR_SUFFIXES:
        return "tensors"
    if not path.exists():
        raise UserError(f"--input {spec}: no such file or folder")
    raise UserError(f"--input {spec}: expected a folder of images, an image, a .npy or .pt file, or {TEST_SPLIT}")


def dataset_of(loader):
    return getattr(loader.dataset, "dataset", loader.dataset)  # under BatchFetching


def batches(spec: str, kind: str, trained, batch_size: int, test_loader):
    """(positions, ids, batch, samples): the inputs' places in the CSV and their ids, the batch, and its
    inputs one by one (`samples`), to retry alone when the batch fails, or None when a failure concerns the
    whole input. An input that cannot be used comes alone as ([position], [id], None, why)."""
    if kind == "split":
        from runtime.batch import batch_size as samples_in

        start = 0
        for batch in test_loader:
            positions = list(range(start, start + samples_in(batch)))
            yield positions, [str(p) for p in positions], batch, None
            start = positions[-1] + 1
    elif kind == "tensors":
        from data_loader.unlabeled import read_tensor_file

        data = read_tensor_file(Path(spec))
        n = len(next(iter(data.values())) if isinstance(data, dict) else data)
        for start in range(0, n, batch_size):
            part = slice(start, min(start + batch_size, n))
            batch = {k: v[part] for k, v in data.items()} if isinstance(data, dict) else data[part]
            positions = list(range(part.start, part.stop))
            yield positions, [str(p) for p in positions], batch, None
    else:
        dataset = dataset_of(test_loader) if test_loader is not None else None
        yield from _image_batches(Path(spec), trained, batch_size, dataset)


def _image_batches(root: Path, trained, batch_size: int, dataset):
    import torch
    from torch.utils.data import DataLoader

    from data_loader.unlabeled import ImageFiles, list_images

    if dataset is None or not hasattr(dataset, "mode"):
        name = type(dataset).__name__ if dataset is not None else "its dataset"
        raise UserError(f"--input {root}: {trained.config['data_loader']['type']} ({name}) does not read image "
                        f"files; pass a .npy or .pt file of its inputs, or {TEST_SPLIT}")
    paths, others = list_images(root)
    if others:
        print(f"note: {len(others)} file(s) under {root} skipped: not images ({others[0]}, ...)", file=sys.stderr)
    if not paths:
        raise UserError(f"--input {root}: no image files")
    reference, source = _reference_shape(dataset), "the config's test split gives"
    ids = [str(p) for p in paths]  # as given: under --input
    workers = trained.config["data_loader"]["args"].get("num_workers", 0)
    loader = DataLoader(ImageFiles(paths, dataset.mode, dataset.transform), batch_size=batch_size,
                        num_workers=workers, collate_fn=list)
    start = 0
    for items in loader:
        good = []
        for position, item in enumerate(items, start=start):
            if isinstance(item, str):  # why it cannot be read
                yield [position], [ids[position]], None, item
                continue
            if reference is None:  # no test sample to compare with: the first readable image sets the shape
                reference, source = tuple(item.shape), "the first image gives"
            if tuple(item.shape) != reference:
                yield [position], [ids[position]], None, (f"{ids[position]}: shape {tuple(item.shape)} after the "
                                                          f"dataset's transform; {source} {reference}")
            else:
                good.append((position, item))
        start += len(items)
        if good:
            samples = [item for _, item in good]
            yield [p for p, _ in good], [ids[p] for p, _ in good], torch.stack(samples), samples


def _reference_shape(dataset) -> tuple | None:
    """The input shape of the test split's first sample, when it is one tensor."""
    import torch

    try:
        item = dataset[0]
    except Exception:  # noqa: BLE001 - no reference: the first readable image sets it
        return None
    first = item[0] if isinstance(item, (tuple, list)) else item
    return tuple(first.shape) if isinstance(first, torch.Tensor) else None


class Predictions:
    """The rows of the CSV, in input order, and the masks of segmentation outputs."""

    def __init__(self, output: Path, loss: str | None, classes: list[str] | None, root: Path | None = None):
        self.output, self.loss, self.classes = output, loss, classes
        self.root = root  # the input folder: mask files are named after the image's path under it
        self.masks = output.with_name(f"{output.stem}_masks")
        self.kind: str | None = None
        self.width = 1  # values per sample, for regression
        self.rows: dict[int, dict] = {}
        self.errors = 0

    def add(self, positions: list[int], ids: list[str], output) -> None:
        import torch

        output = output.detach().float().cpu()
        if self.kind is None:
            scores = self.loss not in REGRESSION_LOSSES and output.dim() in (2, 4) and output.shape[1] > 1
            if scores and output.dim() == 4:
                self.kind = "segmentation"  # (B, K, H, W) class scores per pixel
            elif scores:
                self.kind = "classification"  # (B, K) logits or log-probabilities
            else:
                self.kind, self.width = "regression", output[0].numel()
        if self.kind == "classification":
            # softmax of log-probabilities is their exp: one formula for both kinds of output.
            probability, index = torch.softmax(output, dim=1).max(dim=1)
            for position, name, k, p in zip(positions, ids, index.tolist(), probability.tolist()):
                row = {"input": name, "class": k, "probability": repr(p)}
                if self.classes is not None:
                    row["class_name"] = self.classes[k] if k < len(self.classes) else ""
                self.rows[position] = row
        elif self.kind == "segmentation":
            for position, name, mask in zip(positions, ids, output.argmax(dim=1)):
                self.rows[position] = {"input": name, "mask": self._write_mask(name, mask, output.shape[1])}
        else:
            values = output.reshape(len(positions), -1)
            for position, name, row in zip(positions, ids, values.tolist()):
                self.rows[position] = {"input": name, **{self._value_column(i): repr(v) for i, v in enumerate(row)}}

    def error(self, position: int, name: str, message: str) -> None:
        print(f"error: {message}", file=sys.stderr)
        self.rows[position] = {"input": name, "error": message}
        self.errors += 1

    def _value_column(self, i: int) -> str:
        return "value" if self.width == 1 else f"value_{i}"

    def _write_mask(self, name: str, mask, classes: int) -> str:
        """A PNG of class indices (8-bit; 16-bit beyond 256 classes) named after the input."""
        import numpy as np
        from PIL import Image

        if self.root is None:
            relative = Path(f"{name}.png")
        elif self.root.is_dir():
            relative = Path(name).relative_to(self.root).with_suffix(".png")
        else:
            relative = Path(Path(name).name).with_suffix(".png")
        path = self.masks / relative
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.numpy().astype(np.uint8 if classes <= 256 else np.uint16)).save(path)
        except OSError as exc:
            raise UserError(f"{path}: cannot write the mask ({exc.strerror or exc})") from None
        return (Path(self.masks.name) / relative).as_posix()

    def save(self) -> None:
        import csv
        import io

        from runtime.atomic_write import atomic_write

        columns = ["input"]
        if self.kind == "classification":
            columns += ["class"] + (["class_name"] if self.classes is not None else []) + ["probability"]
        elif self.kind == "segmentation":
            columns += ["mask"]
        elif self.kind == "regression":
            columns += [self._value_column(i) for i in range(self.width)]
        text = io.StringIO()
        writer = csv.DictWriter(text, columns + ["error"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows[p] for p in sorted(self.rows))
        try:
            self.output.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.output, lambda handle: handle.write(text.getvalue().encode("utf-8")))
        except OSError as exc:
            raise UserError(f"--output {self.output}: cannot write ({exc.strerror or exc})") from None


def predict(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from checkpoint.trained import load_trained, output_file, predict_step_hint
    from config.build import build_test_loader
    from runtime.batch import to_device

    kind = input_kind(args.input)
    trained = load_trained(args.resume, args.config, args.overrides, args.device, metrics=False)
    output = output_file(args.output, ".csv", [trained.path] + ([Path(args.input)] if kind != "split" else []))
    config = trained.config
    try:  # the test split: its transform reads images, its dataset names the classes
        test_loader = build_test_loader(config, device=trained.device)
    except UserError as exc:
        if kind != "tensors":
            raise
        test_loader = None
        print(f"note: no class names: the config's test split cannot be built ({one_line(str(exc))})",
              file=sys.stderr)
    loss = config["loss"] if isinstance(config["loss"], str) else config["loss"]["type"]
    classes = getattr(dataset_of(test_loader), "classes", None) if test_loader is not None else None
    predictions = Predictions(output, loss, list(classes) if classes is not None else None,
                              Path(args.input) if kind == "images" else None)
    trainer, model = trained.trainer, trained.model
    batch_size = args.batch_size or config["data_loader"]["args"].get("batch_size", 64)

    def run(batch):
        try:
            with trainer.autocast:
                return trainer.predict_step(to_device(batch, trained.device)), None
        except Exception as exc:  # noqa: BLE001 - an input of a shape or dtype the model does not take
            return None, (f"does not fit the model ({type(exc).__name__}: {one_line(str(exc))})"
                          f"{predict_step_hint(trainer)}")

    model.eval()
    print(f"predicting with {trained.path} on {args.input}", file=sys.stderr)
    with torch.no_grad(), tqdm(unit="input", file=sys.stderr, disable=None) as bar:
        for positions, ids, batch, samples in batches(args.input, kind, trained, batch_size, test_loader):
            bar.update(len(positions))
            if batch is None:  # an input that could not be read: `samples` says why
                predictions.error(positions[0], ids[0], samples)
                continue
            out, problem = run(batch)
            if out is not None:
                predictions.add(positions, ids, out)
            elif samples is None:
                raise UserError(f"--input {args.input}: {problem}")
            else:  # find the inputs at fault
                for position, name, sample in zip(positions, ids, samples):
                    out, problem = run(sample.unsqueeze(0))
                    if out is not None:
                        predictions.add([position], [name], out)
                    else:
                        predictions.error(position, name, f"{name}: {problem}")
    predictions.save()
    done = len(predictions.rows) - predictions.errors
    where = f" (masks in {predictions.masks})" if predictions.kind == "segmentation" else ""
    print(f"predicted {done} of {len(predictions.rows)} inputs: {output}{where}", file=sys.stderr)
    if predictions.errors:
        print(f"{predictions.errors} input(s) could not be predicted (see the error column)", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return predict(args)
    except UserError as exc:
        for line in problem_lines(exc):
            print(f"error: {line}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
