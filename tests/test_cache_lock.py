"""The cache on a folder shared by several processes (or hosts): built once, under a lock file.

Two builders started at once on the same folder: one decodes, the other waits for its header, and
both read the same bytes. A lock left by a dead process is removed; a live one is waited for."""
import hashlib
import json
import socket
import subprocess
import sys

import pytest

import data
from conftest import REPO

BUILDER = '''
import hashlib, logging, os, pathlib, sys, time
sys.path.insert(0, sys.argv[1])
import data
logging.basicConfig(level=logging.INFO, format="%(message)s")
ready = pathlib.Path(sys.argv[3])                                # both start at the same moment:
(ready / str(os.getpid())).touch()                               # a barrier, whatever the load
while len(list(ready.iterdir())) < 2:
    time.sleep(0.01)
loader = data.build_loader("synthetic", None, "all", size=24, batch_size=50, shuffle=False, drop_last=False,
                           workers=0, synthetic_images=300, cache=sys.argv[2])
digest = hashlib.sha1()
for images, labels in loader:
    digest.update(images.numpy().tobytes() + labels.numpy().tobytes())
print("digest", digest.hexdigest())
'''


def test_two_builders_at_once_one_decodes_the_other_waits(tmp_path):
    script, cache = tmp_path / "builder.py", tmp_path / "shared-cache"
    script.write_text(BUILDER)
    ready = tmp_path / "ready"
    ready.mkdir()
    procs = [subprocess.Popen([sys.executable, str(script), str(REPO), str(cache), str(ready)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={"PATH": "", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
             for _ in range(2)]
    outputs = [proc.communicate(timeout=240) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), outputs
    logs = [out + err for out, err in outputs]
    assert sum("building the cache" in log for log in logs) == 1, logs
    assert sum("waiting for" in log for log in logs) == 1, logs   # ... the other one's host and pid
    digests = {line for log in logs for line in log.splitlines() if line.startswith("digest")}
    assert len(digests) == 1, logs                                # identical bytes in both
    assert sorted(p.suffix for p in cache.iterdir()) == [".json", ".u8"]   # no lock, no temp file left


def decoder(n=40, size=16):
    return data.SampleDecoder(data.build_dataset("synthetic", synthetic_images=n, img_size=size), size, 2.0)


def test_a_dead_builders_lock_is_removed(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / "synthetic-n40-seed0_16.lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    path = data.build_cache(decoder(), tmp_path, workers=0, wait_s=30)
    assert path.exists() and not lock.exists() and "removing the stale cache lock" in caplog.text
    again = hashlib.sha1(path.read_bytes()).hexdigest()
    assert data.build_cache(decoder(), tmp_path, workers=0) == path                  # reused
    assert hashlib.sha1(path.read_bytes()).hexdigest() == again


def test_a_live_lock_elsewhere_is_waited_for(tmp_path, monkeypatch):
    lock = tmp_path / "synthetic-n40-seed0_16.lock"
    lock.write_text(json.dumps({"host": "another-node", "pid": 1234}))      # fresh: not stale
    with pytest.raises(data.DataError, match=f"another-node.*delete {lock} if no job is building it"):
        data.build_cache(decoder(), tmp_path, workers=0, wait_s=1.5)
    monkeypatch.setenv("LOCAL_RANK", "1")                                   # never builds, even unlocked
    lock.unlink()
    with pytest.raises(data.DataError, match="timed out"):
        data.build_cache(decoder(), tmp_path, workers=0, wait_s=1.5)
    monkeypatch.setattr(data, "STALE_LOCK_S", 0.0)                          # an old lock is stale
    monkeypatch.setenv("LOCAL_RANK", "0")
    lock.write_text(json.dumps({"host": "another-node", "pid": 1234}))
    assert data.build_cache(decoder(), tmp_path, workers=0, wait_s=30).exists()
