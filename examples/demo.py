"""The digits demo (`tdpo-trl demo`): TDPO-R with LoRA on the shipped digits model and its learned ink reward.

python examples/demo.py                     # ~8 min on 2 CPU cores; outputs/demo
python examples/demo.py --use_critic false  # the same run as DDPO
"""

import sys

from tdpo_trl.commands.demo import main, parse_args


if __name__ == "__main__":
    main(*parse_args(sys.argv[1:]))
