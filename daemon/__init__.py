"""cld: a continual-learning daemon that serves an LLM through vLLM and teaches it new documents.

The package holds the daemon's stages (one module each) and its adapters to external systems;
`replay/` is a separate package that knows nothing of the daemon.
"""

__version__ = "0.1.0"
