"""Run under torchrun (2 processes, gloo) by tests/test_tasks.py: one epoch over 101 samples with F1 and
AUROC as epoch metrics. Each rank saves every prediction it trained on (padding included) to
<out>/rank<R>.pth; rank 0 writes the epoch's metric values to <out>/result.json."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from runtime.distributed import barrier, distributed_context, init_process_group, shutdown, wrap_model  # noqa: E402
from test_tasks import CLASSIFICATION, Recording, blobs, build, make_config  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    context = distributed_context(None)
    init_process_group(context, "gloo", torch.device("cpu"))
    trainer = build(make_config(out, CLASSIFICATION), blobs(101), Recording)
    trainer.dist = context
    trainer.model, _ = wrap_model(trainer.model, torch.device("cpu"), sync_batchnorm=False)
    trainer.data_loader.configure(0, context.rank, context.world_size)
    result = trainer._train_epoch(1)
    output = torch.cat([o for o, _ in trainer.seen])
    target = torch.cat([t for _, t in trainer.seen])
    torch.save((output, target), out / f"rank{context.rank}.pth")
    if context.rank == 0:
        (out / "result.json").write_text(json.dumps(result))
    barrier()
    shutdown()


if __name__ == "__main__":
    main()
