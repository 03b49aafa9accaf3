"""utils.run_command, the wrapper of every command-line tool: one line and exit 2 for a mistake
the user can fix, a traceback for a bug, and the process group left either way; and ``./launch``,
the wrapper of torchrun: one ``launch: error:`` line (exit 2) for a bad flag, one line after a
failed script's own output instead of torchrun's traceback, its exit code kept, and no restart
after a user error."""

import argparse
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from simpool import utils


class UserMistake(utils.UserError, ValueError):
    pass


def fail(error):
    raise error


def test_user_errors_are_one_line_and_exit_1(capsys):
    for error in (utils.RunError("disk full"), utils.CheckpointError("disk full"), UserMistake("disk full")):
        with pytest.raises(SystemExit) as stop:
            utils.run_command(fail, error)
        assert stop.value.code == utils.USER_ERROR_EXIT
        assert capsys.readouterr().err == "error: disk full\n"


def test_ctrl_c_is_one_line_and_exit_130(capsys):
    # before: a ~65-line KeyboardInterrupt traceback from deep inside the training step
    with pytest.raises(SystemExit) as stop:
        utils.run_command(fail, KeyboardInterrupt(), interrupted="interrupted: resume with the same command")
    assert stop.value.code == 130 and capsys.readouterr().err == "interrupted: resume with the same command\n"


def test_bugs_keep_their_traceback_and_results_pass_through():
    with pytest.raises(ZeroDivisionError):
        utils.run_command(lambda: 1 / 0)
    with pytest.raises(ValueError):  # only UserError's subclasses count as the user's
        utils.run_command(fail, ValueError("bug"))
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
    assert stop.value.code == utils.USER_ERROR_EXIT
    err = capsys.readouterr().err
    assert err.startswith("error: this is task 1 of 4 SLURM tasks") and "srun ./launch" in err and err.count("\n") == 1
    assert not dist.is_initialized()


