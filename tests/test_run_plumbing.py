"""data.py's run plumbing shared by the three scripts: errors, checkpoints, save points, curves."""
import os
import signal

import pytest
import torch
from PIL import Image

import data


def test_run_main_turns_user_errors_into_one_line_and_exit_2(capsys):
    def main(argv):
        raise data.DataError(f"no folder {argv[0]}")
    with pytest.raises(SystemExit) as exit_info:
        data.run_main(main, ["/nowhere"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: no folder /nowhere\n"


def test_run_main_prints_one_line_for_an_error_raised_in_a_loader_worker(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "fine.png")

    def main(argv):
        loader = data.build_loader(str(tmp_path), None, "all", size=8, batch_size=2, shuffle=False,
                                   drop_last=False, workers=1, cache=None, distributed=False)
        next(iter(loader))
    with pytest.raises(SystemExit):
        data.run_main(main)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: cannot read image ") and "broken.jpg" in err


def test_run_main_keeps_the_traceback_of_a_bug():
    with pytest.raises(ZeroDivisionError):
        data.run_main(lambda argv: 1 / 0)


def test_checkpoint_writer_snapshots_before_returning_and_replaces_atomically(tmp_path):
    path = tmp_path / "checkpoint.pth"
    path.write_bytes(b"previous good checkpoint")
    state = {"w": torch.arange(6.0), "nested": [torch.ones(2), {"step": 3}]}
    writer = data.CheckpointWriter()
    writer.save(state, path)
    state["w"].zero_()            # training goes on while the thread writes
    writer.wait()
    saved = torch.load(path)
    assert torch.equal(saved["w"], torch.arange(6.0)) and saved["nested"][1] == {"step": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]   # no temp file left


def test_checkpoint_writer_reports_a_failed_write_as_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    writer = data.CheckpointWriter()
    writer.save({"w": torch.ones(1)}, blocker / "sub" / "checkpoint.pth")   # parent is a file
    with pytest.raises(data.UserError, match="could not write the checkpoint"):
        writer.wait()


def test_load_checkpoint_is_cpu_and_names_bad_files(tmp_path):
    with pytest.raises(data.UserError, match="not found"):
        data.load_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(data.UserError, match="junk.pth"):
        data.load_checkpoint(tmp_path / "junk.pth")
    torch.save({"weights": torch.ones(2)}, tmp_path / "foreign.pth")
    with pytest.raises(data.UserError, match="not a checkpoint of these scripts"):
        data.load_checkpoint(tmp_path / "foreign.pth")
    torch.save({"args": {}, "rng": torch.get_rng_state()}, tmp_path / "ok.pth")
    ckpt = data.load_checkpoint(tmp_path / "ok.pth")
    torch.set_rng_state(ckpt["rng"])            # a CPU ByteTensor, as set_rng_state requires


def test_save_points_signal_stops_and_clock_saves():
    points = data.SavePoints(every_min=0, device="cpu")
    assert points.check(1) == (False, False)            # every_min 0: no wall-clock saves
    os.kill(os.getpid(), signal.SIGUSR1)
    assert points.check(2) == (True, True)
    clock = data.SavePoints(every_min=1e-9, device="cpu")
    assert clock.check(1) == (True, False)


def test_curves_png_has_a_fixed_size_and_time_to_accuracy(tmp_path):
    few = [{"time_s": 1, "images_seen": 10, "loss": 3.0}, {"time_s": 2, "images_seen": 20, "knn": 40.0}]
    many = [{"time_s": i, "images_seen": 10 * i, "loss": 5 - i / 100} for i in range(1, 500)]
    many += [{"time_s": 10 * i, "images_seen": 100 * i, "knn": k} for i, k in enumerate([30, 41, 48.7, 50, 49.6], 1)]
    for name, records in (("few.png", few), ("many.png", many)):
        data.plot_curves(records, tmp_path / name, floor=35.0)
    sizes = {Image.open(tmp_path / n).size for n in ("few.png", "many.png")}
    assert sizes == {(960, 600)}
    assert data.time_to_accuracy(many) == 30           # 48.7 >= 49.6 - 1, first reached at 30 s
    assert data.time_to_accuracy(few) == 2 and data.time_to_accuracy(many[:3]) is None
