"""Export a checkpoint's model for deployment, checked against the eager model first:
`python export.py -r CHECKPOINT --format onnx|torch_export [--output PATH] [--atol 1e-5] [--rtol 1.3e-6]`.

The model comes from the checkpoint as in test.py, on the CPU, in eval mode. Its inputs are what the
run's trainer's `predict_step` passes to it on a batch of the config's test split; they are exported
with a dynamic batch dimension (and dynamic sizes where the test samples differ, such as the length
of a padded sequence). `torch_export` writes an ExportedProgram (`torch.export.save`, `.pt2`); `onnx`
goes through the dynamo-based exporter (`torch.onnx.export(..., dynamo=True)`) and needs the optional
packages of requirements-extra.txt. Before anything is written, the exported model, run by its own
runtime (`torch.export.load(...).module()`, or ONNX Runtime), must match the eager model on two
batches of real test inputs of different sizes: |exported - eager| <= atol + rtol * |eager| for every
output value (torch.testing's float32 tolerances; the rtol term covers float32 rounding of large
outputs: a ResNet's logits of 60 differ by 2e-5 between ONNX Runtime's and torch's kernels, and by
1e-5 between the eager model in float32 and in float64). Beside the file, `<file>.json` describes
the inputs (names, shapes, dtypes), the preprocessing the dataset applies (its transform,
normalisation mean and std), the class names and the parity measured.

Exit status: 0 exported; 1 the model cannot be exported (the message names the operation) or the
exported model differs from the eager one by more than the tolerance (the message gives the
largest difference; nothing is written); 2 the command line, checkpoint or config is wrong, or the ONNX
packages are missing.
"""
from __future__ import annotations

import argparse
import contextlib
import re
import sys
from pathlib import Path

from errors import UserError, one_line, problem_lines

ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
SUFFIXES = {"onnx": ".onnx", "torch_export": ".pt2"}
SMALL_BATCH = 3  # the second parity batch: another batch size (and padded length) than the first


class ExportFailed(Exception):
    """The model cannot be exported, or its export does not match it: exit status 1."""

    exit_code = 1


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Export a checkpoint's model, checked against the eager model.")
    parser.add_argument("-r", "--resume", required=True,
                        help="checkpoint file, or a run directory (its best.pth, else last.pth)")
    parser.add_argument("--format", required=True, choices=sorted(SUFFIXES), help="onnx or torch_export (.pt2)")
    parser.add_argument("--output", help="file to write (default: the checkpoint's path with .onnx or .pt2)")
    parser.add_argument("--atol", type=float, default=1e-5,
                        help="absolute tolerance of the parity check (default 1e-5)")
    parser.add_argument("--rtol", type=float, default=1.3e-6,
                        help="relative tolerance of the parity check, times |eager output| (default 1.3e-6)")
    parser.add_argument("-c", "--config", help="config to use instead of the one stored in the checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    args = parser.parse_args(argv)
    if not (args.atol >= 0 and args.rtol >= 0):
        parser.error("--atol and --rtol must be numbers >= 0")
    return args


def check_onnx_packages() -> None:
    import importlib

    missing = []
    for name in ONNX_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError as exc:  # onnxscript without onnx fails on onnx: name the package missing
            missing.append(exc.name if exc.name in ONNX_PACKAGES else name)
    missing = list(dict.fromkeys(missing))
    if missing:
        raise UserError(f"--format onnx needs onnx, onnxscript and onnxruntime (not installed: {', '.join(missing)}): "
                        f"pip install -r requirements-extra.txt")


def model_inputs(trainer, model, batch) -> tuple:
    """The positional arguments `predict_step` calls the model with, on `batch` (captured by a forward
    pre-hook: the task's own code decides what the model gets, not a copy of it here)."""
    import inspect

    import torch

    seen = []

    def record(module, args, kwargs) -> None:
        seen.append((args, kwargs))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            trainer.predict_step(batch)
    except Exception as exc:  # noqa: BLE001 - the task's code failed on its own test data
        from checkpoint.trained import predict_step_hint

        raise ExportFailed(f"{type(trainer).__name__}.predict_step fails on a test batch "
                           f"({type(exc).__name__}: {one_line(str(exc))}){predict_step_hint(trainer)}") from None
    finally:
        handle.remove()
    if not seen:
        raise ExportFailed(f"{type(trainer).__name__}.predict_step did not call the model")
    args, kwargs = seen[0]
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    if bound.kwargs:
        raise ExportFailed(f"{type(model).__name__}.forward takes keyword-only arguments "
                           f"({', '.join(bound.kwargs)}): export takes positional inputs")
    return tuple(bound.args)


def parity_examples(trained, loader) -> tuple[list[tuple], set[tuple[int, int]]]:
    """Model inputs for two batches of the test split (its first batch, and its first SMALL_BATCH samples),
    and the (input, dimension) pairs besides the batch's that differ between single test samples."""
    from torch.utils.data import DataLoader

    def inputs_of(batch_size: int, count: int) -> list[tuple]:
        batches = DataLoader(loader.dataset, batch_size=batch_size, collate_fn=loader.collate_fn)
        found = []
        for batch in batches:
            found.append(model_inputs(trained.trainer, trained.model, batch))
            if len(found) == count:
                break
        return found

    # The first (the one exported) holds more than one sample whatever the config's batch size: a batch of 1
    # would fix the batch dimension. Parity is also checked on a single sample.
    singles = inputs_of(1, 8)
    examples = inputs_of(max(loader.batch_size or 1, 2 * SMALL_BATCH), 1) + inputs_of(SMALL_BATCH, 1) + singles[:1]
    varying = {(i, d) for i, arg in enumerate(examples[0]) if hasattr(arg, "shape")
               for d in range(1, arg.dim()) if len({single[i].shape[d] for single in singles + examples}) > 1}
    return examples, varying


def dynamic_shapes(example: tuple, varying: set[tuple[int, int]]) -> tuple:
    import torch
    from torch.export import Dim

    batch = Dim("batch", min=1)
    return tuple({0: batch, **{d: Dim.AUTO for d in range(1, arg.dim()) if (i, d) in varying}}
                 if isinstance(arg, torch.Tensor) and arg.dim() else None for i, arg in enumerate(example))


@contextlib.contextmanager
def quiet():
    """torch.export and the ONNX exporter log warnings and print partial graphs to stderr on a failure,
    which this script reports in one line."""
    import io
    import logging
    import warnings

    logger = logging.getLogger("torch")
    level = logger.level
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), \
            contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logger.setLevel(logging.CRITICAL)
        try:
            yield
        finally:
            logger.setLevel(level)


