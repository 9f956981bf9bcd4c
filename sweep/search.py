"""Optuna searches (`--sweep-trials N`): TPE sampling over the --sweep ranges, median pruning, the
study in `study.db` (SQLite) in the sweep directory.

The sweep process asks the study for a trial and runs it as a child train.py (run directory
`trial-<number>`). The child reports the monitored value at every epoch end to the same trial
(`TrialReport`, a callback the trainer adds when the sweep's environment names a trial) and ends
cleanly, checkpoint saved and exit 0, when the pruner says so. The sweep then tells the study how
the trial ended. A killed search leaves its trial RUNNING in the study: the resume continues that
trial's run from its checkpoint (or starts it, without one), so no trial is lost or run twice.
"""
from __future__ import annotations

import os
from pathlib import Path

from errors import UserError
from sweep.runner import Forwarder, finish, read_rows, row_from_csv, run_one, stopped, write_rows
from sweep.spec import Axis
from trainer.callbacks import Callback

STUDY_NAME = "sweep"
ENV_STORAGE, ENV_STUDY, ENV_TRIAL = "SWEEP_OPTUNA_STORAGE", "SWEEP_OPTUNA_STUDY", "SWEEP_OPTUNA_TRIAL_ID"
PRUNED_ATTR = "pruned_at_epoch"
STARTUP_TRIALS = 2  # completed trials before the median pruner prunes anything


def plan_search(axes: list[Axis], trials: int, base: dict) -> dict:
    """The search part of sweep.yaml, and the combinations to validate before anything is written:
    every choice and both ends of every range, the other keys at their first value."""
    if not axes:
        raise UserError("--sweep-trials: give the ranges to search with --sweep, e.g. "
                        "--sweep optimizer.args.lr=log(1e-4,1e-1) arch.args.hidden=int(16,128)")
    if base["trainer"]["monitor"] == "off":
        raise UserError("--sweep-trials: a search optimises the monitored metric: set trainer.monitor "
                        "(e.g. trainer.monitor='max val_accuracy')")
    _optuna()
    first = {axis.key: axis.values[0] for axis in axes}
    checks = [first] + [{**first, axis.key: value} for axis in axes for value in axis.values[1:]]
    mode = base["trainer"]["monitor"].split()[0]
    return {"kind": "search", "runs": [], "checks": checks,
            "search": {"trials": trials, "seed": base["seed"], "direction": "maximize" if mode == "max" else "minimize",
                       "axes": [{"key": a.key, "kind": a.kind, "values": list(a.values)} for a in axes]}}


def _optuna():
    try:
        import optuna
    except ImportError:
        raise UserError("--sweep-trials needs Optuna: pip install -r requirements-extra.txt (or pip install optuna)") \
            from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _distributions(search: dict) -> dict:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from config.files import parse_scalar

    out = {}
    for axis in search["axes"]:
        if axis["kind"] == "list":
            out[axis["key"]] = CategoricalDistribution(list(axis["values"]))
        else:
            low, high = (parse_scalar(v) for v in axis["values"])
            out[axis["key"]] = IntDistribution(low, high) if axis["kind"] == "int" else \
                FloatDistribution(float(low), float(high), log=axis["kind"] == "log")
    return out


def _text(value) -> str:
    return value if isinstance(value, str) else repr(value)


