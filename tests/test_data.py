"""data.py: layouts, decoding of every image mode, errors, splits, synthetic scenes, load sizes,
loaders (prefetching, batch extras, resume), the memmap cache and BatchAugment (against the
implementation it replaced). All images are written by the tests (small, fast)."""
import itertools
import json
import logging
import math
import pathlib
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
from data import BatchAugment, DataError


@pytest.fixture(autouse=True)
def auto_cache(tmp_path, monkeypatch):
    """cache="auto" (build_loader's default) writes under the test's folder, never ~/.cache."""
    monkeypatch.setenv("RSMIM_CACHE", str(tmp_path / "auto-cache"))
    return tmp_path / "auto-cache"


def rgb(seed, size=(40, 40)):
    """A smooth random RGB image (compresses well, survives JPEG without surprises)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BILINEAR)


def make_tree(root, classes=("alpha", "beta", "gamma"), per_class=10, size=(40, 40), ext=".png"):
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rgb(100 * c + i, size).save(root / name / f"img{i:03d}{ext}")
    return root


# ---------------------------------------------------------------------------------------- layouts

def test_ucm_layout_with_images_level_and_tif(tmp_path, caplog):
    make_tree(tmp_path / "UCMerced_LandUse" / "Images", ("farm", "beach"), 5, ext=".tif")
    with caplog.at_level(logging.WARNING, logger="rsmim.data"):
        ds = data.build_dataset("UCM", tmp_path)
    assert ds.classes == ["beach", "farm"] and len(ds) == 10
    assert ds.samples[0] == "beach/img000.tif"
    image, label = ds[0]
    assert image.mode == "RGB" and image.size == (40, 40) and label == 0
    # a named dataset with the wrong number of classes is a warning, not an error
    assert "found 2 class folders, the dataset has 21" in caplog.text


@pytest.mark.parametrize("name,sub", [("AID", "AID"), ("NWPU-RESISC45", "NWPU-RESISC45"), ("nwpu-resisc45", "NWPU-RESISC45")])
def test_aid_and_nwpu_layouts(tmp_path, name, sub):
    make_tree(tmp_path / sub, ("a", "b"), 3, ext=".jpg")
    ds = data.build_dataset(name, tmp_path)
    assert ds.name == sub and ds.classes == ["a", "b"] and len(ds) == 6


def test_any_folder_tree_and_transform(tmp_path):
    make_tree(tmp_path / "mine", ("x", "y"), 4)
    ds = data.build_dataset(str(tmp_path / "mine"), transform=lambda im: np.asarray(im).shape)
    assert ds[0] == ((40, 40, 3), 0)


def test_every_image_mode_becomes_rgb(tmp_path):
    folder = tmp_path / "modes" / "c"
    folder.mkdir(parents=True)
    base = np.asarray(rgb(1))
    Image.fromarray(base).save(folder / "a.jpg", quality=95)
    Image.fromarray(base).save(folder / "b.png")
    Image.fromarray(base[..., 0]).save(folder / "c_gray.tif")
    Image.fromarray(np.full((40, 40), 128 * 257, np.uint16)).save(folder / "d_16bit.tif")
    Image.fromarray(np.full((40, 40), 65535, np.uint16)).save(folder / "e_16bit.png")
    Image.fromarray(np.dstack([base, np.full((40, 40), 7, np.uint8)]), "RGBA").save(folder / "f_rgba.png")
    Image.fromarray(base).convert("P").save(folder / "g_palette.png")
    Image.fromarray(base).save(folder / "h.bmp")
    assert Image.open(folder / "d_16bit.tif").mode.startswith("I;16")
    ds = data.build_dataset(str(tmp_path / "modes"))
    arrays = {name: np.asarray(ds[i][0]) for i, name in enumerate(ds.samples)}
    assert all(a.shape == (40, 40, 3) and a.dtype == np.uint8 for a in arrays.values())
    assert (arrays["c/d_16bit.tif"] == 128).all()           # 16-bit mapped linearly to 8 bits
    assert (arrays["c/e_16bit.png"] == 255).all()
    assert (arrays["c/c_gray.tif"] == base[..., :1]).all()  # gray repeated over 3 channels
    assert (arrays["c/f_rgba.png"] == base).all()           # alpha dropped
    assert (arrays["c/b.png"] == base).all() and (arrays["c/h.bmp"] == base).all()
    assert np.abs(arrays["c/g_palette.png"].astype(int) - base).mean() < 20


# ----------------------------------------------------------------------------------------- errors

def test_missing_root_names_the_place_and_the_layout(tmp_path):
    with pytest.raises(DataError) as error:
        data.build_dataset("UCM", tmp_path / "nowhere")
    message = str(error.value)
    assert str((tmp_path / "nowhere" / "UCMerced_LandUse" / "Images").resolve()) in message
    assert "<class name>" in message and "\n" not in message


def test_unknown_name_and_missing_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="unknown dataset name 'EuroSATT'.*AID, NWPU-RESISC45, UCM, synthetic"):
        data.build_dataset("EuroSATT")
    with pytest.raises(DataError, match="dataset folder does not exist './gone'"):
        data.build_dataset("./gone")
    with pytest.raises(DataError, match="unknown split"):
        data.build_dataset("synthetic", split="val")


def test_empty_class_folder_and_no_class_folders(tmp_path):
    make_tree(tmp_path / "t", ("a",), 2)
    (tmp_path / "t" / "empty").mkdir()
    with pytest.raises(DataError, match=f"empty class folder {tmp_path / 't' / 'empty'}"):
        data.build_dataset(str(tmp_path / "t"))
    (tmp_path / "flat").mkdir()
    rgb(0).save(tmp_path / "flat" / "x.png")
    with pytest.raises(DataError, match=f"no class folders in {tmp_path / 'flat'}"):
        data.build_dataset(str(tmp_path / "flat"))


def bad_tree(tmp_path):
    root = make_tree(tmp_path / "bad", ("a", "b"), 5, ext=".jpg")
    jpeg = (root / "a" / "img000.jpg").read_bytes()
    (root / "a" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "b" / "garbage.png").write_bytes(b"this is not a png" * 10)
    return root


def test_corrupt_and_truncated_images_name_the_file(tmp_path):
    root = bad_tree(tmp_path)
    ds = data.build_dataset(str(root))          # decoding is lazy without skip_bad
    for name in ("a/truncated.jpg", "b/garbage.png"):
        with pytest.raises(DataError, match=f"cannot read image {root / name}.*skip_bad"):
            ds[ds.samples.index(name)]
    for workers in (0, 2):                                             # PIL path: one line, no traceback
        loader = data.build_loader(str(root), None, "all", size=32, batch_size=4, shuffle=False,
                                   drop_last=False, workers=workers, cache=None)
        with pytest.raises(DataError, match="cannot read image") as error:
            list(loader)
        assert "\n" not in str(error.value)
    with pytest.raises(DataError, match="cannot read image"):          # cache build: same error,
        data.build_loader(str(root), None, "all", size=32, batch_size=4, shuffle=False,
                          drop_last=False, workers=0, cache=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []                  # and no partial file left


def test_non_image_file_is_an_error_and_hidden_files_are_ignored(tmp_path, caplog):
    root = make_tree(tmp_path / "t", ("a", "b"), 3)
    (root / "a" / ".DS_Store").write_bytes(b"\0")
    with caplog.at_level(logging.WARNING, logger="rsmim.data"):
        assert len(data.build_dataset(str(root))) == 6
    assert "ignored 1 hidden file" in caplog.text
    (root / "b" / "notes.txt").write_text("labels")
    with pytest.raises(DataError, match=f"not an image file among the images: {root / 'b' / 'notes.txt'}"):
        data.build_dataset(str(root))


def test_skip_bad_skips_and_reports_the_count(tmp_path, caplog):
    root = bad_tree(tmp_path)
    (root / "b" / "notes.txt").write_text("labels")
    with caplog.at_level(logging.WARNING, logger="rsmim.data"):
        ds = data.build_dataset(str(root), skip_bad=True)
    assert len(ds) == 10 and "truncated.jpg" not in ds.samples and "b/garbage.png" not in ds.samples
    assert "skipped 3 unreadable or non-image file(s)" in caplog.text
    assert "truncated.jpg" in caplog.text and "garbage.png" in caplog.text


def test_image_smaller_than_the_requested_size(tmp_path):
    root = make_tree(tmp_path / "t", ("a", "b"), 2, size=(40, 30))
    kwargs = dict(size=64, batch_size=4, shuffle=False, drop_last=False, workers=0)
    message = f"image {root / 'a' / 'img000.png'} is 40x30, smaller than"   # 30 px * 2 < 64: refused
    with pytest.raises(DataError, match=message):
        data.build_loader(str(root), None, "all", **kwargs)                  # the cache build, at once
    loader = data.build_loader(str(root), None, "all", cache=None, **kwargs)
    with pytest.raises(DataError, match=message):
        next(iter(loader))
    loader = data.build_loader(str(root), None, "all", max_upscale=float("inf"), **kwargs)
    assert next(iter(loader))[0].shape == (4, 3, 64, 64)         # upscaling on purpose works


def test_skip_bad_leaves_out_too_small_images_reported_once(tmp_path, caplog):
    root = make_tree(tmp_path / "t", ("a", "b"), 10, size=(40, 40), ext=".jpg")
    rgb(7, (10, 10)).save(root / "a" / "tiny.jpg")
    splits = data.build_dataset(str(root), skip_bad=True).splits      # drawn with the tiny image
    kwargs = dict(size=32, batch_size=4, shuffle=False, drop_last=False, workers=0, skip_bad=True)
    with caplog.at_level(logging.WARNING, logger="rsmim.data"):
        loaders = {split: data.build_loader(str(root), None, split, **kwargs) for split in ("all", "train", "test")}
        data.build_loader(str(root), None, "test", cache=None, **kwargs)
    assert caplog.text.count("left out 1 image(s) smaller than 32 px") == 1 and "a/tiny.jpg" in caplog.text
    assert caplog.text.count("skipped") <= 1                                 # the skip summary: once a run
    tiny = data.build_dataset(str(root)).all_samples.index("a/tiny.jpg")
    for split, loader in loaders.items():
        expected = [i for i in splits[split] if i != tiny]
        assert [int(r) for r in loader.rows] == expected and sum(len(y) for _, y in loader) == len(expected)
    with pytest.raises(DataError, match="tiny.jpg is 10x10, smaller than"):   # without skip_bad: an error
        data.build_loader(str(root), None, "all", **{**kwargs, "skip_bad": False})


# ------------------------------------------------------------------------------------- load sizes

def test_resolve_load_size(tmp_path):
    make_tree(tmp_path / "AID", ("a",), 1, size=(8, 8))               # the table's size, not the files'
    make_tree(tmp_path / "UCMerced_LandUse" / "Images", ("a",), 1, size=(8, 8))
    assert data.resolve_load_size("AID", tmp_path, 224) == 448          # 600 px, capped at 2 x crop
    assert data.resolve_load_size("AID", tmp_path, 400) == 600
    assert data.resolve_load_size("UCM", tmp_path, 224) == 256
    assert data.resolve_load_size("UCM", tmp_path, 224, load_size=300) == 300
    folder = make_tree(tmp_path / "mine", ("x", "y"), 2, size=(90, 70))
    (folder / "x" / ".hidden.png").write_bytes(b"not read")
    assert data.resolve_load_size(str(folder), None, 32) == 64 and data.resolve_load_size(str(folder), None, 48) == 70
    assert data.resolve_load_size("synthetic", None, 32) == 64
    with pytest.raises(DataError, match="NWPU-RESISC45 not found"):
        data.resolve_load_size("NWPU-RESISC45", tmp_path, 224)


# ----------------------------------------------------------------------------------------- splits

def test_splits_are_deterministic_and_independent_of_listing_order(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "t", ("a", "b", "c"), 30, size=(8, 8))
    (root / "c" / "img029.png").unlink()
    first = data.build_dataset(str(root), seed=3)
    iterdir, rglob = pathlib.Path.iterdir, pathlib.Path.rglob
    monkeypatch.setattr(pathlib.Path, "iterdir", lambda self: iter(sorted(iterdir(self), reverse=True)))
    monkeypatch.setattr(pathlib.Path, "rglob", lambda self, p: iter(sorted(rglob(self, p), reverse=True)))
    again = data.build_dataset(str(root), seed=3)
    assert again.all_samples == first.all_samples and again.splits == first.splits
    assert data.build_dataset(str(root), seed=4).splits["test"] != first.splits["test"]
    train, test, train1 = (set(first.splits[k]) for k in ("train", "test", "train1"))
    assert not train & test and train | test == set(range(89)) and train1 <= train
    labels = np.array(first.all_labels)
    assert list(np.bincount(labels[sorted(test)])) == [6, 6, 6]            # 20% of 30 and of 29
    assert list(np.bincount(labels[sorted(train1)])) == [1, 1, 1]          # 1% of 24, at least one
    assert data.build_dataset(str(root), split="train1", seed=3).labels == [0, 1, 2]


def test_save_splits_json(tmp_path):
    root = make_tree(tmp_path / "t", ("a", "b"), 10, size=(8, 8))
    ds = data.build_dataset(str(root), split="train", seed=1)
    data.save_splits(ds, tmp_path / "out" / "splits.json")
    saved = json.loads((tmp_path / "out" / "splits.json").read_text())
    assert saved["classes"] == ["a", "b"] and saved["seed"] == 1
    assert saved["train"] == ds.samples and len(saved["test"]) == 4 and len(saved["train1"]) == 2
    assert set(saved["train1"]) <= set(saved["train"]) and not set(saved["train"]) & set(saved["test"])


# -------------------------------------------------------------------------------------- synthetic

def test_synthetic_is_deterministic_any_size_and_balanced():
    a, label = data.synthetic_scene(7, 13, 48)
    assert a.shape == (48, 48, 3) and a.dtype == np.uint8 and label == 3
    assert (data.synthetic_scene(7, 13, 48)[0] == a).all()
    assert (data.synthetic_scene(8, 13, 48)[0] != a).any()
    assert data.synthetic_scene(0, 5, 33)[0].shape == (33, 33, 3)
    ds = data.build_dataset("synthetic", split="all", img_size=24, synthetic_images=100, seed=2)
    assert len(ds.classes) >= 8 and np.bincount(ds.labels).tolist() == [10] * 10
    image, label = ds[0]
    assert image.size == (24, 24) and ds.samples[0].startswith(ds.classes[label] + "/")
    assert len(data.build_dataset("synthetic", split="train1", synthetic_images=100)) == 10


def test_synthetic_classes_are_not_their_mean_colour():
    """Palettes are drawn per image: nearest class-mean on the mean RGB is far from perfect,
    while the images of one class still differ in colour a lot."""
    n, classes = 400, len(data.SYNTHETIC_CLASSES)
    scenes = [data.synthetic_scene(0, i, 32) for i in range(n)]
    means = np.array([image.reshape(-1, 3).mean(0) for image, _ in scenes])
    labels = np.array([label for _, label in scenes])
    train, test = np.arange(n) < n // 2, np.arange(n) >= n // 2
    centres = np.stack([means[train & (labels == c)].mean(0) for c in range(classes)])
    predicted = np.argmin(((means[test, None] - centres[None]) ** 2).sum(-1), 1)
    accuracy = (predicted == labels[test]).mean()
    assert accuracy < 0.45, accuracy                                     # chance is 0.10
    assert means[labels == 0].std(0).mean() > 20                         # palettes vary


# ---------------------------------------------------------------------------------- loaders/cache

def test_cache_pixels_equal_pil_path_and_cache_is_reused(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "t", ("a", "b"), 6, size=(50, 44), ext=".jpg")
    Image.fromarray(np.asarray(rgb(9, (48, 48)))[..., 0]).save(root / "b" / "gray.tif")
    kwargs = dict(size=32, batch_size=5, shuffle=False, drop_last=False, workers=0)
    plain = list(data.build_loader(str(root), None, "all", cache=None, **kwargs))
    cached_loader = data.build_loader(str(root), None, "all", cache=tmp_path / "cache", **kwargs)
    cached = list(cached_loader)
    assert cached_loader.dataset.classes == ["a", "b"]
    assert len(plain) == len(cached) == 3
    for (x, y), (cx, cy) in zip(plain, cached):
        assert x.dtype == cx.dtype == torch.uint8 and x.shape[1:] == (3, 32, 32)
        assert torch.equal(x, cx) and torch.equal(y, cy) and y.dtype == torch.int64
    u8 = next((tmp_path / "cache").glob("*_32.u8"))
    header = json.loads(u8.with_suffix(".json").read_text())
    assert header["size"] == 32 and header["n"] == 13 and header["classes"] == ["a", "b"]
    assert set(header["splits"]) == {"train", "test", "train1"}
    # reused: a matching header means no decoding at all
    monkeypatch.setattr(data, "_write_cache", lambda *a, **k: pytest.fail("cache rebuilt"))
    test_split = data.build_loader(str(root), None, "test", cache=tmp_path / "cache", **kwargs)
    assert torch.equal(torch.cat([x for x, _ in test_split]),
                       torch.cat([x for x, _ in data.build_loader(str(root), None, "test", cache=None, **kwargs)]))
    # a changed dataset does not match any more
    rgb(50).save(root / "a" / "new.jpg")
    with pytest.raises(pytest.fail.Exception, match="cache rebuilt"):
        data.build_loader(str(root), None, "all", cache=tmp_path / "cache", **kwargs)


def test_loaders_shuffle_per_epoch_the_same_way_with_and_without_workers(tmp_path):
    kwargs = dict(size=16, batch_size=8, shuffle=True, drop_last=True, seed=5, synthetic_images=40)
    loader = data.build_loader("synthetic", None, "all", workers=2, **kwargs)         # PIL path, 2 processes
    assert len(loader) == 5
    loader.sampler.set_epoch(0)
    epoch0 = torch.cat([y for _, y in loader])
    loader.sampler.set_epoch(1)
    epoch1 = [batch for batch in loader]
    labels1 = torch.cat([y for _, y in epoch1])
    assert sorted(epoch0.tolist()) == sorted(labels1.tolist()) and not torch.equal(epoch0, labels1)
    cached = data.build_loader("synthetic", None, "all", workers=2, cache=tmp_path / "c", **kwargs)
    cached.sampler.set_epoch(1)
    for (x, y), (cx, cy) in zip(epoch1, cached):                                      # seeded order
        assert torch.equal(x, cx) and torch.equal(y, cy)


def masks(rng, batch_size):
    """A batch_extras: per-batch random structure, and the thread that made it."""
    return rng.integers(0, 1000, batch_size), threading.current_thread().name


def test_cache_auto_and_none(tmp_path, auto_cache):
    root = make_tree(tmp_path / "t", ("a", "b"), 4)
    kwargs = dict(size=16, batch_size=4, shuffle=False, drop_last=False, workers=0)
    auto = torch.cat([x for x, _ in data.build_loader(str(root), None, "all", **kwargs)])
    assert [p.suffix for p in sorted(auto_cache.iterdir())] == [".json", ".u8"]     # the default location
    none = torch.cat([x for x, _ in data.build_loader(str(root), None, "all", cache="none", **kwargs)])
    assert torch.equal(auto, none)
    data.build_loader("synthetic", None, "all", synthetic_images=20, **kwargs)      # drawn, not cached
    assert len(list(auto_cache.iterdir())) == 2


@pytest.mark.parametrize("cache", [None, "folder"])
def test_batches_depend_only_on_seed_epoch_rank_and_resume_exactly(tmp_path, cache):
    kwargs = dict(size=16, batch_size=6, shuffle=True, drop_last=True, seed=3, synthetic_images=40,
                  workers=2, batch_extras=masks, cache=cache and tmp_path / "c")
    loader = data.build_loader("synthetic", None, "train", **kwargs)
    assert len(loader) == 5                                                       # 32 train images
    epochs = []
    for epoch in range(3):
        loader.sampler.set_epoch(epoch)
        epochs.append(list(loader))
        assert loader.pending[0][0] == (epoch + 1, 0)                 # already making the next epoch
    images, labels, (extras, thread) = epochs[1][2]
    assert images.shape == (6, 3, 16, 16) and labels.dtype == torch.int64 and thread != "MainThread"
    assert (extras == np.random.default_rng([3, 0, 1, 2]).integers(0, 1000, 6)).all()
    assert not torch.equal(epochs[0][0][0], epochs[1][0][0])
    fresh = data.build_loader("synthetic", None, "train", **{**kwargs, "workers": 0})   # no workers,
    for epoch in (2, 1):                                                           # epochs out of order,
        fresh.sampler.set_epoch(epoch)
        resumed = list(itertools.islice(fresh, 2, None))                          # skipping 2 batches
        for (x, y, (e, _)), (rx, ry, (re, _)) in zip(epochs[epoch][2:], resumed, strict=True):
            assert torch.equal(x, rx) and torch.equal(y, ry) and (e == re).all()
    fresh.sampler.set_epoch(0)
    next(iter(fresh))                                                              # abandoned mid-epoch
    fresh.sampler.set_epoch(0)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(epochs[0], fresh, strict=True))


def test_buffers_are_reused_only_once_free(tmp_path):
    loader = data.build_loader("synthetic", None, "all", size=8, batch_size=4, shuffle=False, drop_last=False,
                               synthetic_images=40, workers=0, cache=tmp_path / "c")
    kept = list(loader)                                          # every batch held: no buffer reused
    assert len({x.data_ptr() for x, _ in kept}) == 10
    reference = torch.cat([x for x, _ in kept])
    del kept
    for _ in range(3):                                           # batches dropped: a few buffers recycled
        assert torch.equal(torch.cat([x.clone() for x, _ in loader]), reference)
    assert len(loader.buffers) <= 10 + data.PREFETCH                # 40 batches made so far


def test_distributed_shards_are_disjoint(monkeypatch):
    seen = []
    for r in (0, 1):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", str(r))
        assert data.is_distributed() and data.rank() == r
        loader = data.build_loader("synthetic", None, "all", size=8, batch_size=5, shuffle=True,
                                   drop_last=False, workers=0, synthetic_images=40)
        seen.append([i for batch in loader.sampler for i in batch])
    assert len(seen[0]) == len(seen[1]) == 20 and sorted(seen[0] + seen[1]) == list(range(40))


# ------------------------------------------------------------------------------------ BatchAugment

def plain(size, **kwargs):
    """BatchAugment with no colour ops: only geometry."""
    options = dict(hflip=0.0, jitter_p=0.0, gray_p=0.0, mean=(0, 0, 0), std=(1, 1, 1))
    return BatchAugment(size, **{**options, **kwargs})


def test_full_box_reproduces_the_antialiased_resize():
    images = torch.randint(0, 256, (3, 3, 40, 40), dtype=torch.uint8)
    views, params = plain(24, scale=(1, 1), ratio=(1, 1))(images)
    assert torch.allclose(params["boxes"], torch.tensor([[0.0, 0, 40, 40]] * 3))
    reference = F.interpolate(images.float() / 255, size=(24, 24), mode="bilinear", antialias=True, align_corners=False)
    assert torch.allclose(views, reference, atol=1e-5)
    pil = np.asarray(Image.fromarray(images[0].permute(1, 2, 0).numpy()).resize((24, 24), Image.BILINEAR))
    assert np.abs(views[0].permute(1, 2, 0).numpy() * 255 - pil).max() <= 1.01
    upscaled, _ = plain(56, scale=(1, 1), ratio=(1, 1))(images)          # also when enlarging
    assert torch.allclose(upscaled, F.interpolate(images.float() / 255, size=(56, 56), mode="bilinear",
                                                  antialias=True, align_corners=False), atol=1e-5)


def test_boxes_flips_and_rotations_are_consistent():
    images = torch.rand(16, 3, 48, 40)
    torch.manual_seed(0)
    base, params = plain(20)(images)
    boxes = params["boxes"]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / (48 * 40)
    ratio = (boxes[:, 2] - boxes[:, 0]) / (boxes[:, 3] - boxes[:, 1])
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 40 + 1e-4).all() and (boxes[:, 3] <= 48 + 1e-4).all()
    assert (area >= 0.08 - 1e-4).all() and (area <= 1 + 1e-4).all()
    assert (ratio >= 3 / 4 - 1e-4).all() and (ratio <= 4 / 3 + 1e-4).all()
    # the same RNG stream with flips / rotations on: same boxes, the view flipped / rotated
    torch.manual_seed(0)
    flipped, fparams = plain(20, hflip=1.0, vflip=1.0)(images)
    assert torch.equal(fparams["boxes"], boxes) and fparams["hflip"].all() and fparams["vflip"].all()
    assert torch.allclose(flipped, base.flip(-1).flip(-2), atol=1e-6)
    torch.manual_seed(0)
    rotated, rparams = plain(20, rot90=1.0)(images)
    assert set(rparams["rot90"].tolist()) <= {1, 2, 3} and rparams["rot90"].dtype == torch.int64
    for view, original, k in zip(rotated, base, rparams["rot90"].tolist()):
        assert torch.allclose(view, torch.rot90(original, k, (-2, -1)), atol=1e-6)


def test_colour_ops_uint8_float_and_determinism():
    images = torch.randint(0, 256, (8, 3, 36, 36), dtype=torch.uint8)
    augment = BatchAugment(32, vflip=0.5, rot90=0.5, blur_p=0.5, solarize_p=0.5, noise_p=0.5)
    torch.manual_seed(1)
    views, params = augment(images)
    assert views.shape == (8, 3, 32, 32) and views.dtype == torch.float32 and torch.isfinite(views).all()
    assert set(params) >= {"boxes", "hflip", "vflip", "rot90"} and params["hflip"].dtype == torch.bool
    torch.manual_seed(1)
    again, _ = augment(images.float() / 255)                              # float input, same result
    assert torch.allclose(views, again, atol=1e-5)
    gray, _ = BatchAugment(32, gray_p=1.0, jitter_p=0.0)(images)
    gray = gray * torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(data.IMAGENET_MEAN).view(1, 3, 1, 1)
    assert torch.allclose(gray[:, 0], gray[:, 1], atol=1e-5) and torch.allclose(gray[:, 1], gray[:, 2], atol=1e-5)
    x = torch.rand(4, 3, 20, 20)
    hue_only = plain(20, scale=(1, 1), ratio=(1, 1), jitter=(0, 0, 0, 0.0), jitter_p=1.0)(x)[0]
    assert torch.allclose(hue_only, plain(20, scale=(1, 1), ratio=(1, 1))(x)[0], atol=1e-5)
    solar = plain(20, scale=(1, 1), ratio=(1, 1), solarize_p=1.0)(x)[0]
    assert (solar <= 0.5 + 1e-6).all()
    normalised = data.normalize(images)
    assert torch.allclose(normalised[:, 0], (images[:, 0] / 255 - 0.485) / 0.229)


class ReferenceAugment(BatchAugment):
    """BatchAugment.forward as it was before ops of probability 0 were skipped, constants cached
    per device and rot90 made one gather: every op computed on the whole batch."""

    def forward(self, images):
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        batch, _, height, width = x.shape
        device, size = x.device, self.size
        draw = lambda p: torch.rand(batch, device=device) < p             # noqa: E731
        boxes = self.sample_boxes(batch, height, width, device)
        hflip, vflip = draw(self.hflip), draw(self.vflip)
        wx = data.resample_weights(boxes[:, 0], boxes[:, 2], width, size)
        wy = data.resample_weights(boxes[:, 1], boxes[:, 3], height, size)
        wx = torch.where(hflip[:, None, None], wx.flip(1), wx)
        wy = torch.where(vflip[:, None, None], wy.flip(1), wy)
        x = wy[:, None] @ x @ wx.transpose(1, 2)[:, None]
        turns = torch.randint(1, 4, (batch,), device=device) * draw(self.rot90)
        if self.rot90 > 0:
            for k in (1, 2, 3):
                x = torch.where((turns == k)[:, None, None, None], torch.rot90(x, k, (-2, -1)), x)
        jittered = draw(self.jitter_p)[:, None, None, None]
        b, c, s, hue = self.jitter
        factor = lambda f: torch.where(jittered, torch.empty(batch, 1, 1, 1, device=device).uniform_(max(0, 1 - f), 1 + f), 1.0)  # noqa: E731
        brightness, contrast, saturation = factor(b), factor(c), factor(s)
        shift = torch.where(jittered, torch.empty(batch, 1, 1, 1, device=device).uniform_(-hue, hue), 0.0)
        x = (x * brightness).clamp(0, 1)
        x = (contrast * x + (1 - contrast) * data._gray(x).mean((2, 3), keepdim=True)).clamp(0, 1)
        x = (saturation * x + (1 - saturation) * data._gray(x)).clamp(0, 1)
        if hue > 0:
            x = torch.where(jittered & (shift != 0), data._shift_hue(x, shift[:, :, 0]), x)
        x = torch.where(draw(self.gray_p)[:, None, None, None], data._gray(x).expand_as(x), x)
        if self.blur_p > 0:
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
        return data.normalize(x, self.mean, self.std), params


@pytest.mark.parametrize("options", [
    dict(rot90=1.0, jitter_p=0.0, gray_p=0.0),                                   # geometry only
    dict(scale=(0.2, 1.0), hflip=0.5, vflip=0.5, rot90=0.5, jitter_p=0.0, gray_p=0.0),   # SelectiveMAE
    dict(jitter=(0.4, 0.0, 0.2, 0.0), jitter_p=0.8, gray_p=0.0),                  # some jitter ops at 0
    dict(jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=1.0, gray_p=0.5, blur_p=0.5, solarize_p=0.5, noise_p=0.5),
    dict(hflip=0.5, vflip=0.5, rot90=0.75, blur_p=1.0, solarize_p=0.2),           # GSC-MIM's teacher view
])
def test_batch_augment_computes_what_the_reference_did(options):
    images = torch.randint(0, 256, (12, 3, 40, 36), dtype=torch.uint8)
    torch.manual_seed(4)
    views, params = BatchAugment(24, **options)(images)
    torch.manual_seed(4)
    expected, expected_params = ReferenceAugment(24, **options)(images)
    torch.testing.assert_close(views, expected, atol=2e-6, rtol=0)
    assert all(torch.equal(params[k], expected_params[k]) for k in expected_params)


def test_hue_shift_matches_a_reference():
    """A full turn of hue is the identity; a third of a turn permutes R,G,B."""
    x = torch.rand(2, 3, 5, 5)
    assert torch.allclose(data._shift_hue(x, torch.ones(2, 1, 1) * 1.0), x, atol=1e-5)
    assert torch.allclose(data._shift_hue(x, torch.ones(2, 1, 1) / 3), x[:, [2, 0, 1]], atol=1e-5)


# ------------------------------------------------------------------------------------------ UCM

def test_real_ucm_images(ucm_root):
    ds = data.build_dataset("UCM", ucm_root, "all")
    assert len(ds.classes) == 21 and len(ds) == 2100
    assert len(ds.splits["test"]) == 420 and len(ds.splits["train1"]) == 21
    loader = data.build_loader("UCM", ucm_root, "train1", size=64, batch_size=21, shuffle=False,
                               drop_last=False, workers=0, cache=None)
    images, labels = next(iter(loader))
    assert images.shape == (21, 3, 64, 64) and sorted(labels.tolist()) == list(range(21))
    assert images.float().std() > 10


TORCHRUN_SCRIPT = '''
import json, os, sys
sys.path.insert(0, os.getcwd())
import torch, torch.distributed as dist
import data
dist.init_process_group("gloo")
loader = data.build_loader("synthetic", None, "all", size=16, batch_size=4, shuffle=True,
                           drop_last=False, workers=0, synthetic_images=40, cache=sys.argv[1])
loader.sampler.set_epoch(1)
seen = [i for batch in loader.sampler for i in batch]
pixels = int(sum(images.sum() for images, _ in loader))
with open(os.path.join(sys.argv[1], f"rank{data.rank()}.json"), "w") as f:
    json.dump({"world": data.world_size(), "seen": seen, "pixels": pixels}, f)
dist.destroy_process_group()
'''


def test_torchrun_shards_and_builds_the_cache_once(tmp_path, run_torchrun):
    script = tmp_path / "shard.py"
    script.write_text(TORCHRUN_SCRIPT)
    cache = tmp_path / "cache"
    proc = run_torchrun(2, script, cache, timeout=240)
    assert (proc.stdout + proc.stderr).count("building the cache") == 1       # local rank 0 only
    ranks = [json.loads((cache / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and len(r["seen"]) == 20 and r["pixels"] > 0 for r in ranks)
    assert sorted(ranks[0]["seen"] + ranks[1]["seen"]) == list(range(40))
    assert sorted(p.name for p in cache.glob("synthetic*")) == ["synthetic-n40-seed0_16.json", "synthetic-n40-seed0_16.u8"]


def test_loader_leaves_the_global_rng_alone():
    """Iterating a loader (PIL path: worker processes, or the synthetic generator) draws nothing from
    torch's global RNG: a resumed run must see the same augmentations as an uninterrupted one,
    whenever the loader happens to start its workers."""
    loader = data.build_loader("synthetic", None, "train", size=16, batch_size=4, shuffle=True,
                               drop_last=True, synthetic_images=24, workers=1, distributed=False)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    loader.sampler.set_epoch(1)
    next(iter(loader))
    assert torch.equal(torch.get_rng_state(), before)


def test_a_process_exits_cleanly_with_batches_still_being_prepared(tmp_path):
    """The loader's threads keep preparing batches ahead; a process that stops mid-epoch (--max-steps,
    preemption, an error) must still exit normally, not abort in a daemon thread inside torch."""
    code = ("import data\n"
            "loader = data.build_loader('synthetic', None, 'train', size=32, batch_size=4, shuffle=True,\n"
            "                           drop_last=True, synthetic_images=60, workers=0, distributed=False)\n"
            "next(iter(loader))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=pathlib.Path(data.__file__).parent, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