def export_program(model, example: tuple, shapes: tuple):
    """torch.export.export; ExportFailed naming the operation and the line of the model that stopped it."""
    import torch

    try:
        with quiet():
            return torch.export.export(model, example, dynamic_shapes=shapes)
    except Exception as exc:  # noqa: BLE001 - torch.export raises many kinds; each becomes one line
        raise ExportFailed(f"cannot export {type(model).__name__} with torch.export: {export_reason(exc)}"
                           f"{source_of(exc)}") from None


def export_reason(exc: Exception) -> str:
    text = str(exc)
    fixed = re.search(r"specialized it to be a constant \((\d+)\)", text)
    if fixed:
        return f"its code fixes the batch size to {fixed.group(1)}, so the batch dimension cannot be dynamic"
    if type(exc).__name__ in ("GuardOnDataDependentSymNode", "DataDependentOutputException"):
        return "a Python decision on a tensor's values (data-dependent control flow, or .item()/int()/float() of it)"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0].rstrip('.') if lines else 'no message'}"


def source_of(exc: BaseException) -> str:
    """` at FILE:LINE: `code`` of the innermost frame of the model's own code in the traceback ('' if none)."""
    import traceback

    import torch

    library = (str(Path(torch.__file__).parent), str(Path(re.__file__).parent), str(Path(__file__)))
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(library)
              and not f.filename.startswith("<")]
    if not frames:
        return ""
    frame = frames[-1]
    return f" at {_relative(frame.filename)}:{frame.lineno}: `{(frame.line or '').strip()}`"


def onnx_program(program, model):
    """The ExportedProgram through the ONNX exporter; ExportFailed naming an operation without translation."""
    import torch

    try:
        with quiet():
            return torch.onnx.export(program, dynamo=True, verbose=False)
    except Exception as exc:  # noqa: BLE001
        text = str(exc)
        op = re.search(r"OpOverload\(op='([\w.]+)', overload='(\w+)'\)", text)
        if op:
            where = _op_source(program, op.group(1))
            raise ExportFailed(f"cannot export {type(model).__name__} to ONNX: the operation {op.group(1)}."
                               f"{op.group(2)} has no ONNX translation{where}") from None
        summary = re.search(r"## Exception summary\s+(.+)", text)
        raise ExportFailed(f"cannot export {type(model).__name__} to ONNX: "
                           f"{one_line(summary.group(1) if summary else text)}") from None


