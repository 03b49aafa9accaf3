"""utils.run_command, the wrapper of every command-line tool: one line and exit 1 for a mistake
the user can fix, a traceback for a bug, and the process group left either way."""
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
