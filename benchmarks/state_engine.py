"""Per-rank memory and traffic of the per-sample state: replicated against sharded, on W gloo processes.

Each configuration trains a synthetic classifier (its logits are a learnt bias plus fresh noise) for
two epochs on N samples of C classes with the real ``LabelCorrectionCallback`` (soft labels updated at
every epoch's end, a K-epoch history), on W processes launched as W nodes of one process each (Lightning's
``num_nodes=W``, ``NODE_RANK``, ``MASTER_ADDR=127.0.0.1``), one torch thread each. Every rank reports:

- ``state_bytes_per_rank``: the per-sample state it owns (labels, history, visit counts): what it checkpoints;
- ``fetch_bytes_per_rank``: the most fetched label rows it held at once (sharded only);
- ``peak_rss_bytes_per_rank``: its peak resident memory;
- ``bytes_received_per_rank``: everything it received through the state engine in the second epoch
  (records and row fetches);
- ``boundary_seconds``: the epoch-boundary work of the second epoch (records to owners, history, label update).

With ``--checkpoint gather|dcp`` each configuration then saves a checkpoint (``Trainer.save_checkpoint``):
``gather`` with Lightning's DDP strategy, which gathers each sharded buffer on rank 0, ``dcp`` with
``ShardedStateDDPStrategy``, where each rank writes its rows with ``torch.distributed.checkpoint``. It adds
``save_seconds``, ``save_received_bytes_per_rank``, ``save_peak_rss_bytes_per_rank`` (peak resident memory
during the save, the peak counter reset before it), ``checkpoint_file_bytes`` and ``checkpoint_rows_bytes``
(the directory of rows beside the file).

Rows give the maximum over ranks (and ``peak_rss_bytes_sum``, the sum), one JSON row per configuration.
A configuration whose estimated memory exceeds what the machine has free is skipped and says so.

    .venv/bin/python benchmarks/state_engine.py                          # N = 1e5, 1e6; C = 100; W = 2, 4
    .venv/bin/python benchmarks/state_engine.py --sizes 10000000 --classes 100 --world-size 4 \\
        --mode sharded --storage-dtype bfloat16 --history 10 --history-form running --json out.json
    .venv/bin/python benchmarks/state_engine.py --extrapolate out.json    # 64 ranks: WebVision, 1e8 x 1,000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

MODES = ("replicated", "sharded")


# -- one rank -------------------------------------------------------------------------------------------


def _identity(batch: Any) -> Any:
    return batch


def run_rank(args: argparse.Namespace) -> dict[str, Any]:
    """Train two epochs on this rank and return its figures (called in each launched process)."""
    import lightning.pytorch as pl
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, Dataset

    from lightning_noisy.callbacks import LabelCorrectionCallback
    from lightning_noisy.state.exchange import traffic

    torch.set_num_threads(1)
    n, c = args.sizes[0], args.classes[0]

    class Records(Dataset):
        """``N`` samples whose input is their index; batches come whole through ``__getitems__``."""

        def __init__(self) -> None:
            self.noisy_labels = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(0))
            self.clean_labels, self.num_classes = None, c

        def __len__(self) -> int:
            return n

        def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
            index = torch.as_tensor(indices, dtype=torch.long)
            return [index.float()[:, None], self.noisy_labels[index], index]

    class Synthetic(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.bias = torch.nn.Parameter(torch.zeros(c))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bias + 3 * torch.randn(x.shape[0], c)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class Measured(LabelCorrectionCallback):
        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            super().on_train_epoch_start(trainer, pl_module)
            self.received_at_start = traffic.received_bytes

        def on_epoch_boundary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            start = time.perf_counter()
            super().on_epoch_boundary(trainer, pl_module)
            self.boundary_seconds = time.perf_counter() - start
            self.received = traffic.received_bytes - self.received_at_start

    callback = Measured(
        update="soft", num_average_epochs=args.history, start_epoch=0, prior_weight=0.0, entropy_weight=0.0,
        shard_state=args.mode[0] == "sharded", storage_dtype=args.storage_dtype, storage_topk=args.storage_topk,
        history=args.history_form, fetch_window=args.fetch_window,
    )
    world = args.world_size[0]
    strategy = ("ddp_sharded_state" if args.checkpoint == "dcp" else "ddp") if world > 1 else "auto"
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, num_nodes=world, strategy=strategy, max_epochs=2,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[callback],
    )
    loader = DataLoader(Records(), batch_size=args.batch_size, shuffle=True, collate_fn=_identity)
    trainer.fit(Synthetic(), loader)
    fetcher = callback._fetcher
    figures = {}
    if args.checkpoint is not None:
        _reset_peak_rss()
        received, start = traffic.received_bytes, time.perf_counter()
        trainer.save_checkpoint(args.rank_out.parent / "state.ckpt")
        figures = {"save_seconds": time.perf_counter() - start, "save_received_bytes": traffic.received_bytes - received,
                   "save_peak_rss_bytes": _peak_rss_bytes()}
    return {
        **figures,
        "state_bytes": callback.state_bytes,
        "fetch_bytes": 0 if fetcher is None else fetcher.peak_bytes,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux reports KiB
        "bytes_received": callback.received,
        "boundary_seconds": callback.boundary_seconds,
    }


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as handle:  # Linux >= 4.0: "5" resets the peak resident set size
        handle.write("5")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        fields = dict(line.split(":", 1) for line in handle)
    return int(fields["VmHWM"].split()[0]) * 1024


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


# -- the launcher ---------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _available_bytes() -> int:
    with open("/proc/meminfo") as handle:
        fields = dict(line.split(":", 1) for line in handle)
    return int(fields["MemAvailable"].split()[0]) * 1024


def estimate_bytes(n: int, c: int, world: int, mode: str, dtype: str, topk: int | None, history: int,
                   form: str) -> int:
    """Rough memory of all ranks together: the state, twice the records in flight, 0.6 GB of runtime each."""
    element = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    row = c * element if topk is None else topk * (element + 2)
    tables = 1 + (history if form == "ring" else 1)
    rows_per_rank = n if mode == "replicated" else -(-n // world)
    state = rows_per_rank * (row * tables + 8 * 2)
    records = -(-n // world) * row * (world if mode == "replicated" else 1)
    return world * (state + 3 * records + int(0.6e9))


def run_config(args: argparse.Namespace, n: int, c: int, world: int, mode: str) -> dict[str, Any]:
    row = {"mode": mode, "world_size": world, "num_samples": n, "num_classes": c, "history": args.history,
           "history_form": args.history_form, "storage_dtype": args.storage_dtype, "storage_topk": args.storage_topk}
    need = estimate_bytes(n, c, world, mode, args.storage_dtype, args.storage_topk, args.history, args.history_form)
    if need > 0.9 * _available_bytes():
        return {**row, "skipped": f"needs about {need / 2**30:.1f} GiB, {_available_bytes() / 2**30:.1f} GiB free"}
    port = _free_port()
    with tempfile.TemporaryDirectory() as out:
        processes = []
        for rank in range(world):
            env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(rank),
                   "LOCAL_RANK": "0", "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1"}
            command = [sys.executable, __file__, "--rank-out", f"{out}/{rank}.json", "--sizes", str(n), "--classes",
                       str(c), "--world-size", str(world), "--mode", mode, "--storage-dtype", args.storage_dtype,
                       "--history", str(args.history), "--history-form", args.history_form, "--batch-size",
                       str(args.batch_size), "--fetch-window", str(args.fetch_window)]
            if args.storage_topk is not None:
                command += ["--storage-topk", str(args.storage_topk)]
            if args.checkpoint is not None:
                command += ["--checkpoint", args.checkpoint]
            processes.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        errors = [p.communicate()[1] for p in processes]
        if any(p.returncode != 0 for p in processes):
            last = next(e for p, e in zip(processes, errors) if p.returncode != 0).strip().splitlines()
            codes = [p.returncode for p in processes]
            return {**row, "failed": f"exit codes {codes}" + (f": {last[-1]}" if last else "")}
        ranks = [json.loads(Path(f"{out}/{rank}.json").read_text()) for rank in range(world)]
        saved = {}
        if args.checkpoint is not None:
            saved = {"checkpoint": args.checkpoint, "save_seconds": max(r["save_seconds"] for r in ranks),
                     "save_received_bytes_per_rank": max(r["save_received_bytes"] for r in ranks),
                     "save_peak_rss_bytes_per_rank": max(r["save_peak_rss_bytes"] for r in ranks),
                     "checkpoint_file_bytes": Path(f"{out}/state.ckpt").stat().st_size,
                     "checkpoint_rows_bytes": _tree_bytes(Path(f"{out}/state.ckpt.sample_state"))}
    return {
        **row,
        **saved,
        "state_bytes_per_rank": max(r["state_bytes"] for r in ranks),
        "fetch_bytes_per_rank": max(r["fetch_bytes"] for r in ranks),
        "peak_rss_bytes_per_rank": max(r["peak_rss_bytes"] for r in ranks),
        "peak_rss_bytes_sum": sum(r["peak_rss_bytes"] for r in ranks),
        "bytes_received_per_rank": max(r["bytes_received"] for r in ranks),
        "boundary_seconds": max(r["boundary_seconds"] for r in ranks),
    }


#: (name, N, C) of the data sets extrapolated to, on 64 ranks (8 nodes of 8 GPUs)
TARGETS = (("WebVision", 2_400_000, 1000), ("1e8 x 1,000", 100_000_000, 1000))


def extrapolate(rows: list[dict[str, Any]], world: int = 64) -> None:
    """Bytes per rank and traffic per rank per epoch at ``TARGETS`` from each measured row's per-row costs.

    A measured row's state and traffic per owned row are scaled to the target's rows per rank; dense rows
    also scale with ``C_target / C`` (top-k rows do not depend on ``C``). Replicated state is ``N`` rows per rank.
    """
    print("| measured on | storage | target | W | state/rank GiB | received/rank/epoch GiB |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        if "state_bytes_per_rank" not in row:
            continue
        # rows a rank holds, and records it receives: its block when sharded, all N when replicated
        per_rank = -(-row["num_samples"] // row["world_size"]) if row["mode"] == "sharded" else row["num_samples"]
        state_row = row["state_bytes_per_rank"] / per_rank
        received_row = row["bytes_received_per_rank"] / per_rank
        storage = f"{row['storage_dtype']}, top-{row['storage_topk']}" if row["storage_topk"] else row["storage_dtype"]
        storage += f", {row['history_form']} K={row['history']}"
        for name, n, c in TARGETS:
            scale = 1.0 if row["storage_topk"] else c / row["num_classes"]
            target_rows = n if row["mode"] == "replicated" else -(-n // world)
            print(f"| {row['mode']} {row['num_samples']:.0e} x {row['num_classes']}, W={row['world_size']} | {storage} "
                  f"| {name} | {world} | {state_row * scale * target_rows / 2**30:.3f} "
                  f"| {received_row * scale * target_rows / 2**30:.3f} |")


def _gib(value: Any) -> str:
    return f"{value / 2**30:.3f}" if isinstance(value, (int, float)) else "—"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--classes", type=int, nargs="+", default=[100])
    parser.add_argument("--world-size", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--mode", choices=MODES, nargs="+", default=list(MODES))
    parser.add_argument("--storage-dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--storage-topk", type=int, default=None)
    parser.add_argument("--history", type=int, default=10, help="K of the JO-style prediction history")
    parser.add_argument("--history-form", choices=("ring", "running"), default="ring")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--fetch-window", type=int, default=16)
    parser.add_argument("--checkpoint", choices=("gather", "dcp"), default=None,
                        help="then save a checkpoint: gathered on rank 0, or each rank's rows with DCP")
    parser.add_argument("--json", type=Path, default=None, help="append one JSON row per configuration")
    parser.add_argument("--extrapolate", type=Path, default=None,
                        help="print the per-rank figures at 64 ranks for WebVision and 1e8 x 1,000 from this JSON")
    parser.add_argument("--rank-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.extrapolate is not None:
        extrapolate([json.loads(line) for line in args.extrapolate.read_text().splitlines() if line.strip()])
        return
    if args.rank_out is not None:
        args.rank_out.write_text(json.dumps(run_rank(args)))
        return
    print(f"torch {torch.__version__}, gloo, one thread per rank, two epochs, history K={args.history} "
          f"({args.history_form}), {args.storage_dtype}, top-k {args.storage_topk}\n")
    print("| N | C | W | mode | state/rank GiB | fetch held/rank GiB | received/rank/epoch GiB | peak RSS/rank GiB "
          "| peak RSS sum GiB | boundary s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    saves: list[dict[str, Any]] = []
    for n in args.sizes:
        for c in args.classes:
            for world in args.world_size:
                for mode in args.mode:
                    r = run_config(args, n, c, world, mode)
                    if args.json is not None:
                        with args.json.open("a") as handle:
                            handle.write(json.dumps(r) + "\n")
                    note = r.get("skipped") or r.get("failed")
                    if note:
                        print(f"| {n:.0e} | {c} | {world} | {mode} | {note} ||||||", flush=True)
                        continue
                    print(f"| {n:.0e} | {c} | {world} | {mode} | {_gib(r['state_bytes_per_rank'])} | "
                          f"{_gib(r['fetch_bytes_per_rank'])} | {_gib(r['bytes_received_per_rank'])} | "
                          f"{_gib(r['peak_rss_bytes_per_rank'])} | {_gib(r['peak_rss_bytes_sum'])} | "
                          f"{r['boundary_seconds']:.2f} |", flush=True)
                    if args.checkpoint is not None:
                        saves.append(r)
    if saves:
        print("\n| N | C | W | mode | checkpoint | save s | received/rank GiB | peak RSS in save/rank GiB | file GiB "
              "| rows beside GiB |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in saves:
            print(f"| {r['num_samples']:.0e} | {r['num_classes']} | {r['world_size']} | {r['mode']} | {r['checkpoint']} | "
                  f"{r['save_seconds']:.2f} | {_gib(r['save_received_bytes_per_rank'])} | "
                  f"{_gib(r['save_peak_rss_bytes_per_rank'])} | {_gib(r['checkpoint_file_bytes'])} | "
                  f"{_gib(r['checkpoint_rows_bytes'])} |")


if __name__ == "__main__":
    main()
