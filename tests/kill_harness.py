"""Run a training script in a child process that kills itself with SIGKILL at a chosen point.

``kill`` is "" (run to the end), ``"step:N"`` (die after backward, before the N-th AdamW update) or
``"save:N"`` (die right after the N-th ``torch.save`` of the process: in the middle of a state folder).
The child script gets its JSON payload as ``PAYLOAD``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

PRELUDE = textwrap.dedent(
    """
    import json, os, signal, sys
    import torch

    PAYLOAD, kill = json.loads(sys.argv[1])
    if kill:
        what, n = kill.split(":")
        n, calls = int(n), [0]
        if what == "step":
            original_step = torch.optim.AdamW.step

            def step(self, *args, **kwargs):
                calls[0] += 1
                if calls[0] == n:
                    os.kill(os.getpid(), signal.SIGKILL)
                return original_step(self, *args, **kwargs)

            torch.optim.AdamW.step = step
        else:
            original_save = torch.save

            def save(*args, **kwargs):
                original_save(*args, **kwargs)
                calls[0] += 1
                if calls[0] == n:
                    os.kill(os.getpid(), signal.SIGKILL)

            torch.save = save
    """
)


def run_killable(body: str, payload, kill: str = "") -> int:
    """Run ``PRELUDE + body`` with ``payload``; return the exit code (-9 when killed)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = PRELUDE + textwrap.dedent(body)
    args = [sys.executable, "-c", script, json.dumps([payload, kill])]
    return subprocess.run(args, env=env, capture_output=True, timeout=600).returncode
