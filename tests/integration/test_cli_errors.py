"""Issue 11, finding 7: each mistake is one line from the real `vtpm` CLI, never a traceback
(exit 1; 2 for usage errors)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import VTPM, tpm2
from tests.mgr import (
    GUEST1,
    ManagerProc,
    manager,
    new_group,
    new_vtpm,
    owner_key,
    vtpm_cli,
    wait_state,
)

pytestmark = pytest.mark.integration


def one_line_error(res: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr + (res.stdout or ""), res.stderr
    last = res.stderr.splitlines()[-1]
    assert last.startswith("vtpm: error: ") or "error:" in last, res.stderr
    if code == 1:
        assert res.stderr.count("\n") == 1, res.stderr
    return last


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ManagerProc, Any]]:
    d = tmp_path_factory.mktemp("cli-errors")
    with manager(d / "data") as m:
        new_group(m, "g", owner_key(d))
        view, port = new_vtpm(m, "g", GUEST1)
        wait_state(m, view["uuid"], "running")
        tpm2("startup", "-c", tcti=f"swtpm:host=127.0.0.1,port={port}")
        yield m, view


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["new", "--group", "g", "--label", GUEST1, "--owner", "4294967296"], "0..4294967294"),
        (["new", "--group", "g", "--label", GUEST1, "--owner", "0:-1"], "0..4294967294"),
        (["audit", "--limit", "9223372036854775808"], "1..100000"),
        (["audit", "--limit", "0"], "1..100000"),
    ],
)
def test_out_of_range_integers_are_refused_locally(
    tmp_path: Path, args: list[str], message: str
) -> None:
    """No Manager runs here: the CLI refuses what the admin protocol's bounds would."""
    last = one_line_error(vtpm_cli(tmp_path, *args, check=False), code=2)
    assert message in last


def test_output_files_that_cannot_be_written(running: tuple[ManagerProc, Any]) -> None:
    m, view = running
    res = m.cli("group", "provision", "g", "-o", "/missing/x.json", check=False)
    assert "cannot write /missing/x.json" in one_line_error(res)
    nonce = "00" * 16
    res = m.cli(
        "quote", "--deep", view["uuid"], "--nonce", nonce, "-o", "/missing/q.json", check=False
    )
    assert "cannot write /missing/q.json" in one_line_error(res)


def test_a_closed_stdout_is_one_line(running: tuple[ManagerProc, Any]) -> None:
    """`vtpm manager status | head -1`, with the reader gone before the output is written."""
    m, _ = running
    r, w = os.pipe()
    os.close(r)
    try:
        res = subprocess.run(
            [*VTPM, "manager", "status", "--data-dir", str(m.data_dir)],
            stdout=w,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(w)
    assert "output was closed" in one_line_error(res)


def test_deeply_nested_json_is_refused(tmp_path: Path) -> None:
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 200_000)
    for args in (
        ["--bundle", str(nested)],
        ["--bundle", str(nested), "--evidence", str(nested), "--nonce", "00"],
        ["--bundle", str(nested), "--policy", str(nested)],
    ):
        res = vtpm_cli(tmp_path, "verify", *args, check=False)
        assert "nested too deeply" in one_line_error(res)


def test_manager_init_refuses_a_label_policy_that_is_not_toml(tmp_path: Path) -> None:
    bad = tmp_path / "labels.toml"
    bad.write_text("unlabeled = [\n")
    res = vtpm_cli(tmp_path / "data", "manager", "init", "--labels", str(bad), check=False)
    assert "is not valid TOML" in one_line_error(res)
    assert not (tmp_path / "data" / "manager.json").exists()


@contextlib.contextmanager
def read_only_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="vtpm-ro-"))
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(d)], check=False
    ).returncode:
        d.rmdir()
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=False)
        d.rmdir()


def as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *VTPM, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts, another user)")
def test_unusable_directories_are_one_line(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    key = tmp_path / "k.key"
    vtpm_cli(tmp_path, "instance", "keygen", str(key))
    root_only = Path(tempfile.mkdtemp(prefix="vtpm-rootonly-"))
    root_only.chmod(0o755)
    nobody_key = root_only / "k.key"
    shutil.copy(key, nobody_key)
    os.chown(nobody_key, 65534, 65534)

    def init(d: Path) -> subprocess.CompletedProcess[str]:
        return vtpm_cli(tmp_path, "manager", "init", "--data-dir", str(d), check=False)

    def run(d: Path, k: Path = key) -> list[str]:
        return ["instance", "run", "--state-dir", str(d), "--key-file", str(k), "--server", "tcp:0"]

    try:
        assert "Not a directory" in one_line_error(init(a_file / "x"))
        res = vtpm_cli(tmp_path, *run(a_file / "x"), check=False)
        assert "Not a directory" in one_line_error(res)
        with read_only_dir() as ro:
            assert "Read-only file system" in one_line_error(init(ro / "x"))
            res = vtpm_cli(tmp_path, *run(ro / "x"), check=False)
            assert "Read-only file system" in one_line_error(res)
        res = as_nobody("manager", "init", "--data-dir", str(root_only / "x"))
        assert "Permission denied" in one_line_error(res)
        res = as_nobody(*run(root_only / "x", nobody_key))
        assert "Permission denied" in one_line_error(res)
    finally:
        shutil.rmtree(root_only, ignore_errors=True)
