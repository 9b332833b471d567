"""Checkpoints: exact round trip, a manifest checked on resume, fallback past damage, disk errors."""
import errno
import json
import os
import signal

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from qpeft.core.train import checkpoint
from qpeft.core.train.checkpoint import CheckpointError, DamagedCheckpoint
from qpeft.core.base.errors import QpeftError

HINT = "or pass --save-every 0 to train without checkpoints"


def make_state(step: int) -> dict:
    """A trainer-shaped state: AdamW's state dict has int keys, tensors and tuples (betas)."""
    torch.manual_seed(step)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    opt = torch.optim.AdamW(params, lr=1e-3)
    sum((p ** 2).sum() for p in params).backward()
    opt.step()
    weights = {"layer.lora_A": params[0].detach().clone(), "layer.lora_B": params[1].detach().clone()}
    return {"weights": weights,
            "optimizer": opt.state_dict(),
            "position": {"step": step, "epoch": 0, "index": step * 2},
            "rng": {"torch": torch.get_rng_state(), "python": [1, 2, 3], "python_pos": None},
            "history": [{"step": s, "loss": 1.0 / s} for s in range(1, step + 1)]}


def assert_same(a, b, where="state"):
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where  # same keys, same types (int stays int), same order
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.fixture
def root(tmp_path):
    return tmp_path / "run" / "checkpoints"


def save_steps(root, *steps):
    return {s: checkpoint.save(root / f"step-{s:06d}", make_state(s)) for s in steps}


