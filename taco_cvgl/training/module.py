"""
The LightningModule (model, loss, optimiser and schedule, validation recall) and its callbacks.

The embedder sits at `self.model`, so checkpoint keys are `model.<parameter>` and the
hyper-parameters hold `model_config` as a JSON string: `ImageRetrievalModel.load_from_checkpoint`
reads a checkpoint of this module directly, and `torch.load(weights_only=True)` opens it.
"""

from __future__ import annotations

import math
import time
from typing import Dict, List, Optional, Sequence

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.plugins import TorchCheckpointIO
import numpy as np
from taco_cvgl.errors import InputError, TacoError
from taco_cvgl.evaluation.recall import recall_at_k, top1_errors_m
from taco_cvgl.files.atomic import atomic_path
from taco_cvgl.mapdb.database import ImageRecord
from taco_cvgl.model.backbones import backbone_stages, batchnorms
from taco_cvgl.model.config import ModelConfig
from taco_cvgl.model.embedder import ImageRetrievalModel
from taco_cvgl.training.data import (ImageDatabaseDataset, mine_hard_negatives, records_enu,
                                     TripletDataset, write_triplets)
from taco_cvgl.training.losses import RetrievalLoss
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

RECALL_KS = (1, 5, 10)
GRID_RETRIEVED = 4          # retrieved images shown per query in the TensorBoard figure
HIT, MISS = (0.1, 0.8, 0.1), (0.9, 0.1, 0.1)   # border colours (RGB in [0, 1])


