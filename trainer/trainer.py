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
        self.autocast = contextlib.nullcontext() if amp == "off" else torch.autocast(
            self.device.type, dtype=torch.float16 if amp == "fp16" else torch.bfloat16)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")
        self.metric_names = ["loss"] + [fn.__name__ for fn in self.metric_fns]
        self.histograms = cfg["histograms"] and self.writer.enabled
        self.images = cfg["images"] and self.writer.enabled
        self.callbacks = build_callbacks(self.config, unwrap_model(self.model))
        self.params = list(self.model.parameters())
        self._found_inf = torch.zeros((), device=self.device)  # buffers of the per-step NaN guard
        self._one = torch.ones((), device=self.device)
        self._pending_flags = None  # under DDP: the all-reduce of the last step's flags, in flight

    def _new_totals(self) -> dict:
        """Running sums of an epoch: `loss` over every sample, metrics over the sampled batches."""
        totals = {name: torch.zeros((), dtype=torch.float64, device=self.device) for name in self.metric_names}
        return {**totals, "n": 0, "n_metrics": 0}

    def _accumulate(self, totals: dict, loss: torch.Tensor, output: torch.Tensor, target: torch.Tensor,
                    with_metrics: bool = True) -> None:
        # Weighted by batch size and kept on the device: the host syncs once per epoch, not per step.
        n = target.shape[0]
        totals["loss"].add_(loss.detach(), alpha=n)
        totals["n"] += n
        if with_metrics and self.metric_fns:
            for fn in self.metric_fns:
                totals[fn.__name__].add_(fn(output, target), alpha=n)
            totals["n_metrics"] += n

    def _averages(self, totals: dict, reduce: bool = False) -> dict:
        sums = torch.stack([totals[k] for k in self.metric_names])
        counts = torch.tensor([totals["n"], totals["n_metrics"]], dtype=torch.float64, device=self.device)
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
        started, samples = time.perf_counter(), 0
        output = None
        for data, target in progress:
            data, target = data.to(self.device, non_blocking=True), target.to(self.device, non_blocking=True)
            group_start = self.batch_in_epoch - self.batch_in_epoch % self.accumulate
            group_size = min(self.accumulate, total - group_start)  # the last group of an epoch may be short
            last_in_group = self.batch_in_epoch + 1 == group_start + group_size
            if self.batch_in_epoch == group_start:
                self.optimizer.zero_grad(set_to_none=True)
            with self._no_sync(not last_in_group), self.autocast:
                output = self.model(data)
                loss = self.criterion(output, target)
            # Dividing by the group size makes k micro-batches of b the same update as one batch of k*b.
            self.scaler.scale(loss / group_size if group_size > 1 else loss).backward()
            self._accumulate(totals, loss, output.detach(), target, self.batch_in_epoch % metric_every == 0)
            self.batch_in_epoch += 1
            self.samples_in_epoch += target.shape[0] * self.dist.world_size
            samples += target.shape[0]
            if last_in_group:
                stop = self._optimizer_step(totals["loss"])
                self._hook("on_batch_end", self.batch_in_epoch - 1, loss)
                if self.global_step % self.log_every == 0:
                    self.writer.add_scalar("loss/train_step", loss.detach(), self.global_step)
                if stop:
                    self._stop_now(epoch)
                if self.save_every and self.global_step % self.save_every == 0 and self.batch_in_epoch < total:
                    self.save_mid_epoch()
        seconds = time.perf_counter() - started
        loss_nonfinite, stop = self._settle(self._pending_flags)  # the epoch's last step, under DDP
        self._pending_flags = None
        if loss_nonfinite:
            self._raise_nonfinite(loss=True, step=self.global_step)
        if stop:
            self._stop_now(epoch)
        self.writer.add_scalar("throughput/train_samples_per_s", samples * self.dist.world_size / max(seconds, 1e-9),
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
        self._settle(self._pending_flags)  # every rank started it: finish it before saving
        self._pending_flags = None
        self.save_mid_epoch()
        raise Interrupted(self.stop_signal.signum,
                          f"stopped by signal at epoch {epoch}, step {self.global_step}; checkpoint saved")

    def _no_sync(self, skip_allreduce: bool):
        """Under DDP, micro-batches before the last of an accumulation group skip the gradient all-reduce."""
        if skip_allreduce and self.dist.enabled:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def _optimizer_step(self, loss_sum: torch.Tensor) -> bool:
        """Unscale, clip, check, step. Returns whether to stop now (a signal reached any rank)."""
        self.scaler.unscale_(self.optimizer)  # clip and check true gradients (a no-op without fp16)
        params = [p for p in self.params if p.grad is not None]
        grads = [p.grad for p in params]
        log_now = (self.global_step + 1) % self.log_every == 0
        # The total norm costs several kernels: computed only to clip by it or to log it (before clipping).
        grad_norm = torch.nn.utils.get_total_norm(grads) if log_now or self.clip_norm is not None else None
        if self.clip_value is not None:
            torch.nn.utils.clip_grad_value_(params, self.clip_value)
        if self.clip_norm is not None:
            clip_from = grad_norm if self.clip_value is None else torch.nn.utils.get_total_norm(grads)
            torch.nn.utils.clip_grads_with_norm_(params, self.clip_norm, clip_from)
        # NaN guard, one fused kernel over all gradients (the one GradScaler uses; scale 1 leaves them
        # unchanged). The epoch's loss sum turns non-finite with the first non-finite loss. With fp16
        # the GradScaler itself skips steps whose gradients overflow: that is not an error.
        grads_bad = self._found_inf.zero_()
        if not self.scaler.is_enabled() and grads:
            torch._amp_foreach_non_finite_check_and_unscale_(grads, grads_bad, self._one)
        stop = self.stop_signal is not None and self.stop_signal.requested
        grads_nonfinite, loss_nonfinite = bool(grads_bad.item()), not math.isfinite(loss_sum.item())
        step = self.global_step + 1  # the step about to be taken
        if self.dist.enabled:
            # After DDP's all-reduce the gradients are the same on every rank, so their check agrees
            # without communication. The rank-local facts (a non-finite loss, a signal) travel in an
            # all-reduce that overlaps the next step, and every rank acts on them one step later.
            (loss_nonfinite, stop), step = self._exchange_flags(loss_nonfinite, stop), self.global_step
        if loss_nonfinite and step > self.global_step:  # a non-finite loss explains non-finite gradients
            self._raise_nonfinite(loss=True, step=step)
        if grads_nonfinite:
            self._raise_nonfinite(loss=False, step=self.global_step + 1)
        if loss_nonfinite:
            self._raise_nonfinite(loss=True, step=step)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.lr_scheduler is not None and self.scheduler_interval == "step":
            self.lr_scheduler.step()
        self.global_step += 1
        if log_now:
            self.writer.add_scalar("grad_norm/train_step", grad_norm, self.global_step)
            for i, group in enumerate(self.optimizer.param_groups):
                self.writer.add_scalar(f"lr/group{i}_step", group["lr"], self.global_step)
        return stop

    def _exchange_flags(self, loss_nonfinite: bool, stop: bool) -> tuple[bool, bool]:
        """Start the all-reduce of this step's (loss non-finite, stop) and return the previous step's."""
        flags = torch.tensor([float(loss_nonfinite), float(stop)], dtype=torch.float64, device=self.device)
        previous = self._pending_flags
        self._pending_flags = (flags, torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX,
                                                                   async_op=True))
        return self._settle(previous)

    def _settle(self, pending) -> tuple[bool, bool]:
        if pending is None:
            return False, False
        flags, work = pending
        work.wait()
        loss_nonfinite, stop = (bool(f) for f in flags.tolist())
        if stop and self.stop_signal is not None and self.stop_signal.signum is None:
            self.stop_signal.signum = signal.SIGTERM  # another rank was signalled
        return loss_nonfinite, stop

    def _raise_nonfinite(self, loss: bool, step: int) -> None:
        kept = "checkpoints on disk are from before it"
        if loss:
            raise TrainingError(f"non-finite loss at step {step} (epoch {self.epoch}); {kept}")
        for name, param in unwrap_model(self.model).named_parameters():
            if param.grad is not None and not torch.isfinite(param.grad).all():
                raise TrainingError(f"non-finite gradient at step {step} (epoch {self.epoch}) in parameter "
                                    f"{name!r}; {kept}")
        raise TrainingError(f"non-finite gradient norm at step {step} (epoch {self.epoch}); {kept}")

    def checkpoint_state(self, epoch_finished: bool) -> dict:
        # Finite gradients can still make non-finite weights (a learning rate far too large): such a
        # state must never replace the last good checkpoint. One host sync per save.
        params = list(unwrap_model(self.model).named_parameters())
        if not torch.stack([torch.isfinite(p.detach()).all() for _, p in params]).all().item():
            name = next(n for n, p in params if not torch.isfinite(p.detach()).all())
            raise TrainingError(f"non-finite weights after step {self.global_step} (epoch {self.epoch}) in "
                                f"parameter {name!r} (learning rate far too large?); checkpoints on disk are from "
                                f"before it")
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
