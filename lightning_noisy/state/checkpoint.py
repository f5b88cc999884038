"""Sharded per-sample state in checkpoints through ``torch.distributed.checkpoint`` (DCP), never gathered.

A checkpoint written by :class:`~lightning_noisy.strategies.ShardedStateDDPStrategy` keeps every sharded
buffer out of the main checkpoint file: each rank writes the rows it owns with DCP into a directory beside
the file (``<checkpoint>.sample_state``), and the file holds a small placeholder in the buffer's place. The
rows are stored in chunks of at most 2^24 values, named by the dataset indices they cover, so a resume on
any world size reads only the chunks that overlap the rows each rank then owns.

- :class:`LocalRows`: what a sharded buffer puts in the callback's state instead of the gathered table.
- :func:`split_local_rows`: the checkpoint with placeholders, and this rank's chunks (what the strategy saves).
- :func:`read_local_rows`: a callback's saved buffer states with placeholders replaced by the rows a rank
  now owns (a collective when distributed).

Records of an epoch in progress (a checkpoint taken mid-epoch) are per rank, not per row: with the
strategy each rank writes its own (:class:`LocalRecords`); :func:`read_local_records` gives a rank the
records of the saved ranks it takes over.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor

from lightning_noisy.state.gather import is_distributed
from lightning_noisy.state.layout import RowLayout
from lightning_noisy.state.storage import chunk_rows

SAMPLE_STATE_SUFFIX = ".sample_state"
PLACEHOLDER = "sharded_rows"
RECORDS_PLACEHOLDER = "sharded_records"
NONCE_KEY = "nonce"
_CHUNK_KEY = re.compile(r"^(?P<prefix>rows\d+)\.(?P<name>\w+)\.(?P<begin>\d+)\.(?P<end>\d+)$")
_RECORD_KEY = re.compile(r"^(?P<prefix>records\d+)\.r(?P<rank>\d+)\.(?P<name>\w+)$")


@dataclass
class LocalRows:
    """A sharded buffer's ``state_dict()`` of the rows this rank owns, to be written by the strategy with DCP."""

    state: dict[str, Any]


@dataclass
class LocalRecords:
    """This rank's records of the epoch in progress (tensors by name), to be written by the strategy with DCP."""

    rank: int
    world_size: int
    tensors: dict[str, Tensor]


def sample_state_directory(checkpoint_path: str | os.PathLike) -> str:
    """The directory that holds the sharded rows of the checkpoint file ``checkpoint_path``."""
    return os.fspath(checkpoint_path) + SAMPLE_STATE_SUFFIX


def _row_tensors(state: dict[str, Any]) -> dict[str, Tensor]:
    return {name: value for name, value in state.items() if isinstance(value, Tensor)}


