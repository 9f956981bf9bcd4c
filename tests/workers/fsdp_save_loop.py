"""Run by tests/test_fsdp.py: kill -9 at random moments during sharded saves, and check what is left.

For each trial a forked child saves sharded checkpoints in a loop (one process, DCP without a process group)
until the parent kills it with SIGKILL after a random delay. Saves are asynchronous (ShardedSaver): while
one is written, hashed, renamed and pointed at in the background, the loop already sets the parameters to
the next step, then waits for it before the next save. Before the save of step s every parameter holds s and
global_step is s, so a checkpoint that loads must hold one value throughout, equal to its step (a save that
wrote the parameters after the loop changed them would hold s + 1). The parent then checks what a resume
would pick (`last`, else the newest valid directory) and every other complete directory, and whether a
save was in flight (a `.tmp-` directory left); it writes one result per trial to <out>/results.json."""
from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from checkpoint.sharded import TEMP_DIR, _named_dirs, find_sharded, load_into, load_sharded_state  # noqa: E402
from errors import CheckpointError  # noqa: E402
from test_tasks import blobs, build, make_config  # noqa: E402


def model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 2048), nn.ReLU(), nn.Linear(2048, 256), nn.ReLU(), nn.Linear(256, 3))


def save_forever(trainer) -> None:
    step = 0
    while True:
        step += 1
        with torch.no_grad():
            for p in trainer.model.parameters():
                p.fill_(float(step))
        trainer.global_step, trainer.epoch = step, step
        # Returns once the state is copied; the next loop's fill_ runs while the files are written.
        trainer.sharded_saver.save(trainer, ["best", "last"] if step % 3 == 0 else ["last"],
                                   epoch_finished=step % 2 == 0)


def holds_its_step(state: dict) -> bool:
    net = model()
    load_into(net, torch.optim.SGD(net.parameters(), lr=0.1), state["sharded"])
    return all(bool((p == float(state["global_step"])).all()) for p in net.parameters())


def check(checkpoints: Path) -> dict:
    result = {"resumable": None, "wrong": [], "refused": 0,
              "in_flight": checkpoints.is_dir() and any(TEMP_DIR.fullmatch(n) for n in os.listdir(checkpoints))}
    if not (checkpoints / "last").exists():
        return result  # killed before the first save was complete: the run has nothing to resume
    try:
        folder, state, _ = find_sharded(checkpoints)
    except CheckpointError as exc:
        result["wrong"].append(f"no resumable checkpoint: {exc}")
        return result
    result["resumable"] = folder.name
    if not holds_its_step(state):
        result["wrong"].append(folder.name)
    for other in _named_dirs(checkpoints):
        try:
            if not holds_its_step(load_sharded_state(other)):
                result["wrong"].append(other.name)
        except CheckpointError:
            result["refused"] += 1
    return result


def main() -> None:
    out, trials, seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    config = make_config(out, [], strategy="fsdp", keep_last=2, save_period=1)
    trainer = build(config, blobs(16), model=model(), run_dir=out)
    rng, results = random.Random(seed), []
    for trial in range(trials):
        trainer.run_dir = out / f"t{trial}"
        trainer.checkpoint_dir = trainer.run_dir / "checkpoints"
        pid = os.fork()
        if pid == 0:
            try:
                save_forever(trainer)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.0, 0.8))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        results.append(check(trainer.checkpoint_dir))
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
