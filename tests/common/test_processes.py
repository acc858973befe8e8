"""Signals while a command runs: interrupts become exceptions, nohup is respected."""

from __future__ import annotations

import os
import signal

import pytest

from common.processes import interrupts_raise


def test_sigterm_and_sighup_raise_system_exit_with_128_plus_the_signal() -> None:
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            with pytest.raises(SystemExit) as raised, interrupts_raise():
                os.kill(os.getpid(), sig)
                signal.sigtimedwait([], 0)  # let the handler run
            assert raised.value.code == 128 + sig
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL  # restored on the way out
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_a_hangup_ignored_on_entry_stays_ignored() -> None:
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under `nohup fedrec ...`
    try:
        with interrupts_raise():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)  # nothing happens
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)