def split_local_rows(checkpoint: dict[str, Any], directory_name: str, nonce: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Replace each :class:`LocalRows` of ``checkpoint`` (in nested dicts) by a placeholder.

    Args:
        checkpoint: a checkpoint dict as Lightning dumps it; it is not changed (dicts on the way to a
            :class:`LocalRows` are copied).
        directory_name: base name of the DCP directory, recorded in the placeholders (resolved beside the
            checkpoint file when it is read, so the two can move together).
        nonce: identifies this save; recorded in the placeholders and in the DCP directory.

    Returns:
        ``(checkpoint with placeholders, this rank's DCP state dict)``: chunks of rows keyed
        ``rows<n>.<tensor>.<begin>.<end>`` (dataset indices ``[begin, end)``) and the nonce; ``n`` numbers
        the buffers in the dict's order, the same on every rank. Empty when there is no :class:`LocalRows`.
    """
    rows: dict[str, Any] = {}
    count = records = 0

    def visit(node: Any) -> Any:
        nonlocal count, records
        if isinstance(node, LocalRecords):
            prefix, records = f"records{records}", records + 1
            for name, tensor in node.tensors.items():
                rows[f"{prefix}.r{node.rank}.{name}"] = tensor.contiguous()
            return {RECORDS_PLACEHOLDER: {"directory": directory_name, "prefix": prefix, "nonce": nonce,
                                          "world_size": node.world_size}}
        if isinstance(node, LocalRows):
            prefix, count = f"rows{count}", count + 1
            state = node.state
            start = int(state["start"])
            for name, tensor in _row_tensors(state).items():
                step = chunk_rows(tuple(tensor.shape[1:]))
                for begin in range(0, tensor.shape[0], step):
                    end = min(begin + step, tensor.shape[0])
                    rows[f"{prefix}.{name}.{start + begin}.{start + end}"] = tensor[begin:end].contiguous()
            header = {k: v for k, v in state.items() if not isinstance(v, Tensor)}
            header.update(start=0, stop=int(state["num_samples"]))
            return {PLACEHOLDER: {"directory": directory_name, "prefix": prefix, "nonce": nonce,
                                  "tensors": sorted(_row_tensors(state)), "header": header}}
        if isinstance(node, dict):
            replaced = {key: visit(value) for key, value in node.items()}
            changed = any(replaced[key] is not value for key, value in node.items())
            return replaced if changed else node
        return node

    out = visit(checkpoint)
    if count or records:
        rows[NONCE_KEY] = nonce
    return out, rows


def is_placeholder(state: Any) -> bool:
    """Whether a saved buffer state is a placeholder for rows written with DCP."""
    return isinstance(state, dict) and set(state) == {PLACEHOLDER}


def _open(placeholders: list[dict[str, Any]], checkpoint_path: str | os.PathLike | None) -> tuple[str, Any]:
    """The one DCP directory of ``placeholders`` and its reader."""
    directories = {_directory_of(p, checkpoint_path) for p in placeholders}
    if len(directories) != 1:
        raise RuntimeError(f"the per-sample states point to several directories: {sorted(directories)}")
    directory = directories.pop()
    if not os.path.isdir(directory):
        raise RuntimeError(
            f"the checkpoint's sharded per-sample state is missing: no directory {directory!r} beside the checkpoint "
            "file (it is written next to the file and must be copied with it)"
        )
    return directory, dcp.FileSystemReader(directory)


def _load(wanted: dict[str, Any], reader: Any, directory: str, nonce: str) -> None:
    """Read ``wanted`` (and the directory's nonce) with one DCP load; refuse another save's directory."""
    wanted[NONCE_KEY] = ""
    with warnings.catch_warnings():  # one process reads on purpose (a resume on one device)
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        dcp.load(wanted, storage_reader=reader, no_dist=not is_distributed())
    if wanted.pop(NONCE_KEY) != nonce:
        raise RuntimeError(
            f"the directory {directory!r} holds the per-sample state of another save (the checkpoint file expects "
            f"nonce {nonce!r}): it was overwritten or copied from elsewhere"
        )


def read_local_records(
    saved: dict[str, Any], rank: int, world_size: int, checkpoint_path: str | os.PathLike | None
) -> list[dict[str, Tensor]]:
    """The records of an epoch in progress that rank ``rank`` of ``world_size`` takes over, one dict per saved rank.

    Saved rank ``r`` goes to rank ``r % world_size``, in rank order: with the same world size each rank
    gets exactly its own records back. ``saved`` is ``{"world_size": W, "ranks": [records of rank r, ...]}``
    or a placeholder of :class:`LocalRecords` written with DCP (then a collective: call on every rank).
    """
    if not (isinstance(saved, dict) and set(saved) == {RECORDS_PLACEHOLDER}):
        ranks = saved["ranks"]
        return [ranks[r] for r in range(len(ranks)) if r % world_size == rank]
    placeholder = saved[RECORDS_PLACEHOLDER]
    directory, reader = _open([placeholder], checkpoint_path)
    mine = {r for r in range(int(placeholder["world_size"])) if r % world_size == rank}
    wanted: dict[str, Any] = {}
    for key, meta in reader.read_metadata().state_dict_metadata.items():
        match = _RECORD_KEY.match(key)
        if match is not None and match["prefix"] == placeholder["prefix"] and int(match["rank"]) in mine:
            wanted[key] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
    _load(wanted, reader, directory, placeholder["nonce"])
    out: list[dict[str, Tensor]] = [{} for _ in sorted(mine)]
    order = {r: position for position, r in enumerate(sorted(mine))}
    for key, tensor in wanted.items():
        match = _RECORD_KEY.match(key)
        assert match is not None
        out[order[int(match["rank"])]][match["name"]] = tensor
    return out


def _directory_of(placeholder: dict[str, Any], checkpoint_path: str | os.PathLike | None) -> str:
    if checkpoint_path is None:
        raise RuntimeError(
            "these per-sample states were written with torch.distributed.checkpoint beside a checkpoint file "
            f"({placeholder['directory']!r}); restore them through Trainer.fit(ckpt_path=...), which says where "
            "the checkpoint file is"
        )
    return os.path.join(os.path.dirname(os.fspath(checkpoint_path)), placeholder["directory"])


def read_local_rows(
    states: dict[str, Any], layouts: dict[str, RowLayout], checkpoint_path: str | os.PathLike | None
) -> dict[str, Any]:
    """``states`` (buffer name -> saved state) with each placeholder replaced by a state of the rows ``layouts[name]`` owns.

    One ``torch.distributed.checkpoint.load`` reads, for every placeholder, the chunks that overlap the
    rank's rows; the state returned covers those rows (its ``start``/``stop`` are the chunks' bounds), as
    :meth:`~lightning_noisy.state.SampleBuffer.load_state_dict` takes it. A collective when a process group
    runs and any state is a placeholder: call on every rank. Nothing else is changed.

    Raises:
        RuntimeError: the checkpoint file's path is unknown, the directory is missing, or it belongs to
            another save (its nonce differs).
        ValueError: the directory lacks rows that a rank needs.
    """
    placeholders = {name: state[PLACEHOLDER] for name, state in states.items() if is_placeholder(state)}
    if not placeholders:
        return states
    directory, reader = _open(list(placeholders.values()), checkpoint_path)
    metadata = reader.read_metadata().state_dict_metadata
    wanted: dict[str, Any] = {}
    pieces: dict[str, dict[str, list[tuple[int, str]]]] = {name: {} for name in placeholders}
    templates: dict[tuple[str, str], Any] = {}
    prefixes = {p["prefix"]: name for name, p in placeholders.items()}
    for key, meta in metadata.items():
        match = _CHUNK_KEY.match(key)
        if match is None or match["prefix"] not in prefixes:
            continue
        name = prefixes[match["prefix"]]
        begin, end = int(match["begin"]), int(match["end"])
        templates.setdefault((name, match["name"]), meta)
        layout = layouts[name]
        if begin < layout.stop and end > layout.start:
            wanted[key] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
            pieces[name].setdefault(match["name"], []).append((begin, key))
    nonces = {p["nonce"] for p in placeholders.values()}
    if len(nonces) != 1:
        raise RuntimeError(f"the per-sample states come from several saves: {sorted(nonces)}")
    _load(wanted, reader, directory, nonces.pop())
    out = dict(states)
    for name, placeholder in placeholders.items():
        layout, state = layouts[name], dict(placeholder["header"])
        begins: set[int] = set()
        for tensor in placeholder["tensors"]:
            found = sorted(pieces[name].get(tensor, []))
            if (name, tensor) not in templates:
                raise ValueError(f"the directory {directory!r} has no rows of {name!r}.{tensor}")
            if not found:  # this rank owns no rows
                size = tuple(templates[(name, tensor)].size)
                state[tensor] = torch.empty((0, *size[1:]), dtype=templates[(name, tensor)].properties.dtype)
                begins.add(layout.start)
                continue
            bounds = [tuple(int(v) for v in key.rsplit(".", 2)[1:]) for _, key in found]
            if any(end != begin for (_, end), (begin, _) in zip(bounds, bounds[1:])):
                raise ValueError(f"the directory {directory!r} misses rows of {name!r}.{tensor} between {bounds}")
            state[tensor] = torch.cat([wanted[key] for _, key in found])
            begins.add(found[0][0])
        if len(begins) != 1:
            raise ValueError(f"the saved tensors of {name!r} are chunked differently: {sorted(begins)}")
        state["start"] = begins.pop()
        state["stop"] = state["start"] + int(next(iter(_row_tensors(state).values())).shape[0])
        out[name] = state
    return out
