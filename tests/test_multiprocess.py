import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file


SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "train_two_processes.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two_processes(*args):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        SCRIPT, *map(str, args),
    ]  # fmt: skip
    # A deadlock (TRL saves state on rank 0 only, and save_state has a barrier) shows up as a timeout.
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", ["tdpo", "ddpo", "sdxl", "sd3", "flux"])
def test_two_cpu_processes_end_with_identical_weights(tmp_path, mode):
    launch_two_processes(tmp_path, mode)

    for rank in (0, 1):
        processes, reward, jpeg = (tmp_path / f"{mode}_rank{rank}.txt").read_text().split()
        assert processes == "2", "accelerate did not see 2 processes"
        assert float(jpeg) < 0  # the eval reward was computed (and gathered: both ranks write the same number)
    assert (tmp_path / f"{mode}_rank0.txt").read_text() == (tmp_path / f"{mode}_rank1.txt").read_text()
    rank0 = load_file(tmp_path / f"{mode}_rank0.safetensors")
    rank1 = load_file(tmp_path / f"{mode}_rank1.safetensors")
    assert rank0.keys() == rank1.keys()
    assert any(k.startswith("critic.") for k in rank0) == (mode != "ddpo")
    if mode != "ddpo":  # neuron reset after both epochs: same masks, same re-drawn weights on both ranks
        assert rank0["reset_count"].item() == 2
        assert any(k.startswith("dormant_mask.") for k in rank0)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between ranks"
    # the weights did train: LoRA B starts at zero
    assert any(name.endswith("lora_B.default.weight") and rank0[name].abs().sum() > 0 for name in rank0)
    checkpoints = tmp_path / "logs" / mode / "checkpoints"
    assert sorted(os.listdir(checkpoints)) == ["checkpoint_0", "checkpoint_1"]


@pytest.mark.multiprocess
def test_two_process_multi_task_run_ends_with_identical_weights(tmp_path):
    """Two tasks (one with a distribution-level reward gathered over the ranks), TDPO-R, 2 processes."""
    launch_two_processes(tmp_path, "multitask")
    lines = [(tmp_path / f"multitask_rank{rank}.txt").read_text().split() for rank in (0, 1)]
    assert lines[0] == lines[1], "the ranks logged different task metrics"
    processes, *metrics = lines[0]
    assert processes == "2" and all(m != "nan" for m in metrics), lines[0]
    rank0 = load_file(tmp_path / "multitask_rank0.safetensors")
    rank1 = load_file(tmp_path / "multitask_rank1.safetensors")
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between ranks"
    layers = [k for k in rank0 if k.startswith("critic.") and k.endswith(".weight")]
    output_layer = max(layers, key=lambda k: int(k.split(".")[1]))
    assert rank0[output_layer].shape[0] == 2  # one critic, one value output per task
    assert any(name.endswith("lora_B.default.weight") and rank0[name].abs().sum() > 0 for name in rank0)


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", ["tdpo", "ddpo"])
def test_two_process_resume_equals_an_uninterrupted_run(tmp_path, mode):
    launch_two_processes(tmp_path, mode, 3, "straight")
    launch_two_processes(tmp_path, mode, 1, "interrupted")
    launch_two_processes(tmp_path, mode, 3, "interrupted", "--resume")
    for rank in (0, 1):
        straight = load_file(tmp_path / f"straight_rank{rank}.safetensors")
        resumed = load_file(tmp_path / f"interrupted_rank{rank}.safetensors")
        assert straight.keys() == resumed.keys()
        for name in straight:
            assert torch.equal(straight[name], resumed[name]), f"rank {rank}: {name} differs after resuming"


def launch(nproc: int, script: str, *args):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        os.path.join(os.path.dirname(__file__), "scripts", script), *map(str, args),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.multiprocess
def test_two_processes_normalize_and_score_distributions_as_one(tmp_path):
    """Batch-wise normalization and distribution-level rewards see the batch of all processes: 2 processes give
    exactly what 1 process gives on the same samples."""
    launch(1, "gather_two_processes.py", tmp_path)
    launch(2, "gather_two_processes.py", tmp_path)
    one = json.loads((tmp_path / "gather_1procs_rank0.json").read_text())
    ranks = [json.loads((tmp_path / f"gather_2procs_rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["num_processes"] for r in ranks] == [2, 2]
    for two in ranks:
        assert two["normalized"] == one["normalized"]
        assert two["normalized"][5] == 0.0, "the NaN reward gets advantage 0"
        for name in ("diversity", "parity", "mixed", "mixed/diversity", "mixed/brightness"):
            assert two[name] == pytest.approx(one[name], abs=1e-6), name
        for name in ("diversity", "parity", "mixed", "attribute_parity"):
            assert two[f"{name}_group_score"] == pytest.approx(one[f"{name}_group_score"], abs=1e-6)
        # per image on each process (OWLv2 + CLIP colours), and distribution-level over the gathered CLIP readings
        for name in ("composition", "attribute_parity"):
            assert two[name] == pytest.approx(one[name], abs=1e-5), name
        # a WeightedSum with a distribution-level component: 2 x the diversity credit + 0.5 x the brightness
        assert two["mixed/diversity"] == pytest.approx(one["diversity"], abs=1e-6)
        expected = [2 * d + 0.5 * b for d, b in zip(two["mixed/diversity"], two["mixed/brightness"])]
        assert two["mixed"] == pytest.approx(expected, abs=1e-6)
    finite = [r for i, r in enumerate(one["normalized"]) if i != 5]
    assert abs(sum(finite)) < 1e-4 and any(r != 0 for r in one["parity"])
    assert len(set(one["composition"])) > 1 and all(0 <= r <= 1 for r in one["composition"])
    assert any(r != 0 for r in one["attribute_parity"])


@pytest.mark.multiprocess
def test_torch_fsdp2_trains_the_tiny_flux_transformer_as_ddp_does(tmp_path):
    """Sharding for full-transformer FLUX: torch's `fully_shard` runs on 2 CPU processes with gloo and gives DDP's
    weights to float tolerance (not bit for bit: a reduce-scatter sums in another order than an all-reduce). The
    trainer itself cannot be sharded on CPUs: accelerate enables FSDP only for GPU-like distributed types
    (docs/model_families.md)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = os.path.join(os.path.dirname(SCRIPT), "fsdp_flux.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), script, str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        processes, difference, changed = (tmp_path / f"fsdp_rank{rank}.txt").read_text().split()
        assert processes == "2"
        assert float(changed) > 1e-3, "the weights trained"
        assert float(difference) < 1e-5, f"FSDP2 and DDP weights differ by {difference}"
