"""Icons and other files the app and launcher need, found through importlib.resources."""
from importlib import resources
from pathlib import Path


def resource_path(name: str) -> Path:
    """A real file path for a packaged resource (installed wheels and editable checkouts alike)."""
    return Path(str(resources.files(__name__).joinpath(name)))
