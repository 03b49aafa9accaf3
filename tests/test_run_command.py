"""utils.run_command, the wrapper of every command-line tool: one line and exit 1 for a mistake
the user can fix, a traceback for a bug, and the process group left either way."""
import argparse

import pytest
import torch.distributed as dist

import utils


class UserMistake(ValueError):
    pass


def fail(error):
    raise error


def test_user_errors_are_one_line_and_exit_1(capsys):
    for error in (utils.RunError("disk full"), utils.CheckpointError("disk full"), UserMistake("disk full")):
        with pytest.raises(SystemExit) as stop:
            utils.run_command(fail, error, user_errors=(UserMistake,))
        assert stop.value.code == 1
        assert capsys.readouterr().err == "error: disk full\n"


def test_bugs_keep_their_traceback_and_results_pass_through():
    with pytest.raises(ZeroDivisionError):
        utils.run_command(lambda: 1 / 0, user_errors=(UserMistake,))
    with pytest.raises(ValueError):  # only the classes named count as the user's
        utils.run_command(fail, ValueError("bug"), user_errors=(UserMistake,))
    assert utils.run_command(lambda a, b: a + b, 2, 3) == 5


def test_the_process_group_is_left_after_an_error(tmp_path):
    def joined_then_failed():
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        raise utils.RunError("stop")
    with pytest.raises(SystemExit):
        utils.run_command(joined_then_failed)
    assert not dist.is_initialized()


def test_slurm_tasks_without_a_rendezvous_address_are_a_one_line_error(monkeypatch, capsys):
    # `srun python main_dino.py` (or a plain python in a multi-task sbatch script) without
    # ./launch: before, env:// failed deep inside torch with a traceback about MASTER_ADDR
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    args = argparse.Namespace(dist_url="env://", cpu=True)
    with pytest.raises(SystemExit) as stop:
        utils.run_command(utils.init_distributed_mode, args)
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: this is task 1 of 4 SLURM tasks") and "srun ./launch" in err and err.count("\n") == 1
    assert not dist.is_initialized()
