"""peftlab: parameter-efficient fine-tuning of foundation models for text classification.

import peftlab
cfg = peftlab.load_config(None, ["epochs=1", "max_train_samples=500"])
report = peftlab.run_experiment(cfg)          # baseline, train, save, reload, compare
predict = peftlab.Predictor(report["adapter"]["dir"])
predict(["WINNER! Claim your prize now"])
"""

__version__ = "0.1.0"

from peftlab.config import RunConfig, load_config
from peftlab.errors import PeftlabError


def __getattr__(name):
    # The experiment API pulls in torch and transformers: import it on first use only.
    if name in ("run_experiment", "evaluate_model", "Predictor"):
        from peftlab import experiment

        return getattr(experiment, name)
    raise AttributeError(f"module 'peftlab' has no attribute {name!r}")


__all__ = ["PeftlabError", "Predictor", "RunConfig", "evaluate_model", "load_config", "run_experiment"]
