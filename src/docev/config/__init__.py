"""The one config schema.

A single YAML file drives every pipeline step. The torchtune sections keep their
keys (``_component_`` + keyword arguments) so the recipe can ``config.instantiate``
them; the pipeline sections (``validate``, ``preprocess``, ``train``, ``export``,
``kubernetes``) are ours. Loading = ``yaml.safe_load`` → OmegaConf (for ``${...}``
interpolation and ``a.b=value`` overrides) → pydantic validation. Every error names
the file, the dotted path, and what was expected.

Modules: ``schema`` (``DocEVConfig``, the root, and its cross-section rules), ``sections`` and ``jobs`` (the
sections), ``loading`` (YAML, overrides, validation, error messages), ``components`` (``_component_``
signatures and argument checks). Everything public is imported from here.
"""

from docev.config.components import COMPONENT_SECTIONS, resolve_component
from docev.config.jobs import (
    ExportSection,
    FsdpStrategy,
    GradientReduction,
    KubernetesSection,
    Resources,
    RunPolicy,
    StepResources,
    Toleration,
    TrainSection,
    parse_byte_size,
    resolve_strategy,
)
from docev.config.loading import load_config, load_raw, parse_overrides, resolve, safe_load, validate_dict
from docev.config.schema import DocEVConfig, json_schema
from docev.config.sections import (
    LORA_DEFAULTS,
    CheckpointerSection,
    Component,
    ConfigError,
    DataloaderSection,
    DatasetSource,
    EvaluateSection,
    ModelSection,
    PreprocessSection,
    StorageOptions,
    SyntheticSection,
    TokenizerSection,
    ValidateSection,
    is_store_url,
)

__all__ = [
    "COMPONENT_SECTIONS",
    "CheckpointerSection",
    "Component",
    "ConfigError",
    "DataloaderSection",
    "DatasetSource",
    "DocEVConfig",
    "EvaluateSection",
    "ExportSection",
    "FsdpStrategy",
    "GradientReduction",
    "KubernetesSection",
    "LORA_DEFAULTS",
    "ModelSection",
    "PreprocessSection",
    "Resources",
    "RunPolicy",
    "StepResources",
    "StorageOptions",
    "SyntheticSection",
    "TokenizerSection",
    "Toleration",
    "TrainSection",
    "ValidateSection",
    "is_store_url",
    "json_schema",
    "load_config",
    "load_raw",
    "parse_byte_size",
    "parse_overrides",
    "resolve",
    "resolve_component",
    "resolve_strategy",
    "safe_load",
    "validate_dict",
]
