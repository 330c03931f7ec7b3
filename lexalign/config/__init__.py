"""Configuration: YAML loading and schema validation (`loader`, the schema `config.schema.yaml` beside it),
one dataclass per config section (`sections`), the `online` section's checks (`online`), and a whole config
written with every key's meaning (`annotated`)."""
