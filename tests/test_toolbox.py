"""The training loop's toolbox (issue 5): init, hooks and callbacks, AMP, accumulation, clipping,
LR schedules, the NaN guard, determinism, torch.compile, and equality with a plain loop.

Most runs go through `train.main` in this process (the real entry point, without paying the
torch import per run) on a tiny MLP over 64 digits; run directories live under tmp_path.
"""
from __future__ import annotations

import logging
import math
import os
import re

import pytest
import torch
import yaml

import train
from conftest import ROOT, run_script
from config import load_config
from config.build import (build_data_loaders, build_loss, build_lr_scheduler, build_metrics, build_model,
                          build_optimizer)
from errors import TrainingError
from logger import make_writer
from runtime.seeding import seed_everything
from trainer.callbacks import Callback
from trainer.trainer import Trainer

N_DIGITS_TRAIN = 1437  # DigitsDataset(train=True); validation_split as a count leaves the rest for training


def tiny(n_train: int = 64, batch_size: int = 16, **trainer) -> dict:
    return {
        "name": "tiny", "seed": 0, "device": "cpu",
        "arch": {"type": "MLP", "args": {"in_features": 64, "hidden": 32, "num_classes": 10, "depth": 2}},
        "data_loader": {"type": "DigitsDataLoader",
                        "args": {"batch_size": batch_size, "validation_split": N_DIGITS_TRAIN - n_train}},
        "optimizer": {"type": "SGD", "args": {"lr": 0.01}},
        "loss": "cross_entropy", "metrics": ["accuracy"],
        "trainer": {"epochs": 1, "verbosity": 0, "monitor": "off", "tensorboard": False, "histograms": False,
                    "images": False, **trainer},
    }


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models on 2 busy cores: intra-op threads cost more than they save (cross_entropy on 16 x 10
    # took 4 ms with 2 threads, 6 us with 1). All runs compared bit for bit here share this setting.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _quiet_logger():
    yield  # in-process runs attach handlers to the "train" logger (tmp files, captured streams): detach them
    logger = logging.getLogger("train")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


def write(tmp_path, config: dict, name: str = "config.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def run(tmp_path, config: dict, *overrides: str, run_id: str = "r") -> tuple[int, object]:
    """train.main in this process; returns (exit status, run directory)."""
    path = write(tmp_path, config, f"{run_id}.yaml")
    code = train.main(["-c", str(path), "--run-id", run_id, f"trainer.save_dir={tmp_path / 'saved'}", *overrides])
    return code, tmp_path / "saved" / config["name"] / run_id


def last(run_dir, name: str = "last.pth") -> dict:
    return torch.load(run_dir / "checkpoints" / name, weights_only=True)


def initial_state(tmp_path, config: dict) -> dict:
    """The model a run starts from: seeded and built as run.py does."""
    seed_everything(config["seed"])
    model = build_model(load_config(write(tmp_path, config, "init.yaml")))
    return {k: v.clone() for k, v in model.state_dict().items()}


def scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """The run's scalars, and those of its train/ and val/ sub-runs as "train/<tag>" and "val/<tag>"."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = {}
    for split in ("", "train", "val"):
        events = EventAccumulator(os.path.join(run_dir, split), size_guidance={"scalars": 0})
        events.Reload()
        found.update({f"{split}/{tag}" if split else tag: [(e.step, e.value) for e in events.Scalars(tag)]
                      for tag in events.Tags()["scalars"]})
    return found


def build_trainer(tmp_path, config: dict, cls=Trainer, tensorboard: bool = False) -> Trainer:
    """The objects run.py builds, from the same builders, handed to `cls` (a Trainer subclass)."""
    config = load_config(write(tmp_path, config, "built.yaml"))
    seed_everything(config["seed"])
    model = build_model(config)
    train_loader, valid_loader = build_data_loaders(config)
    optimizer = build_optimizer(config, model)
    scheduler = build_lr_scheduler(config.get("lr_scheduler"), optimizer)
    run_dir = tmp_path / "built"
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    return cls(model, build_loss(config), build_metrics(config), optimizer, config, torch.device("cpu"),
               train_loader, valid_loader, scheduler, run_dir=run_dir, writer=make_writer(run_dir, tensorboard))


# ---- 1. weight init ------------------------------------------------------------------------------
def test_init_statistics_match_the_scheme():
    from model.init import init_weights

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2048, 1024), torch.nn.Conv2d(64, 128, 3), torch.nn.BatchNorm2d(8),
                                torch.nn.LayerNorm(8))
    with torch.no_grad():  # non-default values, so that resetting them is visible
        for norm in (model[2], model[3]):
            norm.weight.fill_(2.0)
            norm.bias.fill_(3.0)
    init_weights(model, "kaiming_normal")
    for layer, fan_in in ((model[0], 2048), (model[1], 64 * 9)):
        assert layer.weight.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.03)
        assert abs(layer.weight.mean().item()) < 0.1 * math.sqrt(2 / fan_in)
        assert torch.count_nonzero(layer.bias) == 0
    for norm in (model[2], model[3]):
        assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)
    init_weights(model, "xavier_uniform")
    bound = math.sqrt(6 / (2048 + 1024))
    assert model[0].weight.abs().max().item() == pytest.approx(bound, rel=0.01)
    assert model[0].weight.abs().max().item() <= bound


@pytest.mark.parametrize("scheme", ["kaiming_normal", "kaiming_uniform", "xavier_normal", "xavier_uniform", "normal",
                                    "trunc_normal", "orthogonal", "zeros"])
def test_every_init_scheme_builds_deterministically(tmp_path, scheme):
    config = tiny()
    default = initial_state(tmp_path, config)
    config["arch"]["init"] = {"type": scheme, "args": {}}
    first, second = initial_state(tmp_path, config), initial_state(tmp_path, config)
    assert all(torch.equal(first[k], second[k]) for k in first)  # the seed fixes it
    for key, value in first.items():
        if key.endswith("bias"):
            assert torch.count_nonzero(value) == 0
        elif scheme == "zeros":
            assert torch.count_nonzero(value) == 0
        else:
            assert not torch.equal(value, default[key]), f"{scheme} left {key} at the default init"


def test_a_run_trains_the_initialised_weights(tmp_path):
    config = tiny()
    config["optimizer"]["args"]["lr"] = 0.0  # the checkpoint then holds the weights training started from
    config["arch"]["init"] = {"type": "orthogonal", "args": {"gain": 0.5}}
    code, run_dir = run(tmp_path, config)
    assert code == 0
    saved, expected = last(run_dir)["state_dict"], initial_state(tmp_path, config)
    assert all(torch.equal(saved[k], expected[k]) for k in expected)
    assert torch.allclose(saved["net.1.weight"] @ saved["net.1.weight"].T, 0.25 * torch.eye(32), atol=1e-5)


# ---- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("override, words", [
    ("arch.init={type: kaiming_normall}", "kaiming_normal"),
    ("trainer.amp=fp32", "trainer.amp"),
    ("trainer.accumulate_grad_batches=0", "accumulate_grad_batches"),
    ("trainer.amp=fp16", "fp16"),
    ("trainer.freeze={modules: [net.9], until_epoch: 2}", "net.9"),
    ("trainer.watch={modules: [encoder.*]}", "trainer.watch.modules"),
    ("lr_scheduler={type: ReduceLROnPlateau, interval: step}", "interval"),
])
def test_bad_toolbox_input_exits_2_with_one_line_before_training(tmp_path, capsys, override, words):
    code, run_dir = run(tmp_path, tiny(), override)
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error:") and words in err, err
    assert not run_dir.parent.exists()  # nothing written


# ---- 2./3. hooks, callbacks, watch, freeze -------------------------------------------------------
def test_hook_methods_and_callbacks_run_in_loop_order(tmp_path):
    calls = []

    class Recorder(Callback):
        def on_epoch_start(self, trainer, epoch):
            calls.append(("callback epoch", epoch))

    class MyTrainer(Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.callbacks.append(Recorder())

        def on_train_start(self):
            calls.append(("train start",))

        def on_epoch_start(self, epoch):
            calls.append(("epoch", epoch))

        def on_batch_end(self, batch_idx, loss):
            calls.append(("batch", batch_idx, self.global_step))

        def on_validation_end(self, epoch, result):
            calls.append(("validation", epoch, sorted(result)))

        def on_train_end(self):
            calls.append(("train end",))

    build_trainer(tmp_path, tiny(n_train=32, epochs=2), MyTrainer).train()
    metrics = ["accuracy", "loss", "val_accuracy", "val_loss"]
    assert calls == [("train start",),
                     ("epoch", 1), ("callback epoch", 1), ("batch", 0, 1), ("batch", 1, 2), ("validation", 1, metrics),
                     ("epoch", 2), ("callback epoch", 2), ("batch", 0, 3), ("batch", 1, 4), ("validation", 2, metrics),
                     ("train end",)]


def _hook_counts(model) -> dict[str, int]:
    return {name: len(m._forward_hooks) + len(m._backward_hooks) for name, m in model.named_modules()}


@pytest.mark.parametrize("watch", [None, {"modules": ["net.1", "net.2"], "every_steps": 2}])
def test_watch_hooks_only_matching_modules_and_writes_tensorboard(tmp_path, watch):
    seen = {}

    class Spy(Trainer):
        def on_batch_end(self, batch_idx, loss):  # runs before the callbacks: the step's gradients are there
            seen["hooks"] = _hook_counts(self.model)
            layer = self.model.net[1]
            grads = torch.cat([layer.weight.grad.flatten(), layer.bias.grad])
            seen.setdefault("grad_norm", {})[self.global_step] = grads.norm().item()

    trainer = build_trainer(tmp_path, tiny(epochs=2, watch=watch), Spy, tensorboard=True)
    trainer.train()
    trainer.writer.close()
    assert all(count == 0 for count in _hook_counts(trainer.model).values())  # removed at the end
    tags = scalars(trainer.run_dir)
    if watch is None:
        assert all(count == 0 for count in seen["hooks"].values())
        assert not [t for t in tags if t.startswith(("activations/", "gradients/"))]
        return
    assert {name for name, count in seen["hooks"].items() if count} == {"net.1", "net.2"}
    watched = sorted(t for t in tags if t.startswith(("activations/", "gradients/")))
    assert watched == sorted([f"activations/{m}/{s}" for m in ("net.1", "net.2") for s in ("mean", "std",
                                                                                         "zero_fraction")]
                             + ["gradients/net.1/norm"])  # the ReLU has no parameters
    assert [step for step, _ in tags["gradients/net.1/norm"]] == [2, 4, 6, 8]  # 4 steps per epoch, every 2
    for step, value in tags["gradients/net.1/norm"]:
        assert value == pytest.approx(seen["grad_norm"][step], rel=1e-5)
    relu_zeros = [value for _, value in tags["activations/net.2/zero_fraction"]]
    assert all(0 < z < 1 for z in relu_zeros)
    assert all(value == 0 for _, value in tags["activations/net.1/zero_fraction"])


def test_freeze_keeps_submodule_until_epoch_and_in_optimizer(tmp_path):
    snapshots = {}

    class Snap(Trainer):
        def on_validation_end(self, epoch, result):
            snapshots[epoch] = {k: v.clone() for k, v in self.model.state_dict().items()}

    config = tiny(epochs=3, freeze={"modules": ["net.1"], "until_epoch": 3})
    config["optimizer"] = {"type": "SGD", "args": {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.01}}
    trainer = build_trainer(tmp_path, config, Snap)
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    frozen = [trainer.model.net[1].weight, trainer.model.net[1].bias]
    trainer.train()
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in in_optimizer for p in frozen)
    for key in ("net.1.weight", "net.1.bias"):
        assert torch.equal(snapshots[1][key], start[key]) and torch.equal(snapshots[2][key], start[key])
        assert not torch.equal(snapshots[3][key], start[key])
    assert not torch.equal(snapshots[1]["net.3.weight"], start["net.3.weight"])  # the rest trains from epoch 1
    assert all(p.requires_grad for p in trainer.model.parameters())  # restored at the end


# ---- 4. mixed precision -------------------------------------------------------------------------
def test_bf16_on_cpu_trains_and_differs_from_fp32(tmp_path):
    config = tiny(epochs=2)
    start = initial_state(tmp_path, config)
    code_off, off = run(tmp_path, config, run_id="off")
    code_bf16, bf16 = run(tmp_path, config, "trainer.amp=bf16", run_id="bf16")
    assert code_off == code_bf16 == 0
    a, b = last(off)["state_dict"], last(bf16)["state_dict"]
    for key in start:
        assert torch.isfinite(b[key]).all()
        assert not torch.equal(b[key], start[key])  # it trained
        assert torch.allclose(a[key], b[key], atol=0.05)  # like fp32 ...
    assert any(not torch.equal(a[k], b[k]) for k in start)  # ... but computed in bf16


def fp16_trainer(tmp_path, loss_scale: float = 1.0) -> Trainer:
    """A Trainer with amp fp16, built in-process. torch 2.14 runs fp16 autocast and GradScaler on the
    CPU too (slowly), which is why `train.py` refuses fp16 there; the Trainer's scaler path is the
    one a GPU run takes."""
    config = load_config(write(tmp_path, tiny(n_train=64, batch_size=16, amp="fp16", epochs=2), "fp16.yaml"))
    seed_everything(0)
    model = build_model(config)
    optimizer = build_optimizer(config, model)
    train_loader, valid_loader = build_data_loaders(config)
    criterion = build_loss(config)
    return Trainer(model, lambda out, target: criterion(out, target) * loss_scale, build_metrics(config), optimizer,
                   config, torch.device("cpu"), train_loader, valid_loader, None)


def test_fp16_scaler_state_is_checkpointed_and_restored(tmp_path):
    trainer = fp16_trainer(tmp_path)
    assert trainer.scaler.is_enabled()
    trainer.train()
    state = trainer.checkpoint_state(epoch_finished=True)
    assert state["scaler"] is not None and state["scaler"]["scale"] == trainer.scaler.get_scale()
    state["scaler"]["scale"] = 1024.0  # a value a fresh scaler does not start with (65536)
    resumed = fp16_trainer(tmp_path)
    resumed.resume(state)
    assert resumed.scaler.get_scale() == 1024.0


def test_fp16_overflow_is_skipped_by_the_scaler_not_an_error(tmp_path):
    # A loss scaled by 1e6 makes the fp16 gradients overflow at the initial loss scale: GradScaler
    # skips those steps and lowers its scale; that is not a non-finite gradient error.
    trainer = fp16_trainer(tmp_path, loss_scale=1e6)
    trainer.train()  # raises TrainingError if the guard mistook the overflow for divergence
    assert trainer.scaler.get_scale() < 65536.0
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


# ---- 5. accumulation ----------------------------------------------------------------------------
def test_accumulated_micro_batches_equal_one_big_batch(tmp_path):
    # 48 samples: micro-batches of 8 in groups of 4 give one full group (32) and a short one (2 x 8);
    # batches of 32 give 32 + 16. Same samples, same order, so the same two SGD updates.
    code_a, accumulated = run(tmp_path, tiny(n_train=48, batch_size=8, accumulate_grad_batches=4), run_id="acc")
    code_b, big = run(tmp_path, tiny(n_train=48, batch_size=32), run_id="big")
    assert code_a == code_b == 0
    a, b = last(accumulated), last(big)
    assert a["global_step"] == b["global_step"] == 2
    for key, value in b["state_dict"].items():
        assert torch.allclose(a["state_dict"][key], value, rtol=1e-5, atol=1e-6), key
    code, plain = run(tmp_path, tiny(n_train=48, batch_size=8), run_id="plain")  # 6 steps: the check can fail
    assert code == 0 and not torch.allclose(last(plain)["state_dict"]["net.1.weight"], b["state_dict"]["net.1.weight"],
                                            atol=1e-6)


# ---- 6. clipping --------------------------------------------------------------------------------
def test_clipping_bounds_the_update_and_logs_the_preclip_norm(tmp_path):
    config = tiny(n_train=16, tensorboard=True, log_every_steps=1)  # one SGD step of lr 1: update = -gradient
    config["optimizer"]["args"]["lr"] = 1.0
    start = initial_state(tmp_path, config)

    def gradient(run_dir) -> torch.Tensor:
        state = last(run_dir)["state_dict"]
        return torch.cat([(start[k] - state[k]).flatten() for k in start])

    assert run(tmp_path, config, run_id="free")[0] == 0
    free = gradient(tmp_path / "saved/tiny/free")
    logged = scalars(tmp_path / "saved/tiny/free")["optimizer/grad_norm"]
    assert logged[0][1] == pytest.approx(free.norm().item(), rel=1e-4)
    max_norm, max_value = free.norm().item() / 4, free.abs().max().item() / 4
    assert run(tmp_path, config, f"trainer.clip_grad_norm={max_norm}", run_id="norm")[0] == 0
    clipped = gradient(tmp_path / "saved/tiny/norm")
    assert clipped.norm().item() == pytest.approx(max_norm, rel=1e-4)
    assert scalars(tmp_path / "saved/tiny/norm")["optimizer/grad_norm"][0][1] == pytest.approx(logged[0][1])
    assert run(tmp_path, config, f"trainer.clip_grad_value={max_value}", run_id="value")[0] == 0
    clipped = gradient(tmp_path / "saved/tiny/value")
    assert clipped.abs().max().item() == pytest.approx(max_value, rel=1e-4)
    assert scalars(tmp_path / "saved/tiny/value")["optimizer/grad_norm"][0][1] == pytest.approx(logged[0][1])
    assert (clipped.abs() <= max_value * (1 + 1e-5)).all()


# ---- 7. LR schedules ----------------------------------------------------------------------------
def _lrs(run_dir, tag: str) -> list[float]:
    return [value for _, value in scalars(run_dir)[tag]]


def _reference_lrs(spec: dict, steps: int) -> list[float]:
    """The same torch schedulers on a throwaway optimizer: the learning rate each step() used."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    scheduler = build_lr_scheduler(spec, optimizer)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_step_and_epoch_intervals_and_warmup(tmp_path):
    config = tiny(epochs=2, tensorboard=True, log_every_steps=1)  # 4 steps per epoch, lr 0.01
    step_lr = {"type": "StepLR", "args": {"step_size": 2, "gamma": 0.5}}
    assert run(tmp_path, {**config, "lr_scheduler": {**step_lr, "interval": "step"}}, run_id="step")[0] == 0
    assert run(tmp_path, {**config, "lr_scheduler": step_lr}, run_id="epoch")[0] == 0
    per_step = _lrs(tmp_path / "saved/tiny/step", "lr/group0_step")
    per_epoch = _lrs(tmp_path / "saved/tiny/epoch", "lr/group0_step")
    assert per_step == pytest.approx([0.01 * 0.5 ** ((s - 1) // 2) for s in range(1, 9)])  # the rate step s used
    assert per_epoch == pytest.approx([0.01] * 8)  # step_size 2 counts epochs here: halved after epoch 2
    assert _lrs(tmp_path / "saved/tiny/epoch", "lr/group0") == pytest.approx([0.01, 0.01])  # each epoch's own rate

    warmup = {"type": "SequentialLR", "interval": "step", "args": {"milestones": [3], "schedulers": [
        {"type": "LinearLR", "args": {"start_factor": 0.25, "total_iters": 3}},
        {"type": "ExponentialLR", "args": {"gamma": 0.8}}]}}
    config["optimizer"]["args"]["lr"] = 0.1
    assert run(tmp_path, {**config, "lr_scheduler": warmup}, run_id="warmup")[0] == 0
    logged = _lrs(tmp_path / "saved/tiny/warmup", "lr/group0_step")
    spec = load_config(write(tmp_path, {**config, "lr_scheduler": warmup}))["lr_scheduler"]
    assert logged == pytest.approx(_reference_lrs(spec, 8))
    assert logged[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])  # the warmup ramps up, then decays


def test_plateau_scheduler_is_fed_the_monitored_metric(tmp_path):
    config = tiny(epochs=5, tensorboard=True, monitor="max val_accuracy")
    config["lr_scheduler"] = {"type": "ReduceLROnPlateau", "args": {"mode": "max", "factor": 0.5, "patience": 0}}
    config["optimizer"]["args"]["lr"] = 0.02
    code, run_dir = run(tmp_path, config)
    assert code == 0
    tags = scalars(run_dir)

    def replay(values: list[float]) -> list[float]:
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.02)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=0)
        out = []
        for value in values:
            plateau.step(value)
            out.append(optimizer.param_groups[0]["lr"])
        return out

    # Each epoch's rate (lr/group0) is the one the plateau scheduler set after the epoch before.
    logged = [value for _, value in tags["lr/group0"]]
    assert logged == pytest.approx([0.02] + replay([v for _, v in tags["val/accuracy"]])[:-1])
    assert logged != pytest.approx([0.02] + replay([v for _, v in tags["val/loss"]])[:-1])  # not just any metric


# ---- 8. NaN guard -------------------------------------------------------------------------------
def test_divergence_exits_1_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    # Epoch 1 (steps 1-4) trains normally; then the LR becomes 1e28 and training blows up in epoch 2.
    config = tiny(epochs=3)
    config["lr_scheduler"] = {"type": "ExponentialLR", "args": {"gamma": 1.0e+30}}
    code, run_dir = run(tmp_path, config)
    err = capsys.readouterr().err
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and "non-finite" in err, err
    assert int(re.search(r"step (\d+)", err).group(1)) > 4
    state = last(run_dir)
    assert state["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())


@pytest.mark.parametrize("what, expected, last_good", [
    ("loss", "non-finite loss at step 3", 2),
    ("gradient", "non-finite gradient at step 3 (epoch 1) in parameter 'net.3.weight'", 2),
    ("weights", "non-finite weights after step 2 (epoch 1) in parameter 'net.3.weight'", 1),  # never saved
])
def test_nonfinite_loss_gradient_or_weights_name_the_step(tmp_path, what, expected, last_good):
    class Poisoned(Trainer):
        def on_batch_end(self, batch_idx, loss):  # after optimizer step 2, before its checkpoint
            if self.global_step != 2:
                return
            if what == "loss":
                plain = self.criterion
                self.criterion = lambda output, target: plain(output, target) * float("nan")
            elif what == "gradient":
                self.model.net[3].weight.register_hook(lambda grad: grad * float("nan"))
            else:
                with torch.no_grad():
                    self.model.net[3].weight[0, 0] = float("inf")

    trainer = build_trainer(tmp_path, tiny(save_every_steps=1), Poisoned)
    with pytest.raises(TrainingError, match=re.escape(expected)):
        trainer.train()
    state = last(trainer.run_dir)
    assert state["global_step"] == last_good
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())


# ---- 9. determinism -----------------------------------------------------------------------------
def test_same_seed_gives_bit_identical_weights_with_and_without_workers(tmp_path):
    from datafiles import write_cifar10

    write_cifar10(tmp_path / "data", n_per_batch=8)  # 40 training images, random crop + flip in the workers
    config = tiny(epochs=2)
    config["arch"]["args"].update(in_features=3 * 32 * 32, dropout=0.3)  # dropout: the global RNG too
    config["data_loader"] = {"type": "Cifar10DataLoader", "args": {"data_dir": str(tmp_path / "data"),
                                                                   "batch_size": 16, "augment": True,
                                                                   "download": False, "verify_checksums": False}}
    states = {}
    for run_id, workers, seed in (("a0", 0, 0), ("b0", 0, 0), ("a2", 2, 0), ("b2", 2, 0), ("seed1", 2, 1)):
        code, run_dir = run(tmp_path, config, f"data_loader.args.num_workers={workers}", f"seed={seed}",
                            run_id=run_id)
        assert code == 0
        states[run_id] = last(run_dir)["state_dict"]
    for first, second in (("a0", "b0"), ("a2", "b2")):
        assert all(torch.equal(states[first][k], states[second][k]) for k in states[first]), first
    assert not torch.equal(states["a2"]["net.1.weight"], states["seed1"]["net.1.weight"])


def test_deterministic_flag_turns_on_deterministic_algorithms(tmp_path):
    torch.use_deterministic_algorithms(False)
    try:
        assert run(tmp_path, tiny(), run_id="off")[0] == 0
        assert not torch.are_deterministic_algorithms_enabled()
        assert run(tmp_path, tiny(), "trainer.deterministic=true", run_id="on")[0] == 0
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


# ---- 10. torch.compile --------------------------------------------------------------------------
@pytest.mark.slow
def test_compiled_run_saves_eager_keys_and_resumes_eagerly(tmp_path):
    # One step (64 samples, one batch): compiling forward and backward on the CPU costs ~20 s cold.
    config = tiny(batch_size=64)
    path = write(tmp_path, config, "compile.yaml")
    saved = tmp_path / "saved"
    proc = run_script("train.py", "-c", str(path), "--run-id", "compiled", f"trainer.save_dir={saved}",
                      "trainer.compile=true", "trainer.verbosity=1", timeout=240, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "compiled with torch.compile" in proc.stdout
    compiled = last(saved / "tiny/compiled")
    assert run(tmp_path, config, run_id="eager")[0] == 0
    eager = last(saved / "tiny/eager")
    assert list(compiled["state_dict"]) == list(eager["state_dict"])
    assert not any("_orig_mod" in key for key in compiled["state_dict"])
    assert train.main(["-r", str(saved / "tiny/compiled"), "trainer.epochs=2"]) == 0  # compile: false in config
    assert last(saved / "tiny/compiled")["global_step"] == 2


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_reuses_the_graph_for_a_short_last_batch(tmp_path, monkeypatch, backend):
    """trainer.compile (dynamic: null) marks the batch dimension dynamic: two epochs of 100 samples (6 x 16 + 4)
    compile one graph. Without the mark (torch's own default) the short batch compiles a second one, and so does
    dynamic: false. (Evaluation runs the module unwrapped, uncompiled: Trainer.evaluate.) Counted with dynamo's
    counters; the eager backend (dynamo alone, which is what decides recompiles) keeps the quick variant fast."""
    import runtime.compile
    import torch._dynamo
    from torch._dynamo.utils import counters

    variants = {"marked": None, "unmarked": None, "static": False}
    if backend == "eager":  # mode is an inductor option
        original = torch.compile
        monkeypatch.setattr(torch, "compile", lambda model, mode, dynamic: original(model, backend="eager",
                                                                                    dynamic=dynamic))
    else:
        variants = {"marked": None}
    graphs = {}
    for name, dynamic in variants.items():
        if name == "unmarked":
            monkeypatch.setattr(runtime.compile, "_dynamic_batch_dimension", lambda module, args, kwargs: None)
        torch._dynamo.reset()
        counters.clear()
        config = tiny(n_train=100, batch_size=16, epochs=2, compile={"mode": "default", "dynamic": dynamic})
        assert run(tmp_path, config, run_id=name)[0] == 0
        graphs[name] = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert graphs == {"marked": 1, "unmarked": 2, "static": 2} if backend == "eager" else {"marked": 1}


def test_compile_config_is_a_switch_or_mode_and_dynamic(tmp_path):
    from errors import ConfigError

    for value in (True, False, {"mode": "max-autotune"}, {"dynamic": True}, {}):
        assert load_config(write(tmp_path, tiny(compile=value)))["trainer"]["compile"] in (value, {
            "mode": "default", "dynamic": None, **value} if isinstance(value, dict) else value)
    for value, message in (("fast", "trainer.compile: expected true, false or a mapping, got 'fast'"),
                           ({"mode": "fastest"}, "trainer.compile.mode: 'fastest' is not one of default, "
                                                 "reduce-overhead, max-autotune, max-autotune-no-cudagraphs"),
                           ({"dynamic": "yes please"}, "trainer.compile.dynamic: expected true, false or null"),
                           ({"fullgraph": True}, "trainer.compile.fullgraph: unknown key")):
        with pytest.raises(ConfigError) as info:
            load_config(write(tmp_path, tiny(compile=value)))
        assert message in str(info.value), str(info.value)


# ---- 10b. data loading on CUDA ------------------------------------------------------------------
def test_pin_memory_defaults_on_for_cuda_and_an_explicit_value_wins(tmp_path):
    """Built for a CUDA device the loaders pin their batches (else non_blocking copies are pageable and block);
    pin_memory in the config wins either way. (Only the construction: no GPU needed.)"""
    from config.build import build_test_loader

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    config = load_config(write(tmp_path, tiny()))
    for device, pinned in ((cuda, True), (cpu, False), (None, False)):
        train_loader, valid_loader = build_data_loaders(config, device=device)
        assert train_loader.pin_memory is pinned and valid_loader.pin_memory is pinned
        assert build_test_loader(config, device=device).pin_memory is pinned
    config["data_loader"]["args"]["pin_memory"] = False
    assert build_data_loaders(config, device=cuda)[0].pin_memory is False
    config["data_loader"]["args"]["pin_memory"] = True
    assert build_data_loaders(config, device=cpu)[0].pin_memory is True


# ---- 11. every feature off == the plain loop ----------------------------------------------------
def test_features_off_match_a_handwritten_loop_bit_for_bit(tmp_path):
    config = yaml.safe_load((ROOT / "configs/digits.yaml").read_text())  # CNN: BatchNorm, dropout, Adam, StepLR
    config["data_loader"]["args"]["validation_split"] = N_DIGITS_TRAIN - 200  # 200 = 3 batches of 64 + 8
    config["trainer"].update(epochs=2, verbosity=0)
    config["device"] = "cpu"
    code, run_dir = run(tmp_path, config)
    assert code == 0

    config = load_config(write(tmp_path, config, "plain.yaml"))
    seed_everything(config["seed"])
    model = build_model(config)
    loader, _ = build_data_loaders(config)
    optimizer = build_optimizer(config, model)
    scheduler = build_lr_scheduler(config["lr_scheduler"], optimizer)
    criterion = build_loss(config)
    for epoch in range(1, 3):
        model.train()
        loader.set_epoch(epoch)
        for data, target in loader:
            optimizer.zero_grad()
            loss = criterion(model(data), target)
            loss.backward()
            optimizer.step()
        scheduler.step()
    saved = last(run_dir)["state_dict"]
    assert list(saved) == list(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(saved[key], value), key
