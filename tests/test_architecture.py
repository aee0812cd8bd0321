"""The house: every model family implements the pipeline interface, the core stands without the digits demo, and a
checkpoint written before the restructuring resumes after it."""

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from tdpo_trl import TDPOPipeline, TDPOStableDiffusionPipeline, TDPOTrainer
from tdpo_trl.pipelines import FAMILIES, family_for
from tdpo_trl.tiny_models import (
    left_minus_right_brightness,
    tiny_flux,
    tiny_stable_diffusion,
    tiny_stable_diffusion_3,
    tiny_stable_diffusion_xl,
)


TINY = {
    "StableDiffusionPipeline": tiny_stable_diffusion,
    "StableDiffusionXLPipeline": tiny_stable_diffusion_xl,
    "StableDiffusion3Pipeline": tiny_stable_diffusion_3,
    "FluxPipeline": tiny_flux,
}
DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("class_name", sorted(TINY))
def test_every_registered_family_is_an_instance_of_the_interface(class_name):
    assert set(FAMILIES) == set(TINY), "a new family needs a tiny model here"
    wrapper = family_for(class_name)
    pipeline = wrapper(TINY[class_name]())
    assert isinstance(pipeline, TDPOPipeline)
    assert not getattr(wrapper, "__abstractmethods__", None), f"{wrapper.__name__} leaves methods abstract"
    assert type(pipeline.diffusers_pipeline).__name__ == class_name


def test_a_family_must_implement_the_interface():
    class Incomplete(TDPOPipeline):
        pass

    with pytest.raises(TypeError, match="abstract"):
        Incomplete(tiny_stable_diffusion())
    with pytest.raises(ValueError, match="no tdpo_trl model family trains 'KandinskyPipeline'"):
        family_for("KandinskyPipeline")


def test_the_core_does_not_import_the_demo_but_its_names_resolve():
    script = (
        "import sys\n"
        "import tdpo_trl, tdpo_trl.tdpo_trainer, tdpo_trl.evaluation, tdpo_trl.rewards\n"
        "assert not [m for m in sys.modules if m.startswith('tdpo_trl.digits')], 'the core imported the demo'\n"
        "from tdpo_trl.rewards import get_reward_function, DigitInk\n"
        "assert type(get_reward_function('digit_ink')).__name__ == 'DigitInk'\n"
        "from tdpo_trl.regularizers import load_pretraining_dataset\n"
        "assert len(load_pretraining_dataset('digits')) > 1000\n"
        "from tdpo_trl.modeling_critic import CRITIC_ENCODERS\n"
        "assert 'digit_classifier' in CRITIC_ENCODERS and 'tdpo_trl.digits' in sys.modules\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def prompt():
    return random.choice(["a photo of a cat", "a photo of a dog"]), {}


def test_a_checkpoint_written_before_the_restructuring_resumes(tmp_path):
    """`tests/data/checkpoint_v0.1.0`: a TDPO-R run of the tiny model (per-prompt statistics, neuron reset) written by
    the code of commit 9d94ff7 (2 epochs, then resumed by that code to 3 epochs for `resumed_3_epochs.pt`)."""
    shutil.copytree(DATA / "checkpoint_v0.1.0" / "v0", tmp_path / "logs" / "v0")
    config = tiny_config(
        tmp_path, run_name="v0", num_epochs=3, save_freq=1, num_checkpoint_limit=1, per_prompt_stat_tracking=True,
        per_prompt_stat_tracking_buffer_size=16, per_prompt_stat_tracking_min_count=2, neuron_reset_frequency=1,
        resume_from=str(tmp_path / "logs" / "v0"),
    )  # fmt: skip
    torch.manual_seed(0)
    trainer = TDPOTrainer(
        config, left_minus_right_brightness, prompt, TDPOStableDiffusionPipeline(tiny_stable_diffusion(seed=0))
    )
    assert trainer.first_epoch == 2
    trainer.train()
    expected = torch.load(DATA / "checkpoint_v0.1.0" / "resumed_3_epochs.pt")
    denoiser = trainer.accelerator.unwrap_model(trainer.denoiser)
    state = {f"unet.{n}": p for n, p in denoiser.named_parameters() if p.requires_grad}
    state.update({f"critic.{n}": p for n, p in trainer.critic.head.named_parameters()})
    assert state.keys() == expected.keys()
    for name, value in expected.items():  # the old code's third epoch, to float rounding (thread count)
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert os.path.isdir(tmp_path / "logs" / "v0" / "checkpoints" / "checkpoint_2")


def test_no_import_loops_counting_imports_inside_functions():
    grimp = pytest.importorskip("grimp")  # import-linter's graph builder (dev extra); it reads every import statement
    graph = grimp.build_graph("tdpo_trl")
    loops = []
    for importer in sorted(graph.modules):
        if importer == "tdpo_trl":  # the package's public face imports everything; nothing imports it back
            continue
        for imported in graph.find_modules_directly_imported_by(importer):
            if imported != "tdpo_trl" and graph.chain_exists(imported=importer, importer=imported):
                loops.append(graph.find_shortest_chain(importer=imported, imported=importer) + (imported,))
    assert not loops, f"import loops: {loops[:5]}"
    importers_of_root = graph.find_modules_that_directly_import("tdpo_trl")
    assert not importers_of_root, f"modules importing the package root (a loop through __init__): {importers_of_root}"
