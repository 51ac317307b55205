"""Run a test file's worker in several real processes on CPU (gloo), as `accelerate launch` runs a script; the
tolerance of the sharded runs against their unsharded twins."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

# Sharded (FSDP2) against unsharded weights and feedback. ATOL: ViT's key biases, whose gradient is zero up to
# rounding (softmax ignores shifts).
RTOL, ATOL = 1e-6, 1e-9


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


def launched_folder(tmp_path_factory, script: str, processes: int) -> Path:
    """A fresh folder, named after `script`, that `script`'s worker filled in `processes` processes
    (`launch_workers`): the body of each multi-process test file's `launched` fixture."""
    output = tmp_path_factory.mktemp(Path(script).stem)
    launch_workers(script, output, processes)
    return output


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """|a - b| <= RTOL |b| + ATOL (Frobenius norms)."""
    return float((a.double() - b.double()).norm()) <= RTOL * float(b.double().norm()) + ATOL
