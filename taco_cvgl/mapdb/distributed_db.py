"""
Database building spread over several processes, GPUs and machines with Lightning.

`Trainer.predict` runs under DDP: each process embeds one contiguous block of the image records
(no record is padded in or repeated) and writes its shard (record indices, embeddings, the
images it could not read, its model fingerprint) to a hidden folder next to the output. After a
barrier, the process that read the records (global rank 0, or the parent process with
`ddp_spawn`) merges the shards in record order into one `EmbeddingDatabase`, identical in
content to the single-process build, writes it atomically and removes the shards. A failure
leaves any previous database at the output path as it was.

Strategies: `ddp` starts the further processes of a machine by running the same command again
(Lightning's script launcher), which is also what `torchrun` and SLURM do; `ddp_spawn` starts
them from Python with multiprocessing (notebooks, tests; the calling script needs an
`if __name__ == '__main__'` guard). On several machines, start the same command on each with
MASTER_ADDR, MASTER_PORT and NODE_RANK set (or under torchrun / SLURM); the images, the weights
and the folder of the output must be at the same paths on every machine (shared storage), since
rank 0 reads every shard from there. Only rank 0 reads the records; the others get them from it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
from pathlib import Path
import shutil
from typing import Callable, Dict, Optional, Sequence, Tuple
import uuid
import warnings

import numpy as np
from taco_cvgl.errors import InputError, MismatchError
from taco_cvgl.logs import quiet_loggers
from taco_cvgl.mapdb.database import check_records, EmbeddingDatabase, ImageRecord
import torch

# Environment variables a launcher sets to tell a process its place in the job.
RANK_VARIABLES = ('RANK', 'LOCAL_RANK', 'NODE_RANK', 'SLURM_PROCID')
# What Lightning's launchers write into os.environ of the launching process.
LAUNCH_VARIABLES = ('MASTER_ADDR', 'MASTER_PORT', 'NODE_RANK', 'LOCAL_RANK', 'WORLD_SIZE')


@dataclasses.dataclass(frozen=True)
class ParallelPlan:
    """How many processes embed the images, on what, and how they are started."""

    accelerator: str            # 'cpu' or 'gpu'
    devices: int                # processes per machine
    num_nodes: int              # machines
    strategy: str               # 'ddp' or 'ddp_spawn'
    precision: str = 'auto'     # the model's autocast precision, as for the single process
    workers: Optional[int] = None  # data-loading worker processes per process (None: auto)

    @property
    def processes(self) -> int:
        """Return the number of processes of the whole job."""
        return self.devices * self.num_nodes


def leads_launch() -> bool:
    """
    Return True in the process that reads the inputs (global rank 0, or the launching parent).

    The further processes a launcher starts (Lightning's script launcher, torchrun, SLURM, the
    other machines of a multi-node job) carry a non-zero rank in their environment; they get
    the records from rank 0 instead of reading them again.
    """
    return all(os.environ.get(name, '0') in ('', '0') for name in RANK_VARIABLES)


# ------------------------------------------------------------------------------------ merge
def merge_shards(folder, records: Sequence[ImageRecord], world_size: int, model_config,
                 fingerprint: str, skip_bad: bool = False, source: str = '',
                 on_skip: Optional[Callable[[str, str], None]] = None) -> EmbeddingDatabase:
    """
    Merge the shards of `world_size` processes into one database, in record order.

    A record embedded by two shards is kept once. An image no process could read is an error
    naming the file (the first in record order), or is skipped and counted with skip_bad, as in
    `build_database`.
    """
    from taco_cvgl.mapdb.shard_predict import shard_path
    folder = Path(folder)
    n = len(records)
    embeddings = np.zeros((n, model_config.embedding_dim), np.float32)
    embedded = np.zeros(n, bool)
    errors: Dict[int, str] = {}
    for rank in range(world_size):
        path = shard_path(folder, rank)
        if not path.is_file():
            raise InputError(f'the shard of process {rank} is missing from {folder}; on several '
                             f'machines the folder of the output must be on storage they all '
                             f'share')
        with np.load(path, allow_pickle=False) as shard:
            if str(shard['fingerprint']) != fingerprint:
                raise MismatchError(f'process {rank} embedded with model '
                                    f'{shard["fingerprint"]}, rank 0 with {fingerprint}; every '
                                    f'machine must load the same weights')
            index = shard['index']
            fresh = ~embedded[index]
            embeddings[index[fresh]] = shard['embeddings'][fresh]
            embedded[index] = True
            for i, message in zip(shard['error_index'].tolist(),
                                  shard['error_message'].tolist()):
                errors.setdefault(int(i), str(message))
    for i in np.flatnonzero(embedded):
        errors.pop(int(i), None)
    covered = int(embedded.sum()) + len(errors)
    if covered != n:
        raise InputError(f'the shards in {folder} hold {covered} of {n} images')
    skipped = 0
    for i in sorted(errors):
        if not skip_bad:
            raise InputError(errors[i])
        skipped += 1
        if on_skip:
            on_skip(records[i].path, errors[i])
    kept = [r for r, ok in zip(records, embedded) if ok]
    if not kept:
        raise InputError('no readable image among the records')
    return EmbeddingDatabase(
        embeddings=embeddings[embedded],
        latitude=np.array([r.latitude for r in kept]),
        longitude=np.array([r.longitude for r in kept]),
        altitude=np.array([r.altitude for r in kept]),
        heading=np.array([r.heading for r in kept]),
        image_ids=np.array([r.path for r in kept], dtype=str),
        model_config=model_config,
        model_fingerprint=fingerprint,
        meta={'created': datetime.datetime.now(datetime.timezone.utc).isoformat(),
              'source': source, 'skipped': skipped})


# ------------------------------------------------------------------------------------ build
@contextlib.contextmanager
def _launch_environment(restore: bool):
    """
    With restore, undo what Lightning's spawn launcher writes into os.environ.

    With `ddp` the variables stay, as Lightning wants: the processes it started run the same
    program, and a later build in it (like a second `fit`) reuses them and their process group.
    """
    if not restore:
        yield
        return
    before = {name: os.environ.get(name) for name in LAUNCH_VARIABLES}
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _trainer(plan: ParallelPlan, progress: bool):
    import lightning as L
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.strategies import DDPStrategy
    strategy = DDPStrategy(process_group_backend='gloo' if plan.accelerator == 'cpu' else 'nccl',
                           start_method='spawn' if plan.strategy == 'ddp_spawn' else 'popen')
    try:
        return L.Trainer(accelerator=plan.accelerator, devices=plan.devices,
                         num_nodes=plan.num_nodes, strategy=strategy, precision='32-true',
                         logger=False, enable_checkpointing=False, enable_model_summary=False,
                         enable_progress_bar=progress, use_distributed_sampler=False,
                         inference_mode=True)
    except MisconfigurationException as exc:
        raise InputError(f'cannot start {plan.processes} processes: '
                         f'{str(exc).splitlines()[0]}') from None


def build_database_parallel(out, weights, records: Optional[Sequence[ImageRecord]],
                            plan: ParallelPlan, batch_size: int = 32, dtype: str = 'fp16',
                            skip_bad: bool = False, progress: bool = True, source: str = '',
                            on_skip: Optional[Callable[[str, str], None]] = None,
                            ) -> Optional[EmbeddingDatabase]:
    """
    Embed `records` with `plan.processes` processes and save the merged database at `out`.

    Call it in every process of the job; `records` is needed only where `leads_launch()` is
    true (the others get it from rank 0). Returns the database as written in the process that
    wrote it, None in the others.
    """
    from taco_cvgl.mapdb.shard_predict import EmbedShards, pack_records
    from taco_cvgl.model.embedder import ImageRetrievalModel
    if dtype not in ('fp16', 'fp32'):
        raise InputError(f"database dtype must be 'fp16' or 'fp32', got {dtype!r}")
    if plan.strategy == 'ddp_spawn' and torch.distributed.is_available() and \
            torch.distributed.is_initialized():
        raise InputError('this program already runs in a process group (an earlier ddp build); '
                         "keep strategy 'ddp' for its later builds")
    out = Path(out)
    packed = shard_dir = None
    if leads_launch():
        _check_records(records, plan, skip_bad)
        packed = pack_records(records)
        shard_dir = str(out.parent / f'.{out.name}.shards-{uuid.uuid4().hex[:12]}')
    model = ImageRetrievalModel.load(weights, 'cpu', 'fp32')  # Lightning moves it to its device
    module = EmbedShards(model, packed, shard_dir, plan.precision, batch_size, plan.workers,
                         quiet=not progress)
    spawned = plan.strategy == 'ddp_spawn'
    # Lightning's start-up notes (devices found, processes registered), unless progress is shown.
    lightning = () if progress else ('lightning.pytorch', 'lightning.fabric')
    with _launch_environment(spawned), quiet_loggers(lightning, logging.WARNING), \
            warnings.catch_warnings():
        warnings.filterwarnings('ignore', '.*does not have many workers.*')
        warnings.filterwarnings('ignore', '.*LeafSpec.* is deprecated')   # torch vs Lightning
        trainer = _trainer(plan, progress)
        try:
            trainer.predict(module, return_predictions=False)
            if not (trainer.node_rank == 0 if spawned else trainer.global_rank == 0):
                return None
            db = merge_shards(shard_dir, records, trainer.world_size, model.config,
                              module.fingerprint, skip_bad, source, on_skip)
            db.save(out, dtype=dtype, weights=weights)
            return db
        finally:
            if shard_dir is not None:
                shutil.rmtree(shard_dir, ignore_errors=True)


def _check_records(records, plan: ParallelPlan, skip_bad: bool) -> None:
    """Refuse, before any process starts, what the single-process build would refuse."""
    check_records(records, skip_bad)
    if plan.processes > len(records):
        raise InputError(f'{plan.processes} processes for {len(records)} images: ask for at '
                         f'most one process per image (--devices x --num-nodes)')


def check_count(flag: str, value) -> None:
    """Refuse a count option (processes, batch size, ...) that is not a whole number >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f'{flag} must be a whole number of 1 or more, got {value!r}')


