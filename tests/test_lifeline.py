"""No orphans: the recipe's member processes die with it, even when it is killed with SIGKILL."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARENT = '''
import os, sys, time

def member(seconds):
    os.write(1, f"{os.getpid()}\\n".encode())   # one write: the two members' lines never interleave
    time.sleep(seconds)

if __name__ == "__main__":
    from tuning.recipe import member_pool
    pool = member_pool(2)
    for _ in range(2):
        pool.submit(member, 120)
    time.sleep(120)
'''


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie nobody reaped has ended)."""
    if not Path("/proc/self/stat").exists():   # no procfs: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_members_die_within_10s_of_a_sigkill_of_the_recipe(tmp_path):
    (tmp_path / "parent.py").write_text(PARENT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    parent = subprocess.Popen([sys.executable, str(tmp_path / "parent.py")], stdout=subprocess.PIPE, text=True,
                              env=env, cwd=tmp_path)
    try:
        members = [int(parent.stdout.readline()) for _ in range(2)]
        assert len(set(members)) == 2 and all(_alive(pid) for pid in members)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in members) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [pid for pid in members if _alive(pid)]
    for pid in survivors:   # leave nothing behind, then fail
        os.kill(pid, signal.SIGKILL)
    assert survivors == []