def warmup_cosine(step: int, warmup: int, total: int, floor: float) -> float:
    """Return the learning-rate factor: linear warm-up to 1, then cosine decay to `floor`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class RetrievalModule(L.LightningModule):
    """Trains an `ImageRetrievalModel` on triplets; validates Recall@k at a distance threshold."""

    def __init__(self, model_config: str, lr: float = 1e-4, weight_decay: float = 0.05,
                 warmup_epochs: float = 1.0, min_lr_ratio: float = 0.01,
                 triplet_weight: float = 1.0, infonce_weight: float = 0.5,
                 ms_weight: float = 0.0, margin: float = 0.1, temperature: float = 0.07,
                 mining: str = 'hard', pos_radius_m: float = 25.0, neg_radius_m: float = 100.0,
                 threshold_m: float = 25.0, grid_queries: int = 8,
                 backbone_weights: Optional[str] = None, freeze_bn: bool = False,
                 head_lr_scale: float = 1.0, freeze_stages: int = 0):
        """
        model_config: ModelConfig JSON; backbone_weights: None, 'imagenet' or a file.

        lr is the AdamW peak learning rate of the backbone, reached after warmup_epochs and
        decaying by a cosine to lr * min_lr_ratio; the head (norm, pooling, projection) runs at
        lr * head_lr_scale; weight_decay spares biases and norm weights. freeze_bn keeps the
        backbone's BatchNorm layers in eval mode (their pretrained statistics unchanged, their
        affine weights trained): small batches of another domain would otherwise drag them
        away and destroy pretrained features. freeze_stages: the first N backbone stages do not
        train. threshold_m is the validation's hit distance.
        """
        super().__init__()
        # backbone_weights only seeds a fresh model; a checkpoint carries the trained weights.
        self.save_hyperparameters(ignore=['backbone_weights'])
        self.config = ModelConfig.from_json(model_config)
        self.model = ImageRetrievalModel(self.config, backbone_weights)
        self._frozen = self._freeze_stages(int(freeze_stages))
        self.loss = RetrievalLoss(triplet_weight, infonce_weight, ms_weight, margin,
                                  temperature, mining, pos_radius_m, neg_radius_m)
        self._val_outputs: List[tuple] = []
        self.last_val_metrics: Dict[str, float] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a normalised batch."""
        return self.model(self._layout(x))

    def _freeze_stages(self, count: int) -> List[torch.nn.Module]:
        """Stop the first `count` backbone stages training; return their modules."""
        stages = backbone_stages(self.config.backbone, self.model.backbone)
        if not 0 <= count <= len(stages):
            raise InputError(f'freeze_stages {count}: {self.config.backbone} has '
                             f'{len(stages)} stages')
        frozen = [module for stage in stages[:count] for module in stage]
        for module in frozen:
            module.requires_grad_(False)
        return frozen

    def train(self, mode: bool = True) -> 'RetrievalModule':
        """Set training mode; frozen stages, and with freeze_bn all backbone BN, stay in eval."""
        super().train(mode)
        if mode:
            fixed = batchnorms(self.model.backbone) if self.hparams.freeze_bn else []
            for module in fixed + self._frozen:
                module.eval()
        return self

    def on_train_start(self) -> None:
        """Apply freeze_bn: Lightning itself does not call train() when fitting starts."""
        self.train()

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        # channels_last speeds convolutions on GPUs; on this CPU it changed nothing.
        if x.device.type == 'cuda':
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def setup(self, stage: str) -> None:
        """Put the weights in channels_last for a GPU (before DDP wraps the model)."""
        if self.trainer.strategy.root_device.type == 'cuda':
            self.model.to(memory_format=torch.channels_last)

    # ----------------------------------------------------------------------------- training
    def _triplet_loss(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        images = batch['images']                      # B x 3 x C x H x W
        b = images.shape[0]
        x = images.transpose(0, 1).reshape(3 * b, *images.shape[2:])
        emb = self(x)
        labels = batch['labels'].T.reshape(-1)
        latlon = batch['latlon'].transpose(0, 1).reshape(-1, 2)
        return self.loss(emb, labels, latlon)

    def training_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Embed anchors, positives and negatives together and return the combined loss."""
        parts = self._triplet_loss(batch)
        if not torch.isfinite(parts['loss']):
            raise TacoError(f'the training loss became {parts["loss"].item()} at step '
                            f'{self.global_step}; lower the learning rate (--lr) or use fp32')
        b, sync = batch['images'].shape[0], self.trainer.world_size > 1
        self.log('train/loss', parts['loss'], prog_bar=True, on_step=True, on_epoch=True,
                 batch_size=b, sync_dist=sync)
        self.log_dict({f'train/{k}': v.detach() for k, v in parts.items() if k != 'loss'},
                      on_step=True, on_epoch=True, batch_size=b, sync_dist=sync)
        return parts['loss']

    def configure_optimizers(self):
        """Return AdamW (no decay on biases and norms) with per-step warm-up, cosine decay."""
        hp = self.hparams
        optimizer = torch.optim.AdamW(self._param_groups(), lr=hp.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        epochs = max(1, int(self.trainer.max_epochs or 1))
        warmup = min(total // 2, int(round(hp.warmup_epochs * total / epochs)))
        floor = float(hp.min_lr_ratio)

        def factor(step: int) -> float:
            return warmup_cosine(step, warmup, total, floor)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {'optimizer': optimizer,
                'lr_scheduler': {'scheduler': scheduler, 'interval': 'step'}}

    def _param_groups(self) -> List[dict]:
        """Return the trainable parameters: backbone at lr, head at lr * head_lr_scale."""
        hp = self.hparams
        backbone = {id(p) for p in self.model.backbone.parameters()}
        groups: Dict[tuple, list] = {}
        for p in self.model.parameters():
            if p.requires_grad:
                scale = 1.0 if id(p) in backbone else float(hp.head_lr_scale)
                groups.setdefault((scale, hp.weight_decay if p.ndim > 1 else 0.0), []).append(p)
        return [{'params': params, 'lr': hp.lr * scale, 'weight_decay': decay}
                for (scale, decay), params in groups.items()]

    # ----------------------------------------------------------------------------- validation
    def validation_step(self, batch: Dict[str, torch.Tensor], batch_idx: int,
                        dataloader_idx: int = 0) -> None:
        """Embed validation images (retrieval set), or score validation triplets (val/loss)."""
        if 'images' in batch:
            loss = self._triplet_loss(batch)['loss']
            self.log('val/loss', loss, on_epoch=True, batch_size=batch['images'].shape[0],
                     sync_dist=True, add_dataloader_idx=False)
            return
        emb = self(batch['image']).float()
        self._val_outputs.append((batch['index'], emb, batch['latlon'], batch['is_query']))

    def on_validation_epoch_end(self) -> None:
        """Score retrieval over the whole validation set: Recall@1/5/10, median top-1 error."""
        outputs, self._val_outputs = self._val_outputs, []
        if not outputs or self.trainer.sanity_checking:
            return
        index, emb, latlon, is_query = (torch.cat([o[k] for o in outputs]) for k in range(4))
        if self.trainer.world_size > 1:   # every rank scores the whole set after a gather
            index, emb, latlon, is_query = (self.all_gather(t).flatten(0, 1)
                                            for t in (index, emb, latlon, is_query))
        # Sorted unique dataset indices: drops the padding a distributed sampler repeats.
        uniq, order = np.unique(index.cpu().numpy(), return_index=True)
        emb = emb[torch.as_tensor(order, device=emb.device)]
        latlon, query = latlon.cpu().numpy()[order], is_query.cpu().numpy()[order].astype(bool)
        if not query.any() or query.all():
            return
        db_rows, query_rows = np.flatnonzero(~query), np.flatnonzero(query)
        sim = emb[torch.as_tensor(query_rows, device=emb.device)] @ \
            emb[torch.as_tensor(db_rows, device=emb.device)].T
        top = torch.topk(sim, min(max(RECALL_KS), len(db_rows)), dim=1).indices.cpu().numpy()
        ks = [k for k in RECALL_KS if k <= top.shape[1]]
        db_latlon, q_latlon = latlon[db_rows], latlon[query_rows]
        recall = recall_at_k(top, q_latlon, ks, self.hparams.threshold_m, db_latlon)
        errors = top1_errors_m(top, q_latlon, db_latlon)
        metrics = {f'val/recall@{k}': v for k, v in recall.items()}
        metrics['val/median_error_m'] = float(np.median(errors))
        self.log_dict(metrics)            # identical on every rank: no reduction needed
        self.last_val_metrics = metrics
        if self.trainer.is_global_zero:
            self._log_retrieval_grid(uniq[db_rows[top]], uniq[query_rows], top, db_latlon,
                                     q_latlon)

    def _log_retrieval_grid(self, retrieved: np.ndarray, queries: np.ndarray,
                            top: np.ndarray, db_latlon: np.ndarray, q_latlon: np.ndarray) -> None:
        experiment = getattr(self.logger, 'experiment', None)
        loaders = self.trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        dataset = getattr(loader, 'dataset', None)
        if not hasattr(experiment, 'add_image') or not isinstance(dataset, ImageDatabaseDataset):
            return
        from taco_cvgl.evaluation.recall import hits_within
        from torchvision.utils import make_grid
        n = min(int(self.hparams.grid_queries), len(queries))
        if n == 0:
            return
        k = min(GRID_RETRIEVED, top.shape[1])
        hits = hits_within(top[:n, :k], q_latlon[:n], self.hparams.threshold_m, db_latlon)
        tiles = []
        for i in range(n):
            tiles.append(_bordered(dataset.display_image(int(queries[i])), (1.0, 1.0, 1.0)))
            for j in range(k):
                image = dataset.display_image(int(retrieved[i, j]))
                tiles.append(_bordered(image, HIT if hits[i, j] else MISS))
        grid = make_grid(torch.stack(tiles), nrow=k + 1, padding=2, pad_value=0.0)
        # One row per query: the query (white frame), then its top-k (green: within
        # threshold_m of the query's position, red: not).
        experiment.add_image('val/retrievals', grid, self.global_step)


def _bordered(image: torch.Tensor, colour, width: int = 3) -> torch.Tensor:
    """Return the image with a coloured frame of `width` pixels (for the retrieval figure)."""
    out = F.pad(image, (width, width, width, width))
    for c in range(3):
        out[c, :width], out[c, -width:] = colour[c], colour[c]
        out[c, :, :width], out[c, :, -width:] = colour[c], colour[c]
    return out


class HardNegativeMiner(L.Callback):
    """
    Every N epochs, re-pick each triplet's negative from the current model's embeddings.

    The training database is embedded; for each triplet whose anchor is in it, one of the
    `candidates` most similar images lying beyond neg_radius_m becomes the negative. The mined
    negatives are kept in the checkpoint (so a resumed run trains on them) and, when out_path is
    given, written there as a triplet file.
    """

    def __init__(self, dataset: TripletDataset, records: Sequence[ImageRecord],
                 every_n_epochs: int, neg_radius_m: float, candidates: int = 10,
                 batch_size: int = 64, num_workers: int = 0, out_path=None, data_dir=None,
                 seed: int = 0):
        """Index the training database; anchors outside it keep their negatives."""
        self.dataset, self.records = dataset, list(records)
        self.every, self.neg_radius_m, self.candidates = int(every_n_epochs), neg_radius_m, \
            int(candidates)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.out_path, self.data_dir = out_path, data_dir
        self.enu = records_enu(self.records)
        self._row = {r.path: k for k, r in enumerate(self.records)}
        self.mined_epoch = -1

    @property
    def state_key(self) -> str:
        """Name the state in the checkpoint."""
        return 'HardNegativeMiner'

    def state_dict(self) -> dict:
        """Return the epoch of the last mining and the negatives it chose."""
        negatives = [t.negative for t in self.dataset.triplets] if self.mined_epoch >= 0 else []
        return {'mined_epoch': self.mined_epoch, 'negatives': negatives}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore mined negatives on resume."""
        self.mined_epoch = int(state_dict.get('mined_epoch', -1))
        negatives = state_dict.get('negatives') or []
        if len(negatives) == len(self.dataset):
            self.dataset.set_negatives(negatives)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: RetrievalModule) -> None:
        """Mine at the start of epochs every, 2 x every, ... (before the epoch's loader starts)."""
        epoch = trainer.current_epoch
        if self.every <= 0 or epoch == 0 or epoch % self.every or epoch == self.mined_epoch:
            return
        start = time.monotonic()
        emb = self.embed(trainer, pl_module)
        rows = np.array([self._row.get(t.anchor, -1) for t in self.dataset.triplets])
        known = np.flatnonzero(rows >= 0)
        picked = mine_hard_negatives(emb, self.enu, rows[known], self.neg_radius_m,
                                     self.candidates, self.seed + epoch)
        negatives: List[Optional[str]] = [None] * len(self.dataset)
        for k, p in zip(known, picked):
            if p >= 0:
                negatives[k] = self.records[p].path
        changed = self.dataset.set_negatives(negatives)
        self.mined_epoch = epoch
        pl_module.log('train/remined_fraction', changed / len(self.dataset), on_epoch=True,
                      sync_dist=trainer.world_size > 1)
        if trainer.is_global_zero:
            if self.out_path is not None:
                write_triplets(self.dataset.triplets, self.out_path, self.data_dir)
            print(f'hard-negative mining (epoch {epoch}): {changed} of {len(self.dataset)} '
                  f'negatives changed in {time.monotonic() - start:.1f} s')

    @torch.no_grad()
    def embed(self, trainer: L.Trainer, pl_module: RetrievalModule) -> np.ndarray:
        """Embed the training database (no augmentation) with the current weights."""
        loader = DataLoader(ImageDatabaseDataset(self.records, pl_module.config),
                            batch_size=self.batch_size, num_workers=self.num_workers)
        was_training = pl_module.training
        pl_module.eval()
        chunks = []
        try:
            with trainer.precision_plugin.forward_context():
                for batch in loader:
                    chunks.append(pl_module(batch['image'].to(pl_module.device)).float().cpu())
        finally:
            pl_module.train(was_training)   # through RetrievalModule.train: freeze_bn holds
        return torch.cat(chunks).numpy()


