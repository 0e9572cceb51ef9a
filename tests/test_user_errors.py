"""Bad input through the scripts themselves: each ends with one `error: ...` line naming the file
and exit code 2 (never a traceback), or, under --skip-bad, is left out and reported once."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO

# The smallest run of each script that reaches its training step (exit 0), for the --skip-bad case.
TINY = {"gsc_mim.py": ["--arch", "vit_tiny", "--img-size", "32", "--patch-size", "16", "--out-dim", "64",
                       "--head-hidden", "32", "--local-crops", "0"],
        "selective_mae.py": ["--arch", "vit_tiny", "--img-size", "32", "--patch-size", "8", "--depth", "1",
                             "--decoder-depth", "1"],
        "cmid.py": ["--arch", "vit_tiny", "--depth", "1", "--img-size", "32", "--patch-size", "16",
                    "--mask-patch-size", "16", "--proj-hidden", "32", "--proj-dim", "16", "--local-hidden", "32",
                    "--local-bottleneck", "16", "--local-out", "32", "--queue-size", "64", "--local-pairs", "2"]}


def scene_folder(root, bad=None):
    """root/<class>/<image>.png, 2 classes x 6 images of 64 px, plus one bad entry."""
    rng = np.random.default_rng(0)
    for c in ("fields", "forest"):
        (root / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    if bad == "corrupt JPEG":
        (root / "forest" / "z_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    elif bad == "zero-byte file":
        (root / "forest" / "z_empty.png").write_bytes(b"")
    elif bad == "non-image file":
        (root / "forest" / "z_notes.txt").write_text("field notes")
    elif bad == "empty class":
        (root / "water").mkdir()
    elif bad == "too-small image":
        Image.new("RGB", (10, 10)).save(root / "forest" / "z_tiny.png")
    return root


def run(script, *args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_one_line_error(proc, *words):
    """Exit 2, no traceback, and the error as the last line (progress lines such as "building the
    cache" may come before it)."""
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and errors == lines[-1:], proc.stderr[-3000:]
    for word in words:
        assert word in errors[0], errors[0]


@pytest.mark.parametrize("script", list(TINY))
def test_a_corrupt_image_is_one_line_naming_it(script, tmp_path):
    folder = scene_folder(tmp_path / "scenes", "corrupt JPEG")
    assert_one_line_error(run(script, "--data", folder, "--out", tmp_path / "run", cwd=tmp_path), "z_broken.jpg")


@pytest.mark.parametrize("bad, word", [("zero-byte file", "z_empty.png"), ("non-image file", "z_notes.txt"),
                                       ("empty class", "water"), ("too-small image", "z_tiny.png")])
def test_each_bad_input_is_one_line_naming_it(bad, word, tmp_path):
    folder = scene_folder(tmp_path / "scenes", bad)
    assert_one_line_error(run("gsc_mim.py", "--data", folder, "--out", tmp_path / "run", cwd=tmp_path), word)


def test_skip_bad_leaves_bad_images_out_and_says_so_once(tmp_path):
    folder = scene_folder(tmp_path / "scenes", "corrupt JPEG")
    Image.new("RGB", (10, 10)).save(folder / "fields" / "z_tiny.png")
    proc = run("gsc_mim.py", "--data", folder, "--skip-bad", *TINY["gsc_mim.py"], "--batch-size", "4",
               "--epochs", "1", "--max-steps", "1", "--no-eval", "--eval-every", "0", "--workers", "0",
               "--out", tmp_path / "run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert log.count("skip_bad skipped 1 unreadable") == 1 and "forest/z_broken.jpg" in log, log[-3000:]
    assert log.count("skip_bad left out 1 image(s) smaller") == 1 and "fields/z_tiny.png" in log, log[-3000:]
