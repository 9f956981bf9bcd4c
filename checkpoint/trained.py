"""A trained model ready to use, from a checkpoint: shared by test.py, predict.py and export.py.

The checkpoint is loaded as every checkpoint is (archive and CRCs verified, weights_only=True, the keys
it must hold checked); the model, loss and metrics come from its stored config (or `-c`) through the
same builders as train.py, and the trainer is the run's own class, so evaluation runs its `step` and
prediction its `predict_step`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence


@dataclass
class Trained:
    path: Path        # the checkpoint file loaded
    config: dict      # resolved and validated
    model: Any        # torch.nn.Module on `device`, the checkpoint's weights loaded
    trainer: Any      # trainer.trainer.Trainer (the config's trainer.type), without data or optimizer
    device: Any       # torch.device


def checkpoint_file(resume: str | Path) -> Path:
    """`-r` of test.py, predict.py and export.py: a checkpoint file, or a run directory or its checkpoints/
    folder (its best.pth, else last.pth)."""
    from checkpoint.consolidate import suggested_output
    from checkpoint.sharded import is_checkpoint_dir, is_sharded_run
    from errors import CheckpointError
    from runtime.run_dir import locate_checkpoint

    if is_checkpoint_dir(Path(resume)) or (Path(resume).is_dir() and is_sharded_run(locate_checkpoint(str(resume))[0])):
        raise CheckpointError(f"{resume}: a sharded checkpoint (trainer.strategy fsdp); for one file: "
                              f"python -m checkpoint.consolidate {resume} {suggested_output(resume)}")
    path, _ = locate_checkpoint(str(resume))
    if path.is_dir():
        path = next((p for p in (path / "best.pth", path / "last.pth") if p.exists()), path / "best.pth")
    return path


def load_trained(resume: str | Path, config_file: str | None = None, overrides: Sequence[str] = (),
                 device: str | None = None, metrics: bool = True) -> Trained:
    """Raises UserError (exit 2) for a missing, corrupt or mismatched checkpoint and for config problems."""
    from checkpoint import check_eval_state, load_checkpoint, load_model_state
    from config import load_config, resolve_config

    from runtime.device import device_option

    overrides = list(overrides) + ([f"device={device_option(device, several=False)}"] if device else [])
    path = checkpoint_file(resume)
    state = load_checkpoint(path)
    check_eval_state(state, path, need_config=not config_file)
    if config_file:
        config = load_config(config_file, overrides)
    else:
        config = resolve_config(state.get("config"), overrides, f"{path} (config)")

    from config.build import build_loss, build_metrics, build_model, trainer_class
    from runtime.device import resolve_device

    torch_device = resolve_device(config["device"], config.get("n_gpu"))
    config["arch"]["pretrained"] = None  # the checkpoint's own weights are loaded below
    model = build_model(config)
    load_model_state(model, state["state_dict"], strict=True, source=str(path))
    model = model.to(torch_device)
    metric_fns = build_metrics(config) if metrics else []
    trainer = trainer_class(config)(model, build_loss(config), metric_fns, None, config, torch_device, None)
    return Trained(path, config, model, trainer, torch_device)


def output_file(text: str, suffix: str, keep: Sequence[Path] = ()) -> Path:
    """`--output` of predict.py and export.py: a file to write, never a folder, an input or a checkpoint."""
    from errors import UserError

    path = Path(text)
    if text.endswith(("/", "\\")) or path.is_dir():
        raise UserError(f"--output {text}: is a folder; name the file to write (e.g. {path / ('predictions' + suffix)})")
    if path.exists():
        if any(path.resolve() == Path(other).resolve() for other in keep):
            raise UserError(f"--output {text}: is an input of this command; name another file")
        if path.suffix.lower() != suffix:
            raise UserError(f"--output {text}: exists and is not a {suffix} file; name a new file (or delete it)")
    return path


def predict_step_hint(trainer) -> str:
    """Why predict_step may not fit: a task that overrides `step` but not `predict_step`."""
    from trainer.trainer import Trainer

    cls = type(trainer)
    if cls.step is not Trainer.step and cls.predict_step is Trainer.predict_step:
        return (f"; {cls.__name__} overrides step but not predict_step, whose default is self.model(input): "
                f"override predict_step(self, batch) to run the model as step does (README: Your own training step)")
    return ""
