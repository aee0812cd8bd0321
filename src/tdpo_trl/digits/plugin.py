"""What the digits demo adds to the core's registries (loaded through the `tdpo_trl.plugins` entry point): its
judges as rewards, its training digits as a pretraining dataset, its classifier's features as a critic encoder."""

import copy

from ..modeling_critic import CRITIC_ENCODERS
from ..regularizers import PRETRAINING_DATASETS
from ..rewards import register_reward
from .data import pretraining_dataset
from .distribution import DigitDiversity, DigitParity, DigitParityIndependent, DigitPixelDiversity
from .independent_judge import DigitAccuracyIndependent
from .judges import (
    DigitAccuracy,
    DigitClassifierFeatures,
    DigitInk,
    DigitNearestReal,
    DigitRealism,
    DigitStrokeMass,
    shared_judges,
)


def classifier_features(latent_shape=None) -> DigitClassifierFeatures:
    """Critic encoder `"digit_classifier"`: a copy of the shipped classifier's features (what the ink reward reads)."""
    return DigitClassifierFeatures(copy.deepcopy(shared_judges().classifier))


REWARDS = {
    "digit_ink": DigitInk,
    "digit_accuracy": DigitAccuracy,
    "digit_realism": DigitRealism,
    "digit_nearest_real": DigitNearestReal,
    "digit_stroke_mass": DigitStrokeMass,
    "digit_accuracy_independent": DigitAccuracyIndependent,  # scikit-learn; shares nothing with the others
    # distribution-level: one reward per sample from the whole batch
    "digit_parity": DigitParity,
    "digit_diversity": DigitDiversity,
    "digit_parity_independent": DigitParityIndependent,  # scikit-learn judge; an eval metric
    "digit_pixel_diversity": DigitPixelDiversity,  # pixel space, no classifier; an eval metric
}
for name, factory in REWARDS.items():
    register_reward(name, factory)
PRETRAINING_DATASETS.register("digits", pretraining_dataset)
CRITIC_ENCODERS.register("digit_classifier", classifier_features)
