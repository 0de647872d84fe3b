"""sdlab: Stable Diffusion from scratch in PyTorch.

    import sdlab
    pipe = sdlab.load("path/to/model")          # once
    images = pipe.generate("a red circle on a blue background", seed=1)
"""

__version__ = "0.1.0"


def load(model=None, **options):
    """Load a model (None: sdlab's default) and return a pipeline; see `sdlab.api.load`."""
    from sdlab.api import load as _load

    return _load(model, **options)


def __getattr__(name: str):
    """`sdlab.Control` (a ControlNet for a run) without importing torch at `import sdlab`."""
    if name == "Control":
        from sdlab.api import Control

        return Control
    raise AttributeError(f"module 'sdlab' has no attribute {name!r}")
