"""The pyro-vae program ends without tearing the interpreter down (cli.console): atexit
handlers still run, output is whole, the status is the command's, and a thread that is still
at work keeps the normal exit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PLUGIN = """
import atexit, sys, threading, time
from pathlib import Path

OUT = Path({out!r})

def goodbye():
    (OUT / "atexit-ran").write_text("yes")
    sys.stdout.write("written by an atexit handler\\n")  # buffered: must reach the pipe

atexit.register(goodbye)

class Finalized:
    def __del__(self):
        (OUT / "finalizer-ran").write_text("yes")

KEPT = Finalized()  # finalized only when the interpreter is torn down

if {thread!r}:
    def late():
        time.sleep(0.5)
        (OUT / "thread-finished").write_text("yes")
    threading.Thread(target=late, daemon=False).start()
"""


def _run(tmp_path: Path, *, thread: bool = False, env: dict | None = None):
    plugin = tmp_path / "exit_probe.py"
    plugin.write_text(textwrap.dedent(PLUGIN.format(out=str(tmp_path), thread=thread)))
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
                   **(env or {})}
    if not env:
        environment.pop("PYRO_VAE_FULL_EXIT", None)
    # a command that fails in one line: main() returns 2 and the program exits through console()
    return subprocess.run([sys.executable, "-m", "pyro_vae.cli", "evaluate", "--import",
                           "exit_probe", str(tmp_path / "no-such-run")],
                          capture_output=True, text=True, env=environment, timeout=120)


def test_the_program_runs_atexit_handlers_keeps_its_status_and_skips_the_teardown(tmp_path):
    done = _run(tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("pyro-vae evaluate: error:")
    assert done.stdout == "written by an atexit handler\n"
    assert (tmp_path / "atexit-ran").exists()
    assert not (tmp_path / "finalizer-ran").exists()  # the interpreter was not torn down


def test_the_full_exit_is_kept_on_request(tmp_path):
    done = _run(tmp_path, env={"PYRO_VAE_FULL_EXIT": "1"})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("pyro-vae evaluate: error:")
    assert done.stdout == "written by an atexit handler\n"
    assert (tmp_path / "atexit-ran").exists() and (tmp_path / "finalizer-ran").exists()


def test_a_thread_still_at_work_keeps_the_normal_exit(tmp_path):
    done = _run(tmp_path, thread=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("pyro-vae evaluate: error:")
    assert (tmp_path / "thread-finished").exists()  # the process waited for it
    assert (tmp_path / "atexit-ran").exists()
