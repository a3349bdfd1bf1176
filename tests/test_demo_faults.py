"""The demo never deletes a training run it did not write."""

import json

import pytest

from opdplus_jax import demo


def _a_training_run(folder):
    (folder / "checkpoints" / "2").mkdir(parents=True)
    (folder / "checkpoints" / "2" / "params").write_text("weights")
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 1, "split": "train"}) + "\n")


def test_a_run_the_demo_did_not_write_is_kept(tmp_path):
    _a_training_run(tmp_path)
    with pytest.raises(FileExistsError, match="--overwrite"):
        demo.clear_run(str(tmp_path))
    assert (tmp_path / "checkpoints" / "2" / "params").read_text() == "weights"
    assert (tmp_path / "metrics.jsonl").exists()
    assert not (tmp_path / demo.DEMO_MARKER).exists()


def test_overwrite_replaces_it_and_marks_the_folder(tmp_path):
    _a_training_run(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    demo.clear_run(str(tmp_path), overwrite=True)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only the run's outputs go
    assert (tmp_path / demo.DEMO_MARKER).is_file()


def test_the_demos_own_previous_run_is_replaced(tmp_path):
    demo.clear_run(str(tmp_path))  # an empty folder: nothing to remove, marked
    _a_training_run(tmp_path)  # what the distillation then wrote
    demo.clear_run(str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_cli_flag():
    assert demo.parse_args(["--overwrite"])["overwrite"]
    assert not demo.parse_args([])["overwrite"]
