"""A Slurm job's tasks as one torch.distributed job: the variables each task takes from SLURM_*."""

import signal

import pytest

from debiformer.runtime import STOP_SIGNALS, first_host, slurm_environment


@pytest.mark.parametrize(
    "nodelist, host",
    [
        ("node07", "node07"),
        ("node[07-09,12]", "node07"),
        ("gpu[003,005],cpu1", "gpu003"),
        ("a1,b[2-3]", "a1"),
        ("rack2-node[10-11]", "rack2-node10"),
    ],
)
def test_the_first_host_of_a_node_list(nodelist, host):
    assert first_host(nodelist) == host


def test_a_task_of_a_multi_task_job_gets_rank_world_and_rendezvous():
    job = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4",
           "SLURM_JOB_NODELIST": "node[07-08]", "SLURM_JOB_ID": "123456"}  # fmt: skip
    assert slurm_environment(job) == {
        "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "node07",
        "MASTER_PORT": str(20000 + 123456 % 20000),
    }  # fmt: skip
    given = slurm_environment({**job, "MASTER_ADDR": "10.0.0.2", "MASTER_PORT": "29500"})
    assert "MASTER_ADDR" not in given and "MASTER_PORT" not in given


@pytest.mark.parametrize(
    "environ",
    [
        {},  # not under Slurm
        {"SLURM_PROCID": "0", "SLURM_NTASKS": "1"},  # a single task
        {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "RANK": "1"},  # torchrun inside the job
    ],
)
def test_nothing_changes_outside_a_multi_task_job(environ):
    assert slurm_environment(environ) == {}


def test_slurms_warning_signal_stops_a_run_with_a_checkpoint():
    assert signal.SIGUSR1 in STOP_SIGNALS and signal.SIGTERM in STOP_SIGNALS
