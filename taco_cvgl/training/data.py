"""
Training data: triplet files, GPS-tagged images, triplet generation and mining, augmentation.

Triplet file (CSV, optional header): `anchor,positive,negative,place_label`, image paths relative
to the data folder. Anchor and positive show the same place; the negative another place; images
with the same place_label show the same place (used for in-batch mining where GPS is unknown).

Database CSV: `image_path,latitude,longitude[,heading][,altitude]` (see taco_cvgl.mapdb.database).

Every image enters the network through model.preprocess: validation images through the very
`prepare_batch` the node uses; training images are augmented at the model's input size and then
pass through the same `normalize`.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import lightning as L
import numpy as np
from taco_cvgl.errors import InputError
from taco_cvgl.files.atomic import atomic_path
from taco_cvgl.files.image_codec import load_image_file
from taco_cvgl.geo.geodesy import angle_difference_deg, to_enu
from taco_cvgl.mapdb.database import ImageRecord
from taco_cvgl.model.config import ModelConfig
from taco_cvgl.model.preprocess import image_to_tensor, normalize, prepare_batch, resize
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as TF

TRIPLET_COLUMNS = ('anchor', 'positive', 'negative', 'place_label')
CPU = torch.device('cpu')


# --------------------------------------------------------------------------------- triplet files
@dataclasses.dataclass(frozen=True)
class Triplet:
    """Three image paths (anchor and positive at one place, negative elsewhere) and the place."""

    anchor: str
    positive: str
    negative: str
    place_label: str


def read_triplets(path, data_dir=None, skip_missing: bool = False) -> Tuple[List[Triplet], int]:
    """
    Read a triplet file; return (triplets with resolved paths, number of lines skipped).

    Relative paths are taken from data_dir (default: the file's folder). A line naming a missing
    image is an error naming the line, or is skipped and counted when skip_missing is set.
    """
    path = Path(path)
    base = Path(data_dir) if data_dir else path.parent
    if not path.is_file():
        raise InputError(f'triplet file not found: {path}')
    triplets, skipped, exists = [], 0, {}
    with open(path, newline='', encoding='utf-8') as handle:
        for line_no, row in enumerate(csv.reader(handle), start=1):
            row = [field.strip() for field in row]
            if not any(row) or (line_no == 1 and row[:3] == list(TRIPLET_COLUMNS[:3])):
                continue
            where = f'{path}:{line_no}'
            if len(row) not in (3, 4) or not all(row[:3]):
                raise InputError(f'{where}: expected anchor,positive,negative,place_label, got '
                                 f'{row}')
            images = [name if os.path.isabs(name) else str(base / name) for name in row[:3]]
            missing = [p for p in images if not exists.setdefault(p, os.path.isfile(p))]
            if missing:
                if skip_missing:
                    skipped += 1
                    continue
                raise InputError(f'{where}: image not found: {missing[0]} (pass --skip-missing '
                                 f'to skip such lines and count them)')
            label = row[3] if len(row) == 4 and row[3] else images[0]
            triplets.append(Triplet(images[0], images[1], images[2], label))
    if not triplets:
        raise InputError(f'{path}: no usable triplets ({skipped} line(s) skipped for missing '
                         f'images)')
    return triplets, skipped


def write_triplets(triplets: Sequence[Triplet], out, data_dir) -> Path:
    """Write a triplet file atomically with paths relative to data_dir; return its path."""
    out = Path(out)
    with atomic_path(out) as tmp, open(tmp, 'w', newline='', encoding='utf-8') as handle:
        writer = csv.writer(handle)
        writer.writerow(TRIPLET_COLUMNS)
        for t in triplets:
            writer.writerow([os.path.relpath(p, data_dir)
                             for p in (t.anchor, t.positive, t.negative)] + [t.place_label])
    return out


# --------------------------------------------------------------------------------- geometry
def records_enu(records: Sequence[ImageRecord]) -> np.ndarray:
    """Return N x 2 (east, north) metres of records around their mean position."""
    lat = np.array([r.latitude for r in records], float)
    lon = np.array([r.longitude for r in records], float)
    bad = np.flatnonzero(~(np.isfinite(lat) & np.isfinite(lon)))
    if len(bad):
        raise InputError(f'image {records[bad[0]].path} has no valid latitude/longitude '
                         f'({lat[bad[0]]}, {lon[bad[0]]})')
    return to_enu(float(lat.mean()), float(lon.mean()), lat, lon)


def pairs_within(enu: np.ndarray, radius_m: float) -> Tuple[np.ndarray, np.ndarray]:
    """
    Return (i, j) index arrays of all ordered pairs i != j closer than radius_m metres.

    Points are bucketed into square cells of radius_m, so each point is compared with the points
    of its own and the 8 neighbouring cells only: O(N x neighbours), not O(N^2).
    """
    cell = np.floor(enu / radius_m).astype(np.int64)
    cell -= cell.min(axis=0)
    stride = int(cell[:, 1].max()) + 3
    key = cell[:, 0] * stride + cell[:, 1] + 1
    order = np.argsort(key, kind='stable')
    sorted_key = key[order]
    cells, starts, counts = np.unique(sorted_key, return_index=True, return_counts=True)
    out_i, out_j = [], []
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            want = key + dx * stride + dy
            slot = np.clip(np.searchsorted(cells, want), 0, len(cells) - 1)
            hit = np.flatnonzero(cells[slot] == want)
            n = counts[slot[hit]]
            first = np.repeat(starts[slot[hit]], n)
            offset = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
            i = np.repeat(hit, n)
            j = order[first + offset]
            d = np.hypot(*(enu[i] - enu[j]).T)
            keep = (d <= radius_m) & (i != j)
            out_i.append(i[keep])
            out_j.append(j[keep])
    return np.concatenate(out_i), np.concatenate(out_j)


def place_labels(enu: np.ndarray, cell_m: float) -> List[str]:
    """Return a place label per point: the square cell of cell_m metres it falls in."""
    cell = np.floor(enu / cell_m).astype(np.int64)
    return [f'cell_{x}_{y}' for x, y in cell]


# --------------------------------------------------------------------------------- generation
@dataclasses.dataclass
class TripletSummary:
    """What triplet generation made and what it had to leave out."""

    triplets: int
    anchors: int
    places: int
    without_positive: int
    without_negative: int
    path: Optional[Path] = None


def generate_triplets(records: Sequence[ImageRecord], pos_radius_m: float = 25.0,
                      neg_radius_m: float = 100.0, max_heading_diff_deg: Optional[float] = None,
                      per_anchor: int = 1, seed: int = 0, source: str = 'database'
                      ) -> Tuple[List[Triplet], TripletSummary]:
    """
    Make triplets from GPS: positives within pos_radius_m, negatives beyond neg_radius_m.

    Every image with at least one positive is an anchor of per_anchor triplets, each with a random
    positive and a random negative. With max_heading_diff_deg, a positive must also face within
    that many degrees of the anchor (every record then needs a heading). Place labels are
    pos_radius_m square cells.
    """
    if not 0 < pos_radius_m <= neg_radius_m:
        raise InputError(f'need 0 < pos_radius_m ({pos_radius_m}) <= neg_radius_m '
                         f'({neg_radius_m})')
    if per_anchor < 1:
        raise InputError(f'per_anchor must be >= 1, got {per_anchor}')
    if len(records) < 3:
        raise InputError(f'{source}: too few images to make triplets ({len(records)}; a '
                         f'triplet needs two at one place and one at another)')
    enu = records_enu(records)
    i, j = pairs_within(enu, pos_radius_m)
    if max_heading_diff_deg is not None:
        heading = np.array([r.heading for r in records], float)
        if not np.isfinite(heading).all():
            bad = records[int(np.flatnonzero(~np.isfinite(heading))[0])].path
            raise InputError(f'{source}: max_heading_diff_deg needs a heading for every image; '
                             f'{bad} has none')
        keep = np.abs(angle_difference_deg(heading[i], heading[j])) <= max_heading_diff_deg
        i, j = i[keep], j[keep]
    if len(i) == 0:
        raise InputError(f'{source}: too few places to mine: no image has another within '
                         f'{pos_radius_m} m to be its positive')
    order = np.lexsort((j, i))
    i, j = i[order], j[order]
    anchors, first, count = np.unique(i, return_index=True, return_counts=True)
    rng = np.random.default_rng(seed)
    anchor_rows = np.repeat(np.arange(len(anchors)), per_anchor)
    pick = first[anchor_rows] + (rng.random(len(anchor_rows)) * count[anchor_rows]).astype(int)
    negatives = _random_far(enu, anchors[anchor_rows], neg_radius_m, rng)
    labels = place_labels(enu, pos_radius_m)
    triplets = [Triplet(records[a].path, records[p].path, records[n].path, labels[a])
                for a, p, n in zip(anchors[anchor_rows], j[pick], negatives) if n >= 0]
    no_negative = len(set(anchors[anchor_rows][negatives < 0].tolist()))
    if not triplets:
        raise InputError(f'{source}: too few places to mine: every image lies within '
                         f'{neg_radius_m} m of every other, so none has a negative')
    summary = TripletSummary(triplets=len(triplets), anchors=len(anchors) - no_negative,
                             places=len({labels[a] for a in anchors}),
                             without_positive=len(records) - len(anchors),
                             without_negative=no_negative)
    return triplets, summary


def _random_far(enu: np.ndarray, anchors: np.ndarray, radius_m: float,
                rng: np.random.Generator, tries: int = 32) -> np.ndarray:
    """Return, per anchor, a random point index farther than radius_m (-1 where none exists)."""
    cand = rng.integers(0, len(enu), size=(len(anchors), tries))
    far = np.hypot(*(enu[cand] - enu[anchors][:, None]).transpose(2, 0, 1)) > radius_m
    out = np.where(far.any(1), cand[np.arange(len(anchors)), far.argmax(1)], -1)
    for k in np.flatnonzero(out < 0):  # rare: most points are near this anchor; look at all
        options = np.flatnonzero(np.hypot(*(enu - enu[anchors[k]]).T) > radius_m)
        if len(options):
            out[k] = rng.choice(options)
    return out


def make_triplets(csv_path, out, pos_radius_m: float = 25.0, neg_radius_m: float = 100.0,
                  max_heading_diff_deg: Optional[float] = None, per_anchor: int = 1,
                  seed: int = 0, images_dir=None) -> TripletSummary:
    """
    Generate triplets from a database CSV and write them (paths relative to images_dir).

    images_dir defaults to the CSV's folder, as for `read_csv`. Returns a summary with the path.
    """
    from taco_cvgl.mapdb.database import read_csv
    base = Path(images_dir) if images_dir else Path(csv_path).parent
    records = read_csv(csv_path, base)
    triplets, summary = generate_triplets(records, pos_radius_m, neg_radius_m,
                                          max_heading_diff_deg, per_anchor, seed, str(csv_path))
    summary.path = write_triplets(triplets, out, base)
    return summary


def mine_hard_negatives(embeddings, enu: np.ndarray, anchors: np.ndarray, neg_radius_m: float,
                        candidates: int = 10, seed: int = 0, chunk: int = 256) -> np.ndarray:
    """
    Return, per anchor row, a hard negative: close in embedding space, far on the ground.

    embeddings N x D (L2-normalised), enu N x 2 metres, anchors: row indices. Among the rows
    beyond neg_radius_m of the anchor, one of the `candidates` most similar is drawn at random
    (the very hardest is often a mislabelled or look-alike place). -1 where no row is far enough.
    """
    emb = torch.as_tensor(np.asarray(embeddings, np.float32))
    pos = torch.as_tensor(np.asarray(enu, np.float64))
    gen = torch.Generator().manual_seed(int(seed))
    out = np.full(len(anchors), -1, np.int64)
    k = min(int(candidates), len(emb))
    for start in range(0, len(anchors), chunk):
        rows = torch.as_tensor(np.asarray(anchors[start:start + chunk], np.int64))
        sim = emb[rows] @ emb.T
        near = torch.cdist(pos[rows], pos) <= neg_radius_m
        sim = sim.masked_fill(near, float('-inf'))
        top_val, top_idx = torch.topk(sim, k, dim=1)
        valid = torch.isfinite(top_val)
        # Draw uniformly among each row's valid candidates (they come first, best first).
        n_valid = valid.sum(1)
        draw = (torch.rand(len(rows), generator=gen) * n_valid.clamp_min(1)).long()
        chosen = top_idx.gather(1, draw[:, None])[:, 0]
        out[start:start + len(rows)] = torch.where(n_valid > 0, chosen, -1).numpy()
    return out


# --------------------------------------------------------------------------------- augmentation
@dataclasses.dataclass
class Augmentation:
    """
    Photometric and mild geometric augmentation for place recognition, at the input size.

    A random crop of crop_scale..1 of the image area (its aspect within 10 % of the image's)
    resized to the input size, brightness/contrast/saturation jitter of +-color_jitter, a hue
    shift of +-color_jitter/6 of a turn, a Gaussian blur with probability blur_prob. Horizontal
    flip is off by default: a mirrored place is not the same place. rotate (for downward-looking
    cameras) turns the image by a random angle of up to +-rotate_max_deg (180: any heading; less
    for a model that sees north-up queries, within their heading error) and keeps the largest
    axis-aligned rectangle of the same shape inside it, so no black corners enter.
    """

    input_size: Tuple[int, int]
    crop_scale: float = 0.7
    color_jitter: float = 0.3
    blur_prob: float = 0.3
    hflip: bool = False
    rotate: bool = False
    rotate_max_deg: float = 180.0

    def __post_init__(self):
        """Check ranges."""
        if not 0 < self.rotate_max_deg <= 180:
            raise InputError(f'augmentation: rotate_max_deg {self.rotate_max_deg} must be in '
                             f'(0, 180]')
        if not 0 < self.crop_scale <= 1 or not 0 <= self.color_jitter < 1 or \
                not 0 <= self.blur_prob <= 1:
            raise InputError(f'augmentation: crop_scale {self.crop_scale} must be in (0, 1], '
                             f'color_jitter {self.color_jitter} in [0, 1), blur_prob '
                             f'{self.blur_prob} in [0, 1]')

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """Augment a float 3xHxW image in [0, 1]; return 3 x input_size in [0, 1]."""
        x = image
        if self.rotate:
            angle = float((torch.rand(()) * 2.0 - 1.0) * self.rotate_max_deg)
            x = TF.rotate(x, angle, interpolation=TF.InterpolationMode.BILINEAR)
            c, s = abs(math.cos(math.radians(angle))), abs(math.sin(math.radians(angle)))
            h, w = x.shape[-2:]
            # The largest centred rectangle of the image's shape inside the turned image; 2 px
            # less for the bilinear edge.
            keep = min(w / (w * c + h * s), h / (w * s + h * c))
            x = TF.center_crop(x, [max(1, int(h * keep) - 2), max(1, int(w * keep) - 2)])
        x = resize(self._random_crop(x), self.input_size)
        if self.hflip and bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
        if self.color_jitter > 0:
            s = self.color_jitter
            factors = 1.0 + (torch.rand(3) * 2.0 - 1.0) * s
            x = TF.adjust_brightness(x, float(factors[0]))
            x = TF.adjust_contrast(x, float(factors[1]))
            x = TF.adjust_saturation(x, float(factors[2]))
            x = rotate_hue(x, float((torch.rand(()) * 2.0 - 1.0) * s / 6.0))
        if self.blur_prob > 0 and bool(torch.rand(()) < self.blur_prob):
            sigma = float(0.2 + torch.rand(()) * 1.3)  # output pixels
            # OpenCV blurs a small image ~25x faster than torchvision's conv-based blur.
            hwc = np.ascontiguousarray(x.permute(1, 2, 0).numpy())
            x = torch.from_numpy(cv2.GaussianBlur(hwc, (0, 0), sigma)).permute(2, 0, 1)
        return x.clamp_(0.0, 1.0)

    def _random_crop(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        r = torch.rand(3)
        area = h * w * (self.crop_scale + (1.0 - self.crop_scale) * float(r[0]))
        # The crop keeps the image's own aspect within +-10 %: inference resizes whole frames
        # to the input size, so training must see about the same squash.
        aspect = (w / h) * math.exp(math.log(0.9) + 2.0 * math.log(1 / 0.9) * float(r[1]))
        ch = min(h, max(1, int(round(math.sqrt(area / aspect)))))
        cw = min(w, max(1, int(round(math.sqrt(area * aspect)))))
        top = int(torch.randint(0, h - ch + 1, ()))
        left = int(float(r[2]) * (w - cw + 1)) if w > cw else 0
        return x[..., top:top + ch, left:left + cw]


_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322],
                            [0.211, -0.523, 0.312]], dtype=torch.float64)
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def rotate_hue(image: torch.Tensor, turns: float) -> torch.Tensor:
    """
    Shift the hue of a 3xHxW RGB image by `turns` of a full circle (rotation in YIQ space).

    A linear stand-in for the HSV hue shift, about 10x faster on small images; luma is kept.
    """
    a = 2.0 * math.pi * turns
    rot = torch.tensor([[1.0, 0.0, 0.0], [0.0, math.cos(a), -math.sin(a)],
                        [0.0, math.sin(a), math.cos(a)]], dtype=torch.float64)
    matrix = (_YIQ_TO_RGB @ rot @ _RGB_TO_YIQ).to(image.dtype)
    return (matrix @ image.reshape(3, -1)).reshape(image.shape)


def load_network_input(path: str, config: ModelConfig,
                       augment: Optional[Augmentation] = None) -> torch.Tensor:
    """
    Read an image file and return the normalised 3 x input_size network input.

    Without augmentation this is exactly what the node computes for the same image.
    """
    image = load_image_file(path)
    if augment is None:
        return prepare_batch([image], config, CPU)[0]
    x = augment(image_to_tensor(image).float().div_(255.0))
    return normalize(x[None], config)[0]


# --------------------------------------------------------------------------------- datasets
class TripletDataset(Dataset):
    """Triplets of images: item = anchor, positive, negative inputs with labels and positions."""

    def __init__(self, triplets: Sequence[Triplet], config: ModelConfig,
                 augment: Optional[Augmentation] = None,
                 positions: Optional[Dict[str, Tuple[float, float]]] = None):
        """Hold triplets; positions maps image path -> (lat, lon) where GPS is known."""
        if not triplets:
            raise InputError('no triplets to train on')
        self.triplets = list(triplets)
        self.config, self.augment = config, augment
        self.positions = dict(positions or {})
        names = sorted({t.place_label for t in self.triplets})
        self._label_ids = {name: k for k, name in enumerate(names)}
        self._path_labels = {}
        for t in self.triplets:
            label = self._label_ids[t.place_label]
            self._path_labels.setdefault(t.anchor, label)
            self._path_labels.setdefault(t.positive, label)
        self._negative_labels = self._label_negatives()

    def __len__(self) -> int:
        """Return the number of triplets."""
        return len(self.triplets)

    def set_negatives(self, negatives: Sequence[Optional[str]]) -> int:
        """Replace each triplet's negative (None keeps it); return how many changed."""
        if len(negatives) != len(self.triplets):
            raise InputError(f'{len(negatives)} negatives for {len(self.triplets)} triplets')
        changed = 0
        for k, negative in enumerate(negatives):
            if negative and negative != self.triplets[k].negative:
                self.triplets[k] = dataclasses.replace(self.triplets[k], negative=negative)
                changed += 1
        self._negative_labels = self._label_negatives()
        return changed

    def _label_negatives(self) -> List[int]:
        """
        Return each negative's label: its place if it is an anchor or positive elsewhere.

        Other negatives get a label of their own, one per image path (never another's place).
        """
        unknown = sorted({t.negative for t in self.triplets} - set(self._path_labels))
        own = {path: len(self._label_ids) + k for k, path in enumerate(unknown)}
        return [self._path_labels.get(t.negative, own.get(t.negative)) for t in self.triplets]

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        """Return images 3 x 3 x H x W, labels 3, latlon 3 x 2 (NaN unknown), index."""
        t = self.triplets[index]
        paths = (t.anchor, t.positive, t.negative)
        nan = (math.nan, math.nan)
        return {
            'images': torch.stack([load_network_input(p, self.config, self.augment)
                                   for p in paths]),
            'labels': torch.tensor([self._label_ids[t.place_label]] * 2
                                   + [self._negative_labels[index]]),
            'latlon': torch.tensor([self.positions.get(p, nan) for p in paths],
                                   dtype=torch.float64),
            'index': index,
        }


class ImageDatabaseDataset(Dataset):
    """GPS-tagged images: item = network input, position and whether it is a query."""

    def __init__(self, records: Sequence[ImageRecord], config: ModelConfig,
                 is_query: Optional[Sequence[bool]] = None,
                 augment: Optional[Augmentation] = None):
        """Hold records; is_query marks the validation queries (the rest is the database)."""
        if not records:
            raise InputError('no images in the dataset')
        self.records, self.config, self.augment = list(records), config, augment
        self.is_query = list(is_query) if is_query is not None else [False] * len(records)
        if len(self.is_query) != len(self.records):
            raise InputError('is_query needs one flag per record')

    @classmethod
    def from_csv(cls, csv_path, config: ModelConfig, images_dir=None) -> 'ImageDatabaseDataset':
        """Read the database CSV (errors name the file and line)."""
        from taco_cvgl.mapdb.database import read_csv
        return cls(read_csv(csv_path, images_dir), config)

    def __len__(self) -> int:
        """Return the number of images."""
        return len(self.records)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        """Return image 3 x H x W, latlon 2, index and is_query."""
        r = self.records[index]
        return {'image': load_network_input(r.path, self.config, self.augment),
                'latlon': torch.tensor([r.latitude, r.longitude], dtype=torch.float64),
                'index': index, 'is_query': self.is_query[index]}

    def display_image(self, index: int) -> torch.Tensor:
        """Return the image resized to the input size, 3 x H x W in [0, 1] (for figures)."""
        image = image_to_tensor(load_image_file(self.records[index].path)).float() / 255.0
        return resize(image, self.config.input_size)


def split_database_queries(records: Sequence[ImageRecord]
                           ) -> Tuple[List[ImageRecord], List[ImageRecord]]:
    """
    Split records into (database, queries): per place, the first image is the database entry.

    A place is a set of rows with the same coordinates (to 1e-7 degree, about 1 cm); its later
    rows become queries. Places with one row stay in the database as distractors.
    """
    seen, database, queries = set(), [], []
    for r in records:
        key = (round(r.latitude, 7), round(r.longitude, 7))
        (queries if key in seen else database).append(r)
        seen.add(key)
    return database, queries


def validation_dataset(database: Sequence[ImageRecord], queries: Sequence[ImageRecord],
                       config: ModelConfig, source: str = 'validation') -> ImageDatabaseDataset:
    """Return one dataset of database rows followed by query rows, queries flagged."""
    if not queries:
        raise InputError(f'{source}: no validation queries; give a query CSV, or put several '
                         f'images at the same coordinates (the first is the database entry, the '
                         f'others its queries)')
    if not database:
        raise InputError(f'{source}: no validation database images')
    return ImageDatabaseDataset(list(database) + list(queries), config,
                                [False] * len(database) + [True] * len(queries))


class RetrievalDataModule(L.LightningDataModule):
    """Training triplets; validation database + queries and/or validation triplets."""

    def __init__(self, train: TripletDataset, val: Optional[ImageDatabaseDataset] = None,
                 batch_size: int = 32, num_workers: int = 0,
                 val_triplets: Optional[TripletDataset] = None):
        """batch_size counts triplets (3 images each); validation batches hold 3x as many."""
        super().__init__()
        if batch_size < 2:
            raise InputError(f'batch_size must be >= 2 triplets, got {batch_size}')
        self.train_dataset, self.val_dataset, self.val_triplets = train, val, val_triplets
        self.batch_size, self.num_workers = batch_size, max(0, int(num_workers))

    def _loader(self, dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
                          drop_last=shuffle and len(dataset) >= batch_size,
                          persistent_workers=False)  # fresh workers see re-mined negatives

    def train_dataloader(self) -> DataLoader:
        """Return shuffled batches of triplets."""
        return self._loader(self.train_dataset, self.batch_size, True)

    def val_dataloader(self):
        """Return the validation retrieval loader, then the triplet loader (as many as exist)."""
        loaders = [self._loader(d, 3 * self.batch_size, False)
                   for d in (self.val_dataset, self.val_triplets) if d is not None]
        return loaders[0] if len(loaders) == 1 else loaders
