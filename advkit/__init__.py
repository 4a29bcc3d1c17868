"""advkit: a study kit for "Intriguing properties of adversarial training at scale" (Xie and Yuille, ICLR 2020)."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``advkit.load_run`` without importing torch for ``import advkit`` (the analysis modules need no torch)."""
    if name == "load_run":
        from .run import load_run

        return load_run
    raise AttributeError(f"module 'advkit' has no attribute {name!r}")
