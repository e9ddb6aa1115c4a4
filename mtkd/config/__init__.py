"""Typed, validated run configuration, read from and written to YAML.

One :class:`RunConfig` drives a run (teacher training, plain student training or
distillation) from the command line, from Slicer, and in the run folder's ``config.yaml``.
Unknown keys, wrong types, unknown names, NaN or infinite numbers, values out of range, an
unknown ``train.device`` and files that are not YAML text are errors that name the key and the
file.
A relative path in a configuration file is read from the file's folder (see
:mod:`mtkd.config_paths`). PyYAML is imported when a file is read or written, so that Slicer
can import this module before the engine's dependencies are installed.

The sections are in :mod:`.sections`, the whole run and its checks in :mod:`.run_config`,
building dataclasses from mappings in :mod:`.mappings`, and the files in :mod:`.yaml_files`;
their public names are all importable from here.
"""

from mtkd.config.mappings import differing_keys
from mtkd.config.run_config import RANGES, SEED_LIMIT, RunConfig, is_run_name
from mtkd.config.sections import (
    RECOMMENDED,
    RECOMMENDED_PRESET,
    TRAIN_ON_NONE,
    UNLABELLED_AUTO,
    UNLABELLED_NONE,
    UNLABELLED_TRAIN,
    AnchorConfig,
    AugmentConfig,
    DataConfig,
    DistillConfig,
    MultiTaskConfig,
    NetworkConfig,
    OptimizerConfig,
    OutputTermConfig,
    SplitConfig,
    TapPairConfig,
    TrainConfig,
)
from mtkd.config.yaml_files import (
    MAX_CONFIG_BYTES,
    MAX_CONFIG_VALUES,
    dump_config,
    load_config,
    read_yaml,
    resolve_file_paths,
)
from mtkd.config_paths import PATH_KEYS

__all__ = [
    "MAX_CONFIG_BYTES",
    "MAX_CONFIG_VALUES",
    "PATH_KEYS",
    "RANGES",
    "SEED_LIMIT",
    "TRAIN_ON_NONE",
    "RECOMMENDED",
    "RECOMMENDED_PRESET",
    "UNLABELLED_AUTO",
    "UNLABELLED_NONE",
    "UNLABELLED_TRAIN",
    "AnchorConfig",
    "AugmentConfig",
    "DataConfig",
    "DistillConfig",
    "MultiTaskConfig",
    "NetworkConfig",
    "OptimizerConfig",
    "OutputTermConfig",
    "RunConfig",
    "SplitConfig",
    "TapPairConfig",
    "TrainConfig",
    "differing_keys",
    "dump_config",
    "is_run_name",
    "load_config",
    "read_yaml",
    "resolve_file_paths",
]
