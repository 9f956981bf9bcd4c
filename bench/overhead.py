"""Trainer overhead: epoch time of the Trainer (TensorBoard, progress, metrics on) against a minimal
hand-written loop in the style of pytorch/examples, same model, data, batch size, seed and threads: the
train() function of pytorch/examples/mnist/main.py (data.to(device), a loss.item() print every 10 batches,
here to /dev/null).

    python bench/overhead.py --model mnist        # MnistModel, batch 64, target <= 1.03
    python bench/overhead.py --model digits       # DigitsCNN, batch 64, target <= 1.05
    python bench/overhead.py --model mlp          # ~1 ms/step MLP, target <= 1.05
    python bench/overhead.py --model mnist --logging-off   # Trainer logging on vs off, target <= 1.02
    python bench/overhead.py --model mlp --aa     # A/A: the hand-written loop against itself (noise)

Each round is one more epoch of a long-lived trainer and of the hand-written loop (run in alternating
order). Two ratios per round: the steps (`Trainer.train_seconds`: its loop over the epoch's batches,
from creating the iterator to the check point after the last step, so the deferred per-step work, the
waiting loss sums, is in), and the whole epoch, which adds what the trainer does once at its end
(histograms, the sample grid, the checkpoint); the median of that end of the trainer's epochs is printed in
milliseconds too. The whole-epoch ratio is the one held to the target (issue 21); the last line printed is
its median.
Weights after the first epoch must be bit-identical.
"""
from __future__ import annotations

import argparse
import os
import statistics

from common import paired_rounds, report, temp_dir, timed

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from base import BaseDataLoader
from config import check_config
from data_loader.sampler import EpochSampler
from logger import make_writer, setup_logging
from model.model import MLP, DigitsCNN, MnistModel
from trainer.trainer import Trainer

SPECS = {  # model, input shape, loss, target ratio
    "mnist": (lambda: MnistModel(), (1, 28, 28), "nll_loss", 1.03),
    "digits": (lambda: DigitsCNN(), (1, 8, 8), "nll_loss", 1.05),
    "mlp": (lambda: MLP(in_features=64, hidden=256, depth=2), (1, 8, 8), "cross_entropy", 1.05),
}


class RandomImages(Dataset):
    """In-memory inputs and labels, fetched one sample at a time like most user datasets."""

    def __init__(self, n: int, shape: tuple, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, *shape, generator=generator)
        self.targets = torch.randint(0, 10, (n,), generator=generator)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return self.images[index], self.targets[index]


class BenchLoader(BaseDataLoader):
    def __init__(self, dataset, batch_size):
        super().__init__(dataset, batch_size, shuffle=True, validation_split=0.0, num_workers=0)


