"""The config schema as data: every key, its type, default and meaning.

`validate` checks a raw config against it and returns a new dict with defaults filled in; it
collects every problem before raising, so one run shows the user all of them. `docs/CONFIG.md` is
generated from this table (`python -m config > docs/CONFIG.md`) and a test keeps the two equal.
"""
from __future__ import annotations

import difflib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

REQUIRED = object()
# \Z, not $: `$` also matches before a final newline, which would let "run\n" through.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
FSDP_DTYPES = ("float32", "bfloat16", "float16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
LOGGERS = ("tensorboard", "csv", "mlflow")  # trainer.loggers: logger/writers.py builds them


@dataclass(frozen=True)
class Key:
    kind: str  # str | int | float | bool | list | dict | section | loss | switch (a bool or a section)
    doc: str
    default: Any = REQUIRED
    choices: tuple = ()
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    keys: dict = field(default_factory=dict)  # for kind == "section"
    item: str | None = None  # item kind for lists
    nullable: bool = False  # None is a valid value (an optional section or number)


def _typed(what: str, names: str, extra: dict | None = None, optional: bool = False) -> Key:
    keys = {
        "type": Key("str", names),
        "args": Key("dict", "keyword arguments of its constructor, checked against its signature", {}),
    }
    keys.update(extra or {})
    return Key("section", f"the {what}: {{type, args}}", None if optional else REQUIRED, keys=keys,
               nullable=optional)


SCHEMA: dict[str, Key] = {
    "name": Key("str", "run name; the run directory is <save_dir>/<name>/<run_id>"),
    "n_gpu": Key("int", "pytorch-template compatibility: 0 forces the CPU; more than 1 needs torchrun", None,
                 minimum=0, nullable=True),
    "device": Key("str", "auto | cpu | cuda | cuda:N | mps (auto: cuda if available, else mps, else cpu)", "auto"),
    "seed": Key("int", "seeds Python, NumPy, torch, the data order and the DataLoader workers", 0, minimum=0,
                maximum=2**63 - 1),
    "arch": _typed("model", "a model class in model/, or a torchvision.models name (built with weights=None)", {
        "init": Key("section", "weight initialisation applied with model.apply before the optimizer is built",
                    None, nullable=True, keys={
                        "type": Key("str", "kaiming_normal | kaiming_uniform | xavier_normal | xavier_uniform | "
                                           "normal | trunc_normal | orthogonal | zeros"),
                        "args": Key("dict", "keyword arguments of the torch.nn.init function", {}),
                    }),
        "pretrained": Key("str", "checkpoint whose state_dict initialises the model (fine-tuning)", None,
                          nullable=True),
        "strict": Key("bool", "with pretrained: false loads only matching keys and logs the others", True),
    }),
    "data_loader": _typed("data loader", "a BaseDataLoader subclass in data_loader/; its pin_memory, unless args "
                                         "give it, is true when the device is CUDA", {
        "folds": Key("int", "k-fold cross-validation: K folds of a seeded permutation of the training split; "
                            "`python train.py -c CONFIG` then trains K runs (README: Many runs)", None, minimum=2,
                     nullable=True),
        "fold": Key("int", "with folds: this run validates on fold i (0 <= i < folds) and trains on the others, "
                           "in place of validation_split", None, minimum=0, nullable=True),
    }),
    "optimizer": _typed("optimizer", "a torch.optim class; the builder passes the model's parameters"),
    "loss": Key("loss", "name of a function in model/loss.py, or {type, args} to bind keyword arguments",
                keys={"type": Key("str", "a function in model/loss.py"),
                      "args": Key("dict", "keyword arguments bound to it, checked against its signature", {})}),
    "metrics": Key("list", "each a function in model/metric.py (a mean of per-batch values), or a torchmetrics "
                   "class (computed over the whole epoch), by name or as {type, args, name}; logged as "
                   "<name> in TensorBoard's train/ and val/ runs and in metrics.csv (name: the function's, "
                   "or the class's in snake_case)", [],
                   item="metric"),
    "lr_scheduler": _typed("LR scheduler", "a torch.optim.lr_scheduler class; the builder passes the optimizer; "
                           "SequentialLR and ChainedScheduler take schedulers: [{type, args}, ...]", {
        "interval": Key("str", "step the scheduler every epoch or every optimizer step", "epoch",
                        choices=("epoch", "step")),
    }, optional=True),
    "user": Key("dict", "your own values (any plain data: numbers, strings, lists, mappings), read by your code as "
                        "config['user'] (self.config in a Trainer subclass) and shown in TensorBoard's HParams", {}),
    "trainer": Key("section", "the training loop", REQUIRED, keys={
        "type": Key("str", "trainer class (a BaseTrainer subclass in trainer/)", "Trainer"),
        "epochs": Key("int", "number of epochs", minimum=1),
        "save_dir": Key("str", "root of the run directories (relative to the working directory)", "saved/"),
        "save_period": Key("int", "write checkpoints/epoch-<N>.pth every N epochs (0: never)", 1, minimum=0),
        "keep_last": Key("int", "keep only the K newest epoch-<N>.pth (0: keep all); last/best are kept", 0,
                         minimum=0),
        "save_every_steps": Key("int", "also write last.pth every N optimizer steps (0: only at epoch end)", 0,
                                minimum=0),
        "verbosity": Key("int", "console: 0 warnings and errors, 1 adds progress, epoch lines and the summary, "
                                  "2 adds debug lines (train.log always gets everything)", 1, minimum=0, maximum=2),
        "monitor": Key("str", "'min <metric>' or 'max <metric>' (e.g. 'max val_accuracy'), or 'off'", "off"),
        "early_stop": Key("int", "stop after N epochs without improvement of the monitored metric (0: never)", 0,
                          minimum=0),
        "loggers": Key("list", "where the run's scalars go: tensorboard (event files in the run directory), csv "
                               "(metrics.csv), mlflow (a local MLflow store, <save_dir>/mlflow.db, or "
                               "MLFLOW_TRACKING_URI; pip install -r requirements-extra.txt)", ["tensorboard", "csv"],
                       item="str", choices=LOGGERS),
        "tensorboard": Key("bool", "pytorch-template's switch: false leaves TensorBoard out even when trainer.loggers "
                                   "names it", True),
        "log_every_steps": Key("int", "log the training loss every N optimizer steps", 50, minimum=1),
        "train_metric_batches": Key("int", "training metrics other than the loss are computed on about N "
                                           "batches per epoch (0: on every batch); evaluation uses every batch",
                                    16, minimum=0),
        "allow_nonfinite_buffers": Key("list", "fnmatch patterns of buffers (state_dict keys) that may hold inf or "
                                               "NaN; any other non-finite parameter, buffer or optimizer value "
                                               "stops the run before it reaches a checkpoint", [], item="str"),
        "histograms": Key("bool", "weight and gradient histograms once per epoch (at most 4096 values drawn "
                                 "per tensor)", True),
        "images": Key("bool", "a picture of validation samples once per epoch (classification: 10 inputs with "
                              "true and predicted classes)", True),
        "amp": Key("str", "mixed precision: off | bf16 | fp16 (fp16 uses a GradScaler)", "off",
                   choices=("off", "bf16", "fp16")),
        "accumulate_grad_batches": Key("int", "optimizer step every k micro-batches", 1, minimum=1),
        "clip_grad_norm": Key("float", "clip the total gradient norm to this value", None, minimum=0,
                              exclusive_minimum=True, nullable=True),
        "clip_grad_value": Key("float", "clip each gradient element to [-v, v]", None, minimum=0,
                               exclusive_minimum=True, nullable=True),
        "deterministic": Key("bool", "torch.use_deterministic_algorithms(True)", False),
        "compile": Key("switch", "torch.compile the model: true, or {mode, dynamic} (checkpoints keep eager key "
                                 "names)", False, keys={
            "mode": Key("str", "torch.compile mode; reduce-overhead and max-autotune use CUDA graphs on a GPU",
                        "default", choices=COMPILE_MODES),
            "dynamic": Key("bool", "null: the batch dimension of the model's inputs is dynamic, so a short last "
                                   "batch reuses the compiled graph; true: every dimension; false: none (a new "
                                   "batch size compiles again)", None, nullable=True),
        }),
        "sync_batchnorm": Key("bool", "convert BatchNorm to SyncBatchNorm under torchrun", False),
        "strategy": Key("str", "under torchrun: ddp (a whole copy of the model per process) or fsdp (parameters, "
                               "gradients and optimizer state sharded with FSDP2's fully_shard; sharded checkpoints; "
                               "README: Bigger models)", "ddp", choices=("ddp", "fsdp")),
        "fsdp": Key("section", "with strategy fsdp: how the model is sharded", {}, keys={
            "wrap": Key("list", "module class names (e.g. Block): each module of these classes is sharded as one "
                                "unit (its parameters gathered together), then the root module", [], item="str"),
            "mixed_precision": Key("section", "FSDP2's MixedPrecisionPolicy: compute in param_dtype, reduce "
                                              "gradients in reduce_dtype (the sharded parameters stay float32; "
                                              "BatchNorm layers compute in float32)",
                                   None, nullable=True, keys={
                                       "param_dtype": Key("str", "dtype of the gathered parameters", "bfloat16",
                                                          choices=FSDP_DTYPES),
                                       "reduce_dtype": Key("str", "dtype of the gradient reduction", "float32",
                                                           choices=FSDP_DTYPES),
                                   }),
            "cpu_offload": Key("bool", "keep the sharded parameters, gradients and optimizer state in CPU memory "
                                       "(FSDP2's CPUOffloadPolicy)", False),
        }),
        "ddp_backend": Key("str", "torch.distributed backend under torchrun: auto (nccl on CUDA, else gloo), "
                                  "gloo or nccl", "auto", choices=("auto", "gloo", "nccl")),
        "watch": Key("section", "forward/backward hooks recording activation and gradient statistics", None,
                     nullable=True, keys={
                         "modules": Key("list", "fnmatch patterns over named_modules names", ["*"], item="str"),
                         "every_steps": Key("int", "record every N optimizer steps", 100, minimum=1),
                     }),
        "freeze": Key("section", "freeze submodules (get_submodule) for the first epochs", None, nullable=True,
                      keys={
                          "modules": Key("list", "submodule names, as in named_modules", item="str"),
                          "until_epoch": Key("int", "unfrozen from this epoch on", minimum=1),
                      }),
    }),
}


def _kind_ok(kind: str, value: Any) -> tuple[bool, Any]:
    """Check (and where safe, coerce) a value; returns (ok, value)."""
    if kind == "str":
        return isinstance(value, str), value
    if kind == "bool":
        return isinstance(value, bool), value
    if kind in ("int", "float"):
        if isinstance(value, str):  # a number YAML 1.1 left as a string, or one typed on the command line
            try:
                number = float(value)
            except ValueError:
                return False, value
            value = int(number) if kind == "int" and number.is_integer() else number
        if isinstance(value, bool):
            return False, value
        if kind == "int":
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            return isinstance(value, int), value
        if isinstance(value, (int, float)) and math.isfinite(value):
            return True, float(value)
        return False, value
    if kind == "list":
        return isinstance(value, list), value
    if kind in ("dict", "section"):
        return isinstance(value, dict), value
    if kind in ("loss", "metric"):
        return isinstance(value, (str, dict)), value
    if kind == "switch":
        return isinstance(value, (bool, dict)), value
    raise AssertionError(kind)


KIND_NAMES = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
              "list": "a list", "dict": "a mapping", "section": "a mapping", "loss": "a name or {type, args}",
              "metric": "a name or {type, args, name}", "switch": "true, false or a mapping"}


