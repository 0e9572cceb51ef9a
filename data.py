"""Data for rsmim: scene datasets, splits, synthetic scenes, a uint8 cache and batched augmentation.

Shared by gsc_mim.py, selective_mae.py and cmid.py. Read top to bottom:

1. datasets: the known layouts (AID, NWPU-RESISC45, UCM), any folder-per-class tree, `synthetic`
   -> build_dataset(), SceneDataset, the deterministic 80/20 + 1% splits, save_splits()
2. decoding: every image becomes RGB uint8 (grayscale, palette, RGBA, 16-bit TIFF included);
   bad input raises DataError, a one-line message naming the path and saying what to do
3. synthetic RS-like scenes (fields, forest, water, roads, buildings, cars, tanks)
4. loaders: resolve_load_size(); build_loader() yields uint8 [B,3,S,S] batches made ahead in
   background threads, read from a memory-mapped cache decoded once (default location, built under a
   lock by one process per shared folder) or decoded per sample by PIL in worker processes
5. BatchAugment: random-resized crop, flips, rot90, colour jitter, grayscale, blur, solarise,
   noise on whole batches on any device (the GPU in the scripts), and normalize() for evaluation
6. run plumbing the scripts share: run_main() (user errors as one line, exit 2), load_checkpoint(),
   CheckpointWriter (background atomic writes), SavePoints (wall clock, SIGTERM/SIGUSR1),
   plot_curves() and time_to_accuracy() for the learning curves
7. `python data.py --bench ...`: loader images/s and consumer waits per epoch, and BatchAugment

Typical use in a script:
    size = resolve_load_size(args.data, args.data_root, 224, args.load_size)   # e.g. 448 for AID
    loader = build_loader(args.data, args.data_root, "train", size=size, batch_size=64,
                          shuffle=True, drop_last=True, seed=args.seed, cache=args.cache)
    augment = BatchAugment(224, hflip=0.5, vflip=0.5, rot90=0.5)
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        for images, labels in loader:
            views, params = augment(images.to(device, non_blocking=True))
"""
import argparse
import collections
import copy
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import queue
import random
import shutil
import signal
import socket
import sys
import threading
import time
import weakref
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

