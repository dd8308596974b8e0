"""Typed experiment configuration: one schema, YAML files, ``--set a.b=c`` overrides.

Every option is declared here with its default and meaning; the README's configuration reference is
generated from these declarations (``stablerep-ray config-reference``). Validation happens before Ray
starts, so a bad config costs a second, not a GPU reservation. Errors name the key and the fix.
"""

from .io import apply_overrides, dump_config, from_dict, load_config, reference_markdown
from .schema import Config
from .sections import (
    SIMULATOR_WORLDS,
    AugmentConfig,
    CaptionsConfig,
    ClusterConfig,
    ConfigError,
    EvalConfig,
    GeneratorConfig,
    ModelConfig,
    StreamConfig,
    TextTowerConfig,
    TrainConfig,
)
from .synth import SYNTH_SOURCE, SynthConfig
from .tune import TuneBudgetConfig, TuneConfig, TuneParam, TuneSchedulerConfig

__all__ = [
    "AugmentConfig", "CaptionsConfig", "ClusterConfig", "Config", "ConfigError", "EvalConfig",
    "GeneratorConfig", "ModelConfig", "SIMULATOR_WORLDS", "SYNTH_SOURCE", "StreamConfig", "SynthConfig",
    "TextTowerConfig", "TrainConfig",
    "TuneBudgetConfig", "TuneConfig", "TuneParam", "TuneSchedulerConfig",
    "apply_overrides", "dump_config", "from_dict", "load_config", "reference_markdown",
]
