"""Data for rsmim: scene datasets, splits, synthetic scenes, a uint8 cache and batched augmentation.

Shared by gsc_mim.py, selective_mae.py and cmid.py. Read top to bottom:

1. datasets: the known layouts (AID, NWPU-RESISC45, UCM), any folder-per-class tree, `synthetic`
   -> build_dataset(), SceneDataset, the deterministic 80/20 + 1% splits, save_splits()
2. decoding: every image becomes RGB uint8 (grayscale, palette, RGBA, 16-bit TIFF included);
   bad input raises DataError, a one-line message naming the path and saying what to do
3. synthetic RS-like scenes (fields, forest, water, roads, buildings, cars, tanks)
4. loaders: build_loader() yields uint8 [B,3,S,S] batches, decoded by PIL in DataLoader workers or
   read from a memory-mapped cache (`cache=DIR`) that is decoded once; DistributedSampler always
5. BatchAugment: random-resized crop, flips, rot90, colour jitter, grayscale, blur, solarise,
   noise on whole batches on any device (the GPU in the scripts), and normalize() for evaluation
6. run plumbing the scripts share: run_main() (user errors as one line, exit 2), load_checkpoint(),
   CheckpointWriter (background atomic writes), SavePoints (wall clock, SIGTERM/SIGUSR1),
   plot_curves() and time_to_accuracy() for the learning curves
7. `python data.py --bench ...`: images/s of the PIL path vs the cached path, and of BatchAugment

Typical use in a script:
    loader = build_loader(args.data, args.data_root, "train", size=256, batch_size=64,
                          shuffle=True, drop_last=True, seed=args.seed, cache=args.cache)
    augment = BatchAugment(224, hflip=0.5, vflip=0.5, rot90=0.5)
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        for images, labels in loader:
            views, params = augment(images.to(device, non_blocking=True))
"""
import argparse
import functools
import hashlib
import json
import logging
import math
import os
import random
import shutil
import signal
import socket
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

log = logging.getLogger("rsmim.data")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# name -> (sub-path under --data-root, number of classes). The standard archives unpack this way.
DATASETS = {
    "AID": ("AID", 30),                              # AID/<Class>/*.jpg, 10,000 images, 600 px
    "NWPU-RESISC45": ("NWPU-RESISC45", 45),          # NWPU-RESISC45/<class>/*.jpg, 31,500, 256 px
    "UCM": ("UCMerced_LandUse/Images", 21),          # UCMerced_LandUse/Images/<class>/*.tif, 2,100, 256 px
}
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"}
TEST_FRACTION = 0.2        # per class: 80% train / 20% test
LABELLED_FRACTION = 0.01   # "train1": 1% of each class of the train split, at least one image
SPLITS = ("all", "train", "test", "train1")


class UserError(Exception):
    """Something the user can fix (a flag, a path, a checkpoint): the scripts print `error: <message>`
    and exit 2 instead of a traceback (see run_main). The message is one line and says what to do."""


class DataError(UserError):
    """Bad data or a bad data argument. The message is one line, names the path, says what to do."""


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", 0))


def is_distributed() -> bool:
    return world_size() > 1


def _warn(message):
    if rank() == 0:
        log.warning(message)


# ----------------------------------------------------------------------------------------------
# 1. Datasets and splits
# ----------------------------------------------------------------------------------------------

def _layout_help(root, sub="<dataset>"):
    return f"expected layout: {Path(root) / sub}/<class name>/<image files (.jpg .png .tif ...)>"