def _op_source(program, op: str) -> str:
    """Where the model calls `op` (aten._linalg_svd is the exporter's decomposition of aten.linalg_svd)."""
    wanted = op.split(".")[-1].lstrip("_")
    for node in program.graph.nodes:
        name = str(node.target).split(".")
        if node.op == "call_function" and len(name) >= 2 and name[-2].lstrip("_") == wanted:
            lines = (node.meta.get("stack_trace") or "").splitlines()
            frames = [(i, re.search(r'File "([^"]+)", line (\d+)', line)) for i, line in enumerate(lines)]
            frames = [(i, found) for i, found in frames if found]
            if frames:  # the innermost: the last frame, and its code on the next line if there is one
                i, found = frames[-1]
                code = lines[i + 1].strip() if i + 1 < len(lines) and "File \"" not in lines[i + 1] else ""
                return f" at {_relative(found.group(1))}:{found.group(2)}" + (f": `{code}`" if code else "")
    return ""


def _relative(filename: str) -> str:
    try:
        return Path(filename).resolve().relative_to(Path.cwd()).as_posix()
    except ValueError:
        return filename


def exported_runner(fmt: str, data: bytes):
    """A function running the serialized model by its own runtime: inputs -> list of output tensors."""
    import io

    import torch

    from runtime.batch import tensors

    if fmt == "torch_export":
        module = torch.export.load(io.BytesIO(data)).module()
        return lambda inputs: tensors(module(*inputs))
    import onnxruntime

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(inputs):
        arrays = [x.numpy() for x in inputs if isinstance(x, torch.Tensor)]
        return [torch.from_numpy(out) for out in session.run(None, dict(zip(names, arrays)))]
    return run


class Parity:
    """The parity check over the examples: |exported - eager| <= atol + rtol * |eager| for every value."""

    def __init__(self, atol: float, rtol: float):
        self.atol, self.rtol = atol, rtol
        self.largest = 0.0  # the largest absolute difference
        self.worst = (0.0, 0.0, 0)  # (difference, allowed, example) of the value most over its allowance

    @property
    def passed(self) -> bool:
        difference, allowed, _ = self.worst
        return difference <= allowed

    def check(self, model, run, examples: list[tuple]) -> "Parity":
        import torch

        from runtime.batch import tensors

        for index, example in enumerate(examples):
            with torch.no_grad():
                eager = tensors(model(*example))
            exported = run(example)
            if [tuple(t.shape) for t in eager] != [tuple(t.shape) for t in exported]:
                raise ExportFailed(f"the exported model's outputs have shapes {[tuple(t.shape) for t in exported]}, "
                                   f"the eager model's {[tuple(t.shape) for t in eager]}")
            for a, b in zip(eager, exported):
                if not a.numel():
                    continue
                a, b = a.double(), b.double()
                difference = (a - b).abs().nan_to_num(nan=float("inf"))  # NaN against a number fails
                difference[(a == b) | (a.isnan() & b.isnan())] = 0.0
                allowed = self.atol + self.rtol * a.abs()
                self.largest = max(self.largest, difference.max().item())
                at = (difference - allowed).argmax()
                excess = (difference - allowed).flatten()[at].item()
                if excess > self.worst[0] - self.worst[1]:
                    self.worst = (difference.flatten()[at].item(), allowed.flatten()[at].item(), index)
        return self


def _batch_of(example: tuple) -> int:
    return next(int(x.shape[0]) for x in example if hasattr(x, "shape") and len(x.shape))


