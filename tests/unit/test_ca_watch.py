"""When the controller re-reads its CA directory: only after a change has settled."""

from __future__ import annotations

from pathlib import Path

from nodemesh.controller.ca_watch import CA_FILES, SettledChange, ca_dir_signature

A, B, C = ((1, 1, 1), None, None), ((2, 1, 1), None, None), ((2, 2, 2), None, None)


def test_a_change_is_adopted_once_it_holds_for_one_more_poll() -> None:
    w = SettledChange(A)
    assert [w.observe(s) for s in (A, A, B, B, B, B)] == [False, False, False, True, False, False]


def test_a_change_still_moving_waits_and_a_reverted_one_is_ignored() -> None:
    w = SettledChange(A)
    # the key was written, then the certificate: nothing is read until both are in place
    assert [w.observe(s) for s in (B, C, C)] == [False, False, True]
    w = SettledChange(A)
    assert [w.observe(s) for s in (B, A, A)] == [False, False, False]


def test_signature_follows_symlinks_and_notes_missing_files(tmp_path: Path) -> None:
    assert ca_dir_signature(str(tmp_path)) == (None, None, None)
    (tmp_path / "real").write_text("x")
    (tmp_path / CA_FILES[0]).symlink_to("real")
    first = ca_dir_signature(str(tmp_path))
    assert first[0] is not None and first[1:] == (None, None)
    (tmp_path / "real2").write_text("xy")
    (tmp_path / CA_FILES[0]).unlink()
    (tmp_path / CA_FILES[0]).symlink_to("real2")
    assert ca_dir_signature(str(tmp_path))[0] != first[0]