def test_backend_flag_picks_the_process_group_backend(monkeypatch, capsys):
    # iBOT's and AttMask's --backend: gloo where given; nccl on the CPU is a one-line error
    for var in ("TORCHELASTIC_RESTART_COUNT", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    for var, value in (
        ("RANK", "0"),
        ("WORLD_SIZE", "2"),
        ("LOCAL_RANK", "0"),
        ("LOCAL_WORLD_SIZE", "2"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29999"),
    ):
        monkeypatch.setenv(var, value)
    seen = []
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: seen.append(backend))
    monkeypatch.setattr(dist, "barrier", lambda: None)
    threads = torch.get_num_threads()
    try:
        for backend in (None, "gloo"):
            utils.init_distributed_mode(argparse.Namespace(dist_url="env://", cpu=True, backend=backend))
    finally:
        torch.set_num_threads(threads)
    assert seen == ["gloo", "gloo"]
    with pytest.raises(SystemExit) as stop:
        utils.run_command(utils.init_distributed_mode, argparse.Namespace(dist_url="env://", cpu=True, backend="nccl"))
    assert stop.value.code == utils.USER_ERROR_EXIT
    err = capsys.readouterr().err
    assert err.startswith("error: --backend nccl needs CUDA GPUs") and err.count("\n") == 1
    assert seen == ["gloo", "gloo"]


# ------------------------------------------------------------------ ./launch
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_SLURM = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # also when pytest runs in a job
SLURM = dict(NO_SLURM, SLURM_JOB_ID="7", SLURM_NNODES="2", SLURM_NODEID="1", SLURM_JOB_NODELIST="node1")
NNODES_FORMAT = "a positive integer or MIN:MAX with 1 <= MIN <= MAX"


def launch(*args, env=NO_SLURM, timeout=60):
    """``./launch ARGS`` (with ``--nproc_per_node 1`` unless given, so that no torch is imported)."""
    nproc = [] if "--nproc_per_node" in args else ["--nproc_per_node", "1"]
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch"), *nproc, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def dry_run(*args, env=NO_SLURM):
    """The torchrun command that ``./launch --dry_run ARGS main_dino.py`` prints."""
    out = launch("--dry_run", *args, "main_dino.py", env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout


def launch_error(*args, env=NO_SLURM):
    """The error of a refused ``./launch --dry_run ARGS main_dino.py``: argparse's exit code 2 and
    usage, then one ``launch: error: ...`` line."""
    out = launch("--dry_run", *args, "main_dino.py", env=env)
    assert out.returncode == 2 and not out.stdout, out
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("launch: error: ") and out.stderr.count("error:") == 1, out.stderr
    return last[len("launch: error: ") :]


@pytest.mark.parametrize("nnodes", ["abc", "0", "3:2", "1:2:3", "2:", "1.5"])
def test_launch_names_a_malformed_node_count(nnodes):
    # before: "several nodes need --master_addr and --node_rank ...", about another flag
    assert launch_error("--nnodes", nnodes) == f"--nnodes must be {NNODES_FORMAT}, got {nnodes!r}"
    # torchrun's two forms still pass, a single node count of 1:1 included
    assert "--nnodes=1:4 " in dry_run("--nnodes", "1:4", "--rdzv_endpoint", "host0:29500")
    assert "--nnodes=1:1 " in dry_run("--nnodes", "1:1") and "--standalone" in dry_run("--nnodes", "1:1")


def test_launch_refuses_a_node_rank_outside_the_node_count():
    # before: accepted, and the agent waited for a rendezvous that could never complete
    static = ["--nnodes", "2", "--master_addr", "host0"]
    assert launch_error(*static, "--node_rank", "5") == "--node_rank must be below the node count 2 (--nnodes 2), got 5"
    assert launch_error(*static, "--node_rank", "2") == "--node_rank must be below the node count 2 (--nnodes 2), got 2"
    assert launch_error(*static, "--node_rank", "-1") == "--node_rank must be an integer >= 0, got -1"
    assert (
        launch_error(env=dict(SLURM, SLURM_NODEID="3"))
        == "SLURM_NODEID must be below the node count 2 (SLURM_NNODES 2), got 3"
    )
    assert "--node_rank=1 --master_addr=host0 " in dry_run(*static, "--node_rank", "1")
    assert "--node_rank=1 --master_addr=node1 " in dry_run(env=SLURM)


@pytest.mark.parametrize(
    "flag,value,expected",
    [
        ("--master_port", "99999", "--master_port must be an integer in 1..65535, got '99999'"),
        ("--master_port", "abc", "--master_port must be an integer in 1..65535, got 'abc'"),
        ("--master_port", "0", "--master_port must be an integer in 1..65535, got '0'"),
        (
            "--rdzv_endpoint",
            "nohostport",
            "--rdzv_endpoint must be HOST:PORT with a port in 1..65535, got 'nohostport'",
        ),
        (
            "--rdzv_endpoint",
            "host0:99999",
            "--rdzv_endpoint must be HOST:PORT with a port in 1..65535, got 'host0:99999'",
        ),
        ("--rdzv_endpoint", ":29500", "--rdzv_endpoint must be HOST:PORT with a port in 1..65535, got ':29500'"),
    ],
    ids=[
        "port-too-large",
        "port-not-a-number",
        "port-0",
        "endpoint-without-port",
        "endpoint-port-too-large",
        "endpoint-without-host",
    ],
)
def test_launch_refuses_a_bad_port_or_endpoint(flag, value, expected):
    # before: accepted, to fail later inside torchrun (or, on one node, to be ignored)
    assert launch_error("--nnodes", "2", flag, value) == expected
    for endpoint in ("host0:29500", "10.0.0.1:29500", "[::1]:29500"):
        assert f"--rdzv_endpoint={endpoint} " in dry_run("--nnodes", "2", "--rdzv_endpoint", endpoint)


@pytest.mark.parametrize(
    "args",
    [
        ["--node_rank", "1", "--master_addr", "host0"],
        ["--master_addr", "host0"],
        ["--node_rank", "1"],
        ["--nnodes", "1", "--master_addr", "host0"],
    ],
    ids=["rank-and-address", "address", "rank", "one-node"],
)
def test_launch_refuses_multi_node_flags_on_one_node(args):
    # before: a standalone one-node job, the rank and the address dropped (a forgotten --nnodes)
    assert (
        launch_error(*args) == "--node_rank and --master_addr are for several nodes, but --nnodes is 1: pass --nnodes N"
    )
    assert "--standalone" in dry_run("--node_rank", "0")  # rank 0 of one node is what one node is
    # an sbatch script may pass the address on any node count: a SLURM job of one node runs standalone
    assert "--standalone" in dry_run("--master_addr", "host0", env=dict(SLURM, SLURM_NNODES="1", SLURM_NODEID="0"))


@pytest.mark.parametrize("args", [["--node_rank", "1"], ["--master_addr", "host0"]], ids=["rank", "address"])
def test_launch_refuses_static_flags_beside_a_c10d_endpoint(args):
    # before: dropped without a word; the c10d rendezvous assigns the node ranks
    assert (
        launch_error("--nnodes", "2", "--rdzv_endpoint", "host0:29500", *args)
        == "--rdzv_endpoint assigns the node ranks itself: leave out --node_rank and --master_addr"
    )


def test_launch_without_arguments_asks_only_for_the_script():
    out = launch()
    assert out.returncode == 2
    # before: "required: script, script_args", though the script's arguments are optional
    assert out.stderr.strip().splitlines()[-1] == "launch: error: the following arguments are required: script"


def test_a_failed_script_under_launch_ends_in_one_line_without_torchruns_traceback(tmp_path):
    script = tmp_path / "fails.py"
    script.write_text('import sys\nprint("error: no such folder /nonexistent", file=sys.stderr)\nsys.exit(3)\n')
    out = launch("--nproc_per_node", "2", str(script), env=dict(NO_SLURM, OMP_NUM_THREADS="1"), timeout=300)
    assert out.returncode == 3, out.stderr  # the script's code (torchrun's own would be 1)
    # each rank's line is kept; torchrun's ~40 lines of ChildFailedError traceback and summary are gone
    assert out.stderr.count("error: no such folder /nonexistent") == 2, out.stderr
    assert "Traceback" not in out.stderr and "ChildFailedError" not in out.stderr, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"launch: {re.escape(str(script))} failed on (rank [01]|2 processes, first on rank [01]) "
        r"with exit code 3; see the lines above",
        last,
    ), out.stderr
    assert out.stderr.count("launch:") == 1, out.stderr


def script_failing_with(tmp_path, code):
    """A script that says which restart it is (torchrun's TORCHELASTIC_RESTART_COUNT) and exits ``code``."""
    script = tmp_path / f"exits_{code}.py"
    script.write_text(
        "import os, sys\n"
        "print(f\"error: attempt {os.environ['TORCHELASTIC_RESTART_COUNT']}\", file=sys.stderr)\n"
        f"sys.exit({code})\n"
    )
    return str(script)


def test_launch_does_not_restart_a_user_error_but_restarts_a_crash(tmp_path):
    env = dict(NO_SLURM, OMP_NUM_THREADS="1")
    # exit code 2 (utils.USER_ERROR_EXIT: a flag, a path, a file to fix) would fail the same way again
    script = script_failing_with(tmp_path, utils.USER_ERROR_EXIT)
    out = launch("--nproc_per_node", "2", "--max_restarts", "2", script, env=env, timeout=300)
    assert out.returncode == utils.USER_ERROR_EXIT, out.stderr
    assert "error: attempt 0" in out.stderr and "error: attempt 1" not in out.stderr, out.stderr  # before: 0, 1, 2
    assert re.search(
        r"launch: rank [01] stopped on an error to fix \(exit code 2\); a restart would repeat it, "
        r"so none follows",
        out.stderr,
    ), out.stderr
    assert out.stderr.strip().splitlines()[-1].endswith("with exit code 2; see the lines above"), out.stderr
    # any other failure is restarted as torchrun does, and its code kept
    script = script_failing_with(tmp_path, 1)
    out = launch("--nproc_per_node", "2", "--max_restarts", "1", script, env=env, timeout=300)
    assert out.returncode == 1, out.stderr
    assert "error: attempt 0" in out.stderr and "error: attempt 1" in out.stderr, out.stderr
    assert "none follows" not in out.stderr, out.stderr
