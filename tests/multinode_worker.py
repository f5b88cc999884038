"""One "node" of a 2-node Lightning run on this machine (launched by test_multinode.py, not collected).

Lightning's environment reads ``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK`` and ``LOCAL_RANK`` (and the
test sets ``WORLD_SIZE``) as a cluster launcher would; ``num_nodes=2`` with one process per node.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from helpers import N, ScriptedClassifier, scripted_data, trainer  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_noisy.callbacks import LabelCorrectionCallback  # noqa: E402


class WriteLabels(LabelCorrectionCallback):
    def __init__(self, out: str, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.out = out

    def on_train_end(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        labels, (held, _) = self.labels, self.local_labels()  # the gather is a collective: every rank calls it
        torch.save({"labels": labels, "held": held, "world_size": trainer.world_size,
                    "global_rank": trainer.global_rank}, f"{self.out}.{trainer.global_rank}")


def fit(out: str, num_nodes: int) -> None:
    callback = WriteLabels(out, update="soft", num_average_epochs=3, start_epoch=0, fetch_window=2)
    strategy = "ddp" if num_nodes > 1 else "auto"
    trainer(num_nodes=num_nodes, strategy=strategy, max_epochs=3, callbacks=[callback]).fit(
        ScriptedClassifier(), DataLoader(scripted_data(N + 1), batch_size=3, shuffle=True)
    )


if __name__ == "__main__":
    fit(sys.argv[1], int(sys.argv[2]))
