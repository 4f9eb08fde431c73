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
    with pytest.raises(type(error)):
        with staged_folder(out, "OUT") as staging:
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
    with pytest.raises(UserError, match=r"--out '.*model' already exists and is not empty"):
        with staged_folder(out, "--out"):
            pytest.fail("the body must not run")
    assert (out.read_text() if kind == "file" else (out / "keep.txt").read_text()) == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_files_that_appear_in_the_destination_meanwhile_are_not_replaced(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(OSError):
        with staged_folder(out, "OUT") as staging:
            (staging / "weights.bin").write_bytes(b"ours")
            out.mkdir()
            (out / "theirs.txt").write_text("theirs")  # e.g. another run started on the same folder
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