def plan_processes(device: str = 'auto', precision: str = 'auto', devices: int = 1,
                   accelerator: str = 'auto', num_nodes: int = 1, strategy: str = 'auto',
                   workers: Optional[int] = None) -> Tuple[str, Optional[ParallelPlan]]:
    """
    Check the process options; return (device for one process, plan for several or None).

    `device` (auto, cpu, cuda) and `accelerator` (auto, cpu, gpu) must not contradict each
    other. strategy 'auto' is 'ddp', or 'ddp_spawn' in an interactive Python session.
    """
    check_count('--devices', devices)
    check_count('--num-nodes', num_nodes)
    if accelerator not in ('auto', 'cpu', 'gpu'):
        raise InputError(f"--accelerator must be 'auto', 'cpu' or 'gpu', got {accelerator!r}")
    if strategy not in ('auto', 'ddp', 'ddp_spawn'):
        raise InputError(f"--strategy must be 'auto', 'ddp' or 'ddp_spawn', got {strategy!r}")
    if workers is not None and workers < 0:
        raise InputError(f'--workers must be 0 or more, got {workers}')
    wanted = {'cpu': 'cpu', 'cuda': 'gpu'}.get(device.split(':')[0])
    if accelerator != 'auto' and wanted not in (None, accelerator):
        raise InputError(f'--device {device} contradicts --accelerator {accelerator}: give one')
    if accelerator == 'auto':
        accelerator = wanted or ('gpu' if torch.cuda.is_available() else 'cpu')
    elif device == 'auto':      # an explicit accelerator picks the single process's device too
        device = 'cuda' if accelerator == 'gpu' else 'cpu'
    if devices * num_nodes == 1:
        return device, None
    if accelerator == 'gpu':
        if not torch.cuda.is_available():
            raise InputError('GPUs were requested but CUDA is not available here')
        if devices > torch.cuda.device_count():
            raise InputError(f'--devices {devices} GPUs requested but this machine has '
                             f'{torch.cuda.device_count()}')
    elif precision == 'fp16':
        raise InputError('fp16 autocast is for CUDA; on CPU use bf16 or fp32')
    if strategy == 'auto':
        from lightning.fabric.utilities.imports import _IS_INTERACTIVE
        strategy = 'ddp_spawn' if _IS_INTERACTIVE else 'ddp'
    return device, ParallelPlan(accelerator, devices, num_nodes, strategy, precision, workers)
