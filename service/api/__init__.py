"""The HTTP layer (the only package that imports FastAPI/Starlette): ``create_app(settings)``."""

from service.api.app import create_app

__all__ = ["create_app"]