def build_dataset(name_or_path, root="./datasets", split="all", transform=None, *, seed=0,
                  img_size=224, synthetic_images=1000, skip_bad=False):
    """A SceneDataset for `split` ("all", "train", "test" or "train1") of a dataset.

    name_or_path: "AID", "NWPU-RESISC45", "UCM" (found under `root`, see DATASETS), "synthetic"
    (ignores root; `synthetic_images` scenes of img_size px) or the path of a folder-per-class tree.
    skip_bad: decode every file once now and leave out (with a logged warning and count) the ones
    that cannot be read, instead of raising DataError when they are first loaded.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    name = str(name_or_path)
    if name.lower() == "synthetic":
        return SyntheticScenes(synthetic_images, img_size, seed, split, transform)
    known = {key.lower(): key for key in DATASETS}
    if name.lower() in known:
        name, root = known[name.lower()], Path(root or "./datasets").expanduser()
        sub, n_classes = DATASETS[name]
        folder = root / sub
        if not folder.is_dir():
            raise DataError(f"{name} not found: looked for {folder.resolve()} - "
                            f"{_layout_help(root.resolve(), sub)}; set --data-root")
    else:
        folder, n_classes = Path(name).expanduser(), None
        if not folder.is_dir():
            looks_like_path = os.sep in name or "/" in name or name.startswith(".")
            what = "dataset folder does not exist" if looks_like_path else "unknown dataset name"
            raise DataError(f"{what} {name!r} (no folder {folder.resolve()}): use one of "
                            f"{', '.join(DATASETS)}, synthetic, or a path - {_layout_help('PATH', '')}")
        name = folder.resolve().name
    classes, samples, labels = scan_folder_tree(folder, skip_bad)
    if n_classes is not None and len(classes) != n_classes:
        _warn(f"{name} at {folder}: found {len(classes)} class folders, the dataset has {n_classes} "
              f"- check the download is complete")
    return SceneDataset(name, folder, classes, samples, labels, seed, split, transform)


def scan_folder_tree(folder, skip_bad=False):
    """Sorted (classes, relative sample paths, labels) of folder/<class>/**/<image>.

    Sorting by relative path makes everything downstream independent of file-system order.
    Hidden files (".DS_Store") are ignored with a warning; any other non-image file is an error
    (or skipped with a warning under skip_bad)."""
    folder = Path(folder)
    class_dirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    loose = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"no class folders in {folder.resolve()}: {_layout_help(folder.parent, folder.name)}")
    if loose:
        _warn(f"{folder}: ignored {len(loose)} file(s) outside the class folders: {loose[:5]}")
    classes, samples, labels, hidden, skipped = [], [], [], [], []
    for class_dir in class_dirs:
        files = sorted(p for p in class_dir.rglob("*") if p.is_file())
        images = []
        for path in files:
            rel = path.relative_to(folder).as_posix()
            if path.name.startswith("."):
                hidden.append(rel)
            elif path.suffix.lower() not in IMAGE_EXTENSIONS:
                if not skip_bad:
                    raise DataError(f"not an image file among the images: {path} - remove it "
                                    f"or pass skip_bad=True (--skip-bad)")
                skipped.append(rel)
            else:
                images.append(rel)
        if skip_bad:
            readable = _readable(folder, images)
            skipped += [rel for rel, ok in zip(images, readable) if not ok]
            images = [rel for rel, ok in zip(images, readable) if ok]
        if not images:
            raise DataError(f"empty class folder {class_dir.resolve()}: no images in it "
                            f"(extensions {' '.join(sorted(IMAGE_EXTENSIONS))}); add images or remove the folder")
        classes.append(class_dir.name)
        samples += images
        labels += [len(classes) - 1] * len(images)
    if hidden:
        _warn(f"{folder}: ignored {len(hidden)} hidden file(s), e.g. {hidden[0]}")
    if skipped:
        _warn(f"{folder}: skip_bad skipped {len(skipped)} unreadable or non-image file(s): "
              f"{skipped[:5]}{' ...' if len(skipped) > 5 else ''}")
    return classes, samples, labels


_READABLE = {}   # (path, bytes, mtime) -> decodes?  so each split's build_dataset checks a file once


def _readable(folder, rel_paths):
    """Which files decode fully (threads: PIL releases the GIL while decoding)."""
    def ok(rel):
        stat = (folder / rel).stat()
        key = (str(folder / rel), stat.st_size, stat.st_mtime_ns)
        if key not in _READABLE:
            try:
                load_rgb(folder / rel)
                _READABLE[key] = True
            except DataError as error:
                _warn(f"skip_bad: skipping {error}")
                _READABLE[key] = False
        return _READABLE[key]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(ok, rel_paths))


def make_splits(samples, labels, classes, seed):
    """{"all", "train", "test", "train1"} -> sorted sample indices.

    Per class, the class's sorted samples are shuffled by a generator seeded with (seed, class
    name): the split of a class does not depend on listing order or on the other classes.
    The first 20% (rounded, at least one when the class has two or more images) are the test
    split, the rest the train split, and the first 1% of those (at least one) the labelled subset."""
    by_class = defaultdict(list)
    for index, label in enumerate(labels):   # samples are sorted, so each list is too
        by_class[label].append(index)
    splits = {"train": [], "test": [], "train1": []}
    for label, indices in sorted(by_class.items()):
        order = list(indices)
        random.Random(f"{seed}/{classes[label]}").shuffle(order)
        n_test = max(1, round(TEST_FRACTION * len(order))) if len(order) > 1 else 0
        train = order[n_test:]
        splits["test"] += order[:n_test]
        splits["train"] += train
        splits["train1"] += train[:max(1, round(LABELLED_FRACTION * len(train)))]
    splits = {key: sorted(value) for key, value in splits.items()}
    splits["all"] = list(range(len(samples)))
    return splits


class SceneDataset(torch.utils.data.Dataset):
    """One split of a scene-classification dataset.

    .classes: class names (sorted); .splits: split -> indices into the full sorted sample list
    (.all_samples relative paths, .all_labels); .indices: this split's indices; .samples and
    .labels: this split's relative paths and labels, aligned with __getitem__.
    __getitem__(i) -> (PIL RGB image, or transform(image), label)."""

    def __init__(self, name, folder, classes, samples, labels, seed, split, transform):
        self.name, self.folder, self.classes, self.seed = name, folder, list(classes), seed
        self.all_samples, self.all_labels = list(samples), list(labels)
        self.splits = make_splits(self.all_samples, self.all_labels, self.classes, seed)
        self.split, self.transform = split, transform
        self.indices = self.splits[split]
        self.samples = [self.all_samples[i] for i in self.indices]
        self.labels = [self.all_labels[i] for i in self.indices]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        image = self.image(self.indices[i])
        return (self.transform(image) if self.transform else image), self.labels[i]

    def image(self, index):
        """PIL RGB image of sample `index` (an index into all_samples)."""
        return load_rgb(self.folder / self.all_samples[index])

    def resized(self, index, size, max_upscale=2.0):
        """uint8 [size, size, 3] array of sample `index`: the one resize both loader paths use."""
        path = self.folder / self.all_samples[index]
        return resize_rgb(load_rgb(path, draft_size=size), size, path, max_upscale)

    def cache_key(self):
        """Cache file stem and a signature of the files (relative path and byte size)."""
        digest = hashlib.sha1()
        for rel in self.all_samples:
            digest.update(f"{rel}:{(self.folder / rel).stat().st_size};".encode())
        key = self.name if self.name in DATASETS else \
            f"{self.name}-{hashlib.sha1(str(self.folder.resolve()).encode()).hexdigest()[:8]}"
        return key, digest.hexdigest()


def save_splits(dataset, path):
    """Write the splits as JSON {"dataset", "classes", "seed", "train", "test", "train1"} (relative paths)."""
    record = {"dataset": dataset.name, "classes": dataset.classes, "seed": dataset.seed}
    for split in ("train", "test", "train1"):
        record[split] = [dataset.all_samples[i] for i in dataset.splits[split]]
    _write_atomic(Path(path), json.dumps(record, indent=1).encode())


def _write_atomic(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# 2. Decoding: any image -> RGB uint8, or a DataError naming the file
# ----------------------------------------------------------------------------------------------

def load_rgb(path, draft_size=None):
    """Decode `path` fully to a PIL RGB image.

    draft_size: let the JPEG decoder scale down by 2/4/8 while staying >= draft_size on both
    sides (much faster for AID's 600 px images; both loader paths decode the same way)."""
    try:
        with Image.open(path) as image:
            if draft_size and image.format == "JPEG":
                image.draft("RGB", (draft_size, draft_size))
            image.load()                  # full decode here: truncated files fail now, not later
            return to_rgb(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read image {path}: {error} - the file is corrupt, truncated or "
                        f"not an image; replace or delete it, or pass skip_bad=True (--skip-bad)") from None


def to_rgb(image):
    """RGB copy of any PIL image: grayscale is repeated, alpha dropped, palettes expanded, and
    16-bit (I;16, or I with values above 255) mapped linearly 0..65535 -> 0..255."""
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image).astype(np.float32)
        if image.mode != "I" or values.max() > 255:
            values = values / 257.0
        image = Image.fromarray(np.clip(values + 0.5, 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        values = np.asarray(image)
        values = values * 255.0 if values.max() <= 1.0 else values
        image = Image.fromarray(np.clip(values + 0.5, 0, 255).astype(np.uint8), "L")
    elif image.mode in ("P", "PA", "LA"):
        image = image.convert("RGBA")
    return image.convert("RGB")


def resize_rgb(image, size, path="<image>", max_upscale=2.0):
    """uint8 [size, size, 3]: `image` resized (bilinear, antialiased; non-square images are
    stretched, not cropped). An image whose shorter side is below size / max_upscale raises
    DataError: upscaling it further is almost always a wrong --img-size or wrong data. Pass a
    larger max_upscale (e.g. float("inf")) to upscale small images (EuroSAT 64 px -> 224) on purpose."""
    width, height = image.size
    if min(width, height) * max_upscale < size:
        raise DataError(f"image {path} is {width}x{height}, smaller than the requested size {size} "
                        f"/ max_upscale {max_upscale:g}: use a smaller --img-size, or max_upscale to "
                        f"upscale it on purpose")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return np.asarray(image)


# ----------------------------------------------------------------------------------------------
# 3. Synthetic remote-sensing scenes
# ----------------------------------------------------------------------------------------------
# Every scene draws a fresh random colour for each material (ground, vegetation, water, road,
# roof, ...), so the mean colour of an image says little about its class: a class is its layout
# (stripes of fields, a meandering band, a grid of roofs, rows of cars) or its small objects.
# "meadow", "storage_tanks" and "vehicles" share the same background and differ only by a few
# objects of one or two 16-px patches (at 224 px): the case GSC-MIM and SelectiveMAE care about.

SYNTHETIC_CLASSES = ("farmland", "forest", "river", "lake", "crossroads", "residential",
                     "parking_lot", "meadow", "storage_tanks", "vehicles")
SYNTHETIC_VERSION = 2   # bump when the generator changes (invalidates caches)


def _value_noise(rng, size, cells):
    """Smooth random field in [0,1] of shape (size, size): a (cells+1)^2 random grid, smoothstep-interpolated."""
    grid = rng.random((cells + 1, cells + 1), dtype=np.float32)
    t = (np.arange(size, dtype=np.float32) + 0.5) * (cells / size)
    i = np.minimum(t.astype(np.int64), cells - 1)
    f = t - i
    f = f * f * (3 - 2 * f)
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]
    return rows[:, i] * (1 - f) + rows[:, i + 1] * f


def _soft(distance_inside, size):
    """Anti-aliased mask from a signed distance (normalised units, > 0 inside)."""
    return np.clip(distance_inside * size + 0.5, 0.0, 1.0)[..., None]


def _rotate(x, y, angle, cx=0.5, cy=0.5):
    c, s = math.cos(angle), math.sin(angle)
    return (x - cx) * c + (y - cy) * s, -(x - cx) * s + (y - cy) * c


def _paint(image, mask, colour):
    """Blend `colour` (3,) or (H,W,3) into image where mask (H,W,1) is 1."""
    return image + mask * (colour - image)


def _objects_in_cells(rng, count, grid):
    """Centres of `count` objects in distinct cells of a grid x grid layout (no overlaps)."""
    cells = rng.choice(grid * grid, size=count, replace=False)
    jitter = rng.uniform(0.3, 0.7, size=(count, 2))
    return np.stack([(cells % grid + jitter[:, 0]) / grid, (cells // grid + jitter[:, 1]) / grid], 1)


@functools.lru_cache(maxsize=8)
def _grid(size):
    """Pixel-centre coordinates y, x in [0, 1] (read-only, shared by all scenes of this size)."""
    y, x = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size
    y.flags.writeable = x.flags.writeable = False
    return y, x


def synthetic_scene(seed, index, size):
    """(uint8 [size, size, 3] image, label) of synthetic scene `index`; a pure function of (seed, index, size)."""
    label = index % len(SYNTHETIC_CLASSES)
    kind = SYNTHETIC_CLASSES[label]
    rng = np.random.default_rng([seed, index, SYNTHETIC_VERSION])
    px = 1.0 / size                                              # one pixel in normalised units
    y, x = _grid(size)
    colour = rng.uniform(0.08, 0.92, size=(8, 3)).astype(np.float32)    # random palette per image
    ground, ground2, vegetation, water, road, roof, bright, dark = colour
    # background shared by all classes: two-tone ground with fine grain
    tone = _value_noise(rng, size, 4)[..., None]
    grain = 0.9 + 0.2 * _value_noise(rng, size, max(4, size // 4))[..., None]
    image = (ground * (1 - tone) + ground2 * tone) * grain
    angle = rng.uniform(0, math.pi)

    if kind == "farmland":                # rectangular plots of striped crops, tracks between them
        u, v = _rotate(x, y, angle)
        pw, ph = rng.uniform(0.2, 0.4), rng.uniform(0.15, 0.35)
        iu, iv = np.floor(u / pw).astype(np.int64) % 16, np.floor(v / ph).astype(np.int64) % 16
        crop = rng.integers(0, 3, size=(16, 16))[iu, iv]
        crops = np.stack([vegetation, ground2, bright * 0.8])[crop]
        period = rng.uniform(0.02, 0.045)
        along = np.where((iu + iv) % 2 == 0, u, v)
        stripes = 0.75 + 0.25 * np.sin(2 * np.pi * along / period)[..., None]
        image = crops * stripes * grain
        edge = np.minimum(np.abs(u / pw - np.round(u / pw)) * pw, np.abs(v / ph - np.round(v / ph)) * ph)
        image = _paint(image, _soft(1.5 * px - edge, size), dark)
    elif kind == "forest":                # dense canopy of crowns, a few clearings
        crowns = _value_noise(rng, size, max(4, size // 5))[..., None]
        canopy = vegetation * (0.45 + 0.8 * crowns) * grain
        clearing = _value_noise(rng, size, 3) - 0.8
        image = _paint(image, _soft(-clearing * 0.05, size), canopy)
    elif kind == "river":                 # a meandering band of water with banks
        u, v = _rotate(x, y, angle)
        centre = rng.uniform(0.05, 0.15) * np.sin(2 * np.pi * rng.uniform(0.5, 1.5) * v + rng.uniform(0, 6.3))
        half = rng.uniform(0.03, 0.07)
        distance = np.abs(u - centre)
        image = _paint(image, _soft(half + 3 * px - distance, size), bright * 0.9)
        ripple = 0.9 + 0.1 * _value_noise(rng, size, max(4, size // 8))[..., None]
        image = _paint(image, _soft(half - distance, size), water * ripple)
    elif kind == "lake":                  # one large blob of water with an irregular shore
        u, v = _rotate(x, y, angle, *rng.uniform(0.35, 0.65, size=2))
        rx, ry = rng.uniform(0.18, 0.33, size=2)
        radius = np.sqrt((u / rx) ** 2 + (v / ry) ** 2)
        shore = 1 + 0.25 * (_value_noise(rng, size, 5) - 0.5) - radius
        image = _paint(image, _soft(shore * min(rx, ry), size), water)
    elif kind == "crossroads":            # two perpendicular roads with dashed centre lines
        u, v = _rotate(x, y, angle, *rng.uniform(0.3, 0.7, size=2))
        half = rng.uniform(0.035, 0.06)
        for along, across in ((u, v), (v, u)):
            image = _paint(image, _soft(half - np.abs(across), size), road)
            dashes = (np.sin(2 * np.pi * along / 0.08) > 0.3)[..., None]
            image = _paint(image, _soft(0.6 * px - np.abs(across), size) * dashes, bright)
    elif kind == "residential":           # blocks: one roof per cell, shadow, streets around
        u, v = _rotate(x, y, angle)
        cell = rng.uniform(0.14, 0.22)
        cu, cv = np.floor(u / cell).astype(np.int64) % 16, np.floor(v / cell).astype(np.int64) % 16
        fu, fv = u / cell - np.floor(u / cell), v / cell - np.floor(v / cell)
        margin = rng.uniform(0.15, 0.3, size=(16, 16))[cu, cv]
        roofs = np.stack([roof, roof * 0.7, bright])[rng.integers(0, 3, size=(16, 16))[cu, cv]]
        street = np.minimum(np.minimum(fu, 1 - fu), np.minimum(fv, 1 - fv)) * cell
        image = _paint(image, _soft(0.012 - street, size), road)
        inside = np.minimum(np.minimum(fu - margin, 1 - margin - fu), np.minimum(fv - margin, 1 - margin - fv))
        shadow = np.minimum(np.minimum(fu - margin - 0.08, 1 - margin - fu + 0.08),
                            np.minimum(fv - margin - 0.08, 1 - margin - fv + 0.08))
        image = _paint(image, _soft(shadow * cell, size), image * 0.45)
        image = _paint(image, _soft(inside * cell, size), roofs)
    elif kind == "parking_lot":           # paved lot, marked rows of slots, most holding a car
        u, v = _rotate(x, y, angle)
        image = road * grain
        slot_w, row_h = rng.uniform(0.04, 0.06), rng.uniform(0.13, 0.18)
        su, sv = np.floor(u / slot_w).astype(np.int64) % 64, np.floor(v / row_h).astype(np.int64) % 64
        fu, fv = u / slot_w - np.floor(u / slot_w), v / row_h - np.floor(v / row_h)
        line = np.minimum(fu, 1 - fu) * slot_w                              # distance to a slot line
        image = _paint(image, _soft(0.8 * px - line, size) * (fv < 0.8)[..., None], bright)
        occupied = (rng.random((64, 64)) < rng.uniform(0.5, 0.95))[su, sv][..., None]
        cars = rng.uniform(0.05, 0.95, size=(64, 64, 3)).astype(np.float32)[su, sv]
        body = np.minimum(np.minimum(fu - 0.2, 0.8 - fu) * slot_w, np.minimum(fv - 0.12, 0.68 - fv) * row_h)
        image = _paint(image, _soft(body, size) * occupied, cars)
    if kind in ("meadow", "storage_tanks", "vehicles"):   # same background; objects differ
        bushes = _value_noise(rng, size, 12) - 0.75
        image = _paint(image, _soft(bushes * 0.05, size), vegetation * grain)
        if kind == "storage_tanks":       # 1-3 round tanks with a shadow, rim and roof ring
            radius = max(3.0 * px, rng.uniform(0.035, 0.055))
            for cx, cy in _objects_in_cells(rng, rng.integers(1, 4), 3):
                r = np.hypot(x - cx, y - cy)
                image = _paint(image, _soft(radius - np.hypot(x - cx - 0.3 * radius, y - cy - 0.3 * radius), size), dark * 0.5)
                image = _paint(image, _soft(radius - r, size), bright)
                image = _paint(image, _soft(1.2 * px - np.abs(r - 0.6 * radius), size), bright * 0.6)
        elif kind == "vehicles":          # 2-5 cars, random orientation and colour
            length = max(5.0 * px, rng.uniform(0.05, 0.07))
            for cx, cy in _objects_in_cells(rng, rng.integers(2, 6), 4):
                u, v = _rotate(x, y, rng.uniform(0, math.pi), cx, cy)
                body = np.minimum(length / 2 - np.abs(u), length / 4 - np.abs(v))
                image = _paint(image, _soft(np.minimum(length / 2 + px - np.abs(u - px), length / 4 + px - np.abs(v - px)), size), dark * 0.3)
                image = _paint(image, _soft(body, size), rng.uniform(0.05, 0.95, size=3).astype(np.float32))
                glass = np.minimum(length / 10 - np.abs(u - length / 6), length / 6 - np.abs(v))
                image = _paint(image, _soft(glass, size), dark * 0.4)
    # illumination and sensor noise, common to all classes
    image = image * (0.8 + 0.4 * _value_noise(rng, size, 2))[..., None]
    image = image + 0.015 * rng.standard_normal(size=image.shape, dtype=np.float32)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), label


class SyntheticScenes(SceneDataset):
    """`n` synthetic scenes of `size` px, labels index % 10, same split rules as real data."""

    def __init__(self, n, size, seed, split="all", transform=None):
        if n < 2 * len(SYNTHETIC_CLASSES):
            raise DataError(f"synthetic_images={n} is too few: use at least {2 * len(SYNTHETIC_CLASSES)}")
        self.size = size
        labels = [i % len(SYNTHETIC_CLASSES) for i in range(n)]
        samples = [f"{SYNTHETIC_CLASSES[label]}/{i:07d}" for i, label in enumerate(labels)]
        order = sorted(range(n), key=samples.__getitem__)    # sorted relative paths, like a folder tree
        super().__init__("synthetic", None, SYNTHETIC_CLASSES, [samples[i] for i in order],
                         [labels[i] for i in order], seed, split, transform)
        self.scene_ids = order                               # sample index -> scene number

    def image(self, index):
        return Image.fromarray(synthetic_scene(self.seed, self.scene_ids[index], self.size)[0])

    def resized(self, index, size, max_upscale=2.0):
        return synthetic_scene(self.seed, self.scene_ids[index], size)[0]   # drawn at any size

    def cache_key(self):
        return f"synthetic-n{len(self.all_samples)}-seed{self.seed}", f"v{SYNTHETIC_VERSION}"


# ----------------------------------------------------------------------------------------------
# 4. Loaders: PIL decoding in workers, or the memory-mapped uint8 cache
# ----------------------------------------------------------------------------------------------

class DecodedBatches(torch.utils.data.Dataset):
    """PIL path: batch[list of positions] -> (uint8 [B,3,S,S], int64 [B]), decoded now.
    Positions index `indices` (default: the split of `scenes`), which index all_samples."""

    def __init__(self, scenes, size, max_upscale=2.0, indices=None):
        self.scenes, self.size, self.max_upscale = scenes, size, max_upscale
        self.indices = scenes.indices if indices is None else indices
        self.classes, self.labels = scenes.classes, [scenes.all_labels[i] for i in self.indices]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, positions):
        images = np.stack([self.scenes.resized(self.indices[p], self.size, self.max_upscale)
                           for p in positions])
        labels = torch.tensor([self.labels[p] for p in positions], dtype=torch.int64)
        return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels


class CachedBatches(torch.utils.data.Dataset):
    """Cache path: the same batches, copied out of the [N,3,S,S] uint8 memmap of the whole dataset."""

    def __init__(self, scenes, data_path, size):
        self.scenes, self.data_path, self.size = scenes, str(data_path), size
        self.classes, self.labels = scenes.classes, scenes.labels
        self.indices = np.asarray(scenes.indices, dtype=np.int64)
        self.array = None                  # opened lazily, once per worker process (never pickled)

    def __len__(self):
        return len(self.indices)

    def __getstate__(self):
        return dict(self.__dict__, array=None)

    def __getitem__(self, positions):
        if self.array is None:
            n = len(self.scenes.all_samples)
            self.array = np.memmap(self.data_path, np.uint8, "r", shape=(n, 3, self.size, self.size))
        images = torch.from_numpy(np.ascontiguousarray(self.array[self.indices[positions]]))
        labels = torch.tensor([self.scenes.labels[p] for p in positions], dtype=torch.int64)
        return images, labels


class EpochBatchSampler(torch.utils.data.Sampler):
    """Lists of positions from a DistributedSampler (one shard per rank; one shard of everything
    when not distributed); set_epoch(e) reshuffles deterministically from (seed, e)."""

    def __init__(self, index_sampler, batch_size, drop_last):
        self.index_sampler, self.batch_size, self.drop_last = index_sampler, batch_size, drop_last

    def set_epoch(self, epoch):
        self.index_sampler.set_epoch(epoch)

    def __iter__(self):
        batch = []
        for index in self.index_sampler:
            batch.append(index)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch and not self.drop_last:
            yield batch

    def __len__(self):
        n = len(self.index_sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


def build_loader(name_or_path, root, split, *, size, batch_size, shuffle, drop_last, seed=0,
                 workers=4, cache=None, synthetic_images=1000, skip_bad=False, distributed=None,
                 max_upscale=2.0, split_seed=None):
    """DataLoader of (uint8 [B,3,size,size], int64 [B]) for one split; see the module docstring.

    cache=None decodes with PIL in `workers` processes; cache=DIR decodes the whole dataset once
    (in `workers` processes) into DIR/<dataset>_<size>.u8 (+ .json header) and then reads
    batches from that memmap in the calling process.
    distributed=None shards over ranks when WORLD_SIZE > 1. Evaluation: shuffle=False,
    drop_last=False, distributed=False. loader.sampler.set_epoch(epoch) before each epoch.
    seed shuffles; split_seed (default: seed) draws the train/test split, so a run can pin its split
    independently of its --seed."""
    split_seed = seed if split_seed is None else split_seed
    scenes = build_dataset(name_or_path, root, split, seed=split_seed, img_size=size,
                           synthetic_images=synthetic_images, skip_bad=skip_bad)
    if cache:
        data_path = build_cache(scenes, cache, size, workers=workers, max_upscale=max_upscale)
        batches = CachedBatches(scenes, data_path, size)
    else:
        batches = DecodedBatches(scenes, size, max_upscale)
    distributed = is_distributed() if distributed is None else distributed
    shards, shard = (world_size(), rank()) if distributed else (1, 0)
    positions = torch.utils.data.DistributedSampler(batches, num_replicas=shards, rank=shard,
                                                    shuffle=shuffle, seed=seed, drop_last=drop_last)
    sampler = EpochBatchSampler(positions, batch_size, drop_last)
    # The cached path reads in this process: a batch is one memcpy from the page cache (~10k
    # images/s even on 2 busy cores), cheaper than shipping it from a worker process, and it
    # overlaps with the GPU, which runs the previous step asynchronously meanwhile.
    workers = 0 if cache else workers
    return torch.utils.data.DataLoader(batches, batch_size=None, sampler=sampler, num_workers=workers,
                                       pin_memory=torch.cuda.is_available(),
                                       persistent_workers=workers > 0)


def cache_paths(scenes, cache_dir, size):
    key, _ = scenes.cache_key()
    stem = Path(cache_dir).expanduser() / f"{key}_{size}"
    return stem.with_name(stem.name + ".u8"), stem.with_name(stem.name + ".json")


def build_cache(scenes, cache_dir, size, *, workers=4, max_upscale=2.0, wait_s=24 * 3600):
    """Path of the uint8 [N,3,size,size] memmap of every sample of `scenes` (all splits).

    Reused when its JSON header matches (format, classes, size, samples, labels, file signature);
    otherwise rebuilt. Under torchrun the local rank 0 decodes; the other ranks wait for the
    header, which is written last (tmp file + rename), so a header means a complete file."""
    data_path, header_path = cache_paths(scenes, cache_dir, size)
    key, signature = scenes.cache_key()
    expected = {"format": 1, "dataset": key, "source": str(scenes.folder), "size": size,
                "n": len(scenes.all_samples), "classes": scenes.classes,
                "samples": scenes.all_samples, "labels": scenes.all_labels, "signature": signature}

    def matches():
        try:
            header = json.loads(header_path.read_text())
        except (OSError, ValueError):
            return False
        return (all(header.get(k) == v for k, v in expected.items())
                and data_path.stat().st_size == expected["n"] * 3 * size * size)

    if matches():
        return data_path
    if int(os.environ.get("LOCAL_RANK", 0)) != 0:
        log.info(f"rank {rank()}: waiting for local rank 0 to build the cache {data_path}")
        start = time.time()
        while not matches():
            if time.time() - start > wait_s:
                raise DataError(f"timed out after {wait_s} s waiting for the cache {header_path}")
            time.sleep(1.0)
        return data_path
    _write_cache(scenes, data_path, header_path, size, workers, max_upscale, expected)
    return data_path


def _write_cache(scenes, data_path, header_path, size, workers, max_upscale, header):
    start, n = time.time(), len(scenes.all_samples)
    data_path.parent.mkdir(parents=True, exist_ok=True)
    need, free = n * 3 * size * size, shutil.disk_usage(data_path.parent).free
    if need > free:            # a memmap write past a full disk is a SIGBUS crash, not an error
        raise DataError(f"not enough disk space for the cache in {data_path.parent}: needs "
                        f"{need / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free; use another cache folder")
    log.warning(f"building the cache {data_path}: {n} images at {size} px ({need / 2**30:.2f} GiB)")
    tmp = data_path.with_name(f"{data_path.name}.tmp{os.getpid()}")
    try:
        array = np.memmap(tmp, np.uint8, "w+", shape=(n, 3, size, size))
        batches = DecodedBatches(scenes, size, max_upscale, indices=scenes.splits["all"])
        sampler = EpochBatchSampler(range(n), 64, drop_last=False)
        done = 0
        for images, _ in torch.utils.data.DataLoader(batches, batch_size=None, sampler=sampler,
                                                     num_workers=workers):
            array[done:done + len(images)] = images.numpy()
            done += len(images)
        array.flush()
        del array
        os.replace(tmp, data_path)
    finally:
        tmp.unlink(missing_ok=True)
    header["splits"] = {k: v for k, v in scenes.splits.items() if k != "all"}   # for reading only
    header["seed"] = scenes.seed
    _write_atomic(header_path, json.dumps(header).encode())
    log.warning(f"cache {data_path} built in {time.time() - start:.1f} s")


# ----------------------------------------------------------------------------------------------
# 5. Batched augmentation on any device, and normalisation for evaluation
# ----------------------------------------------------------------------------------------------

def normalize(images_uint8, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """float32 (images / 255 - mean) / std, on the images' device (evaluation input)."""
    x = images_uint8.float() / 255.0 if images_uint8.dtype == torch.uint8 else images_uint8.float()
    mean = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


def resample_weights(start, end, in_size, out_size):
    """[B, out_size, in_size] weights of a bilinear, antialiased resize of [start, end) (input
    pixels, fractional, per image) to out_size pixels: PIL's / torch's antialiased bilinear filter,
    a triangle widened to the scale when shrinking, renormalised at the image border."""
    scale = (end - start) / out_size                                    # input px per output px
    support = scale.clamp(min=1.0)[:, None, None]
    centre = start[:, None] + (torch.arange(out_size, device=start.device) + 0.5) * scale[:, None]
    source = torch.arange(in_size, device=start.device, dtype=start.dtype) + 0.5
    weights = (1 - (source - centre[:, :, None]).abs() / support).clamp(min=0)
    return weights / weights.sum(-1, keepdim=True)


def _gray(x):
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _shift_hue(x, shift):
    """Rotate hue by shift (fraction of a turn, per image [B,1,1]) via HSV, like torchvision."""
    r, g, b = x.unbind(1)
    top, _ = x.max(1)
    bottom, _ = x.min(1)
    chroma = top - bottom
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(top == r, ((g - b) / safe) % 6,
                      torch.where(top == g, (b - r) / safe + 2, (r - g) / safe + 4)) / 6
    hue = torch.where(chroma > 0, hue, torch.zeros_like(hue))
    hue = (hue + shift) % 1.0
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1) + hue[:, None] * 6) % 6
    return top[:, None] - chroma[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))


class BatchAugment(torch.nn.Module):
    """Augment a whole batch at once, on the images' device, with no Python loop over images.

    Order: random-resized crop + resize (one pair of batched matmuls with antialiased bilinear
    weights; flips are folded into the weights) -> rot90 -> colour jitter (brightness, contrast,
    saturation, hue, in that fixed order) -> grayscale -> Gaussian blur -> solarise -> noise ->
    normalise. Crop boxes are continuous (fractional pixels), sampled as torchvision's
    RandomResizedCrop (10 tries, then the largest centred box of allowed ratio).
    Randomness: the global torch RNG of the images' device.
    forward(uint8 or [0,1] float [B,3,H,W]) -> (views float32 [B,3,size,size], params) with params
    "boxes" [B,4] (x0,y0,x1,y1 in input pixels), "hflip", "vflip" bool [B], "rot90" int64 [B]."""

    def __init__(self, size, *, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, vflip=0.0,
                 rot90=0.0, jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2, blur_p=0.0,
                 blur_sigma=(0.1, 2.0), solarize_p=0.0, noise_p=0.0, noise_std=0.1,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.size, self.scale, self.ratio = size, scale, ratio
        self.hflip, self.vflip, self.rot90 = hflip, vflip, rot90
        self.jitter, self.jitter_p, self.gray_p = jitter, jitter_p, gray_p
        self.blur_p, self.blur_sigma, self.solarize_p = blur_p, blur_sigma, solarize_p
        self.noise_p, self.noise_std, self.mean, self.std = noise_p, noise_std, mean, std

    def sample_boxes(self, batch, height, width, device):
        area = height * width
        target = torch.empty(batch, 10, device=device).uniform_(*self.scale) * area
        log_ratio = torch.empty(batch, 10, device=device).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]))
        w, h = (target * log_ratio.exp()).sqrt(), (target / log_ratio.exp()).sqrt()
        fits = (w <= width) & (h <= height)
        first = fits.float().argmax(1, keepdim=True)                     # first try that fits
        w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
        in_ratio = width / height                                       # fallback: centred box
        if in_ratio < self.ratio[0]:
            fw, fh = width, width / self.ratio[0]
        elif in_ratio > self.ratio[1]:
            fw, fh = height * self.ratio[1], height
        else:
            fw, fh = width, height
        any_fit = fits.any(1)
        w = torch.where(any_fit, w, torch.full_like(w, fw))
        h = torch.where(any_fit, h, torch.full_like(h, fh))
        x0 = torch.where(any_fit, torch.rand(batch, device=device) * (width - w), (width - w) / 2)
        y0 = torch.where(any_fit, torch.rand(batch, device=device) * (height - h), (height - h) / 2)
        return torch.stack([x0, y0, x0 + w, y0 + h], 1)

    def forward(self, images):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"BatchAugment expects [B,3,H,W] images, got {tuple(images.shape)}")
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        batch, _, height, width = x.shape
        device, size = x.device, self.size
        draw = lambda p: torch.rand(batch, device=device) < p             # noqa: E731

        # random-resized crop + resize, flips folded into the resampling weights
        boxes = self.sample_boxes(batch, height, width, device)
        hflip, vflip = draw(self.hflip), draw(self.vflip)
        wx = resample_weights(boxes[:, 0], boxes[:, 2], width, size)
        wy = resample_weights(boxes[:, 1], boxes[:, 3], height, size)
        wx = torch.where(hflip[:, None, None], wx.flip(1), wx)
        wy = torch.where(vflip[:, None, None], wy.flip(1), wy)
        x = wy[:, None] @ x @ wx.transpose(1, 2)[:, None]                 # [B,3,size,size]

        # rot90: k quarter turns, as torch.rot90(dims=(-2,-1))
        turns = torch.randint(1, 4, (batch,), device=device) * draw(self.rot90)
        if self.rot90 > 0:
            for k in (1, 2, 3):
                x = torch.where((turns == k)[:, None, None, None], torch.rot90(x, k, (-2, -1)), x)

        # colour jitter, each image with probability jitter_p (factors 1 / shift 0 otherwise)
        jittered = draw(self.jitter_p)[:, None, None, None]
        b, c, s, hue = self.jitter
        factor = lambda f: torch.where(jittered, torch.empty(batch, 1, 1, 1, device=device).uniform_(max(0, 1 - f), 1 + f), 1.0)  # noqa: E731
        brightness, contrast, saturation = factor(b), factor(c), factor(s)
        shift = torch.where(jittered, torch.empty(batch, 1, 1, 1, device=device).uniform_(-hue, hue), 0.0)
        x = (x * brightness).clamp(0, 1)
        x = (contrast * x + (1 - contrast) * _gray(x).mean((2, 3), keepdim=True)).clamp(0, 1)
        x = (saturation * x + (1 - saturation) * _gray(x)).clamp(0, 1)
        if hue > 0:
            x = torch.where(jittered & (shift != 0), _shift_hue(x, shift[:, :, 0]), x)

        x = torch.where(draw(self.gray_p)[:, None, None, None], _gray(x).expand_as(x), x)

        if self.blur_p > 0:                                                # separable Gaussian
            radius = math.ceil(3 * self.blur_sigma[1])
            sigma = torch.empty(batch, device=device).uniform_(*self.blur_sigma)
            t = torch.arange(-radius, radius + 1, device=device, dtype=x.dtype)
            kernel = torch.exp(-t ** 2 / (2 * sigma[:, None] ** 2))
            kernel = torch.where(draw(self.blur_p)[:, None], kernel, (t == 0).to(x.dtype))
            kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(3, 0)
            flat = F.pad(x.reshape(1, batch * 3, size, size), [radius] * 4, mode="reflect")
            flat = F.conv2d(flat, kernel[:, None, :, None], groups=batch * 3)
            x = F.conv2d(flat, kernel[:, None, None, :], groups=batch * 3).view(batch, 3, size, size)

        x = torch.where(draw(self.solarize_p)[:, None, None, None] & (x >= 0.5), 1 - x, x)
        if self.noise_p > 0:
            noise = torch.randn_like(x) * self.noise_std * draw(self.noise_p)[:, None, None, None]
            x = (x + noise).clamp(0, 1)
        params = {"boxes": boxes, "hflip": hflip, "vflip": vflip, "rot90": turns.long()}
        return normalize(x, self.mean, self.std), params


# ----------------------------------------------------------------------------------------------
# 6. Run plumbing the three scripts share (no method in it): one-line user errors, checkpoints
#    written in the background, wall-clock and preemption save points, the learning-curve picture
# ----------------------------------------------------------------------------------------------

def run_main(main, argv=None):
    """main(argv), with a UserError (DataError included) printed as `error: <message>` on stderr and
    exit code 2: a user sees what to fix, not a traceback. Anything else is a bug and keeps it."""
    try:
        return main(argv)
    except UserError as error:
        # A DataLoader worker re-raises with its traceback folded into the message; the last line
        # ("data.DataError: <message>") is the one the user needs.
        lines = str(error).strip().splitlines() or [type(error).__name__]
        message = lines[-1].split("Error: ", 1)[-1] if len(lines) > 1 else lines[0]
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def load_checkpoint(path):
    """A checkpoint dict on the CPU, whatever device wrote it: RNG states must stay CPU ByteTensors
    (torch.set_rng_state rejects CUDA ones), and load_state_dict copies weights to the model's device.
    A missing, truncated or foreign file is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found: pass a checkpoint.pth written by a run "
                        f"(--resume auto continues OUT/checkpoint.pth only when it exists)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises several types for truncated or non-torch files
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise UserError(f"cannot read checkpoint {path} ({reason}): the file is truncated or not "
                        f"a checkpoint; pass another one") from None
    if not isinstance(ckpt, dict) or "args" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of these scripts (no 'args' entry)")
    return ckpt


def host_copy(state):
    """A copy of nested dicts/lists/tuples with every tensor on the CPU, taken now: training may
    change the originals as soon as this returns. Device tensors are copied asynchronously and
    synchronised once, so the caller waits for one device-to-host transfer, not for a write."""
    def copy(x):
        if isinstance(x, torch.Tensor):
            return x.detach().to("cpu", non_blocking=True) if x.is_cuda else x.detach().clone()
        if isinstance(x, dict):
            return {k: copy(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(copy(v) for v in x)
        return x
    result = copy(state)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return result


class CheckpointWriter:
    """Checkpoints written by a background thread from a host snapshot, atomically (a temp file
    unique to host and process, then rename): a torn file never replaces a good one, and a step
    waits only for the snapshot (snapshot_ms), not for the write (write_ms). One write at a time:
    save() and wait() first finish the previous write, and re-raise its error as a UserError."""

    def __init__(self):
        self._thread, self._error = None, None
        self.snapshot_ms = self.write_ms = 0.0

    def save(self, state, path):
        self.wait()
        start = time.perf_counter()
        snapshot = host_copy(state)
        self.snapshot_ms = (time.perf_counter() - start) * 1e3
        self._thread = threading.Thread(target=self._write, args=(snapshot, Path(path)), name="checkpoint")
        self._thread.start()        # not a daemon: the interpreter finishes the write before it exits

    def _write(self, snapshot, path):
        start = time.perf_counter()
        tmp = path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(snapshot, tmp)
            os.replace(tmp, path)
        except Exception as error:
            if tmp.parent.is_dir():
                tmp.unlink(missing_ok=True)
            self._error = UserError(f"could not write the checkpoint {path}: {error}")
        self.write_ms = (time.perf_counter() - start) * 1e3

    def wait(self):
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


class SavePoints:
    """When to checkpoint besides the end of the run: every `every_min` minutes of wall clock, and
    at the next step boundary after SIGTERM or SIGUSR1 (how Slurm and most clusters announce a
    preemption; torchrun forwards it to every rank). Every rank must save at the same step, so under
    torch.distributed the local flags are max-reduced every `check_every` steps (one 2-int
    collective); a single process checks every step for free.
    check(step) -> (save, stop): stop means "preempted: save, then exit 0 with a resume line"."""

    def __init__(self, every_min, device, check_every=10):
        self.every_s, self.device, self.last = every_min * 60, device, time.time()
        self.distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.check_every = check_every if self.distributed else 1
        self.signal = None
        if threading.current_thread() is threading.main_thread():   # signal.signal's requirement
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def check(self, step):
        if step % self.check_every:
            return False, False
        stop, due = self.signal is not None, 0 < self.every_s <= time.time() - self.last
        if self.distributed:
            flags = torch.tensor([stop, due], dtype=torch.int32, device=self.device)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            stop, due = (bool(v) for v in flags.tolist())
        if stop or due:
            self.last = time.time()
        return stop or due, stop


def time_to_accuracy(records):
    """Wall-clock seconds at which the kNN accuracy first came within one point of its last value."""
    knn = [r for r in records if "knn" in r]
    return next((r["time_s"] for r in knn if r["knn"] >= knn[-1]["knn"] - 1.0), None) if knn else None


def plot_curves(records, path, floor=None, size=(960, 600)):
    """Write a PNG of the training loss and the kNN accuracy (rows) against wall-clock time and
    images seen (columns), from log records {"time_s", "images_seen", "loss" or "knn"}; `floor`
    (the random-init kNN accuracy) is a dashed line. The picture's size never depends on the
    number of points, and pillow is the only drawing library it needs."""
    from PIL import ImageDraw
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    cell_w, cell_h = size[0] // 2, size[1] // 2
    for row, (key, colour) in enumerate((("loss", (31, 119, 180)), ("knn", (214, 39, 40)))):
        points = [r for r in records if key in r]
        for col, (x_key, x_label) in enumerate((("time_s", "wall-clock s"), ("images_seen", "images seen"))):
            left, top = col * cell_w + 60, row * cell_h + 30
            w, h = cell_w - 80, cell_h - 70
            draw.rectangle([left, top, left + w, top + h], outline="black")
            label = "training loss" if key == "loss" else "20-NN accuracy (%)"
            draw.text((left, top - 18), f"{label} vs {x_label}", fill="black")
            ys = [r[key] for r in points] + ([floor] if key == "knn" and floor is not None else [])
            if not points:
                draw.text((left + 10, top + h // 2), "no points yet", fill="gray")
                continue
            x0, x1 = 0.0, max(max(r[x_key] for r in points), 1e-9)
            y0, y1 = min(ys), max(ys)
            y0, y1 = (y0 - 0.5, y1 + 0.5) if y1 - y0 < 1e-9 else (y0, y1)

            def at(x, y):
                return left + w * (x - x0) / (x1 - x0), top + h - h * (y - y0) / (y1 - y0)
            for y, text in ((y0, f"{y0:.3g}"), (y1, f"{y1:.3g}")):
                draw.text((left - 55, at(x0, y)[1] - 6), text, fill="black")
            draw.text((left + w - 60, top + h + 4), f"{x1:.3g}", fill="black")
            if key == "knn" and floor is not None:
                fy = at(x0, floor)[1]
                for start in range(0, w, 12):
                    draw.line([left + start, fy, left + min(start + 6, w), fy], fill="gray")
                draw.text((left + 4, fy - 14), "random init", fill="gray")
            xy = [at(r[x_key], r[key]) for r in points]
            if len(xy) > 1:
                draw.line(xy, fill=colour, width=2)
            for x, y in xy[-200:]:                      # markers for the last points only
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


# ----------------------------------------------------------------------------------------------
# 7. Benchmark: python data.py --bench --data UCM --data-root ../shared/data --cache /tmp/rsmim-cache
# ----------------------------------------------------------------------------------------------

def benchmark(args):
    """images/s of one pass of the PIL path, the cache build, one pass of the cached path, BatchAugment."""
    torch.set_num_threads(args.threads)
    print(f"data.py benchmark | {args.data} size {args.size} batch {args.batch_size} workers {args.workers} "
          f"| torch threads {args.threads} | {os.cpu_count()} cpus | {time.strftime('%Y-%m-%d %H:%M')}")
    common = dict(size=args.size, batch_size=args.batch_size, shuffle=True, drop_last=False,
                  workers=args.workers, distributed=False)
    for label, cache in (("PIL path   ", None), ("cached path", args.cache)):
        start = time.time()
        loader = build_loader(args.data, args.data_root, "all", cache=cache, **common)
        if cache:
            print(f"cache build: {time.time() - start:.1f} s in {cache} (instant when it is reused)")
        start, count = time.time(), sum(len(images) for images, _ in loader)
        print(f"{label}: {count / (time.time() - start):8.0f} images/s (one pass over {count} images)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    augment = BatchAugment(args.crop, hflip=0.5, vflip=0.5, rot90=0.5, blur_p=0.5, solarize_p=0.2)
    shape = (args.augment_batch, 3, args.augment_from, args.augment_from)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
    for step in range(2 + args.augment_steps):
        if step == 2:                                   # after two warm-up batches
            torch.cuda.synchronize() if device == "cuda" else None
            start, cpu_start = time.time(), time.process_time()
        augment(images)
    torch.cuda.synchronize() if device == "cuda" else None
    seconds = (time.time() - start) / args.augment_steps
    cpu_ms = (time.process_time() - cpu_start) / args.augment_steps * 1e3
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"BatchAugment {'x'.join(map(str, shape))} -> {args.crop} px on {name}: {seconds * 1e3:.1f} ms "
          f"per batch ({cpu_ms:.0f} ms process CPU time), {shape[0] / seconds:.0f} images/s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="data.py benchmark: PIL path vs cached path vs BatchAugment")
    parser.add_argument("--bench", action="store_true", help="run the benchmark (the only action)")
    parser.add_argument("--data", default="UCM", help="AID, NWPU-RESISC45, UCM, synthetic or a folder path")
    parser.add_argument("--data-root", default="./datasets", help="folder holding the named datasets")
    parser.add_argument("--cache", default="/tmp/rsmim-cache", help="cache folder for the cached path")
    parser.add_argument("--size", type=int, default=224, help="load size of both paths (px)")
    parser.add_argument("--batch-size", type=int, default=64, help="loader batch size")
    parser.add_argument("--workers", type=int, default=2, help="PIL-path DataLoader worker processes")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the main process")
    parser.add_argument("--augment-batch", type=int, default=64, help="BatchAugment batch size")
    parser.add_argument("--augment-from", type=int, default=256, help="BatchAugment input size (px)")
    parser.add_argument("--crop", type=int, default=224, help="BatchAugment output size (px)")
    parser.add_argument("--augment-steps", type=int, default=5, help="timed BatchAugment batches")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    benchmark(arguments) if arguments.bench else parser.print_help()
