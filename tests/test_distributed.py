"""Multi-process start-up and preemption (mosaic_jax/training/distributed.py), without a
cluster: jax.distributed.initialize and the cross-process gather are recorded or faked."""

import os
import signal
import threading

import jax
import numpy as np
import pytest

from mosaic_jax.training import distributed


@pytest.fixture
def calls(monkeypatch):
    """The arguments of every jax.distributed.initialize call (none is really made)."""
    made = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: made.append(kwargs))
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    return made


def test_a_single_process_connects_nothing(calls, monkeypatch):
    assert distributed.initialize() is False
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert distributed.initialize() is False
    assert calls == []


@pytest.mark.parametrize("missing", ["num_processes", "process_id"])
def test_a_coordinator_address_needs_the_process_count_and_id(calls, missing):
    args = {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 0}
    args[missing] = None
    with pytest.raises(ValueError,
                       match="--coordinator_address needs --num_processes and --process_id"):
        distributed.initialize(**args)
    assert calls == []


def test_explicit_arguments_are_passed_as_given(calls):
    assert distributed.initialize(coordinator_address="10.0.0.1:1234", num_processes=4,
                                  process_id=3) is True
    assert calls == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                      "process_id": 3}]


def test_auto_and_slurm_jobs_let_jax_detect_the_cluster(calls, monkeypatch):
    assert distributed.initialize(auto=True) is True
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert distributed.initialize() is True
    assert calls == [{}, {}]


def test_sigterm_asks_to_stop_and_close_restores_the_previous_handler():
    previous = signal.getsignal(signal.SIGTERM)
    watcher = distributed.PreemptionWatcher()
    try:
        assert signal.getsignal(signal.SIGTERM) != previous
        assert watcher.should_stop() is False
        os.kill(os.getpid(), signal.SIGTERM)  # handled by the watcher: the process lives on
        assert watcher.should_stop() is True
        assert watcher.should_stop() is True  # stays set until the run ends
    finally:
        watcher.close()
    assert signal.getsignal(signal.SIGTERM) == previous


def test_a_watcher_outside_the_main_thread_installs_no_handler():
    previous = signal.getsignal(signal.SIGTERM)
    made = []
    thread = threading.Thread(target=lambda: made.append(distributed.PreemptionWatcher()))
    thread.start()
    thread.join()
    assert signal.getsignal(signal.SIGTERM) == previous
    assert made[0].should_stop() is False
    made[0].close()


def test_every_process_stops_when_one_was_signalled(monkeypatch):
    gathered = []

    def allgather(local):
        gathered.append(np.asarray(local).copy())
        return np.array([[False], [True]])  # this process, then one that got SIGTERM

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(distributed.multihost_utils, "process_allgather", allgather)
    watcher = distributed.PreemptionWatcher(signals=())
    assert watcher.should_stop() is True
    np.testing.assert_array_equal(gathered, [[False]])  # it shared its own (unset) flag
    monkeypatch.setattr(distributed.multihost_utils, "process_allgather",
                        lambda local: np.array([[False], [False]]))
    assert watcher.should_stop() is False
