"""
Lightning `predict` that embeds database images in shards, one per process (DDP).

Used by taco_cvgl.mapdb.distributed_db: each process embeds one contiguous block of the records
(nothing padded in or repeated, unlike a DistributedSampler) and writes its shard. The
embedding is the model's own `encode_batch`, so preprocessing and autocast are those of the
single-process build.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple
import warnings

import lightning as L
import numpy as np
from taco_cvgl.errors import InputError
from taco_cvgl.files.atomic import atomic_path
from taco_cvgl.mapdb.database import ImageRecord
from torch.utils.data import DataLoader, Dataset


class ImageFiles(Dataset):
    """The images of a block of records: item = (record index, RGB array or error text)."""

    def __init__(self, paths: Sequence[str], indices: np.ndarray):
        """Hold every record's path and the indices of this block."""
        self.paths, self.indices = paths, indices

    def __len__(self) -> int:
        """Return the number of images of the block."""
        return len(self.indices)

    def __getitem__(self, item: int):
        """Return (record index, HxWx3 uint8 RGB), or (record index, why it is unreadable)."""
        from taco_cvgl.files.image_codec import load_image_file
        index = int(self.indices[item])
        try:
            return index, load_image_file(self.paths[index])
        except InputError as exc:   # reported by rank 0, or skipped with skip_bad
            return index, str(exc)


def collate(items):
    """Keep images as a list: they differ in size until prepare_batch resizes them."""
    return [i for i, _ in items], [image for _, image in items]


def pack_records(records: Sequence[ImageRecord]) -> Tuple[List[str], np.ndarray]:
    """Return records as (paths, N x 4 latitude/longitude/altitude/heading), cheap to send."""
    coords = np.array([[r.latitude, r.longitude, r.altitude, r.heading] for r in records],
                      dtype=np.float64).reshape(-1, 4)
    return [r.path for r in records], coords


def shard_path(folder, rank: int) -> Path:
    """Return where the process of global rank `rank` writes its shard."""
    return Path(folder) / f'shard-{rank:05d}.npz'


def default_workers(local_processes: int) -> int:
    """Return data-loading workers per process: the CPUs of a machine shared out, 4 at most."""
    return max(0, min(4, (os.cpu_count() or 1) // max(1, local_processes) - 1))


def quiet_lightning() -> None:
    """Silence Lightning's start-up notes and a torch-version deprecation it triggers."""
    for name in ('lightning.pytorch', 'lightning.fabric'):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings('ignore', '.*LeafSpec.* is deprecated')


class EmbedShards(L.LightningModule):
    """
    Predict-only module: embed this process's block of records and write it as a shard.

    A shard (.npz) holds `index` (record indices), `embeddings` (float32, one row per index),
    `error_index` / `error_message` (images this process could not read) and `fingerprint`
    (of the model this process loaded).
    """

    def __init__(self, model, packed: Optional[Tuple[List[str], np.ndarray]],
                 shard_dir: Optional[str], precision: str = 'auto', batch_size: int = 32,
                 workers: Optional[int] = None, quiet: bool = False):
        """Hold the model and, where they were read, the records and the shard folder."""
        super().__init__()
        self.model = model
        self.fingerprint = model.fingerprint()
        self.packed, self.shard_dir = packed, shard_dir
        self.runtime_precision, self.batch_size, self.workers = precision, batch_size, workers
        self.quiet = quiet
        self._reset()

    def __setstate__(self, state):
        """In a process ddp_spawn started, be as quiet as the process that started it."""
        super().__setstate__(state)
        if self.quiet:
            quiet_lightning()

    def _reset(self) -> None:
        self._indices: List[int] = []
        self._chunks: List[np.ndarray] = []
        self._errors: Dict[int, str] = {}

    def setup(self, stage: str) -> None:
        """Give every process rank 0's records and shard folder."""
        self.packed, self.shard_dir = self.trainer.strategy.broadcast(
            (self.packed, self.shard_dir), src=0)
        self._reset()

    def predict_dataloader(self) -> DataLoader:
        """Return the loader over this process's contiguous block of records."""
        paths = self.packed[0]
        block = np.array_split(np.arange(len(paths)), self.trainer.world_size)
        workers = self.workers
        if workers is None:
            workers = default_workers(self.trainer.num_devices)
        return DataLoader(ImageFiles(paths, block[self.trainer.global_rank]),
                          batch_size=self.batch_size, shuffle=False, num_workers=workers,
                          collate_fn=collate)

    def on_predict_start(self) -> None:
        """Put the model on this process's device with the single-process autocast."""
        self.model.to_runtime(str(self.device), self.runtime_precision)

    def predict_step(self, batch, batch_idx: int) -> int:
        """Embed the readable images of a batch, remember the unreadable ones; return the count."""
        indices, images = batch
        good = [(i, im) for i, im in zip(indices, images) if not isinstance(im, str)]
        self._errors.update((i, im) for i, im in zip(indices, images) if isinstance(im, str))
        if good:
            self._chunks.append(self.model.encode_batch([im for _, im in good],
                                                        batch_size=len(good)).numpy())
            self._indices.extend(i for i, _ in good)
        return len(good)   # kept in the shard, not by Lightning (return_predictions=False)

    def on_predict_end(self) -> None:
        """Write this process's shard, then wait until every process has written its own."""
        dim = self.model.config.embedding_dim
        errors = sorted(self._errors.items())
        arrays = {
            'index': np.array(self._indices, dtype=np.int64),
            'embeddings': (np.concatenate(self._chunks).astype(np.float32) if self._chunks
                           else np.zeros((0, dim), np.float32)),
            'error_index': np.array([i for i, _ in errors], dtype=np.int64),
            'error_message': np.array([m for _, m in errors], dtype=str),
            'fingerprint': np.array(self.fingerprint),
        }
        folder = Path(self.shard_dir)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(shard_path(folder, self.global_rank)) as tmp, open(tmp, 'wb') as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        self._reset()
        self.trainer.strategy.barrier('taco_cvgl shards written')
