"""The epoch loop: monitoring, early stopping, checkpoints, exact resume and stop signals.

trainer.trainer.Trainer implements the loop within an epoch; a task overrides its `step(batch)`
(README: Your own training step) and extends a run through the five hook methods named after the
steps of the loop (README: Extending the loop).
"""
from __future__ import annotations

import math
import re
import time
from abc import ABCMeta, abstractmethod
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from checkpoint import (CHECKPOINT_FORMAT, capture_rng, link_checkpoint, load_model_state, restore_rng,
                        save_checkpoint, unwrap_model)
from checkpoint.sharded import ShardedSaver, load_into as load_sharded_into
from data_loader.sampler import mix_seed
from errors import Interrupted, TrainingError
from logger import NullWriter, get_logger
from logger.console import epoch_lines, number
from logger.epoch_log import CsvLogger, EpochLogger, EpochRecord
from runtime.distributed import DistContext, all_reduce


class BaseTrainer(metaclass=ABCMeta):
    def __init__(self, model, criterion, metric_fns, optimizer, config: dict, device: torch.device,
                 data_loader, valid_data_loader=None, lr_scheduler=None, run_dir: str | Path | None = None,
                 writer=None, dist: DistContext | None = None, stop_signal=None):
        self.model, self.criterion, self.metric_fns = model, criterion, list(metric_fns)
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.config, self.device = config, device
        self.data_loader, self.valid_data_loader = data_loader, valid_data_loader
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.checkpoint_dir = self.run_dir / "checkpoints" if self.run_dir is not None else None
        self.writer = writer if writer is not None else NullWriter()
        self.dist = dist or DistContext()
        self.stop_signal = stop_signal
        self.logger = get_logger()

        cfg = config["trainer"]
        self.epochs = cfg["epochs"]
        self.save_period, self.keep_last = cfg["save_period"], cfg["keep_last"]
        self.early_stop = cfg["early_stop"]
        self.sharded_checkpoints = cfg.get("strategy") == "fsdp"  # checkpoint/sharded.py: directories, via DCP
        # Sharded saves finish in the background: wait_for_checkpoint() before anything that needs them on disk.
        self.sharded_saver = ShardedSaver() if self.sharded_checkpoints else None
        self.verbosity = cfg["verbosity"]
        if cfg["monitor"] == "off":
            self.monitor_mode, self.monitor_metric = "off", None
            self.monitor_best = 0.0
        else:
            self.monitor_mode, self.monitor_metric = cfg["monitor"].split()
            self.monitor_best = math.inf if self.monitor_mode == "min" else -math.inf
        self.scheduler_interval = (config.get("lr_scheduler") or {}).get("interval", "epoch")

        # Position: `epoch` is the epoch in progress; `batch_in_epoch` batches (this process) and
        # `samples_in_epoch` samples (all processes) of it are done.
        self.start_epoch, self.epoch, self.global_step = 1, 1, 0
        self.batch_in_epoch = self.samples_in_epoch = 0
        self.epoch_running = False  # inside an epoch's training loop: a checkpoint holds its running sums
        self.resumed_epoch_state: list[dict] | None = None  # those sums from a mid-epoch checkpoint
        self.not_improved_count, self.best_epoch = 0, 0
        self.last_metrics: dict[str, float] = {}  # the last finished epoch's values, kept in checkpoints
        self.should_stop = False  # set by a hook or callback: end the run cleanly after this epoch's checkpoint
        self.last_step_lrs: list[float] | None = None  # the rates of the last step, before a per-step scheduler moved them
        self.callbacks: list = []  # objects with the hook methods below (trainer/callbacks.py)
        self._drawer: ThreadPoolExecutor | None = None  # see draw_aside
        self._drawing: Future | None = None
        # Per-epoch sinks, each handed the same EpochRecord: metrics.csv (trainer.loggers csv; main process, with
        # a run directory) and the writer (TensorBoard and/or MLflow, logger/writers.py).
        main_with_dir = self.run_dir is not None and self.dist.is_main
        csv = main_with_dir and "csv" in cfg["loggers"]
        self.metrics_csv = CsvLogger(self.run_dir / "metrics.csv") if csv else None
        self.epoch_logs: list[EpochLogger] = [s for s in (self.metrics_csv, self.writer) if s is not None]

    # ---- hooks: override in a subclass (trainer.type) to extend the loop -------------------------
    def on_train_start(self) -> None: ...
    def on_epoch_start(self, epoch: int) -> None: ...
    def on_batch_end(self, batch_idx: int, loss: torch.Tensor) -> None: ...  # after each optimizer step
    def on_validation_end(self, epoch: int, result: dict) -> None: ...
    def on_train_end(self) -> None: ...

    def _hook(self, name: str, *args) -> None:
        """The trainer's own hook method, then each callback's (which also receives the trainer)."""
        getattr(self, name)(*args)
        for callback in self.callbacks:
            getattr(callback, name)(self, *args)

    @abstractmethod
    def step(self, batch) -> dict:
        """One batch on the device -> {"loss": ..., "output": ..., "target": ...} (see trainer.Trainer)."""

    @abstractmethod
    def epoch_state(self) -> dict | None:
        """The running sums of the epoch in progress as plain data (None between epochs)."""

    @abstractmethod
    def _train_epoch(self, epoch: int) -> dict:
        """Train one epoch (from `batch_in_epoch` on); return {metric name: average}."""

    @abstractmethod
    def _valid_epoch(self, epoch: int) -> dict:
        """Evaluate on the validation split; return {metric name: average} (without the val_ prefix)."""

    # ---- the loop -------------------------------------------------------------------------------
    def train(self) -> dict:
        self._hook("on_train_start")
        early_stopped, epochs_run, status = False, 0, "failed"
        try:
            self._start_epoch_logs()
            for epoch in range(self.start_epoch, self.epochs + 1):
                self.epoch = epoch
                self._hook("on_epoch_start", epoch)
                started = time.perf_counter()
                result = self._train_epoch(epoch)
                if self.valid_data_loader is not None:
                    result.update({f"val_{k}": v for k, v in self._valid_epoch(epoch).items()})
                self._hook("on_validation_end", epoch, result)
                lrs = self.lrs_in_force()  # before the scheduler moves them: the rates this epoch trained with
                self._step_epoch_scheduler(result)
                improved = self._update_monitor(result)
                self._log_epoch(epoch, result, time.perf_counter() - started, improved, lrs)
                self.last_metrics = {key: float(value) for key, value in result.items()}
                self.batch_in_epoch = self.samples_in_epoch = 0
                self._save_epoch(epoch, improved)
                epochs_run += 1
                if self._stop_requested():
                    self.wait_for_checkpoint()  # the resume point is on disk before the run says so
                    if self.stop_signal is not None:
                        self.stop_signal.finish()  # saved: a further signal has nothing left to stop
                    raise Interrupted(self.stop_signal.signum, f"stopped by signal at epoch {epoch} end; "
                                                               f"checkpoint saved")
                if self.should_stop:  # e.g. a pruned sweep trial: stopped like early stopping, checkpoint saved
                    early_stopped = True
                    break
                if self.early_stop and self.not_improved_count >= self.early_stop:
                    self.logger.info(f"early stopping: {self.monitor_metric} did not improve for "
                                     f"{self.early_stop} epoch{'s' if self.early_stop != 1 else ''}")
                    early_stopped = True
                    break
            self.wait_for_checkpoint()  # the last checkpoint is on disk before the run counts as finished
            status = "early-stopped" if early_stopped else "finished"
        except (Interrupted, KeyboardInterrupt):
            status = "interrupted"
            raise
        finally:
            self._finish_pending_save()  # (a further Ctrl-C interrupts the wait; the save is atomic all the same)
            self._hook("on_train_end")
            self._end_epoch_logs(status)
            self._wait_for_drawing(raise_error=False)  # pending only when the run failed: that error goes on
            self.writer.flush()
        return {"best_epoch": self.best_epoch, "monitor_best": self.monitor_best, "early_stopped": early_stopped,
                "epochs_run": epochs_run}

    def _step_epoch_scheduler(self, result: dict) -> None:
        if self.lr_scheduler is None or self.scheduler_interval != "epoch":
            return
        if isinstance(self.lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.lr_scheduler.step(result[self.plateau_metric(result)])
        else:
            self.lr_scheduler.step()

    def plateau_metric(self, result: dict) -> str:
        return self.monitor_metric or ("val_loss" if "val_loss" in result else "loss")

    def _update_monitor(self, result: dict) -> bool:
        if self.monitor_mode == "off":
            return False
        value = result[self.monitor_metric]
        improved = value < self.monitor_best if self.monitor_mode == "min" else value > self.monitor_best
        if improved:
            self.monitor_best, self.best_epoch, self.not_improved_count = float(value), self.epoch, 0
        else:
            self.not_improved_count += 1
        return improved

    def lrs_in_force(self) -> list[float]:
        """Each parameter group's learning rate in force at the epoch's last step (a scheduler stepped every
        optimizer step has already moved the groups on by one: Trainer keeps the rate before)."""
        if self.scheduler_interval == "step" and self.last_step_lrs is not None:
            return list(self.last_step_lrs)
        return [group["lr"] for group in self.optimizer.param_groups]

    def _log_epoch(self, epoch: int, result: dict, seconds: float, improved: bool, lrs: list[float]) -> None:
        train = {k: v for k, v in result.items() if not k.startswith("val_")}
        val = {k[4:]: v for k, v in result.items() if k.startswith("val_")}
        for line in epoch_lines(epoch, self.epochs, train, val, seconds, improved):
            self.logger.info(line)
        monitoring = self.monitor_mode != "off"
        record = EpochRecord(epoch, self.global_step, time.time(), seconds, lrs, train, val,
                             self.monitor_metric if monitoring else None,
                             self.monitor_best if monitoring and self.best_epoch else None, self.best_epoch, improved)
        for sink in self.epoch_logs:
            sink.log_epoch(record)  # before the epoch's checkpoint: a kill between the two redoes the epoch

    def _start_epoch_logs(self) -> None:
        """Every sink forgets what a killed session wrote after the checkpoint this session continues from;
        a resume shows the best and newest values again in the HParams view."""
        completed = self.start_epoch - 1  # epochs the checkpoint holds whole (a mid-epoch one: those before it)
        for sink in self.epoch_logs:
            sink.start(completed)
        if not completed or not self.writer.enabled:
            return
        values = dict(self.last_metrics)  # the checkpointed epoch's values
        validated = {k: v for k, v in values.items() if k.startswith("val_")}
        final = validated or values
        if self.monitor_mode != "off" and self.best_epoch:
            final[f"best_{self.monitor_metric}"] = self.monitor_best
        if final:
            self.writer.set_summary(final, self.global_step)

    def _end_epoch_logs(self, status: str) -> None:
        """How the session ended goes to the HParams view and MLflow's run status; a failure to write it must
        not hide the run's own error (the caller re-raises that)."""
        try:
            self.writer.record_status(status)
        except OSError as exc:
            self.logger.warning(f"warning: could not record the run's status in TensorBoard: {exc}")
        for sink in self.epoch_logs:
            if sink is not self.writer:  # the caller closes the writer, after its last flush
                sink.close()

    def _stop_requested(self) -> bool:
        """True on every rank as soon as any rank received SIGINT/SIGTERM (one all-reduce)."""
        local = self.stop_signal is not None and self.stop_signal.requested
        if not self.dist.enabled:
            return local
        flag = torch.tensor([1.0 if local else 0.0], device=self.device)  # NCCL serves device tensors only
        all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and self.stop_signal is not None and self.stop_signal.signum is None:
            import signal

            self.stop_signal.signum = signal.SIGTERM
        return bool(flag.item())

    # ---- checkpoints ----------------------------------------------------------------------------
    def checkpoint_state(self, epoch_finished: bool) -> dict:
        """The whole run state as plain data. A collective call under DDP (gathers per-rank RNG)."""
        rank_state = {"rng": capture_rng(), "epoch_totals": self.epoch_state()}
        if self.dist.enabled:
            ranks = [None] * self.dist.world_size
            torch.distributed.all_gather_object(ranks, rank_state)
        else:
            ranks = [rank_state]
        scaler = getattr(self, "scaler", None)
        return {
            "format": CHECKPOINT_FORMAT,
            "torch_version": str(torch.__version__),
            "arch": type(unwrap_model(self.model)).__name__,
            "config": self.config,
            "state_dict": unwrap_model(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
            "epoch": self.epoch,
            "epoch_finished": epoch_finished,
            "batch_in_epoch": self.batch_in_epoch,
            "samples_in_epoch": self.samples_in_epoch,
            "global_step": self.global_step,
            "monitor_best": self.monitor_best,
            "not_improved_count": self.not_improved_count,
            "best_epoch": self.best_epoch,
            "data_order": {"seed": self.config["seed"], "epoch": self.epoch, "samples_in_epoch": self.samples_in_epoch},
            "world_size": self.dist.world_size,
            "ranks": ranks,
            "metrics": dict(self.last_metrics),
        }

    def wait_for_checkpoint(self) -> Path | None:
        """A sharded save finishes in the background: block until its directory and pointers are on disk (a
        no-op otherwise). Raises TrainingError on every rank when that save failed."""
        return self.sharded_saver.wait() if self.sharded_saver is not None else None

    def _finish_pending_save(self) -> None:
        """However the loop ended: a save still in progress (of a state that passed the checks) is finished;
        after a failure its own failure is a warning, the run's error being the one to report."""
        try:
            self.wait_for_checkpoint()
        except TrainingError as exc:
            self.logger.warning(f"warning: {exc}")

    def _write(self, state: dict, name: str) -> Path | None:
        if not self.dist.is_main or self.checkpoint_dir is None:
            self._wait_for_drawing()
            return None
        self.flush_logs()
        path = save_checkpoint(state, self.checkpoint_dir / name)
        self.logger.debug(f"saved {path}")
        return path

    def flush_logs(self) -> None:
        """Before every checkpoint: everything logged up to this step reaches disk before the checkpoint claims
        the step (a resume hides TensorBoard events after the step, purge_step, and must find none missing
        before), the epoch's pictures included (draw_aside)."""
        self._wait_for_drawing()
        self.writer.flush()

    def draw_aside(self, draw: Callable[[], None]) -> None:
        """Run `draw` (the epoch's histograms and sample picture) on a thread of its own while the loop goes on
        to the epoch's metrics, validation, log lines and checkpoint state; flush_logs waits for it, and
        raises its error. On the MLP of bench/overhead.py the end of an epoch became ~5% shorter (paired rounds,
        on a loaded machine): the tensor operations, the PNG's deflate and the fsync of metrics.csv meanwhile
        run without the GIL; the Python parts of the two threads take turns."""
        self._wait_for_drawing()
        if self._drawer is None:
            self._drawer = ThreadPoolExecutor(1, thread_name_prefix="draw-epoch")
        self._drawing = self._drawer.submit(draw)

    def _wait_for_drawing(self, raise_error: bool = True) -> None:
        drawing, self._drawing = self._drawing, None
        error = drawing.exception() if drawing is not None else None  # waits for it to end
        if error is not None and raise_error:
            raise error

    def save_mid_epoch(self) -> None:
        if self.sharded_checkpoints:
            self.sharded_saver.save(self, ["last"], epoch_finished=False)
            return
        self._write(self.checkpoint_state(epoch_finished=False), "last.pth")

    def _save_epoch(self, epoch: int, improved: bool) -> None:
        # last.pth is named last: until it says the epoch ended, a resume redoes the epoch's end and
        # rewrites epoch-N/best, so a kill between the names never leaves those stale.
        if self.sharded_checkpoints:  # one directory epoch-<N>; kept as keep_last says, or while a pointer names it
            message = f"saved best checkpoint ({self.monitor_metric} {self.monitor_best:.4f})" if improved else None
            self.sharded_saver.save(self, ["best", "last"] if improved else ["last"], epoch_finished=True,
                                    message=message)
            return
        names = [f"epoch-{epoch}.pth"] if self.save_period and epoch % self.save_period == 0 else []
        names += ["best.pth"] if improved else []
        names.append("last.pth")
        first = self._write(self.checkpoint_state(epoch_finished=True), names[0])
        if first is None:
            return
        for name in names[1:]:
            link_checkpoint(first, self.checkpoint_dir / name)
        if improved:
            self.logger.debug(f"saved best checkpoint ({self.monitor_metric} {number(self.monitor_best)})")
        self._prune_periodic()

    def _prune_periodic(self) -> None:
        if not self.keep_last:
            return
        numbered = [(int(m.group(1)), p) for p in self.checkpoint_dir.glob("epoch-*.pth")
                    if (m := re.fullmatch(r"epoch-(\d+)\.pth", p.name))]
        for _, old in sorted(numbered)[: -self.keep_last]:
            old.unlink(missing_ok=True)  # best.pth, a link to the same file, keeps it alive if needed

    def resume(self, state: dict, source: str = "resume checkpoint") -> None:
        """Continue exactly where `state` (a loaded checkpoint) stopped."""
        if isinstance(state.get("sharded"), dict):  # a verified checkpoint directory (checkpoint/sharded.py)
            load_sharded_into(self.model, self.optimizer, state["sharded"])
        else:
            load_model_state(self.model, state["state_dict"], strict=True, source=source)
            self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and state["lr_scheduler"] is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        scaler = getattr(self, "scaler", None)
        if scaler is not None and scaler.is_enabled() and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.monitor_best, self.not_improved_count = state["monitor_best"], state["not_improved_count"]
        self.best_epoch = state["best_epoch"]
        self.last_metrics = dict(state.get("metrics") or {})
        if state["epoch_finished"]:
            self.start_epoch = self.epoch + 1
        else:
            self.start_epoch = self.epoch
            self.batch_in_epoch, self.samples_in_epoch = state["batch_in_epoch"], state["samples_in_epoch"]
        ranks = state["ranks"]
        running = [] if state["epoch_finished"] else [epoch_totals_v2(r["epoch_totals"]) for r in ranks
                                                      if r["epoch_totals"] is not None]
        if len(ranks) == self.dist.world_size:
            mine = ranks[self.dist.rank]
            restore_rng(mine["rng"])
            self.resumed_epoch_state = [epoch_totals_v2(mine["epoch_totals"])] if running else None
        else:
            # A different number of processes: RNG streams cannot carry over; derive new ones, and
            # merge the epoch's running sums on rank 0 so its epoch values stay right.
            torch.manual_seed(mix_seed(self.config["seed"], self.dist.rank, self.global_step))
            self.resumed_epoch_state = running if running and self.dist.is_main else None
            self.logger.warning(f"resuming a {len(ranks)}-process checkpoint with {self.dist.world_size} "
                                f"process(es): the data order is kept, random streams start anew")
        where = "end" if state["epoch_finished"] else f"batch {self.batch_in_epoch}"
        self.logger.info(f"resumed at epoch {self.epoch} {where}, step {self.global_step}")


def epoch_totals_v2(totals: dict) -> dict:
    """A mid-epoch checkpoint's running sums in today's layout (trainer.metrics.EpochMetrics.state). Format 1
    kept {"loss", "n", <metric>..., "n_metrics"}: function-metric sums, all over the same sampled batches."""
    if "functions" in totals:
        return totals
    functions = {k: {"total": v, "count": totals["n_metrics"]} for k, v in totals.items()
                 if k not in ("loss", "n", "n_metrics")}
    return {"loss": {"total": totals["loss"], "count": totals["n"]}, "functions": functions, "objects": {}}

