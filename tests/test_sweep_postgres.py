"""A sweep on PostgreSQL storage (the several-machines set-up) against a real, throwaway server
that the test starts with initdb + pg_ctl in a temporary folder. Skipped only when the server
binaries are not installed (`.ci/run` installs Debian's `postgresql`)."""
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from sweep_helpers import load, run, sweep_cmd, write_space


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))  # Debian keeps them off PATH
    return versions[-1] if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed; "
                    "`apt-get install postgresql` (as .ci/run does) to run this test")
    import psycopg2  # noqa: F401  - in the [postgres] extra (part of [dev]); a missing driver is an error, not a skip

    root = Path(tempfile.mkdtemp(prefix="hybridlab-pg-"))
    prefix = []
    if os.geteuid() == 0:  # initdb refuses to run as root: run the server as the postgres user
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", _free_port()
    subprocess.run(prefix + [initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True, timeout=120)
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(prefix + [pg_ctl, "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "start"],
                   check=True, capture_output=True, timeout=120)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(prefix + [pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def test_sweep_on_postgres(tmp_path, postgres_url):
    from hybridlab.sweep.study import HEARTBEAT_S, open_storage

    n = 4
    path = write_space(tmp_path, trials=n)
    # the throwaway server trusts every login, so a password in the URL is accepted and ignored:
    # it must still never be printed
    secret = postgres_url.replace("postgres@", "postgres:s3cret-pw@")
    r = run(sweep_cmd(path, "--storage", secret, "--workers", "2"), cwd=tmp_path, timeout=150)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "s3cret-pw" not in r.stdout + r.stderr
    assert f"storage {postgres_url.replace('postgres@', 'postgres:***@')}" in r.stdout
    study, space = load(path, postgres_url)
    storage = open_storage(postgres_url)  # stale trials: heartbeat + RetryHeartbeatStaleTrialCallback
    assert storage.heartbeat_interval == HEARTBEAT_S and storage.heartbeat_stale_trial_callback is not None
    assert sorted(t.number for t in study.trials) == list(range(n)), r.stdout + r.stderr
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    assert len({t.user_attrs["worker"]["pid"] for t in study.trials}) == 2
    assert not (space.folder / "journal.log").exists()  # nothing went to the default journal
    r = run(sweep_cmd(path, "--storage", postgres_url, "--report"), cwd=tmp_path, timeout=60)
    assert r.returncode == 0 and "Pareto front of study t" in r.stdout, r.stderr
