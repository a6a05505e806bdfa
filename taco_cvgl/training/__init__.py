"""
Offline training of the embedder with PyTorch Lightning (`taco-cvgl train`).

- `data`: triplet files, GPS-tagged image datasets, GPS triplet generation, hard-negative
  mining, augmentation, the DataModule.
- `losses`: triplet (given or hardest in batch), InfoNCE, multi-similarity.
- `module`: the LightningModule (model, optimiser, schedule, validation Recall@k) and callbacks.
- `metrics`: Recall@k at a distance threshold, pure numpy (shared with the evaluation tool).

Submodules import torch and Lightning; import them where needed.
"""