def flip_bit(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def newest(root, **kwargs):
    notices = []
    found = checkpoint.load_newest(root, say=notices.append, **kwargs)
    return found, notices


# -- writing ----------------------------------------------------------------------------------
def test_round_trip_keeps_nested_state_exactly(root):
    state = make_state(3)
    assert isinstance(next(iter(state["optimizer"]["state"])), int)
    assert isinstance(state["optimizer"]["param_groups"][0]["betas"], tuple)
    checkpoint.save(root / "step-000003", state)

    assert_same(checkpoint.load(root / "step-000003"), state)
    (path, loaded), notices = newest(root)
    assert path == root / "step-000003" and notices == []
    assert_same(loaded, state)
    assert sorted(p.name for p in root.iterdir()) == ["step-000003"]  # no temporaries left


def test_manifest_records_size_and_sha256_of_each_file(root):
    import hashlib

    directory = save_steps(root, 1)[1]
    manifest = json.loads((directory / "manifest.json").read_text())
    assert set(manifest["files"]) == {"state.safetensors", "state.json"}
    for name, entry in manifest["files"].items():
        data = (directory / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert sorted(p.name for p in directory.iterdir()) == ["COMPLETE", "manifest.json",
                                                           "state.json", "state.safetensors"]


def test_the_marker_is_written_after_the_manifest_and_before_the_rename(root, monkeypatch):
    events = []
    real_write, real_replace = checkpoint._write, os.replace
    monkeypatch.setattr(checkpoint, "_write", lambda p, d: (events.append(p.name), real_write(p, d)))
    monkeypatch.setattr(checkpoint.os, "replace", lambda a, b: (events.append("rename"), real_replace(a, b)))
    save_steps(root, 1)
    assert events == ["state.json", "manifest.json", "COMPLETE", "rename"]


def test_saving_a_step_again_replaces_it_and_leaves_nothing_aside(root):
    checkpoint.save(root / "step-000004", make_state(1))
    checkpoint.save(root / "step-000004", make_state(4))
    assert_same(checkpoint.load(root / "step-000004"), make_state(4))
    assert sorted(p.name for p in root.iterdir()) == ["step-000004"]


def test_leftover_temporaries_are_removed(root):
    save_steps(root, 2)
    (root / ".tmp-step-000004").mkdir()
    (root / ".tmp-step-000004" / "state.json").write_text("{")  # a write killed half-way
    checkpoint.clean_temporaries(root)
    assert sorted(p.name for p in root.iterdir()) == ["step-000002"]

    (root / ".tmp-step-000006").mkdir()
    save_steps(root, 4)  # save cleans up too
    assert sorted(p.name for p in root.iterdir()) == ["step-000002", "step-000004"]


def test_a_step_set_aside_by_a_killed_replacement_is_restored(root):
    save_steps(root, 2, 4)
    os.replace(root / "step-000004", root / ".old-step-000004")  # killed between the two renames
    os.replace(root / "step-000002", root / ".tmp-step-000002")  # (stands in for the new copy)
    checkpoint.clean_temporaries(root)
    assert sorted(p.name for p in root.iterdir()) == ["step-000004"]
    assert checkpoint.verify(root / "step-000004")

    save_steps(root, 2)
    (root / ".old-step-000002").mkdir()  # the new one is in place: the old copy just goes
    checkpoint.clean_temporaries(root)
    assert sorted(p.name for p in root.iterdir()) == ["step-000002", "step-000004"]


# -- disk errors ------------------------------------------------------------------------------
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
FULL = {
    "save_file OSError": ("save_file", ENOSPC),
    "safetensors-wrapped": ("save_file", SafetensorError(
        'Error while serializing: I/O error: No space left on device (os error 28) at path "x/.tmpAbC"')),
    "fsync": ("fsync", ENOSPC),
}


@pytest.mark.parametrize("fault", list(FULL))
def test_a_full_disk_raises_one_line_and_keeps_earlier_checkpoints(root, monkeypatch, fault):
    save_steps(root, 2)
    where, err = FULL[fault]

    def fail(*args, **kwargs):
        raise err

    monkeypatch.setattr(checkpoint, "save_file", fail) if where == "save_file" else \
        monkeypatch.setattr(checkpoint.os, "fsync", fail)
    with pytest.raises(CheckpointError) as caught:
        checkpoint.save(root / "step-000004", make_state(4))
    monkeypatch.undo()

    assert isinstance(caught.value, QpeftError)
    assert str(caught.value) == (f"cannot write checkpoint step-000004 under {root}: "
                                 f"No space left on device; free space there, {HINT}")
    assert sorted(p.name for p in root.iterdir()) == ["step-000002"]
    (path, state), notices = newest(root)
    assert path.name == "step-000002" and notices == [] and checkpoint.verify(path)


def test_a_failed_rewrite_of_a_step_keeps_the_existing_one(root, monkeypatch):
    save_steps(root, 4)
    real_replace = os.replace

    def rename_fails_into_place(src, dst):
        if os.path.basename(src).startswith(".tmp-"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", rename_fails_into_place)
    with pytest.raises(CheckpointError, match="Input/output error; check the disk"):
        checkpoint.save(root / "step-000004", make_state(1))
    monkeypatch.undo()
    assert sorted(p.name for p in root.iterdir()) == ["step-000004"]
    assert checkpoint.verify(root / "step-000004")
    assert_same(checkpoint.load(root / "step-000004"), make_state(4))


def test_a_read_only_directory_raises_one_line(root, monkeypatch):
    save_steps(root, 2)
    real_mkdir = checkpoint.Path.mkdir

    def refuse(self, *args, **kwargs):
        if self.name.startswith(".tmp-"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(checkpoint.Path, "mkdir", refuse)
    with pytest.raises(CheckpointError) as caught:
        checkpoint.save(root / "step-000004", make_state(4))
    monkeypatch.undo()
    assert str(caught.value) == (f"cannot write checkpoint step-000004 under {root}: "
                                 f"Permission denied; make {root} writable, {HINT}")
    assert sorted(p.name for p in root.iterdir()) == ["step-000002"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes through chmod 0o555")
def test_a_really_read_only_directory_raises_one_line(root):
    save_steps(root, 2)
    root.chmod(0o555)
    refused = r"^cannot write checkpoint step-000004 .*Permission denied;"
    try:
        with pytest.raises(CheckpointError, match=refused):
            checkpoint.save(root / "step-000004", make_state(4))
    finally:
        root.chmod(0o755)
    assert sorted(p.name for p in root.iterdir()) == ["step-000002"]


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE")
def test_a_real_write_error_from_the_kernel_is_reported(root):
    """Not a mock: a file-size limit makes the kernel refuse safetensors' write (EFBIG)."""
    import resource

    save_steps(root, 2)
    big = {"weights": torch.zeros(256 * 1024)}  # 1 MiB, over the 64 KiB limit below
    limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, limits[1]))
    try:
        with pytest.raises(CheckpointError) as caught:
            checkpoint.save(root / "step-000004", big)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert str(caught.value) == (f"cannot write checkpoint step-000004 under {root}: "
                                 f"{os.strerror(errno.EFBIG)}; check the disk, {HINT}")
    assert sorted(p.name for p in root.iterdir()) == ["step-000002"]


# -- verification on resume -------------------------------------------------------------------
def test_a_truncated_newest_falls_back_to_the_previous_with_one_notice(root):
    dirs = save_steps(root, 2, 4)
    tensors = dirs[4] / "state.safetensors"
    size = tensors.stat().st_size
    os.truncate(tensors, size // 2)

    (path, state), notices = newest(root)
    assert path == dirs[2]
    assert_same(state, make_state(2))
    assert notices == [f"qpeft: checkpoint step-000004 is damaged (state.safetensors: truncated, "
                       f"{size // 2} of {size} bytes); falling back to step-000002"]


def test_a_flipped_bit_in_tensor_data_is_caught_by_the_hash(root):
    dirs = save_steps(root, 2, 4)
    tensors = dirs[4] / "state.safetensors"
    flip_bit(tensors, tensors.stat().st_size - 1)
    load_file(str(tensors))  # safetensors itself cannot notice: the values are just different

    (path, state), notices = newest(root)
    assert path == dirs[2]
    assert_same(state, make_state(2))
    assert notices == ["qpeft: checkpoint step-000004 is damaged (state.safetensors: SHA-256 mismatch); "
                       "falling back to step-000002"]


def test_a_flipped_bit_in_state_json_is_caught(root):
    dirs = save_steps(root, 2, 4)
    skeleton = dirs[4] / "state.json"
    flip_bit(skeleton, skeleton.read_bytes().index(b'"position"') + 3)

    (path, _), notices = newest(root)
    assert path == dirs[2]
    assert notices == ["qpeft: checkpoint step-000004 is damaged (state.json: SHA-256 mismatch); "
                       "falling back to step-000002"]
    with pytest.raises(DamagedCheckpoint, match="state.json: SHA-256 mismatch"):
        checkpoint.load(dirs[4])  # load verifies by default too


@pytest.mark.parametrize("damage, reason", [
    (lambda d: (d / "state.json").unlink(), "state.json: missing"),
    (lambda d: (d / "manifest.json").write_text("{"), "manifest.json: unreadable"),
])
def test_a_missing_file_or_unreadable_manifest_is_caught(root, damage, reason):
    dirs = save_steps(root, 2, 4)
    damage(dirs[4])
    (path, _), notices = newest(root)
    assert path == dirs[2]
    assert len(notices) == 1 and notices[0].startswith(f"qpeft: checkpoint step-000004 is damaged ({reason}")
    assert notices[0].endswith("; falling back to step-000002")


def test_nothing_usable_gives_none(root):
    assert newest(root) == (None, [])  # no directory at all
    dirs = save_steps(root, 2)
    flip_bit(dirs[2] / "state.safetensors", 100)
    assert newest(root) == (None, ["qpeft: checkpoint step-000002 is damaged (state.safetensors: "
                                   "SHA-256 mismatch); no earlier checkpoint to fall back to"])


def test_a_checkpoint_without_manifest_is_loaded_unverified_with_a_notice(root):
    dirs = save_steps(root, 2)
    (dirs[2] / "manifest.json").unlink()  # as written by an older qpeft
    (path, state), notices = newest(root, unverified=True)
    assert path == dirs[2]
    assert_same(state, make_state(2))
    assert notices == ["qpeft: checkpoint step-000002 has no manifest.json (written by an older qpeft); "
                       "loaded without verification"]


def test_a_missing_manifest_is_damage_unless_an_older_qpeft_started_the_run(root):
    from qpeft.core.run.record import predates_manifests

    dirs = save_steps(root, 2, 4)
    (dirs[4] / "manifest.json").unlink()
    damaged = []
    (path, state), notices = newest(root, damaged=damaged)
    assert path == dirs[2] and damaged == [dirs[4]]
    assert_same(state, make_state(2))
    assert notices == ["qpeft: checkpoint step-000004 is damaged (manifest.json: missing, and this run was "
                       "started by a qpeft that writes one); falling back to step-000002"]
    assert [predates_manifests(v) for v in ("0.0.9", "0.1.0", "0.1", "0.2.0rc1", "1.0", "0.0.0+unknown", "x")] \
        == [True, False, False, False, False, False, False]


def test_a_damaged_step_is_set_aside_under_its_own_name(root):
    dirs = save_steps(root, 2, 4)
    flip_bit(dirs[4] / "state.safetensors", 100)
    assert checkpoint.set_aside(dirs[4]) == root / "damaged-step-000004"
    save_steps(root, 4)                       # damaged again, and replaced keeping the old copy
    flip_bit(dirs[4] / "state.safetensors", 100)
    checkpoint.save(dirs[4], make_state(4), keep_old=checkpoint.aside_name(dirs[4]))
    assert sorted(p.name for p in root.iterdir()) == ["damaged-step-000004", "damaged-step-000004-2",
                                                      "step-000002", "step-000004"]
    assert checkpoint.complete(root) == [dirs[4], dirs[2]] and checkpoint.verify(dirs[4])
    assert_same(checkpoint.load(dirs[4]), make_state(4))


def test_without_manifest_a_file_that_does_not_parse_still_falls_back(root):
    dirs = save_steps(root, 2, 4)
    (dirs[4] / "manifest.json").unlink()
    os.truncate(dirs[4] / "state.safetensors", 5)
    (path, _), notices = newest(root, unverified=True)
    assert path == dirs[2]
    assert len(notices) == 1
    assert notices[0].startswith("qpeft: checkpoint step-000004 is damaged (state.safetensors: ")
    assert "\n" not in notices[0]

    (dirs[2] / "manifest.json").unlink()
    (dirs[2] / "state.json").write_text('{"__tensor__": "s.nowhere"}')
    found, notices = newest(root, unverified=True)
    assert found is None
    assert notices[-1] == ("qpeft: checkpoint step-000002 is damaged (state.json: does not match "
                           "state.safetensors ('s.nowhere')); no earlier checkpoint to fall back to")


def test_latest_returns_the_newest_complete_checkpoint(root):
    save_steps(root, 2, 10)
    (root / "step-000011").mkdir()  # no marker
    (root / "step-notes").mkdir()
    (root / "step-notes" / "COMPLETE").write_text("ok\n")
    assert checkpoint.latest(root) == root / "step-000010"
    assert checkpoint.complete(root) == [root / "step-000010", root / "step-000002"]
    assert checkpoint.latest(root.parent / "elsewhere") is None
