"""Train the tiny pipeline as `tests/test_resume.py` does (TDPO mode), in its own process, and save the weights.

Run: python tests/scripts/train_for_resume.py OUT_DIR RUN_NAME EPOCHS [--resume]
"""

import os
import sys

import torch


sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from test_resume import train, trained_state  # noqa: E402


if __name__ == "__main__":
    torch.set_num_threads(1)
    out_dir, run_name, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    from pathlib import Path

    trainer = train(Path(out_dir), run_name, epochs, "tdpo", resume="--resume" in sys.argv)
    torch.save(trained_state(trainer), os.path.join(out_dir, f"{run_name}.pt"))