def run_search(sweep_dir: Path, spec: dict, forwarder: Forwarder, env: dict | None = None) -> int:
    """`env`: the trials' environment (None: this process's), to which the study's names are added."""
    optuna = _optuna()
    from optuna.trial import TrialState

    search = spec["search"]
    storage = f"sqlite:///{sweep_dir / 'study.db'}"
    existing = _study(optuna, storage, search, None)
    # Seeded from the seed and the trials so far: a resumed search draws new points, reproducibly.
    sampler = optuna.samplers.TPESampler(seed=(search["seed"] * 1_000_003 + len(existing.trials)) % 2**32)
    study = _study(optuna, storage, search, sampler)
    distributions = _distributions(search)
    records = read_rows(sweep_dir)
    rows: list[dict] = []
    trial_ids: dict[str, int] = {}

    def add_row(trial) -> dict:
        run = {"run_id": f"trial-{trial.number:03d}", "values": {k: _text(trial.params[k]) for k in spec["keys"]}}
        row = row_from_csv(records.get(run["run_id"]), run, spec.get("monitor"))
        if trial.state == TrialState.PRUNED:
            row["status"] = "pruned"
        elif trial.state == TrialState.COMPLETE:
            row["status"] = "finished"
        elif trial.state == TrialState.FAIL:
            row["status"] = "failed"
        rows.append(row)
        trial_ids[row["run_id"]] = trial._trial_id
        return row

    for trial in study.get_trials(deepcopy=False):
        add_row(trial)
    write_rows(sweep_dir, spec["keys"], rows, spec.get("monitor"))

    def run_trial(row: dict, number: int) -> None:
        if forwarder.signum is not None:
            raise stopped(forwarder, sweep_dir)
        trial_id = trial_ids[row["run_id"]]
        frozen = study._storage.get_trial(trial_id)
        if PRUNED_ATTR not in frozen.user_attrs:  # else it was pruned, and the sweep killed before it was told
            trial_env = {**(env or os.environ), ENV_STORAGE: storage, ENV_STUDY: STUDY_NAME, ENV_TRIAL: str(trial_id)}
            run_one(sweep_dir, spec, row, forwarder, rows, f"trial {number + 1}/{search['trials']}", env=trial_env)
            if row["status"] == "interrupted":
                raise stopped(forwarder, sweep_dir)  # the trial stays RUNNING: the resume continues it
            frozen = study._storage.get_trial(trial_id)
        if row["status"] == "failed":
            study.tell(number, state=TrialState.FAIL)
        elif PRUNED_ATTR in frozen.user_attrs:
            row["status"] = "pruned"
            study.tell(number, state=TrialState.PRUNED)
        elif row.get("best") is None:
            row["status"] = "failed"
            study.tell(number, state=TrialState.FAIL)
        else:
            row["status"] = "finished"
            study.tell(number, values=row["best"])
        write_rows(sweep_dir, spec["keys"], rows, spec.get("monitor"))
        if forwarder.signum is not None:
            raise stopped(forwarder, sweep_dir)

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):  # left by a killed search
        run_trial(next(r for r in rows if r["run_id"] == f"trial-{trial.number:03d}"), trial.number)
    while len(study.trials) < search["trials"]:
        if forwarder.signum is not None:
            raise stopped(forwarder, sweep_dir)
        trial = study.ask(distributions)
        row = add_row(study._storage.get_trial(trial._trial_id))
        write_rows(sweep_dir, spec["keys"], rows, spec.get("monitor"))
        run_trial(row, trial.number)
    code = finish(sweep_dir, spec, rows)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if done:
        best = study.best_trial
        print(f"best trial: trial-{best.number:03d} ({spec['monitor']} {best.value:.4f}): "
              + " ".join(f"{k}={_text(v)}" for k, v in best.params.items()))
    counts = {state: sum(t.state == state for t in study.trials) for state in (TrialState.COMPLETE, TrialState.PRUNED,
                                                                                 TrialState.FAIL)}
    print(f"trials: {counts[TrialState.COMPLETE]} finished, {counts[TrialState.PRUNED]} pruned, "
          f"{counts[TrialState.FAIL]} failed; study: {storage}")
    return code


def _study(optuna, storage: str, search: dict, sampler):
    return optuna.create_study(study_name=STUDY_NAME, storage=storage, load_if_exists=True,
                               direction=search["direction"], sampler=sampler,
                               pruner=optuna.pruners.MedianPruner(n_startup_trials=STARTUP_TRIALS))


class TrialReport(Callback):
    """In a trial's run: report the monitored value at every epoch end; when the pruner says so, end
    the run after this epoch's checkpoint (trainer.should_stop; exit 0) and mark the trial pruned.
    Rank 0 talks to the study and every rank takes its decision."""

    def __init__(self, storage: str, study_name: str, trial_id: int):
        self.storage, self.study_name, self.trial_id = storage, study_name, trial_id
        self._trial = None

    @classmethod
    def from_environment(cls) -> "TrialReport | None":
        if not os.environ.get(ENV_TRIAL):
            return None
        return cls(os.environ[ENV_STORAGE], os.environ[ENV_STUDY], int(os.environ[ENV_TRIAL]))

    def trial(self):
        if self._trial is None:  # opened at the first epoch end: building a trainer stays free of side effects
            optuna = _optuna()
            study = optuna.load_study(study_name=self.study_name, storage=self.storage,
                                      pruner=optuna.pruners.MedianPruner(n_startup_trials=STARTUP_TRIALS))
            self._trial = optuna.trial.Trial(study, self.trial_id)
        return self._trial

    def on_validation_end(self, trainer, epoch: int, result: dict) -> None:
        prune = False
        if trainer.dist.is_main and trainer.monitor_metric in result:
            import warnings

            trial = self.trial()
            with warnings.catch_warnings():  # a resume may report an epoch the killed run reported already
                warnings.simplefilter("ignore")
                trial.report(float(result[trainer.monitor_metric]), epoch)
            prune = trial.should_prune()
            if prune:
                trial.set_user_attr(PRUNED_ATTR, epoch)
        if trainer.dist.enabled:
            from runtime.distributed import broadcast_object

            prune = broadcast_object(prune)
        if prune:
            trainer.should_stop = True
            if hasattr(trainer.writer, "set_tag"):  # MLflow shows the trial as finished: say it was pruned
                trainer.writer.set_tag("optuna.pruned_at_epoch", str(epoch))
            trainer.logger.info(f"pruned by the Optuna search at epoch {epoch} ({trainer.monitor_metric} "
                                f"{float(result[trainer.monitor_metric]):.4f}); stopping after this epoch's checkpoint")