log = logging.getLogger("rsmim.data")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# name -> (sub-path under --data-root, number of classes, image side in px). The standard archives
# unpack this way: AID/<Class>/*.jpg (10,000), NWPU-RESISC45/<class>/*.jpg (31,500),
# UCMerced_LandUse/Images/<class>/*.tif (2,100).
DATASETS = {
    "AID": ("AID", 30, 600),
    "NWPU-RESISC45": ("NWPU-RESISC45", 45, 256),
    "UCM": ("UCMerced_LandUse/Images", 21, 256),
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


_WARNED = set()


def _warn_once(message):
    """A warning printed once per run, however many loaders (train, eval splits) meet it."""
    if message not in _WARNED:
        _WARNED.add(message)
        _warn(message)


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
    name, folder, n_classes, _ = locate(name_or_path, root)
    if folder is None:
        return SyntheticScenes(synthetic_images, img_size, seed, split, transform)
    classes, samples, labels = scan_folder_tree(folder, skip_bad)
    if n_classes is not None and len(classes) != n_classes:
        _warn_once(f"{name} at {folder}: found {len(classes)} class folders, the dataset has {n_classes} "
                   f"- check the download is complete")
    return SceneDataset(name, folder, classes, samples, labels, seed, split, transform)


def locate(name_or_path, root):
    """(name, folder, number of classes or None, image side or None) of a dataset argument;
    folder is None for "synthetic". Raises DataError for a missing dataset."""
    name = str(name_or_path)
    if name.lower() == "synthetic":
        return "synthetic", None, len(SYNTHETIC_CLASSES), None
    known = {key.lower(): key for key in DATASETS}
    if name.lower() in known:
        name, root = known[name.lower()], Path(root or "./datasets").expanduser()
        sub, n_classes, side = DATASETS[name]
        if not (root / sub).is_dir():
            raise DataError(f"{name} not found: looked for {(root / sub).resolve()} - "
                            f"{_layout_help(root.resolve(), sub)}; set --data-root")
        return name, root / sub, n_classes, side
    folder = Path(name).expanduser()
    if not folder.is_dir():
        looks_like_path = os.sep in name or "/" in name or name.startswith(".")
        what = "dataset folder does not exist" if looks_like_path else "unknown dataset name"
        raise DataError(f"{what} {name!r} (no folder {folder.resolve()}): use one of "
                        f"{', '.join(DATASETS)}, synthetic, or a path - {_layout_help('PATH', '')}")
    return folder.resolve().name, folder, None, None


def resolve_load_size(name_or_path, root, crop, load_size=None, synthetic_images=1000):
    """The decode size of training images (--load-size) for views of `crop` px: load_size when
    given, else the dataset's image side capped at 2 x crop (AID 600 px -> 448 at crop 224; UCM and
    NWPU -> 256), so that a random-resized crop is cut from the full-resolution image, not from one
    already shrunk to the crop. A folder: the shorter side of its first image (a header read).
    synthetic: 2 x crop (scenes are drawn at any size; synthetic_images only mirrors build_loader)."""
    if load_size:
        return int(load_size)
    _, folder, _, side = locate(name_or_path, root)
    if folder is None:
        return 2 * crop
    if side is None:
        first = next((p for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")
                      for p in sorted(d.rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS
                      and not p.name.startswith(".")), None)
        if first is None:
            raise DataError(f"no images in {folder.resolve()}: {_layout_help(folder.parent, folder.name)}")
        try:
            with Image.open(first) as image:   # the header only
                side = min(image.size)
        except (OSError, SyntaxError, ValueError) as error:
            raise DataError(f"cannot read image {first}: {error} - replace or delete it, "
                            f"or pass --load-size") from None
    return min(side, 2 * crop)


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
            sides = image_sides(folder, images)
            skipped += [rel for rel, side in zip(images, sides) if not side]
            images = [rel for rel, side in zip(images, sides) if side]
        if not images:
            raise DataError(f"empty class folder {class_dir.resolve()}: no images in it "
                            f"(extensions {' '.join(sorted(IMAGE_EXTENSIONS))}); add images or remove the folder")
        classes.append(class_dir.name)
        samples += images
        labels += [len(classes) - 1] * len(images)
    if hidden:
        _warn_once(f"{folder}: ignored {len(hidden)} hidden file(s), e.g. {hidden[0]}")
    if skipped:
        _warn_once(f"{folder}: skip_bad skipped {len(skipped)} unreadable or non-image file(s): "
                   f"{skipped[:5]}{' ...' if len(skipped) > 5 else ''}")
    return classes, samples, labels


_SIDES = {}   # (path, bytes, mtime) -> shorter side, 0 if it does not decode: each file decoded once a run


def image_sides(folder, rel_paths):
    """Shorter side of each file, 0 for one that does not decode fully (threads: PIL releases the
    GIL while decoding)."""
    def side(rel):
        stat = (folder / rel).stat()
        key = (str(folder / rel), stat.st_size, stat.st_mtime_ns)
        if key not in _SIDES:
            try:
                _SIDES[key] = min(load_rgb(folder / rel).size)
            except DataError as error:
                _warn(f"skip_bad: skipping {error}")
                _SIDES[key] = 0
        return _SIDES[key]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(side, rel_paths))


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
    tmp = _tmp_name(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _tmp_name(path):
    """A temporary name beside `path`, unique across the hosts that share its file system."""
    return path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-{os.urandom(4).hex()}")


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
# 4. Loaders: batches made ahead in background threads, from the uint8 cache or decoded by PIL
# ----------------------------------------------------------------------------------------------
# The training thread only takes finished batches: background threads gather each batch from the
# memory-mapped cache (or assemble it from samples that PIL decodes one by one in worker
# processes), pin it when CUDA is there and add its `batch_extras`, PREFETCH batches ahead and on
# into the next epoch. A batch depends only on (seed, epoch, rank, batch index), never on timing:
# resuming mid-epoch is iterating that epoch again and skipping the first k batches.

PREFETCH = 3          # batches made ahead (memory: 3 x 154 MB for 256 images of 448 px)
GATHER_THREADS = 2    # cached path: batches gathered at once (numpy releases the GIL while copying)
STALE_LOCK_S = 600    # a cache lock not refreshed for this long was left by a builder that died


def default_cache_dir():
    """Where cache="auto" keeps the decoded datasets: $RSMIM_CACHE, else ~/.cache/rsmim (delete at will)."""
    return Path(os.environ.get("RSMIM_CACHE") or "~/.cache/rsmim").expanduser()


class SampleDecoder(torch.utils.data.Dataset):
    """Index into scenes.all_samples -> uint8 [3,size,size] decoded by PIL (in a worker process).
    A DataError is returned, not raised, so that the consumer gets its one-line message rather
    than a worker traceback."""

    def __init__(self, scenes, size, max_upscale):
        self.scenes, self.classes, self.size, self.max_upscale = scenes, scenes.classes, size, max_upscale

    def __len__(self):
        return len(self.scenes.all_samples)

    def __getitem__(self, index):
        try:
            image = self.scenes.resized(index, self.size, self.max_upscale)
        except DataError as error:
            return error
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


class EpochBatchSampler(torch.utils.data.Sampler):
    """Lists of positions from a DistributedSampler (one shard per rank; one shard of everything
    when not distributed); set_epoch(e) reshuffles deterministically from (seed, e)."""

    def __init__(self, index_sampler, batch_size, drop_last):
        self.index_sampler, self.batch_size, self.drop_last = index_sampler, batch_size, drop_last
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch
        if not self.known_ahead:          # its order depends on the epochs trained so far: set it now
            self.index_sampler.set_epoch(epoch)

    @property
    def known_ahead(self):
        """False for an index sampler whose order depends on training (InfoBatch prunes by the last
        losses, `known_ahead = False`): the loader then reads no batch of the next epoch early."""
        return getattr(self.index_sampler, "known_ahead", True)

    def __iter__(self):
        return self.batches(self.epoch)

    def batches(self, epoch):
        sampler = self.index_sampler
        if self.known_ahead:
            sampler = copy.copy(sampler)     # any epoch, while the loader may be reading another
            sampler.set_epoch(epoch)
        order = list(sampler)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield order[start:start + self.batch_size]

    def __len__(self):
        n = len(self.index_sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


class Threads:
    """Daemon threads running submitted calls in order of submission (a daemon does not hold up
    the interpreter's exit, unlike ThreadPoolExecutor's threads)."""

    def __init__(self, n):
        self.jobs = queue.SimpleQueue()
        self.threads = [threading.Thread(target=self._run, daemon=True, name="rsmim-loader") for _ in range(n)]
        for thread in self.threads:
            thread.start()

    def stop(self, pending=()):
        """Cancel the `pending` futures not started yet, let the running ones finish and join the
        threads: a daemon thread still inside torch when the interpreter exits aborts the process."""
        for _, future in pending:
            future.cancel()
        for _ in self.threads:
            self.jobs.put(None)
        for thread in self.threads:
            thread.join()

    def submit(self, fn, *args):
        future = Future()
        self.jobs.put((future, fn, args))
        return future

    def _run(self):
        while (job := self.jobs.get()) is not None:
            future, fn, args = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as error:     # handed to the consumer by future.result()
                    future.set_exception(error)


class Loader:
    """Batches of one split: (uint8 images [B,3,S,S], int64 labels [B]), or (images, labels,
    batch_extras(rng, B)). len() in batches; .sampler.set_epoch(e) before each epoch; .dataset
    the SampleDecoder (.classes, .scenes). One iterator at a time."""

    def __init__(self, decoder, rows, sampler, cache_array, workers, batch_extras, seed, shard):
        self.dataset, self.sampler, self.rows, self.array = decoder, sampler, rows, cache_array
        self.labels = torch.tensor(decoder.scenes.all_labels, dtype=torch.int64)   # by row
        self.workers, self.batch_extras, self.seed, self.shard = workers, batch_extras, seed, shard
        self.threads = Threads(GATHER_THREADS if cache_array is not None else 1)   # PIL path: in order
        self.pending = collections.deque()     # ((epoch, batch index), Future), in stream order
        self.stream = self.samples = None
        self.buffers, self.buffers_lock = [], threading.Lock()
        weakref.finalize(self, self.threads.stop, self.pending)   # at exit too (atexit=True)

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        epoch = self.sampler.epoch
        if not self.pending or self.pending[0][0] != (epoch, 0):
            self._restart(epoch)
        for _ in range(len(self)):
            _, future = self.pending.popleft()
            self._submit()
            yield future.result()

    def _batches(self, epoch):
        for e in itertools.count(epoch) if self.sampler.known_ahead else (epoch,):
            for b, positions in enumerate(self.sampler.batches(e)):
                yield e, b, self.rows[positions]

    def _restart(self, epoch):
        for _, future in self.pending:
            future.cancel()
        wait([future for _, future in self.pending])      # a running batch may be reading self.samples
        self.pending.clear()
        self.stream = self._batches(epoch)
        if self.array is None:                               # PIL path: the same stream, one sample at a time
            order = (row for _, _, rows in self._batches(epoch) for row in rows)
            self.samples = iter(torch.utils.data.DataLoader(   # its own generator: starting workers
                self.dataset, batch_size=None, sampler=order, num_workers=self.workers,  # leaves the
                generator=torch.Generator().manual_seed(self.seed)))  # training's global RNG alone
        self._submit()

    def _submit(self):
        while len(self.pending) < PREFETCH:
            epoch, b, rows = next(self.stream, (None, None, None))
            if rows is None:                  # the end of an epoch the loader cannot read past
                return
            self.pending.append(((epoch, b), self.threads.submit(self._batch, epoch, b, rows)))

    def _buffer(self, shape):
        """uint8 tensor for a batch: pinned, from CUDA's caching host allocator, or one of this
        loader's buffers that no tensor uses any more (a fresh 154 MB allocation costs more in page
        faults than the gather into it)."""
        if torch.cuda.is_available():
            return torch.empty(shape, dtype=torch.uint8, pin_memory=True)
        with self.buffers_lock:
            free = next((b for b in self.buffers if b.shape == shape and sys.getrefcount(b) == 3), None)
            if free is None:          # 3 references: the list, `b` and getrefcount's argument
                free = np.empty(shape, np.uint8)
                self.buffers.append(free)
            return torch.from_numpy(free)                # holds a reference while any view lives

    def _batch(self, epoch, b, rows):
        pin = torch.cuda.is_available()
        images = self._buffer((len(rows), 3, self.dataset.size, self.dataset.size))
        if self.array is not None:
            np.take(self.array, rows, axis=0, out=images.numpy(), mode="clip")   # "clip": unbuffered
        else:
            for image in images:
                sample = next(self.samples)
                if isinstance(sample, DataError):
                    raise sample
                image.copy_(sample)
        labels = self.labels[torch.from_numpy(rows)]
        labels = labels.pin_memory() if pin else labels
        if self.batch_extras is None:
            return images, labels
        return images, labels, self.batch_extras(np.random.default_rng([self.seed, self.shard, epoch, b]),
                                                 len(rows))


def build_loader(name_or_path, root, split, *, size, batch_size, shuffle, drop_last, seed=0,
                 workers=4, cache="auto", synthetic_images=1000, skip_bad=False, distributed=None,
                 max_upscale=2.0, split_seed=None, batch_extras=None):
    """Loader of (uint8 [B,3,size,size], int64 [B]) batches of one split; see section 4's note.

    cache: "auto" keeps a decoded uint8 copy of the dataset at `size` in default_cache_dir()
    (synthetic scenes are drawn instead), a folder keeps it there (see build_cache); None or "none"
    decodes with PIL in `workers` processes every epoch.
    skip_bad: leave out unreadable files (before the splits are drawn) and, from this loader,
    images smaller than size / max_upscale (reported once).
    distributed=None shards over ranks when WORLD_SIZE > 1. Evaluation: shuffle=False,
    drop_last=False, distributed=False. seed shuffles; split_seed (default: seed) draws the
    train/test split, so a run can pin its split independently of its --seed.
    batch_extras(rng, batch_size) -> anything: per-batch random structure (masks) made off the
    training thread; batches are then (images, labels, extras), rng =
    np.random.default_rng([seed, rank, epoch, batch index])."""
    split_seed = seed if split_seed is None else split_seed
    scenes = build_dataset(name_or_path, root, split, seed=split_seed, img_size=size,
                           synthetic_images=synthetic_images, skip_bad=skip_bad)
    small = too_small(scenes, size, max_upscale) if skip_bad else set()
    rows = np.array([i for i in scenes.indices if i not in small], dtype=np.int64)
    if cache == "auto":
        cache = default_cache_dir() if scenes.folder is not None else None
    decoder, array = SampleDecoder(scenes, size, max_upscale), None
    if cache not in (None, "none"):
        data_path = build_cache(decoder, cache, small, workers=workers)
        array = np.memmap(data_path, np.uint8, "r", shape=(len(scenes.all_samples), 3, size, size))
    distributed = is_distributed() if distributed is None else distributed
    shards, shard = (world_size(), rank()) if distributed else (1, 0)
    positions = torch.utils.data.DistributedSampler(range(len(rows)), num_replicas=shards, rank=shard,
                                                    shuffle=shuffle, seed=seed, drop_last=drop_last)
    sampler = EpochBatchSampler(positions, batch_size, drop_last)
    return Loader(decoder, rows, sampler, array, workers, batch_extras, seed, shard)


def too_small(scenes, size, max_upscale):
    """Indices of images whose shorter side is below size / max_upscale (reported once a run)."""
    if scenes.folder is None:
        return set()
    sides = image_sides(scenes.folder, scenes.all_samples)
    small = {i for i, side in enumerate(sides) if side * max_upscale < size}
    if small:
        names = [scenes.all_samples[i] for i in sorted(small)]
        _warn_once(f"{scenes.folder}: skip_bad left out {len(small)} image(s) smaller than {size} px / "
                   f"max_upscale {max_upscale:g}: {names[:5]}{' ...' if len(names) > 5 else ''}")
    return small


def cache_paths(scenes, cache_dir, size):
    key, _ = scenes.cache_key()
    stem = Path(cache_dir).expanduser() / f"{key}_{size}"
    return stem.with_name(stem.name + ".u8"), stem.with_name(stem.name + ".json")


def build_cache(decoder, cache_dir, blank=(), *, workers=4, wait_s=24 * 3600):
    """Path of the uint8 [N,3,size,size] memmap of every sample of decoder.scenes (all splits;
    the rows of `blank`, images left out as too small, stay zero).

    Reused when its JSON header matches (format, classes, size, samples, labels, file signature),
    otherwise rebuilt by one process for all that share the folder: the local rank 0 that creates
    the lock file <name>.lock (O_CREAT | O_EXCL: atomic on local disks, NFS and Lustre), so one per
    node on a node-local folder, one per job on a shared file system. The others wait for the
    header, written last (temporary file + rename): a header means a complete file. The builder
    refreshes the lock as it goes; the next process to find a lock whose process is gone (same
    host) or that is STALE_LOCK_S old removes it."""
    scenes, size = decoder.scenes, decoder.size
    data_path, header_path = cache_paths(scenes, cache_dir, size)
    lock = data_path.with_suffix(".lock")
    key, signature = scenes.cache_key()
    expected = {"format": 2, "dataset": key, "source": str(scenes.folder), "size": size,
                "n": len(scenes.all_samples), "classes": scenes.classes, "samples": scenes.all_samples,
                "labels": scenes.all_labels, "signature": signature, "blank": sorted(blank)}

    def matches():
        try:
            header = json.loads(header_path.read_text())
        except (OSError, ValueError):
            return False
        return (all(header.get(k) == v for k, v in expected.items())
                and data_path.stat().st_size == expected["n"] * 3 * size * size)

    builder, start, announced = int(os.environ.get("LOCAL_RANK", 0)) == 0, time.time(), False
    while not matches():
        if builder and _take_lock(lock):
            try:
                if not matches():                # built by the previous holder meanwhile
                    _write_cache(decoder, data_path, header_path, expected, workers, lock)
                return data_path
            finally:
                lock.unlink(missing_ok=True)
        if time.time() - start > wait_s:
            raise DataError(f"timed out after {wait_s} s waiting for the cache {data_path} "
                            f"(lock {_lock_holder(lock)}): delete {lock} if no job is building it, "
                            f"or use --cache none")
        if not announced:
            log.warning(f"rank {rank()}: waiting for {_lock_holder(lock) or 'local rank 0'} to build "
                        f"the cache {data_path}")
            announced = True
        time.sleep(1.0)
    return data_path


def _lock_holder(lock):
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):                # gone, or being written
        return {}


def _take_lock(lock):
    """True when this process created `lock` (host and pid inside). A stale lock is removed, to be
    taken at the next try."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        holder = _lock_holder(lock)
        try:
            stale = time.time() - lock.stat().st_mtime > STALE_LOCK_S
        except FileNotFoundError:
            return False
        if holder.get("host") == socket.gethostname():
            try:
                os.kill(holder["pid"], 0)
            except ProcessLookupError:
                stale = True
            except PermissionError:              # alive, another user's
                pass
        if stale:
            log.warning(f"removing the stale cache lock {lock} of {holder or 'an unknown process'}")
            lock.unlink(missing_ok=True)
        return False
    with os.fdopen(fd, "w") as file:
        file.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    return True


def _write_cache(decoder, data_path, header_path, header, workers, lock):
    start, n, size = time.time(), header["n"], decoder.size
    data_path.parent.mkdir(parents=True, exist_ok=True)
    need, free = n * 3 * size * size, shutil.disk_usage(data_path.parent).free
    if need > free:            # a memmap write past a full disk is a SIGBUS crash, not an error
        raise DataError(f"not enough disk space for the cache in {data_path.parent}: needs "
                        f"{need / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free; use another cache folder")
    log.warning(f"building the cache {data_path}: {n} images at {size} px ({need / 2**30:.2f} GiB)")
    tmp, beat = _tmp_name(data_path), time.time()
    try:
        array = np.memmap(tmp, np.uint8, "w+", shape=(n, 3, size, size))
        todo = [i for i in range(n) if i not in set(header["blank"])]
        samples = torch.utils.data.DataLoader(decoder, batch_size=None, sampler=todo, num_workers=workers)
        for i, image in zip(todo, samples):
            if isinstance(image, DataError):
                raise image
            array[i] = image.numpy()
            if time.time() - beat > 10:       # tells the waiting processes this builder is alive
                os.utime(lock)
                beat = time.time()
        array.flush()
        del array
        os.replace(tmp, data_path)
    finally:
        tmp.unlink(missing_ok=True)
    header = dict(header, splits={k: v for k, v in decoder.scenes.splits.items() if k != "all"},
                  seed=decoder.scenes.seed)                                           # for reading only
    _write_atomic(header_path, json.dumps(header).encode())
    log.warning(f"cache {data_path} built in {time.time() - start:.1f} s")


# ----------------------------------------------------------------------------------------------
# 5. Batched augmentation on any device, and normalisation for evaluation
# ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _constant(values, device):
    """[1,C,1,1] float32 tensor of `values` on `device`, made once: torch.tensor(list, device=cuda)
    is a blocking copy, a host sync on every call."""
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)


def normalize(images_uint8, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """float32 (images / 255 - mean) / std, on the images' device (evaluation input)."""
    x = images_uint8.float() / 255.0 if images_uint8.dtype == torch.uint8 else images_uint8.float()
    return (x - _constant(tuple(mean), x.device)) / _constant(tuple(std), x.device)


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
    k = (_constant((5.0, 3.0, 1.0), x.device) + hue[:, None] * 6) % 6
    return top[:, None] - chroma[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))


@functools.lru_cache(maxsize=16)
def _rot90_index(size, device):
    """[4, size*size]: row k gathers torch.rot90(image, k, (-2, -1)) from a flattened square image."""
    grid = torch.arange(size * size, device=device).view(size, size)
    return torch.stack([torch.rot90(grid, k, (-2, -1)).flatten() for k in range(4)])


class BatchAugment(torch.nn.Module):
    """Augment a whole batch at once, on the images' device, with no Python loop over images.

    Order: random-resized crop + resize (one pair of batched matmuls with antialiased bilinear
    weights; flips are folded into the weights) -> rot90 -> colour jitter (brightness, contrast,
    saturation, hue, in that fixed order) -> grayscale -> Gaussian blur -> solarise -> noise ->
    normalise. Crop boxes are continuous (fractional pixels), sampled as torchvision's
    RandomResizedCrop (10 tries, then the largest centred box of allowed ratio). An op whose
    probability (or strength) is 0 is not computed, but its random numbers are still drawn, so that
    the others see the same stream. No host sync: constants are made once per device.
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

        # rot90: k quarter turns, as torch.rot90(dims=(-2,-1)), in one gather
        turns = torch.randint(1, 4, (batch,), device=device) * draw(self.rot90)
        if self.rot90 > 0:
            index = _rot90_index(size, device)[turns][:, None].expand(batch, 3, size * size)
            x = x.flatten(2).gather(2, index).view(batch, 3, size, size)

        # colour jitter, each image with probability jitter_p (factors 1 / shift 0 otherwise)
        jittered = draw(self.jitter_p)[:, None, None, None]
        b, c, s, hue = self.jitter
        factor = lambda f: torch.where(jittered, torch.empty(batch, 1, 1, 1, device=device).uniform_(max(0, 1 - f), 1 + f), 1.0)  # noqa: E731
        brightness, contrast, saturation = factor(b), factor(c), factor(s)
        shift = torch.where(jittered, torch.empty(batch, 1, 1, 1, device=device).uniform_(-hue, hue), 0.0)
        if self.jitter_p > 0 and b > 0:
            x = (x * brightness).clamp(0, 1)
        if self.jitter_p > 0 and c > 0:
            x = (contrast * x + (1 - contrast) * _gray(x).mean((2, 3), keepdim=True)).clamp(0, 1)
        if self.jitter_p > 0 and s > 0:
            x = (saturation * x + (1 - saturation) * _gray(x)).clamp(0, 1)
        if self.jitter_p > 0 and hue > 0:
            x = torch.where(jittered & (shift != 0), _shift_hue(x, shift[:, :, 0]), x)

        grayed = draw(self.gray_p)[:, None, None, None]
        if self.gray_p > 0:
            x = torch.where(grayed, _gray(x).expand_as(x), x)

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

        solarized = draw(self.solarize_p)[:, None, None, None]
        if self.solarize_p > 0:
            x = torch.where(solarized & (x >= 0.5), 1 - x, x)
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
# 7. Benchmark: python data.py --bench --data AID --data-root /datasets (README: the figures)
# ----------------------------------------------------------------------------------------------

def _epoch(loader, epoch, step_s=0.0):
    """(images/s, mean ms the consumer waited per batch) of one epoch; the consumer sleeps step_s
    per batch (a training step that leaves the GIL, as a GPU step mostly does)."""
    loader.sampler.set_epoch(epoch)
    batches, waited, count, start = iter(loader), 0.0, 0, time.perf_counter()
    while True:
        before = time.perf_counter()
        batch = next(batches, None)
        waited += time.perf_counter() - before
        if batch is None:
            return count / (time.perf_counter() - start), waited / len(loader) * 1e3
        count += len(batch[0])
        time.sleep(step_s)


def benchmark(args):
    """Loader throughput and consumer waits (PIL path, cached path), then BatchAugment per batch."""
    torch.set_num_threads(args.threads)
    size = resolve_load_size(args.data, args.data_root, args.crop, args.load_size)
    print(f"data.py benchmark | {args.data} load size {size} crop {args.crop} batch {args.batch_size} "
          f"workers {args.workers} | torch threads {args.threads} | {os.cpu_count()} cpus | "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    common = dict(size=size, batch_size=args.batch_size, shuffle=True, drop_last=True, workers=args.workers,
                  distributed=False)
    step_s = args.batch_size / args.step_rate
    for label, cache, epochs in (("PIL path", "none", args.pil_epochs), ("cached path", args.cache, args.epochs)):
        start = time.time()
        loader = build_loader(args.data, args.data_root, "all", cache=cache, **common)
        if cache != "none":
            print(f"cache build: {time.time() - start:.1f} s in {cache} (instant when it is reused)")
        for epoch in range(epochs):
            rate, wait_ms = _epoch(loader, epoch)
            print(f"{label:11} epoch {epoch}: {rate:6.0f} images/s to a consumer doing nothing, "
                  f"{wait_ms:6.1f} ms mean wait per batch")
        if epochs:
            rate, wait_ms = _epoch(loader, epochs, step_s)
            print(f"{label:11} epoch {epochs}: {wait_ms:6.1f} ms mean wait per batch for a consumer "
                  f"stepping {step_s * 1e3:.0f} ms per batch ({args.step_rate} images/s)")
        del loader
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = (args.batch_size, 3, size, size)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
    for label, options in (("every op", dict(hflip=0.5, vflip=0.5, rot90=0.5, blur_p=0.5, solarize_p=0.2)),
                           ("SelectiveMAE", dict(scale=(0.2, 1.0), hflip=0.5, vflip=0.5, rot90=0.5,
                                                 jitter_p=0.0, gray_p=0.0))):
        augment = BatchAugment(args.crop, **options)
        for step in range(1 + args.augment_steps):
            if step == 1:                                   # after one warm-up batch
                torch.cuda.synchronize() if device == "cuda" else None
                start, cpu_start = time.time(), time.process_time()
            augment(images)
        torch.cuda.synchronize() if device == "cuda" else None
        seconds = (time.time() - start) / args.augment_steps
        cpu_ms = (time.process_time() - cpu_start) / args.augment_steps * 1e3
        name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        print(f"BatchAugment {label:12} {'x'.join(map(str, shape))} -> {args.crop} px on {name}: "
              f"{seconds * 1e3:.0f} ms per batch, {cpu_ms:.0f} ms process CPU time")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="data.py benchmark: PIL path vs cached path vs BatchAugment")
    parser.add_argument("--bench", action="store_true", help="run the benchmark (the only action)")
    parser.add_argument("--data", default="UCM", help="AID, NWPU-RESISC45, UCM, synthetic or a folder path")
    parser.add_argument("--data-root", default="./datasets", help="folder holding the named datasets")
    parser.add_argument("--cache", default="auto", help="cache folder of the cached path (auto: default_cache_dir())")
    parser.add_argument("--crop", type=int, default=224, help="training view size (px)")
    parser.add_argument("--load-size", type=int, default=None, help="decode size (default: resolve_load_size)")
    parser.add_argument("--batch-size", type=int, default=256, help="loader and BatchAugment batch size")
    parser.add_argument("--workers", type=int, default=2, help="PIL-path worker processes")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the main process")
    parser.add_argument("--epochs", type=int, default=3, help="cached-path epochs to a consumer doing nothing")
    parser.add_argument("--pil-epochs", type=int, default=1, help="PIL-path epochs (0: skip the PIL path)")
    parser.add_argument("--step-rate", type=int, default=1250, help="images/s of the stepping consumer")
    parser.add_argument("--augment-steps", type=int, default=3, help="timed BatchAugment batches")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    benchmark(arguments) if arguments.bench else parser.print_help()
