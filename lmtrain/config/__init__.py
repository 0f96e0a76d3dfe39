"""Typed configuration: three dataclass sections (`data`, `model`, `train`) read from YAML plus
dotted `key=value` overrides that win over the file.

A leaf folder: it imports neither torch nor anything else of lmtrain but `errors`, so a config can
be checked before anything heavy loads. Every mistake raises `ConfigError` naming the key.

Paths: a relative `data.*` path written in a YAML file is relative to that file's folder (so a
config works from any directory); a relative path given on the command line, and `train.out_dir`,
are relative to the current directory; `~` is the home folder, as in a shell. The resolved config
holds absolute data paths.

In three modules: `sections` holds the fields, `checks` their types and bounds, `reading` the YAML
files and the overrides.
"""

from lmtrain.config.checks import (  # noqa: F401
    INT64,
    build_config,
    checked,
    differences,
    from_dict,
    initialisation,
    model_from_arguments,
    renamed_keys,
    shown,
    suggestion,
    to_dict,
    type_name,
    validate,
)
from lmtrain.config.reading import (  # noqa: F401
    MAX_VALUES,
    load_config,
    parse_override,
    read_yaml_text,
    to_yaml,
    to_yaml_value,
    unused_keys,
    unused_settings,
)
from lmtrain.config.sections import (  # noqa: F401
    CHOICES,
    DATA_PATHS,
    DEVICE_NAME,
    MAX_THREADS,
    NON_NEGATIVE,
    NON_NEGATIVE_KEYS,
    PATHS,
    POSITIVE,
    POSITIVE_KEYS,
    RATE,
    RATE_KEYS,
    RENAMED,
    SECTIONS,
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    TrainConfig,
    all_keys,
    choices,
    default,
    field_type,
    get_value,
    section_types,
    type_options,
)
