# /// script
# dependencies = ["tdpo-trl"]
# ///
"""Fine-tune a text-to-image diffusion model with TDPO-R (or DDPO with --use_critic false); `tdpo-trl train`.

    python examples/tdpo.py                       # the embedded tiny random model, 16 s on 2 CPU cores
    python examples/tdpo.py --pretrained_model digits --reward digit_ink --prompts digits
    python examples/tdpo.py --pretrained_model stable-diffusion-v1-5/stable-diffusion-v1-5 --use_lora \\
        --reward aesthetic --eval_reward_functions pickscore --num_epochs 100 --sample_batch_size 8 \\
        --train_batch_size 2 --train_gradient_accumulation_steps 2 --mixed_precision fp16
    torchrun --nproc_per_node 2 examples/tdpo.py  # two processes (add ACCELERATE_USE_CPU=1 on CPU)

Every `TDPOConfig` field is a flag (`--help` lists them). The script is `tdpo_trl.commands.train`, which reads
arguments (`ScriptArguments`, `TDPOConfig`), loads the pipeline, reward and prompts by name, and calls
`TDPOTrainer.train()`; read it to see the library used from Python.
"""

import sys

from tdpo_trl.commands.train import main, parse_args


if __name__ == "__main__":
    main(*parse_args(sys.argv[1:]))
