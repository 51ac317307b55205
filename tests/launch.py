"""Run a test file's worker in several real processes on CPU (gloo), as `accelerate launch` runs a script."""

import os
import socket
import subprocess
import sys


def launch_workers(script: str, output: str, processes: int) -> None:
    """`accelerate launch --multi_gpu --num_processes <processes> <script> <output>` on CPU, one thread per
    process; asserts that every process exited cleanly (showing the end of their output otherwise)."""
    with socket.socket() as probe:  # a free port: other test runs may launch processes at the same time
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(port), script, str(output)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
