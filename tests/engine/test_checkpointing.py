"""Which checkpoint a run resumes from: complete ones only, newest first, saying what it skipped."""
from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from agvm_ds.engine import checkpointing
from agvm_ds.engine.checkpointing import resolve_resume


def _complete_tag(directory: Path, iteration: int, world_size: int = 2, archives: bool = True) -> Path:
    """A tag as a save leaves it: rank files (torch's zip archives, or plain bytes) and the manifest."""
    tag = directory / f"iter_{iteration:08d}"
    tag.mkdir(parents=True)
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        if archives:
            with zipfile.ZipFile(tag / name, "w") as archive:
                archive.writestr("data.pkl", b"z" * 200)
        else:
            (tag / name).write_bytes(b"x" * 200)
    checkpointing._write_manifest(tag, {"world_size": world_size, "zero_stage": 2})
    return tag


def test_auto_resume_takes_the_newest_complete_checkpoint(tmp_path):
    directory = tmp_path / "checkpoints"
    for iteration in (2, 4):
        _complete_tag(directory, iteration)
    checkpoint = resolve_resume("auto", tmp_path)
    assert checkpoint.tag == "iter_00000004" and checkpoint.world_size == 2 and checkpoint.notes == ()


def test_truncated_or_unfinished_checkpoints_fall_back_to_the_previous_complete_one(tmp_path):
    directory = tmp_path / "checkpoints"
    for iteration in (2, 4, 6):
        _complete_tag(directory, iteration)
    optim = directory / "iter_00000004" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optim.write_bytes(optim.read_bytes()[:50])  # truncated
    (directory / "iter_00000006" / "manifest.json").unlink()  # the save never finished
    checkpoint = resolve_resume("auto", tmp_path)
    assert checkpoint.tag == "iter_00000002"
    notes = "\n".join(checkpoint.notes)
    assert "iter_00000006: no manifest.json (the save did not finish)" in notes
    assert f"{optim} has 50 bytes" in notes and "resuming from iter_00000002" in notes


def test_a_file_of_the_right_size_that_is_not_a_torch_archive_is_named(tmp_path):
    tag = _complete_tag(tmp_path / "checkpoints", 2, archives=False)  # sizes as in the manifest
    with pytest.raises(ValueError, match=r"mp_rank_00_model_states.pt is not a readable torch file"):
        resolve_resume(str(tag), tmp_path)


def test_auto_resume_without_a_complete_checkpoint_starts_fresh_but_a_named_one_must_exist(tmp_path):
    directory = tmp_path / "checkpoints"
    (directory / "iter_00000002").mkdir(parents=True)
    assert resolve_resume("auto", tmp_path) is None
    with pytest.raises(ValueError, match=r"no complete checkpoint in .*iter_00000002: no manifest.json"):
        resolve_resume(str(directory), tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint directory there"):
        resolve_resume(str(tmp_path / "nowhere"), tmp_path)


def test_another_world_size_needs_a_universal_load_under_zero(tmp_path):
    _complete_tag(tmp_path / "checkpoints", 2)
    checkpoint = resolve_resume("auto", tmp_path)
    zero2 = {"zero_optimization": {"stage": 2}}
    assert checkpoint.needs_universal_load(1, zero2) and not checkpoint.needs_universal_load(2, zero2)
    assert checkpointing.with_universal_load(zero2)["checkpoint"] == {"load_universal": True}


def test_pruning_keeps_the_newest_complete_checkpoints_and_drops_older_partial_ones(tmp_path):
    directory = tmp_path / "checkpoints"
    for iteration in (2, 4, 6):
        _complete_tag(directory, iteration)
    (directory / "iter_00000003").mkdir()  # a partial save from a crash
    (directory / "iter_00000002_universal").mkdir()
    checkpointing._prune(directory, keep=2)
    assert sorted(p.name for p in directory.iterdir()) == ["iter_00000004", "iter_00000006"]