def make_config(loss: str, save_dir: str, logging_on: bool) -> dict:
    return check_config({
        "name": "bench", "seed": 0, "device": "cpu",
        "arch": {"type": "MLP", "args": {}},
        "data_loader": {"type": "DigitsDataLoader", "args": {"batch_size": 64, "validation_split": 0.0}},
        "optimizer": {"type": "SGD", "args": {"lr": 0.01, "momentum": 0.9}},
        "loss": loss, "metrics": ["accuracy", "top_k_acc"] if logging_on else [],
        "trainer": {"epochs": 1, "save_dir": save_dir, "save_period": 0, "verbosity": 1,
                    "tensorboard": logging_on, "histograms": logging_on, "images": logging_on},
    })


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=sorted(SPECS), default="mnist")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=938, help="steps per epoch (938: one MNIST epoch at batch 64)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--logging-off", action="store_true", help="compare Trainer logging on against off")
    parser.add_argument("--aa", action="store_true",
                        help="A/A: the hand-written loop against a second copy of itself (the noise floor)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    build, shape, loss_name, target = SPECS[args.model]
    loss_fn = {"nll_loss": F.nll_loss, "cross_entropy": F.cross_entropy}[loss_name]
    dataset = RandomImages(args.steps * args.batch_size, shape)
    torch.manual_seed(0)
    initial = build().state_dict()
    out = temp_dir()
    setup_logging(None, verbosity=0)
    device = torch.device("cpu")
    devnull = open(os.devnull, "w")

    def make_trainer(logging_on: bool):
        config = make_config(loss_name, str(out), logging_on)
        model = build()
        model.load_state_dict(initial)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        from config.build import build_loss, build_metrics

        run_dir = out / f"run-{logging_on}"
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        trainer = Trainer(model, build_loss(config), build_metrics(config), optimizer, config, torch.device("cpu"),
                          BenchLoader(dataset, args.batch_size), None, None, run_dir=run_dir,
                          writer=make_writer(run_dir, logging_on))
        return trainer

    def make_hand():
        model = build()
        model.load_state_dict(initial)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        sampler = EpochSampler(torch.arange(len(dataset)), shuffle=True, seed=0)
        loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, generator=torch.Generator())
        return model, optimizer, sampler, loader

    def trainer_epoch(trainer) -> tuple[float, float]:
        """One more epoch of a long-lived trainer (per-run costs, such as the graph, stay out of the timing):
        (steps, whole epoch) in seconds."""
        trainer.epochs = trainer.start_epoch = trainer.epoch + (trainer.global_step > 0)
        epoch = timed(trainer.train)
        epochs.append((epoch - trainer.train_seconds, epoch))
        return trainer.train_seconds, epoch

    def hand_epoch(state) -> tuple[float, float]:
        model, optimizer, sampler, loader = state
        state_epoch = getattr(sampler, "epoch_done", 0) + 1
        sampler.set_epoch(state_epoch)
        sampler.epoch_done = state_epoch

        def loop():  # train() of pytorch/examples/mnist/main.py, log_interval 10, printing to /dev/null
            model.train()
            for batch_idx, (data, target) in enumerate(loader):
                data, target = data.to(device), target.to(device)
                optimizer.zero_grad()
                output = model(data)
                loss = loss_fn(output, target)
                loss.backward()
                optimizer.step()
                if batch_idx % 10 == 0:
                    print('Train Epoch: {} [{}/{} ({:.0f}%)]\tLoss: {:.6f}'.format(
                        state_epoch, batch_idx * len(data), len(loader.dataset),
                        100. * batch_idx / len(loader), loss.item()), file=devnull)

        seconds = timed(loop)
        return seconds, seconds

    if args.aa:
        first, second = make_hand(), make_hand()
        hand_epoch(first), hand_epoch(second)
        ratios = paired_rounds(lambda: hand_epoch(first)[0], lambda: hand_epoch(second)[0], args.rounds)
        print(f"{report(f'{args.model}: hand-written loop / the same loop (A/A)', ratios, None):.3f}")
        return
    epochs = []  # the trainer's (end of epoch: histograms, sample picture, checkpoint; whole epoch) in seconds
    torch.manual_seed(1)
    trainer_on = make_trainer(True)
    trainer_epoch(trainer_on)
    if args.logging_off:
        trainer_off = make_trainer(False)
        trainer_epoch(trainer_off)
        ratios = paired_rounds(lambda: trainer_epoch(trainer_on), lambda: trainer_epoch(trainer_off), args.rounds)
        report(f"{args.model}: trainer logging on / off, steps", [r[0] for r in ratios], None)
        print(f"{report(f'{args.model}: trainer logging on / off, whole epoch', [r[1] for r in ratios], 1.02):.3f}")
        return
    torch.manual_seed(1)
    hand = make_hand()
    step = hand_epoch(hand)[0] / args.steps
    identical = all(torch.equal(a, b) for a, b in zip(trainer_on.model.state_dict().values(),
                                                      hand[0].state_dict().values()))
    print(f"hand-written loop: {step * 1e3:.2f} ms/step ({args.model}, batch {args.batch_size}, "
          f"{args.threads} thread(s)); weights after the first epoch of {args.steps} steps bit-identical to the "
          f"trainer's: {identical}")
    ratios = paired_rounds(lambda: trainer_epoch(trainer_on), lambda: hand_epoch(hand), args.rounds)
    report(f"{args.model}: trainer / hand-written loop, steps", [r[0] for r in ratios], None)
    ends, wholes = zip(*epochs[-len(ratios):])
    print(f"{args.model}: the trainer's end of epoch: median {statistics.median(ends) * 1e3:.1f} ms, of epochs of "
          f"{statistics.median(wholes):.2f} s")
    print(f"{report(f'{args.model}: trainer / hand-written loop, whole epoch', [r[1] for r in ratios], target):.3f}")


if __name__ == "__main__":
    main()
