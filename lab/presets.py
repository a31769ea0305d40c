"""The reference setups (--preset=NAME): each replaces experiment.py's Config defaults with its paper's values (read
from its public code); flags replace those again. config.json records the preset and every value. experiment.py's
PRESETS starts from these (docs/presets.md)."""

REFERENCE_SETUPS = {
    "ais2024": {},  # the AI-Scientist grokking template: experiment.py's Config defaults
    "power2022": {  # Power et al. 2022 (openai/grok); weight decay 1, the paper's best, not the code's default 0
        "ops": ("x_div_y",), "activation": "relu", "weight_decay": 1.0, "warmup_steps": 10, "batch_size": 0,
        "steps": 100_000, "eval_every": 100, "measure_every": 100, "stop_at_val_acc": 0.99},
    "nanda2023": {  # Nanda et al. 2023 (progress-measures-paper): 1 layer, no LayerNorm, full batch
        "ops": ("x_plus_y",), "p": 113, "train_frac": 0.3, "num_layers": 1, "norm": "none", "activation": "relu",
        "op_token": False, "sampler": "full", "weight_decay": 1.0, "warmup_steps": 10, "steps": 40_000,
        "init": "nanda", "eval_every": 100, "measure_every": 100, "checkpoint_every": 200},
    "grokfast2024": {  # Lee et al. 2024 (ironjr/grokfast main.py), its baseline: Adam, no weight decay
        "ops": ("x_times_y",), "norm": "pre", "optimizer": "adam", "weight_decay": 0.0, "warmup_steps": 10,
        "steps": 100_000, "stop_at_val_acc": 0.95, "grokfast_filter": "ema", "grokfast_alpha": 0.98,
        "grokfast_lamb": 2.0},
    "prieto2025": {  # Prieto et al. 2025, their transformer runs (Fig. 6): full batch, no weight decay, no warm-up;
        # switch the cure on with --loss=stablemax or --optimizer=perp_adamw
        "ops": ("x_plus_y",), "p": 113, "train_frac": 0.4, "num_layers": 1, "norm": "none", "activation": "relu",
        "op_token": False, "sampler": "full", "weight_decay": 0.0, "schedule": "constant", "steps": 5000,
        "eval_every": 100, "measure_every": 100},
}
