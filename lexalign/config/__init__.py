"""Configuration: YAML loading, schema validation, and one dataclass per stage."""

from lexalign.config.loader import load_config, load_yaml, validate_config
from lexalign.config.sections import (
    AlignConfig,
    DatasetConfig,
    EvaluateConfig,
    FinetuneConfig,
    SftDatasetConfig,
    SourceConfig,
)

__all__ = [
    "AlignConfig",
    "DatasetConfig",
    "EvaluateConfig",
    "FinetuneConfig",
    "SftDatasetConfig",
    "SourceConfig",
    "load_config",
    "load_yaml",
    "validate_config",
]
