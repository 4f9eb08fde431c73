"""staged_folder: a model folder appears whole or not at all, and never over a folder that holds files."""

import pytest

from mixtral_ft.errors import UserError
from mixtral_ft.export.staging import staged_folder


def test_success_renames_the_staging_folder_into_place(tmp_path):
    out = tmp_path / "nested" / "model"  # a missing parent is created
    with staged_folder(out, "OUT") as staging:
        assert staging.parent == out.parent and staging.name.startswith(".model-") and not out.exists()
        (staging / "weights.bin").write_bytes(b"abc")
    assert (out / "weights.bin").read_bytes() == b"abc"
    assert [p.name for p in out.parent.iterdir()] == ["model"]  # no staging folder left beside it


def test_an_existing_empty_folder_is_replaced(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    with staged_folder(out, "OUT") as staging:
        (staging / "config.json").write_text("{}")
    assert [p.name for p in out.iterdir()] == ["config.json"]


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_an_error_inside_leaves_nothing_and_propagates(tmp_path, error):
    out = tmp_path / "model"
    with pytest.raises(type(error)), staged_folder(out, "OUT") as staging:
        (staging / "half.bin").write_bytes(b"half")
        raise error
    assert list(tmp_path.iterdir()) == []  # neither the destination nor the staging folder


@pytest.mark.parametrize("kind", ["folder with a file", "file"])
def test_a_non_empty_destination_is_refused_and_untouched(tmp_path, kind):
    out = tmp_path / "model"
    if kind == "file":
        out.write_text("keep me")
    else:
        out.mkdir()
        (out / "keep.txt").write_text("keep me")
    with (
        pytest.raises(UserError, match=r"--out '.*model' already exists and is not empty"),
        staged_folder(out, "--out"),
    ):
        pytest.fail("the body must not run")
    assert (out.read_text() if kind == "file" else (out / "keep.txt").read_text()) == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_files_that_appear_in_the_destination_meanwhile_are_not_replaced(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(OSError), staged_folder(out, "OUT") as staging:
        (staging / "weights.bin").write_bytes(b"ours")
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")  # e.g. another run started on the same folder
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


# --- issue 16, case 12: no leftovers from a killed merge, normal permissions -------------------------------


def test_stale_staging_of_a_dead_process_is_removed_by_the_next_run(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    stale = tmp_path / f".model-staging-{dead}-abcd"  # what a kill -9 mid-merge leaves
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"partial")
    with staged_folder(tmp_path / "model", "OUT") as staging:
        (staging / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_sigterm_inside_removes_the_staging_folder(tmp_path):
    import os
    import signal

    before = signal.getsignal(signal.SIGTERM)  # SIG_DFL, or a plugin's
    with pytest.raises(SystemExit) as stopped, staged_folder(tmp_path / "model", "OUT") as staging:
        (staging / "shard").write_bytes(b"x")
        os.kill(os.getpid(), signal.SIGTERM)
    assert stopped.value.code == 143 and list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_model_folder_gets_normal_permissions(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        with staged_folder(tmp_path / "model", "OUT") as staging:
            (staging / "config.json").write_text("{}")
    finally:
        os.umask(mask)
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o755  # mkdtemp's 0700 before


def test_an_unwritable_destination_is_a_user_error(tmp_path):
    (tmp_path / "a_file").write_text("x")
    match = "cannot write --out .* choose a folder you can write to"
    with pytest.raises(UserError, match=match), staged_folder(tmp_path / "a_file" / "out", "--out"):
        pass


def test_quantize_into_an_unwritable_place_stops_before_the_load(tmp_path, capsys):
    """A file where OUT's parent folder should be was found only after the load (minutes on Mixtral)."""
    from mixtral_ft.cli import main

    (tmp_path / "afile").write_text("kept\n")
    assert main(["quantize", "tiny", str(tmp_path / "afile" / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: cannot write OUT '{tmp_path / 'afile' / 'out'}' ('{tmp_path / 'afile'}' is not a writable folder): "
        "choose a folder you can write to"
    ]  # one line, and no "quantize: ... loading" line before it
    assert (tmp_path / "afile").read_text() == "kept\n"
