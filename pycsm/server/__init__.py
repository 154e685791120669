"""pycsm's OpenAI-compatible speech server (extra `[server]`): `pycsm serve`, or `create_app` on an
`Engine` to mount it in an application of your own."""

from .app import ServerConfig, create_app
from .engine import Engine
from .voices import Voices

__all__ = ["Engine", "ServerConfig", "Voices", "create_app"]
