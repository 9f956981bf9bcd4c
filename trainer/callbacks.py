"""Callbacks: objects with the trainer's five hook methods, called right after the trainer's own.

The trainer builds the two shipped ones from the config (`trainer.watch`, `trainer.freeze`). Your
own: subclass `Callback` and append an instance to `self.callbacks` in a Trainer subclass's
`__init__` (named in `trainer.type`), or override the hook methods of that subclass directly.
"""
from __future__ import annotations

import os
from fnmatch import fnmatch
from functools import partial

import torch
import torch.nn as nn

from config.schema import suggest
from errors import ConfigError
from logger import get_logger


class Callback:
    """Override any of these; `trainer` is the running Trainer (model, optimizer, writer, global_step...)."""

    def on_train_start(self, trainer) -> None: ...
    def on_epoch_start(self, trainer, epoch: int) -> None: ...
    def on_batch_end(self, trainer, batch_idx: int, loss: torch.Tensor) -> None: ...  # after each optimizer step
    def on_validation_end(self, trainer, epoch: int, result: dict) -> None: ...
    def on_train_end(self, trainer) -> None: ...


class Watch(Callback):
    """Activation mean, std and fraction of zeros (forward hooks) and gradient norms of the modules
    whose `named_modules` name matches a pattern, written to TensorBoard every `every_steps` steps.

    The forward hooks compute statistics only during the micro-batches of a recorded step (in
    training mode), so the other steps pay one Python call per watched module and nothing more.
    """

    def __init__(self, model: nn.Module, modules: list[str], every_steps: int):
        names = [name for name, _ in model.named_modules() if name]
        self.modules = {name: model.get_submodule(name) for name in names if any(fnmatch(name, p) for p in modules)}
        if not self.modules:
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise ConfigError(f"trainer.watch.modules: {modules} match no module of {type(model).__name__} "
                              f"(its modules: {shown})")
        self.every = every_steps
        self.handles: list = []
        self.activations: dict[str, tuple[torch.Tensor, ...]] = {}
        self.armed = False  # the next optimizer step is one to record

    def on_train_start(self, trainer) -> None:
        if not trainer.writer.enabled:  # TensorBoard off, or not the main process: nowhere to write
            return
        self.handles = [module.register_forward_hook(partial(self._record, name))
                        for name, module in self.modules.items()]
        self.armed = (trainer.global_step + 1) % self.every == 0

    def _record(self, name: str, module: nn.Module, inputs, output) -> None:
        if self.armed and module.training and isinstance(output, torch.Tensor):
            out = output.detach().float()  # with accumulation, the group's last micro-batch is kept
            self.activations[name] = (out.mean(), out.std(), (out == 0).float().mean())

    def on_batch_end(self, trainer, batch_idx: int, loss: torch.Tensor) -> None:
        if not self.handles:
            return
        step, writer = trainer.global_step, trainer.writer
        if step % self.every == 0:
            for name, (mean, std, zeros) in self.activations.items():
                writer.add_scalar(f"activations/{name}/mean", mean, step)
                writer.add_scalar(f"activations/{name}/std", std, step)
                writer.add_scalar(f"activations/{name}/zero_fraction", zeros, step)
            for name, module in self.modules.items():
                # The gradients of the step just taken (unscaled under fp16); zero_grad runs later.
                grads = [p.grad for p in module.parameters() if p.grad is not None]
                if grads:
                    writer.add_scalar(f"gradients/{name}/norm", torch.nn.utils.get_total_norm(grads), step)
            self.activations.clear()
        self.armed = (step + 1) % self.every == 0

    def on_train_end(self, trainer) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self.armed = [], False
        self.activations.clear()


class Freeze(Callback):
    """Parameters of the named submodules (`get_submodule`) get no gradient before `until_epoch`.

    They stay in the optimizer: with `grad` None, torch optimizers leave them (and their state)
    untouched. Running statistics of normalisation layers inside them still update in training mode.
    """

    def __init__(self, model: nn.Module, modules: list[str], until_epoch: int):
        self.params: list[nn.Parameter] = []
        for name in modules:
            try:
                submodule = model.get_submodule(name)
            except AttributeError:
                names = [n for n, _ in model.named_modules() if n]
                raise ConfigError(f"trainer.freeze.modules: {type(model).__name__} has no submodule "
                                  f"{name!r}{suggest(name, names)}") from None
            known = {id(p) for p in self.params}
            self.params += [p for p in submodule.parameters() if p.requires_grad and id(p) not in known]
        self.names, self.until = list(modules), until_epoch
        self.frozen = False

    def _set(self, frozen: bool) -> None:
        for param in self.params:
            param.requires_grad_(not frozen)
        if frozen != self.frozen:
            get_logger().info(f"{'froze' if frozen else 'unfroze'} {', '.join(self.names)} "
                              f"({sum(p.numel() for p in self.params)} parameters)")
        self.frozen = frozen

    def on_epoch_start(self, trainer, epoch: int) -> None:
        self._set(epoch < self.until)

    def on_train_end(self, trainer) -> None:
        self._set(False)


def build_callbacks(config: dict, model: nn.Module) -> list[Callback]:
    """The callbacks the config asks for; raises ConfigError for module names the model lacks."""
    cfg = config["trainer"]
    callbacks: list[Callback] = []
    if cfg.get("watch"):
        callbacks.append(Watch(model, cfg["watch"]["modules"], cfg["watch"]["every_steps"]))
    if cfg.get("freeze"):
        callbacks.append(Freeze(model, cfg["freeze"]["modules"], cfg["freeze"]["until_epoch"]))
    if os.environ.get("SWEEP_OPTUNA_TRIAL_ID"):  # this run is a trial of an Optuna search (sweep/search.py)
        from sweep.search import TrialReport

        callbacks.append(TrialReport.from_environment())
    return callbacks
