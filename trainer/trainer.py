"""The training loop. A task overrides one method, `step`; everything else happens here.

    class SegmentationTrainer(Trainer):
        def step(self, batch):                     # batch: as collated, already on the device
            output = self.model(batch["image"])
            return {"loss": self.criterion(output, batch["mask"]), "output": output, "target": batch["mask"]}

Training and evaluation (validation, test.py) call the same `step`; the bookkeeping around it (data
order, global_step, accumulation, AMP, clipping, the NaN guard, checkpoints, signals, DDP, metrics) is
the loop's, in named helpers below, and not the user's to repeat.
"""
from __future__ import annotations

import contextlib
import math
import signal
import time
from fnmatch import fnmatch

import torch

from base import BaseTrainer
from checkpoint import unwrap_model
from errors import ConfigError, Interrupted, TrainingError
from logger import Progress, get_logger
from logger.views import SampleViews
from runtime.batch import batch_size, describe, head, to_device
from runtime.distributed import all_reduce, is_sharded, local_part
from trainer.callbacks import build_callbacks
from trainer.metrics import EpochMetrics

CHECK_SECONDS = 0.25  # how often the NaN guard runs (and under DDP the ranks agree); see _check_point
MAX_CHECK_STEPS = 1000  # and at least every this many steps, which bounds the list of waiting losses
NULL_CONTEXT = contextlib.nullcontext()  # reusable; one fewer object per step
LOOP_METHODS = ("train", "_train_epoch", "_valid_epoch", "evaluate")


def loop_override(cls: type) -> str | None:
    """Why `cls` cannot be a trainer, or None. A pytorch-template-style `_train_epoch` would skip the data
    order, global_step and checkpoints, and validate and step the scheduler a second time, silently."""
    if not issubclass(cls, Trainer):
        return (f"trainer.type: {cls.__name__} must subclass trainer.trainer.Trainer and override "
                f"step(self, batch) (README: Your own training step)")
    for name in LOOP_METHODS:
        if getattr(cls, name) is not getattr(Trainer, name):
            return (f"trainer.type: {cls.__name__} overrides {name}(), which would bypass the loop's bookkeeping "
                    f"(data order, global_step, validation, the LR scheduler, checkpoints); override "
                    f"step(self, batch) instead, which gets the batch on the device and returns "
                    f"{{'loss', 'output', 'target'}}, and the on_* hooks for per-epoch work "
                    f"(README: Your own training step)")
    return None