def metadata(args, trained, program, dataset, examples: list[tuple], output: Path, parity: Parity) -> dict:
    import torch

    def shape(value) -> list:
        return ["batch" if d == 0 and not isinstance(size, int) else size if isinstance(size, int) else str(size)
                for d, size in enumerate(value.shape)]

    placeholders = {n.name: n.meta["val"] for n in program.graph.nodes if n.op == "placeholder"}
    inputs = [{"name": name, "shape": shape(placeholders[name]), "dtype": str(placeholders[name].dtype)[6:]}
              for name in program.graph_signature.user_inputs]
    outputs = [n for n in program.graph.nodes if n.op == "output"][0].args[0]
    transform = getattr(dataset, "transform", None)
    steps = list(getattr(transform, "transforms", [transform] if transform is not None else []))
    normalize = next((t for t in steps if type(t).__name__ == "Normalize"), None)
    resize = next((t for t in steps if type(t).__name__ == "Resize"), None)
    classes = getattr(dataset, "classes", None)
    return {
        "format": args.format,
        "file": output.name,
        "checkpoint": str(trained.path),
        "arch": trained.config["arch"]["type"],
        "inputs": inputs,
        "outputs": [{"shape": shape(o.meta["val"]), "dtype": str(o.meta["val"].dtype)[6:]} for o in outputs
                    if hasattr(o, "meta") and isinstance(o.meta.get("val"), torch.Tensor)],
        "classes": list(classes) if classes is not None else None,
        "preprocessing": {
            "dataset": type(dataset).__name__,
            "image_mode": getattr(dataset, "mode", None),  # PIL mode an image is converted to first
            "transform": repr(transform) if transform is not None else None,
            "resize": list(resize.size) if resize is not None and not isinstance(resize.size, int) else
            resize.size if resize is not None else None,
            "normalize": {"mean": list(normalize.mean), "std": list(normalize.std)} if normalize is not None else None,
        },
        "parity": {"max_abs_difference": parity.largest, "atol": args.atol, "rtol": args.rtol,
                   "batch_sizes": [_batch_of(e) for e in examples],
                   "runtime": "onnxruntime (CPUExecutionProvider)" if args.format == "onnx" else "torch.export.load"},
        "torch_version": torch.__version__.split("+")[0],
    }


def export(args: argparse.Namespace) -> Path:
    if args.format == "onnx":
        check_onnx_packages()  # before anything slow
    import io
    import json

    import torch

    from checkpoint.trained import load_trained, output_file
    from config.build import build_test_loader
    from runtime.atomic_write import atomic_write

    trained = load_trained(args.resume, args.config, args.overrides, device="cpu", metrics=False)
    output = output_file(args.output, SUFFIXES[args.format], [trained.path]) if args.output else \
        trained.path.with_suffix(SUFFIXES[args.format])
    try:
        loader = build_test_loader(trained.config)
    except UserError as exc:
        raise UserError(f"the parity check runs on the config's test split, which cannot be built: {exc}") from None
    dataset = getattr(loader.dataset, "dataset", loader.dataset)  # under BatchFetching
    model = trained.model.eval()
    examples, varying = parity_examples(trained, loader)
    program = export_program(model, examples[0], dynamic_shapes(examples[0], varying))
    buffer = io.BytesIO()
    if args.format == "torch_export":
        try:
            with quiet():
                torch.export.save(program, buffer)
        except Exception as exc:  # noqa: BLE001
            raise ExportFailed(f"cannot save the ExportedProgram ({type(exc).__name__}: {one_line(str(exc))})") from None
    else:
        buffer.write(onnx_program(program, model).model_proto.SerializeToString())
    data = buffer.getvalue()
    try:
        parity = Parity(args.atol, args.rtol).check(model, exported_runner(args.format, data), examples)
    except ExportFailed:
        raise
    except Exception as exc:  # noqa: BLE001 - the runtime refuses the file, or fails running it
        runtime = "ONNX Runtime" if args.format == "onnx" else "torch.export.load(...).module()"
        raise ExportFailed(f"the exported model does not run in {runtime} "
                           f"({type(exc).__name__}: {one_line(str(exc))})") from None
    if not parity.passed:
        difference, allowed, index = parity.worst
        raise ExportFailed(f"parity check failed: the exported model differs from the eager model by "
                           f"{difference:.3g} where {allowed:.3g} is allowed (atol {args.atol:g} + rtol {args.rtol:g} "
                           f"* |eager|), on a batch of {_batch_of(examples[index])} test samples; largest difference "
                           f"{parity.largest:.3g}; nothing was written")
    info = metadata(args, trained, program, dataset, examples, output, parity)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(output, lambda handle: handle.write(data))
        atomic_write(Path(f"{output}.json"),
                     lambda handle: handle.write((json.dumps(info, indent=2) + "\n").encode("utf-8")))
    except OSError as exc:
        raise UserError(f"--output {output}: cannot write ({exc.strerror or exc})") from None
    inputs = ", ".join(f"{i['name']} {i['dtype']}[{', '.join(map(str, i['shape']))}]" for i in info["inputs"])
    print(f"exported {output} ({args.format}), inputs {inputs}; parity with the eager model on "
          f"{sum(info['parity']['batch_sizes'])} test samples: largest difference {parity.largest:.3g}; "
          f"preprocessing in {output}.json")
    return output


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        export(args)
    except (UserError, ExportFailed) as exc:
        for line in problem_lines(exc):
            print(f"error: {line}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
