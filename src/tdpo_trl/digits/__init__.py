"""The embedded default: a tiny text-to-image model of handwritten digits and the judges that score it.

Trained on 2 CPU cores by `maintainer_scripts/train_digits_base.py` from scikit-learn's digits and shipped with the
package, so `tdpo-trl demo` runs TDPO-R end to end with no GPU and no download. A plugin of the core (entry point
`tdpo_trl.plugins`): the core never imports it; its names (`digit_ink`, `pretrain_dataset="digits"`,
`critic_encoder="digit_classifier"`) resolve through the core's registries once it is loaded.
"""

from . import plugin  # noqa: F401  (registers the demo's rewards, dataset and critic encoder with the core)
from .data import TEMPLATES, WORDS, label_of, load_digits, pretraining_dataset, train_test_split
from .judges import (
    DigitAccuracy,
    DigitInk,
    DigitJudges,
    DigitNearestReal,
    DigitRealism,
    DigitStrokeMass,
    shared_judges,
)
from .model import eval_prompts, load_digits_pipeline, prompted_accuracy


__all__ = [
    "TEMPLATES",
    "WORDS",
    "DigitAccuracy",
    "DigitInk",
    "DigitJudges",
    "DigitNearestReal",
    "DigitRealism",
    "DigitStrokeMass",
    "eval_prompts",
    "label_of",
    "load_digits",
    "load_digits_pipeline",
    "pretraining_dataset",
    "prompted_accuracy",
    "shared_judges",
    "train_test_split",
]