class Trainer(BaseTrainer):
    """Supervised training. The default `step` takes (input, target) batches; override it for any other."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        problem = loop_override(type(self))
        if problem:
            raise ConfigError(problem)
        cfg = self.config["trainer"]
        self.log_every = cfg["log_every_steps"]
        self.save_every = cfg["save_every_steps"]
        self.accumulate = cfg["accumulate_grad_batches"]
        self.clip_norm, self.clip_value = cfg["clip_grad_norm"], cfg["clip_grad_value"]
        self.metric_batches = cfg["train_metric_batches"]
        self.nonfinite_buffers_allowed = cfg["allow_nonfinite_buffers"]
        amp = cfg["amp"]
        # A disabled torch.autocast still costs two context switches per step: use a null context.
        self.autocast = NULL_CONTEXT if amp == "off" else torch.autocast(
            self.device.type, dtype=torch.float16 if amp == "fp16" else torch.bfloat16)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")
        self.train_metrics = EpochMetrics(self.metric_fns, self.device)
        self.valid_metrics = EpochMetrics(self.metric_fns, self.device)
        self.histograms = cfg["histograms"] and self.writer.draws  # TensorBoard only: MLflow takes scalars
        self.train_writer = self.writer.split("train")  # one chart per name, training and validation curves
        self.images = cfg["images"] and self.writer.draws
        self.callbacks = build_callbacks(self.config, unwrap_model(self.model))
        self.params = list(self.model.parameters())
        self._losses: list[tuple[torch.Tensor, int, int]] = []  # (loss, batch size, step) not yet summed
        self._first_bad_loss: int | None = None  # this rank's first step with a non-finite loss (DDP)
        self._next_check, self._checked_at = 0, (0, time.perf_counter())  # see _check_point
        self._step_checked = False  # the step's return value is checked once, on the first batch
        self.train_seconds = 0.0  # the last epoch's training loop (for its throughput)

    # ---- the one method a task overrides ---------------------------------------------------------
    def step(self, batch) -> dict:
        """One batch, already on the device -> {"loss": scalar tensor, "output": ..., "target": ...}.

        "output" and "target" go to every metric as metric(output, target). Optional keys: "input" (what
        TensorBoard's sample views show; default: the batch's first tensor) and "batch_size" (default: the
        first tensor's first dimension). Runs in training (model.train(), gradients on) and in evaluation
        (model.eval(), torch.no_grad()) alike. The default expects (input, target) batches."""
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ConfigError(f"the default Trainer.step expects (input, target) batches, got {describe(batch)}; "
                              f"override step(self, batch) in a Trainer subclass (README: Your own training step)")
        data, target = batch
        output = self.model(data)
        return {"loss": self.criterion(output, target), "output": output, "target": target}

    def predict_step(self, batch) -> torch.Tensor:
        """Inputs without labels, already on the device -> the model's output (predict.py, export.py).

        Runs in eval mode under torch.no_grad(). A task whose `step` does more than `self.model(input)`
        overrides this too. The default takes a tensor of inputs, or the (input, target) pairs of a split,
        whose target it ignores."""
        if isinstance(batch, (tuple, list)) and len(batch) in (1, 2):
            batch = batch[0]
        return self.model(batch)

    # ---- training ----------------------------------------------------------------------------------
    def _train_epoch(self, epoch: int) -> dict:
        self.model.train()
        progress, total = self._start_epoch(epoch)
        for batch in progress:
            batch = to_device(batch, self.device)
            first, last, group_size = self._group_position(total)
            if first:
                self.optimizer.zero_grad(set_to_none=True)
            with self._no_sync(not last), self.autocast:
                out = self.step(batch)
            loss = self._loss_of(out, batch)
            # Dividing by the group size makes k micro-batches of b the same update as one batch of k*b.
            self.scaler.scale(loss / group_size if group_size > 1 else loss).backward()
            self._record(out, batch, loss, total)
            if last:
                self._optimizer_step()
                self._after_optimizer_step(epoch, loss, total)
        return self._end_epoch(epoch)

    def _start_epoch(self, epoch: int) -> tuple[Progress, int]:
        """Fix the epoch's data order (from where a resume left it), continue or reset the epoch's sums,
        and set up progress, clocks and the schedule of the training metrics."""
        loader = self.data_loader
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch, start=self.samples_in_epoch)
        total = self.batch_in_epoch + len(loader)
        # Train metrics other than the loss cost several kernels each: by default they are computed on about
        # 16 batches of an epoch (trainer.train_metric_batches); the loss and evaluation use every sample.
        self._metric_every = max(1, total // self.metric_batches) if self.metric_batches else 1
        # Under DDP the last batches are padded with repeated samples: metrics leave those out.
        sampler = getattr(loader, "sampler", None)
        self._real_left = sampler.real_count() if hasattr(sampler, "real_count") else math.inf
        if self.resumed_epoch_state is not None:
            self.train_metrics.load_states(self.resumed_epoch_state)
            self.resumed_epoch_state = None
        else:
            self.train_metrics.reset()
        self.epoch_running = True
        self._last_out = None
        self._views_of_last_batch = self.images and self.valid_data_loader is None
        progress = Progress(loader, total, f"epoch {epoch}/{self.epochs}", self.dist.is_main and self.verbosity > 0,
                            initial=self.batch_in_epoch)
        progress.postfix = self._running_means
        self._started = (time.perf_counter(), self.samples_in_epoch)
        self._next_check, self._checked_at = self.global_step, (self.global_step, self._started[0])
        return progress, total

    def _group_position(self, total: int) -> tuple[bool, bool, int]:
        """(first micro-batch of its accumulation group, last one, the group's size)."""
        batch, accumulate = self.batch_in_epoch, self.accumulate
        group_start = batch - batch % accumulate
        group_size = min(accumulate, total - group_start)  # the last group of an epoch may be short
        return batch == group_start, batch + 1 == group_start + group_size, group_size

    def _loss_of(self, out, batch) -> torch.Tensor:
        if not self._step_checked:
            self._check_step_output(out, batch, training=True)
        return out["loss"]

    def _record(self, out: dict, batch, loss: torch.Tensor, total: int) -> None:
        """Per-batch bookkeeping: the loss joins a list summed and checked about every 0.25 s (`_check_point`:
        on a 1 ms step every extra kernel shows, ~15 us each), metrics on their batches, the position."""
        n = out.get("batch_size") or batch_size(batch)
        batch_idx = self.batch_in_epoch
        self._losses.append((loss.detach(), n, self.global_step + 1))
        if self.train_metrics.enabled and batch_idx % self._metric_every == 0:
            self._update_train_metrics(out, n)
        self._real_left -= n
        self.batch_in_epoch = batch_idx + 1
        self.samples_in_epoch += n * self.dist.world_size
        if self.batch_in_epoch == total and self._views_of_last_batch:
            self._last_out = (out, batch)  # only the last: holding each step's output keeps its graph alive

    def _update_train_metrics(self, out: dict, n: int) -> None:
        real = min(n, self._real_left)
        if real <= 0:
            return
        output, target = out.get("output"), out.get("target")
        if real < n:  # the tail of the last batch repeats samples (DDP padding)
            output, target = head(output, real), head(target, real)
        self.train_metrics.update(output, target, real)

    def _after_optimizer_step(self, epoch: int, loss: torch.Tensor, total: int) -> None:
        """Hooks, step logging, the check point (NaN guard, signals), mid-epoch checkpoints."""
        self._hook("on_batch_end", self.batch_in_epoch - 1, loss)
        if self.global_step % self.log_every == 0:
            self.train_writer.add_scalar("loss/step", loss.detach(), self.global_step)
        save_now = self.save_every and self.global_step % self.save_every == 0 and self.batch_in_epoch < total
        if self._check_point(force=save_now):
            self._stop_now(epoch)
        if save_now:
            self.save_mid_epoch()

    def _end_epoch(self, epoch: int) -> dict:
        if self._check_point(force=True):  # the epoch's last steps
            self._stop_now(epoch)
        started, started_samples = self._started
        # The epoch's steps, their deferred loss sums included (bench/overhead.py compares it with a plain loop).
        self.train_seconds = time.perf_counter() - started
        self.writer.add_scalar("throughput/train_samples_per_s",
                               (self.samples_in_epoch - started_samples) / max(self.train_seconds, 1e-9),
                               self.global_step)
        items = []
        if self.histograms:
            for name, param in unwrap_model(self.model).named_parameters():  # FSDP2: rank 0's shards
                items.append((f"weights/{name}", local_part(param.detach())))
                if param.grad is not None:
                    items.append((f"weights/{name}.grad", local_part(param.grad.detach())))
        last_out, step, self._last_out = self._last_out, self.global_step, None
        if items or last_out is not None:
            self.draw_aside(lambda: self._draw_epoch(items, last_out, step))
        result = self.train_metrics.compute(self.dist.enabled)
        self.epoch_running = False
        return result

    def _draw_epoch(self, items: list, last_out: tuple | None, step: int) -> None:
        """The epoch's histograms and, without validation, the views of its last batch, on the drawing thread
        (draw_aside): until the checkpoint waits for it, nothing changes the weights, the gradients or that
        batch, and nothing else draws captions (the validation views, drawn meanwhile, exist only when these
        do not: Pillow's font is not for two threads at once)."""
        if items:
            self.writer.add_histograms(items, step)
        if last_out is not None:
            out, batch = last_out
            views = SampleViews(out.get("batch_size") or batch_size(batch))
            views.collect(*self._view_parts(out, batch))
            views.draw(self.writer, "samples/train", step, self.data_loader)

    def _running_means(self) -> dict:
        """The progress bar's values: this process's sums so far, the waiting losses included."""
        means = self.train_metrics.running_means()
        pending, n_pending = self._pending_losses()
        loss = self.train_metrics.loss
        means["loss"] = (loss.total + pending).item() / max(loss.count + n_pending, 1)
        return means

    # ---- evaluation: validation and test.py --------------------------------------------------------
    def _valid_epoch(self, epoch: int) -> dict:
        views = SampleViews(len(self.valid_data_loader.sampler) if hasattr(self.valid_data_loader, "sampler")
                            else 0) if self.images else None
        graph = self.writer.draws and epoch == 1 and not is_sharded(self.model)  # tracing rank 0 alone: FSDP hangs
        result = self.evaluate(self.valid_data_loader, self.valid_metrics, f"valid {epoch}/{self.epochs}", views,
                               graph)
        if views is not None:
            views.draw(self.writer, "samples/val", self.global_step, self.valid_data_loader)
        return result

    @torch.no_grad()
    def evaluate(self, loader, metrics: EpochMetrics | None = None, desc: str = "evaluate",
                 views: SampleViews | None = None, graph: bool = False) -> dict:
        """The step over every batch of `loader` in eval mode; {"loss": ..., metric: ...} over all of them
        (and all processes). Validation and test.py both run this."""
        metrics = metrics if metrics is not None else self.valid_metrics
        metrics.reset()
        extra = self._extra_eval_batches(loader)
        wrapped, self.model = self.model, unwrap_model(self.model)  # no DDP collectives: ranks may hold
        self.model.eval()                                            # unequal numbers of batches
        capture = _InputCapture(self.model) if graph else None
        try:
            progress = Progress(loader, len(loader), desc, self.dist.is_main and self.verbosity > 0)
            progress.postfix = metrics.running_means
            for batch in progress:
                batch = to_device(batch, self.device)
                with self.autocast:
                    out = self.step(batch)
                if not self._step_checked:
                    self._check_step_output(out, batch, training=False)
                n = out.get("batch_size") or batch_size(batch)
                metrics.loss.add(out["loss"], n)
                if metrics.enabled:
                    metrics.update(out.get("output"), out.get("target"), n)
                if views is not None:
                    views.collect(*self._view_parts(out, batch))
                if capture is not None:
                    capture.remove()
            for _ in range(extra):  # FSDP2: every forward is collective; these repeat the last batch, uncounted
                with self.autocast:
                    self.step(batch)
        finally:
            if capture is not None:
                capture.remove()
                if capture.inputs is not None:
                    self.writer.add_model_graph(self.model, capture.inputs)
            if is_sharded(self.model):
                # FSDP2 keeps the root's parameters gathered after a forward without backward: shard them
                # again, or reading the parameters (the NaN guard, a checkpoint) touches freed memory.
                for module in self.model.modules():
                    if is_sharded(module):
                        module.reshard()
            self.model = wrapped
        return metrics.compute(self.dist.enabled)

    def _extra_eval_batches(self, loader) -> int:
        """With FSDP2 every rank must run as many forwards as the others (validation is not padded, so ranks
        may hold one batch fewer): how many forwards beyond its own batches this rank runs."""
        if not (self.dist.enabled and is_sharded(self.model)):
            return 0
        counts = torch.tensor([len(loader), -len(loader)], dtype=torch.float64, device=self.device)
        most, fewest = all_reduce(counts, op=torch.distributed.ReduceOp.MAX).tolist()
        if -fewest == 0 and most > 0:
            raise ConfigError(f"strategy fsdp: some process has no evaluation batch ({int(most)} on another); "
                              f"use a larger validation split or fewer processes")
        return int(most) - len(loader)

    @staticmethod
    def _view_parts(out: dict, batch) -> tuple:
        """(input, target, output) for the sample views: the step's "input", else the batch's first tensor."""
        from runtime.batch import first_tensor

        inputs = out.get("input") if "input" in out else first_tensor(batch)
        return inputs, out.get("target"), out.get("output")

    def _check_step_output(self, out, batch, training: bool) -> None:
        """The first batch's step result, checked once: a mistake in a user's step is one clear line."""
        name = f"{type(self).__name__}.step"
        if not isinstance(out, dict):
            raise ConfigError(f"{name} must return a dict with a 'loss' tensor (and 'output', 'target' for "
                              f"metrics), got {type(out).__name__}")
        loss = out.get("loss")
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            got = f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
            if type(self).step is Trainer.step:  # the default step returns what the configured loss returned
                loss_name = self.config["loss"] if isinstance(self.config["loss"], str) else self.config["loss"]["type"]
                raise ConfigError(f"loss: {loss_name} (model/loss.py) must return one number (e.g. the batch mean), "
                                  f"got {got} (batch: {describe(batch)})")
            raise ConfigError(f"{name}: 'loss' must be a tensor holding one number, got {got} (batch: "
                              f"{describe(batch)})")
        if training and not loss.requires_grad:
            raise ConfigError(f"{name}: 'loss' does not require grad: it was not computed from the model's "
                              f"parameters (detached, or computed under torch.no_grad?)")
        if self.metric_fns and ("output" not in out or "target" not in out):
            raise ConfigError(f"{name} must return 'output' and 'target' when metrics are configured (they are "
                              f"called as metric(output, target)); it returned {sorted(out)}")
        self._step_checked = True

    # ---- the helpers behind the step: accumulation, clipping, the NaN guard, signals -----------------
    def _stop_now(self, epoch: int) -> None:
        """A signal reached a rank: save this step on every rank alike, then exit 128 + signal."""
        self.save_mid_epoch()
        self.wait_for_checkpoint()  # a sharded save completes in the background: the resume point is on disk
        self.stop_signal.finish()  # saved: a further signal has nothing left to stop (and no traceback)
        raise Interrupted(self.stop_signal.signum,
                          f"stopped by signal at epoch {epoch}, step {self.global_step}; checkpoint saved")

    def _no_sync(self, skip_allreduce: bool):
        """Under DDP, micro-batches before the last of an accumulation group skip the gradient all-reduce."""
        if self.accumulate > 1 and self.dist.enabled and is_sharded(self.model):  # FSDP2 reads it in backward
            self.model.set_requires_gradient_sync(not skip_allreduce)
            return NULL_CONTEXT
        if skip_allreduce and self.dist.enabled:
            return self.model.no_sync()
        return NULL_CONTEXT

    def _optimizer_step(self) -> None:
        """Unscale, clip, step; at logging steps also log the gradient norm and learning rates."""
        log_now = (self.global_step + 1) % self.log_every == 0
        if log_now or self.clip_norm is not None or self.clip_value is not None:
            grad_norm = self._clip_gradients(log_now)
        if self.scaler.is_enabled():  # fp16: skips a step whose gradients overflowed, and adapts the scale
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.lr_scheduler is not None and self.scheduler_interval == "step":
            self.last_step_lrs = [group["lr"] for group in self.optimizer.param_groups]  # what this step used
            self.lr_scheduler.step()
        self.global_step += 1
        if log_now:
            self.writer.add_scalar("optimizer/grad_norm", grad_norm, self.global_step)
            lrs = self.lrs_in_force()  # the rates this step used, not the next step's
            for i, lr in enumerate(lrs):
                self.writer.add_scalar(f"lr/group{i}_step", lr, self.global_step)

    def _clip_gradients(self, log_now: bool) -> torch.Tensor | None:
        """Clip by value and/or total norm; return the total norm before clipping (computed only to clip
        by it or to log it: it costs several kernels)."""
        self.scaler.unscale_(self.optimizer)  # clip and measure true gradients (a no-op without fp16)
        params = [p for p in self.params if p.grad is not None]
        grads = [p.grad for p in params]
        grad_norm = torch.nn.utils.get_total_norm(grads) if log_now or self.clip_norm is not None else None
        if self.clip_value is not None:
            torch.nn.utils.clip_grad_value_(params, self.clip_value)
        if self.clip_norm is not None:
            clip_from = grad_norm if self.clip_value is None else torch.nn.utils.get_total_norm(grads)
            torch.nn.utils.clip_grads_with_norm_(params, self.clip_norm, clip_from)
        return grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2: a DTensor

    def _pending_losses(self) -> tuple[torch.Tensor | float, int]:
        """The waiting training losses: their sum weighted by batch size, and their number of samples."""
        if not self._losses:
            return 0.0, 0
        losses, sizes, _ = zip(*self._losses)
        return torch.stack(losses).double() @ torch.tensor(sizes, dtype=torch.float64, device=self.device), sum(sizes)

    def _fold_losses(self) -> None:
        """The NaN guard: add the waiting training losses to the epoch's sum and check that sum (one host
        read). A non-finite loss stops the run, naming its step (under DDP at the ranks' next check point,
        where every rank stops)."""
        if not self._losses:
            return
        pending, n = self._pending_losses()
        loss = self.train_metrics.loss
        loss.total.add_(pending)
        loss.count += n
        if not math.isfinite(float(pending)):
            step = next((step for loss, _, step in self._losses if not torch.isfinite(loss).all()), self.global_step)
            if not self.dist.enabled:
                self._raise_nonfinite(step)
            if self._first_bad_loss is None:  # rank-local: every rank stops at the next check point
                self._first_bad_loss = step
        self._losses.clear()

    def _check_point(self, force: bool = False) -> bool:
        """About every CHECK_SECONDS, before every checkpoint and at the end of an epoch: run the NaN guard
        (`_fold_losses`) and, under DDP, let all ranks learn in one small all-reduce whether any rank was
        signalled or saw a non-finite loss. Ranks reach it at the same steps: rank 0 picks the next one
        from its step time. Returns whether to stop now (one process acts on a signal at once)."""
        stop = self.stop_signal is not None and self.stop_signal.signum is not None
        if not force and self.global_step < self._next_check:
            return stop and not self.dist.enabled
        self._fold_losses()
        steps, started = self._checked_at
        elapsed, done = time.perf_counter() - started, self.global_step - steps
        interval = max(1, min(MAX_CHECK_STEPS, int(CHECK_SECONDS * done / elapsed))) if done and elapsed > 0 else 1
        if self.dist.enabled:
            first_bad = -self._first_bad_loss if self._first_bad_loss is not None else -math.inf
            flags = torch.tensor([first_bad, float(stop), interval if self.dist.is_main else 0.0],
                                 dtype=torch.float64, device=self.device)
            first_bad, stop, interval = all_reduce(flags, op=torch.distributed.ReduceOp.MAX).tolist()
            if math.isfinite(first_bad):
                self._raise_nonfinite(int(-first_bad))
            if stop and self.stop_signal is not None and self.stop_signal.signum is None:
                self.stop_signal.signum = signal.SIGTERM  # another rank was signalled
        self._next_check = self.global_step + int(interval)
        self._checked_at = (self.global_step, time.perf_counter())
        return bool(stop)

    def _raise_nonfinite(self, step: int) -> None:
        raise TrainingError(f"non-finite loss at step {step} (epoch {self.epoch}); {self._kept()}")

    def _diagnose_nonfinite(self, step: int, gradients: bool = True) -> None:
        """Before a checkpoint: raise if the weights, buffers or optimizer state after step `step`, or (when
        asked) its gradients, are not finite, so that such a state never replaces the last good checkpoint.
        (A non-finite gradient with a finite loss shows here, or as the next steps' losses.)"""
        model = unwrap_model(self.model)
        params = dict(model.named_parameters())
        names = {id(p): name for name, p in params.items()}
        where = f"step {step} (epoch {self.epoch})"
        tensors = [(f"weights after {where} in parameter {name!r}", p.detach()) for name, p in params.items()]
        tensors += [(f"gradient at {where} in parameter {name!r}", p.grad) for name, p in params.items()
                    if gradients and p.grad is not None]
        tensors += [(f"buffer {name!r} after {where}", b) for name, b in model.state_dict(keep_vars=True).items()
                    if name not in params and isinstance(b, torch.Tensor) and b.is_floating_point()
                    and not any(fnmatch(name, pattern) for pattern in self.nonfinite_buffers_allowed)]
        tensors += [(f"optimizer state {key!r} of parameter {names.get(id(p), '?')!r} after {where}", value)
                    for p, state in self.optimizer.state.items() for key, value in state.items()
                    if isinstance(value, torch.Tensor) and value.is_floating_point()]
        tensors = [(what, local_part(t)) for what, t in tensors]  # FSDP2: this rank's shards; ranks agree below
        tensors = [(what, t) for what, t in tensors if t.numel()]
        sharded = self.dist.enabled and is_sharded(self.model)
        finite = not tensors or torch.stack([torch.isfinite(t).all() for _, t in tensors]).all().item()  # one host sync
        if sharded:
            finite = bool(all_reduce(torch.tensor([float(finite)], device=self.device),
                                     op=torch.distributed.ReduceOp.MIN).item())
        if finite:
            return
        # Gradients first: a non-finite gradient is the cause of the non-finite weights and state after it.
        bad = [what for what, t in tensors if not torch.isfinite(t).all()]
        if sharded:  # every rank raises, naming what the first rank with a non-finite shard found
            found = [None] * self.dist.world_size
            torch.distributed.all_gather_object(found, bad)
            bad = next(b for b in found if b)
        what = next((w for w in bad if w.startswith("gradient")), bad[0])
        hint = {"weights": " (a non-finite gradient, or a learning rate far too large?)",
                "buffer": " (trainer.allow_nonfinite_buffers lets a buffer hold inf or NaN on purpose)",
                "optimizer": " (gradients too large for the optimizer's statistics: clip them, or lower the lr?)"}
        raise TrainingError(f"non-finite {what}{hint.get(what.split()[0], '')}; {self._kept()}")

    def _kept(self) -> str:
        if self.checkpoint_dir is not None and any((self.checkpoint_dir / n).exists() for n in ("last.pth", "last")):
            return "checkpoints on disk are from before it"
        return "no checkpoint was written"

    def checkpoint_state(self, epoch_finished: bool) -> dict:
        # All ranks are here (a collective call) and hold equally many waiting losses (equal batch counts):
        # after the loop's own check point before a save there are none, and nothing is done twice.
        if self.epoch_running and self._losses:
            if self.dist.enabled:
                self._check_point(force=True)
            else:
                self._fold_losses()
        # The per-step guard reads only the loss. (With fp16, GradScaler skips the steps whose gradients
        # overflow: those gradients are not an error.)
        self._diagnose_nonfinite(self.global_step, gradients=not self.scaler.is_enabled())
        return super().checkpoint_state(epoch_finished)

    def epoch_state(self) -> dict | None:
        return self.train_metrics.state() if self.epoch_running else None


class _InputCapture:
    """Records the positional inputs of the model's first call (a forward pre-hook), for the graph."""

    def __init__(self, model: torch.nn.Module):
        self.inputs = None
        self.handle = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        if self.inputs is None and self.handle is not None:
            if kwargs or not args:  # torch.jit.trace, under add_graph, takes positional inputs only
                get_logger().info("TensorBoard graph skipped: the model is called with keyword arguments")
            else:
                self.inputs = tuple(head(arg, 2) for arg in args)

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
