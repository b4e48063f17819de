"""GenServe: FLUX.1-dev image generation from a restartable pool of worker processes behind FastAPI."""

__version__ = "0.1.0"
