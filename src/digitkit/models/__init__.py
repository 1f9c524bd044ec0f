"""Model registry: `create_model(name, **kw)`, `list_models()`; each model splits into features and head."""

from digitkit.models.registry import (
    DigitModel,
    count_macs,
    count_params,
    create_model,
    list_models,
    model_description,
    model_options,
    model_task,
    register_model,
)

# Importing the families registers their models.
from digitkit.models import cnn, crnn, mlp  # noqa: E402, F401  isort: skip

__all__ = [
    "DigitModel",
    "count_macs",
    "count_params",
    "create_model",
    "list_models",
    "model_description",
    "model_options",
    "model_task",
    "register_model",
]
