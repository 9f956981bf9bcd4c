from __future__ import annotations

import contextlib
import math
import signal
import time

import torch

from base import BaseTrainer
from checkpoint import unwrap_model
from errors import Interrupted, TrainingError
from logger import Progress
from logger.images import class_names
from runtime.distributed import all_reduce
from trainer.callbacks import build_callbacks

CHECK_SECONDS = 0.25  # how often the NaN guard runs (and under DDP the ranks agree); see _check_point
MAX_CHECK_STEPS = 1000  # and at least every this many steps, which bounds the list of waiting losses
NULL_CONTEXT = contextlib.nullcontext()  # reusable; one fewer object per step


class Trainer(BaseTrainer):
    """Supervised training: (input, target) batches, a loss, metrics averaged over samples."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.config["trainer"]
        self.log_every = cfg["log_every_steps"]
        self.save_every = cfg["save_every_steps"]
        self.accumulate = cfg["accumulate_grad_batches"]
        self.clip_norm, self.clip_value = cfg["clip_grad_norm"], cfg["clip_grad_value"]
        amp = cfg["amp"]
        # A disabled torch.autocast still costs two context switches per step: use a null context.
        self.autocast = NULL_CONTEXT if amp == "off" else torch.autocast(
            self.device.type, dtype=torch.float16 if amp == "fp16" else torch.bfloat16)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")
        self.metric_names = ["loss"] + [fn.__name__ for fn in self.metric_fns]
        self.histograms = cfg["histograms"] and self.writer.enabled
        self.images = cfg["images"] and self.writer.enabled
        self.callbacks = build_callbacks(self.config, unwrap_model(self.model))
        self.params = list(self.model.parameters())
        self._losses: list[tuple[torch.Tensor, int, int]] = []  # (loss, batch size, step) not yet summed
        self._first_bad_loss: int | None = None  # this rank's first step with a non-finite loss (DDP)
        self._next_check, self._checked_at = 0, (0, time.perf_counter())  # see _check_point
        self.train_seconds = 0.0  # the last epoch's training loop (for its throughput)

    def _new_totals(self) -> dict:
        """Running sums of an epoch: `loss` over every sample, metrics over the sampled batches."""
        totals = {name: torch.zeros((), dtype=torch.float64, device=self.device) for name in self.metric_names}
        return {**totals, "n": 0, "n_metrics": 0}

    def _accumulate(self, totals: dict, loss: torch.Tensor, output: torch.Tensor, target: torch.Tensor) -> None:
        # Weighted by batch size and kept on the device: no host sync per batch.
        totals["loss"].add_(loss.detach(), alpha=target.shape[0])
        totals["n"] += target.shape[0]
        self._add_metrics(totals, output, target)

    def _add_metrics(self, totals: dict, output: torch.Tensor, target: torch.Tensor) -> None:
        if self.metric_fns:
            output = output.detach()
            for fn in self.metric_fns:
                totals[fn.__name__].add_(fn(output, target), alpha=target.shape[0])
            totals["n_metrics"] += target.shape[0]

    def _pending_losses(self) -> tuple[torch.Tensor | float, int]:
        """The waiting training losses: their sum weighted by batch size, and their number of samples."""
        if not self._losses:
            return 0.0, 0
        losses, sizes, _ = zip(*self._losses)
        return torch.stack(losses).double() @ torch.tensor(sizes, dtype=torch.float64, device=self.device), sum(sizes)

    def _fold_losses(self, totals: dict) -> None:
        """The NaN guard: add the waiting training losses to the epoch's sum and check that sum (one host
        read). A non-finite loss stops the run, naming its step (under DDP at the ranks' next check point,
        where every rank stops)."""
        if not self._losses:
            return
        pending, n = self._pending_losses()
        totals["loss"].add_(pending)
        totals["n"] += n
        if not math.isfinite(float(pending)):
            step = next((step for loss, _, step in self._losses if not torch.isfinite(loss).all()), self.global_step)
            if not self.dist.enabled:
                self._raise_nonfinite(step)
            if self._first_bad_loss is None:  # rank-local: every rank stops at the next check point
                self._first_bad_loss = step
        self._losses.clear()

    def _averages(self, totals: dict, reduce: bool = False) -> dict:
        pending, n_pending = self._pending_losses() if totals is self.epoch_totals else (0.0, 0)
        sums = torch.stack([totals["loss"] + pending] + [totals[k] for k in self.metric_names[1:]])
        counts = torch.tensor([totals["n"] + n_pending, totals["n_metrics"]], dtype=torch.float64, device=self.device)
        if reduce and self.dist.enabled:
            sums, counts = all_reduce(sums), all_reduce(counts)
        sums, (n, n_metrics) = sums.tolist(), counts.tolist()
        return {name: value / max(n if name == "loss" else n_metrics, 1.0) for name, value in zip(self.metric_names, sums)}

    def _train_epoch(self, epoch: int) -> dict:
        self.model.train()
        self.data_loader.set_epoch(epoch, start=self.samples_in_epoch)
        total = self.batch_in_epoch + len(self.data_loader)
        # Train metrics other than the loss cost several kernels each: they are computed on about 16
        # batches of an epoch (every batch when it has fewer); the loss and validation use every sample.
        metric_every = max(1, total // 16)
        totals = self._new_totals()
        if self.epoch_totals is not None:  # resumed mid-epoch: continue the epoch's running sums
            for k, v in self.epoch_totals.items():
                totals[k] += v.to(self.device) if isinstance(v, torch.Tensor) else v
        self.epoch_totals = totals
        progress = Progress(self.data_loader, total, f"epoch {epoch}", self.dist.is_main and self.verbosity > 0,
                            initial=self.batch_in_epoch)
        progress.postfix = lambda: self._averages(totals)
        started, started_samples = time.perf_counter(), self.samples_in_epoch
        self._next_check, self._checked_at = self.global_step, (self.global_step, started)  # e.g. after a resume
        accumulate, world_size, output = self.accumulate, self.dist.world_size, None
        for data, target in progress:
            data, target = data.to(self.device, non_blocking=True), target.to(self.device, non_blocking=True)
            batch = self.batch_in_epoch
            group_start = batch - batch % accumulate
            group_size = min(accumulate, total - group_start)  # the last group of an epoch may be short
            last_in_group = batch + 1 == group_start + group_size
            if batch == group_start:
                self.optimizer.zero_grad(set_to_none=True)
            with self._no_sync(not last_in_group), self.autocast:
                output = self.model(data)
                loss = self.criterion(output, target)
            # Dividing by the group size makes k micro-batches of b the same update as one batch of k*b.
            self.scaler.scale(loss / group_size if group_size > 1 else loss).backward()
            # The loss joins a list, summed and checked every ~0.25 s (`_fold_losses`): on a 1 ms step every
            # extra kernel shows (~15 us each, cache-cold). Other metrics: on ~16 batches an epoch.
            n = target.shape[0]
            self._losses.append((loss.detach(), n, self.global_step + 1))
            if batch % metric_every == 0:
                self._add_metrics(totals, output, target)
            self.batch_in_epoch = batch + 1
            self.samples_in_epoch += n * world_size
            if last_in_group:
                self._optimizer_step()
                self._hook("on_batch_end", batch, loss)
                if self.global_step % self.log_every == 0:
                    self.writer.add_scalar("loss/train_step", loss.detach(), self.global_step)
                save_now = self.save_every and self.global_step % self.save_every == 0 and batch + 1 < total
                if self._check_point(totals, force=save_now):
                    self._stop_now(epoch)
                if save_now:
                    self.save_mid_epoch()
        if self._check_point(totals, force=True):  # the epoch's last steps
            self._stop_now(epoch)
        # The epoch's steps, their deferred loss sums included (bench/overhead.py compares it with a plain loop).
        self.train_seconds = time.perf_counter() - started
        self.writer.add_scalar("throughput/train_samples_per_s",
                               (self.samples_in_epoch - started_samples) / max(self.train_seconds, 1e-9),
                               self.global_step)
        if self.histograms:
            for name, param in unwrap_model(self.model).named_parameters():
                self.writer.add_histogram(f"weights/{name}", param.detach(), self.global_step)
                if param.grad is not None:
                    self.writer.add_histogram(f"grads/{name}", param.grad.detach(), self.global_step)
        if self.valid_data_loader is None and output is not None:  # without validation, show the last batch
            self._log_batch_views(epoch, "train", self.data_loader, (data, target, output.detach()))
        result = self._averages(totals, reduce=True)
        self.epoch_totals = None
        return result

    def _stop_now(self, epoch: int) -> None:
        """A signal reached a rank: save this step on every rank alike, then exit 128 + signal."""
        self.save_mid_epoch()
        raise Interrupted(self.stop_signal.signum,
                          f"stopped by signal at epoch {epoch}, step {self.global_step}; checkpoint saved")

    def _no_sync(self, skip_allreduce: bool):
        """Under DDP, micro-batches before the last of an accumulation group skip the gradient all-reduce."""
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
            self.lr_scheduler.step()
        self.global_step += 1
        if log_now:
            self.writer.add_scalar("grad_norm/train_step", grad_norm, self.global_step)
            for i, group in enumerate(self.optimizer.param_groups):
                self.writer.add_scalar(f"lr/group{i}_step", group["lr"], self.global_step)

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
        return grad_norm

    def _diagnose_nonfinite(self, step: int, gradients: bool = True) -> None:
        """Before a checkpoint: raise if the gradients of step `step` (when asked) or the weights after it are
        not finite. (A non-finite gradient with a finite loss shows here, or as the next steps' losses.)"""
        params = list(unwrap_model(self.model).named_parameters())
        grads = [(name, p.grad) for name, p in params if gradients and p.grad is not None]
        checks = [torch.isfinite(p.detach()).all() for _, p in params] + [torch.isfinite(g).all() for _, g in grads]
        if torch.stack(checks).all().item():  # one host sync
            return
        where = f"step {step} (epoch {self.epoch})"
        kept = "checkpoints on disk are from before it"
        for name, grad in grads:
            if not torch.isfinite(grad).all():
                raise TrainingError(f"non-finite gradient at {where} in parameter {name!r}; {kept}")
        name = next(n for n, p in params if not torch.isfinite(p.detach()).all())
        raise TrainingError(f"non-finite weights after {where} in parameter {name!r} (a non-finite gradient, or a "
                            f"learning rate far too large?); {kept}")

    def _check_point(self, totals: dict, force: bool = False) -> bool:
        """About every CHECK_SECONDS, before every checkpoint and at the end of an epoch: run the NaN guard
        (`_fold_losses`) and, under DDP, let all ranks learn in one small all-reduce whether any rank was
        signalled or saw a non-finite loss. Ranks reach it at the same steps: rank 0 picks the next one
        from its step time. Returns whether to stop now (one process acts on a signal at once)."""
        stop = self.stop_signal is not None and self.stop_signal.signum is not None
        if not force and self.global_step < self._next_check:
            return stop and not self.dist.enabled
        self._fold_losses(totals)
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
        raise TrainingError(f"non-finite loss at step {step} (epoch {self.epoch}); checkpoints on disk are from "
                            f"before it")

    def checkpoint_state(self, epoch_finished: bool) -> dict:
        # All ranks are here (a collective call) and hold equally many waiting losses (equal batch counts):
        # after the loop's own check point before a save there are none, and nothing is done twice.
        if self.epoch_totals is not None and self._losses:
            if self.dist.enabled:
                self._check_point(self.epoch_totals, force=True)
            else:
                self._fold_losses(self.epoch_totals)
        # The per-step guard reads only the loss: a state with non-finite weights (or the gradients that
        # made them) must never replace the last good checkpoint. (With fp16, GradScaler skips the steps
        # whose gradients overflow: those gradients are not an error.)
        self._diagnose_nonfinite(self.global_step, gradients=not self.scaler.is_enabled())
        return super().checkpoint_state(epoch_finished)

    @torch.no_grad()
    def _valid_epoch(self, epoch: int) -> dict:
        model = unwrap_model(self.model)  # no DDP collectives: ranks may hold unequal numbers of batches
        model.eval()
        totals = self._new_totals()
        progress = Progress(self.valid_data_loader, len(self.valid_data_loader), f"valid {epoch}",
                            self.dist.is_main and self.verbosity > 0)
        progress.postfix = lambda: self._averages(totals)
        first = None
        for data, target in progress:
            data, target = data.to(self.device, non_blocking=True), target.to(self.device, non_blocking=True)
            with self.autocast:
                output = model(data)
                loss = self.criterion(output, target)
            self._accumulate(totals, loss, output, target)
            if first is None:
                first = (data, target, output)
        self._log_batch_views(epoch, "val", self.valid_data_loader, first)
        return self._averages(totals, reduce=True)

    def _log_batch_views(self, epoch: int, split: str, loader, batch) -> None:
        """Once per epoch, from a batch already computed (no extra forward pass or data loading): a grid of
        inputs captioned with true and predicted labels; in the first epoch also the model graph."""
        if batch is None or not self.writer.enabled:
            return
        data, target, output = batch
        if self.images:
            self.writer.add_sample_grid(f"samples/{split}", data, target, output, self.global_step,
                                        classes=class_names(loader))
        if epoch == 1:
            self.writer.add_model_graph(unwrap_model(self.model), data[:2])
