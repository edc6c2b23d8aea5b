"""The settings: a pydantic tree, presets, overrides, and the migrations of older files.

Settings come from four sources, each overriding the one before:

1. the defaults in the models (the paper's ImageNet recipe, arXiv 2006.09882);
2. a preset, ``--preset NAME|PATH`` (TOML files in ``presets/``);
3. explicit flags (``--data``, ``--epochs``, ...);
4. ``--set a.b=value`` overrides, values parsed as TOML.

Every model forbids unknown keys, so a typo anywhere is refused with the dotted path and the
nearest valid key.

The tree has a schema version (``schema_version``, :data:`SCHEMA_VERSION`). Settings read back from
a file a run or an export wrote (``resolved.toml``, a checkpoint, an export's metadata, a preset)
are first brought to the current version by :func:`migrate`, so runs and exports made by an older
swavctl still resume and load.

The modules, one concept each: ``schema`` (the tree), ``method_settings`` (which settings each
method uses), ``tree`` (dotted keys of nested mappings), ``validation`` (one-line errors, the field
catalogue), ``migrations``, ``recorded`` (what a run records, read back), ``presets`` and
``overrides`` (the four sources). Their public names are importable from here, as
``swavctl.config.Settings``, ``config.resolve``, ...
"""

from swavctl.config.migrations import MIGRATIONS, migrate
from swavctl.config.overrides import explicit_keys, parse_override, resolve
from swavctl.config.presets import (
    DEFAULTS_TUNED_FOR,
    PRESET_DIRS,
    TunedFor,
    load_preset,
    load_toml,
    preset_description,
    preset_names,
    preset_path,
    preset_toml,
    preset_tuned_for,
)
from swavctl.config.recorded import NOT_RECORDED, from_toml_text, read_tree, recorded_json, to_toml
from swavctl.config.schema import (
    MAX_CROP_SIZE,
    MAX_WORKERS,
    RESOLVED_NAME,
    SCHEMA_VERSION,
    AugmentSettings,
    CheckpointSettings,
    DataSettings,
    DeepClusterSettings,
    DistSettings,
    HealthSettings,
    LogSettings,
    ModelSettings,
    MonitorSettings,
    OptimSettings,
    SelaSettings,
    Settings,
    SwavSettings,
    TrainSettings,
    method_settings_in_use,
    setting_defaults,
)
from swavctl.config.tree import dotted
from swavctl.config.validation import iter_fields, validate

__all__ = [
    "DEFAULTS_TUNED_FOR",
    "MAX_CROP_SIZE",
    "MAX_WORKERS",
    "MIGRATIONS",
    "NOT_RECORDED",
    "PRESET_DIRS",
    "RESOLVED_NAME",
    "SCHEMA_VERSION",
    "AugmentSettings",
    "CheckpointSettings",
    "DataSettings",
    "DeepClusterSettings",
    "DistSettings",
    "HealthSettings",
    "LogSettings",
    "ModelSettings",
    "MonitorSettings",
    "OptimSettings",
    "SelaSettings",
    "Settings",
    "SwavSettings",
    "TrainSettings",
    "TunedFor",
    "dotted",
    "explicit_keys",
    "from_toml_text",
    "iter_fields",
    "load_preset",
    "load_toml",
    "method_settings_in_use",
    "migrate",
    "parse_override",
    "preset_description",
    "preset_names",
    "preset_path",
    "preset_toml",
    "preset_tuned_for",
    "read_tree",
    "recorded_json",
    "resolve",
    "setting_defaults",
    "to_toml",
    "validate",
]
