"""fedge.common.procs.escalate: gentle signals first, harder ones only when a process outlives them."""

import signal
import subprocess
import sys

from fedge.common.procs import escalate

IGNORE_TERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); " \
              "time.sleep(60)"


def test_a_process_that_ignores_sigterm_gets_sigkill():
    p = subprocess.Popen([sys.executable, "-c", IGNORE_TERM], stdout=subprocess.PIPE)
    assert p.stdout.readline().strip() == b"ready"
    ignored = []
    assert escalate(p, ((signal.SIGTERM, 0.5), (signal.SIGKILL, 10.0)), on_ignored=ignored.append)
    assert ignored == [signal.SIGTERM] and p.returncode == -signal.SIGKILL


def test_a_process_that_obeys_stops_at_the_first_signal_and_an_exited_one_is_left_alone():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    assert escalate(p, ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)))
    assert p.returncode == -signal.SIGTERM
    sent = []
    assert escalate(p, ((signal.SIGTERM, 1.0),), send=sent.append) and sent == []