class FitStart(L.Callback):
    """Record the epoch and step that fitting starts from (not zero after a resume)."""

    def __init__(self):
        """Start at zero until fitting begins."""
        self.epoch, self.step = 0, 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Note where the (possibly restored) loop stands."""
        self.epoch, self.step = trainer.current_epoch, trainer.global_step


class RunProgressBar(TQDMProgressBar):
    """The tqdm bar (per-epoch ETA) plus an estimate of the time left for the whole run."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start the run clock."""
        super().on_train_start(trainer, pl_module)
        self._start = (time.monotonic(), trainer.global_step)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        """Add run_eta: h:mm:ss to the last epoch at the current pace (early stop may cut it)."""
        items = super().get_metrics(trainer, pl_module)
        items.pop('v_num', None)
        start = getattr(self, '_start', None)
        total = trainer.estimated_stepping_batches
        if start and math.isfinite(total) and trainer.global_step > start[1]:
            pace = (time.monotonic() - start[0]) / (trainer.global_step - start[1])
            left = int(pace * max(0, total - trainer.global_step))
            items['run_eta'] = f'{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}'
        return items


class AtomicCheckpointIO(TorchCheckpointIO):
    """
    Save checkpoints through `atomic_path`: beside their target, renamed into place when done.

    Lightning's own writer stages each file in the system temp folder (fsspec's mkstemp) and
    then moves it: an interrupted save leaves a partial checkpoint of hundreds of MB there,
    and across file systems the move is a copy that a kill can cut short.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        """Write `checkpoint` to `path` atomically (storage_options: as Lightning's writer)."""
        if storage_options is not None:   # Lightning's writer refuses them with a TypeError
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)