def snake_case(name: str) -> str:
    """MulticlassF1Score -> multiclass_f1_score; a function's name stays as it is."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def metric_spec(item) -> dict | None:
    """A `metrics` entry as {type, args, name}: a plain name is {type: name}; None when malformed."""
    if isinstance(item, str):
        return {"type": item, "args": {}, "name": snake_case(item)}
    if isinstance(item, dict) and isinstance(item.get("type"), str):
        name = item.get("name")
        return {"type": item["type"], "args": item.get("args") or {},
                "name": name if isinstance(name, str) else snake_case(item["type"])}
    return None


def suggest(word: str, candidates) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def short(value: Any, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters so that an error message stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _validate_section(raw: dict, keys: dict[str, Key], path: str, problems: list[str]) -> dict:
    out = {}
    for name in raw:
        if name not in keys:
            where = f"{path}.{name}" if path else str(name)
            problems.append(f"{where}: unknown key{suggest(name, keys)}")
    for name, key in keys.items():
        where = f"{path}.{name}" if path else name
        if name not in raw:
            if key.default is REQUIRED:
                problems.append(f"{where}: missing required key ({key.doc})")
            elif key.kind == "section" and key.default is not None:
                out[name] = _validate_section({}, key.keys, where, problems)
            else:
                out[name] = _copy(key.default)
            continue
        out[name] = _validate_value(raw[name], key, where, problems)
    return out


def _copy(value):
    return [*value] if isinstance(value, list) else dict(value) if isinstance(value, dict) else value


def _validate_value(value: Any, key: Key, where: str, problems: list[str]) -> Any:
    if value is None and key.nullable:
        return None
    if value is False and key.kind == "str" and "off" in (*key.choices, key.default):
        value = "off"  # YAML 1.1 reads an unquoted `off` as false
    ok, value = _kind_ok(key.kind, value)
    if not ok:
        expected = KIND_NAMES[key.kind]
        if key.nullable:  # null is a value the key takes (its default, often): say so
            expected = "true, false or null" if key.kind == "bool" else f"{expected} or null"
        problems.append(f"{where}: expected {expected}, got {short(value)}")
        return value
    if key.kind == "section":
        return _validate_section(value, key.keys, where, problems)
    if key.kind in ("loss", "switch") and isinstance(value, dict):
        return _validate_section(value, key.keys, where, problems)
    if key.kind == "list" and key.item:
        for i, item in enumerate(value):
            item_ok, _ = _kind_ok(key.item, item)
            if not item_ok:
                problems.append(f"{where}[{i}]: expected {KIND_NAMES[key.item]}, got {short(item)}")
            elif key.choices and item not in key.choices:  # a list's choices are those of its items
                problems.append(f"{where}: {short(item)} is not one of {', '.join(key.choices)}"
                                f"{suggest(item, key.choices)}")
            elif key.choices and item in value[:i]:
                problems.append(f"{where}: {short(item)} is named twice")
        return value
    if key.choices and value not in key.choices:
        problems.append(f"{where}: {short(value)} is not one of {', '.join(key.choices)}{suggest(value, key.choices)}")
    if key.minimum is not None and (value <= key.minimum if key.exclusive_minimum else value < key.minimum):
        problems.append(f"{where}: {value} must be {'>' if key.exclusive_minimum else '>='} {key.minimum}")
    if key.maximum is not None and value > key.maximum:
        problems.append(f"{where}: {value} must be <= {key.maximum}")
    return value


def validate(raw: dict, problems: list[str]) -> dict:
    """Check `raw` against SCHEMA; append problems; return the config with defaults filled in."""
    config = _validate_section(raw, SCHEMA, "", problems)
    name = config.get("name")
    if isinstance(name, str) and not NAME_RE.match(name):
        problems.append(f"name: {short(name)} must be a plain directory name (letters, digits, _ . -; no / or ..)")
    trainer = config.get("trainer")
    monitor = trainer.get("monitor") if isinstance(trainer, dict) else None
    if isinstance(monitor, str) and monitor != "off":
        trainer["monitor"] = monitor = " ".join(monitor.split())  # "max  val_accuracy" is meant as one space
        mode, _, metric = monitor.partition(" ")
        if mode not in ("min", "max") or not metric.strip() or " " in metric:
            problems.append(f"trainer.monitor: {short(monitor)} must be 'min <metric>', 'max <metric>' or 'off'")
    return config


def is_known_path(parts: list[str]) -> bool:
    """Is `a.b.c` a key of the schema (used to let overrides set keys absent from the file)?"""
    keys, key = SCHEMA, None
    for part in parts:
        if key is not None and key.kind == "dict":
            return True  # free-form constructor arguments: checked later against the signature
        if not keys or part not in keys:
            return False
        key = keys[part]
        keys = key.keys
    return True


def keys_under(parts: list[str]) -> list[str]:
    """The schema's key names inside the section at `parts` (for "did you mean" on overrides)."""
    keys = SCHEMA
    for part in parts:
        key = keys.get(part)
        if key is None:
            return []
        keys = key.keys
    return list(keys)


