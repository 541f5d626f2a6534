"""The error every model-reading module raises for a config or architecture the engines do not compute exactly.

A ValueError, so callers that catch bad input catch it too; its message names the folder, the setting, its value
and what to do. engine.model.spec re-exports it for its importers.
"""


class UnsupportedModelError(ValueError):
    """A model config.json (or its weights) asks for something the training engines do not compute."""