TYPE_NAMES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean", "list": "list",
              "dict": "mapping", "section": "section", "loss": "string or section", "metric": "name or section", "switch": "boolean or section"}


def _type_cell(key: Key) -> str:
    text = TYPE_NAMES[key.kind] + (f" of {TYPE_NAMES[key.item]}s" if key.item else "")
    if key.choices:
        text += ": " + " \\| ".join(key.choices)
    if key.minimum is not None:
        text += f", {'>' if key.exclusive_minimum else '>='} {key.minimum:g}"
    if key.maximum is not None:
        text += f", <= {key.maximum:g}" if key.maximum < 1e6 else f", < 2^{int(math.log2(key.maximum + 1))}"
    return text + (", or null" if key.nullable and key.kind not in ("section",) else "")


def reference_rows(keys: dict[str, Key] | None = None, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, meaning) for every key, depth first, for docs/CONFIG.md."""
    rows = []
    for name, key in (SCHEMA if keys is None else keys).items():
        path = f"{prefix}{name}"
        default = "required" if key.default is REQUIRED else f"`{json.dumps(key.default)}`"
        rows.append((path, _type_cell(key), default, key.doc))
        rows.extend(reference_rows(key.keys, path + "."))
    return rows


def render_reference() -> str:
    """docs/CONFIG.md (`python -m config > docs/CONFIG.md`)."""
    lines = [
        "# Config reference",
        "",
        "Generated from `config/schema.py` by `python -m config > docs/CONFIG.md`; a test fails when the",
        "two differ. JSON and YAML are two spellings of this one schema (chosen by the file extension).",
        "",
        "- Every swappable object is `{type, args}`: `type` names a class or function among this",
        "  project's models, data loaders, trainers, losses and metrics, `torch.optim`,",
        "  `torch.optim.lr_scheduler` and `torchvision.models`; nothing else can be reached (no import",
        "  paths). `args` are the keyword arguments of that constructor, with the same names, checked",
        "  against its signature (unknown names, missing required ones, types judged by the defaults).",
        "- A section with default `null` is optional; inside it, `required` keys are required only when",
        "  the section is given.",
        "- In YAML, `1e-3` is read as a number (PyYAML alone would read a string); dates stay strings;",
        "  duplicate keys, NaN and infinities are errors.",
        "- Command-line overrides `key.path=value` use YAML scalar rules; list items by index",
        "  (`metrics.0=accuracy`). `--lr` and `--bs` set `optimizer.args.lr` and",
        "  `data_loader.args.batch_size`.",
        "- Every problem is reported at once, one line each, with exit status 2, before anything is",
        "  written. `python train.py -c CONFIG --print-config` shows the resolved config with every",
        "  default filled in.",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for path, kind, default, doc in reference_rows():
        doc = doc.replace("|", "\\|").replace("<", "\\<")
        lines.append(f"| `{path}` | {kind} | {default} | {doc} |")
    return "\n".join(lines) + "\n"
