"""
The eager backend: the model as `to_runtime` left it, called from the fast path's wrapper.

Every other backend falls back to it. fast_path 'off' is the model itself (no wrapper);
'eager' is this backend, with the wrapper's CPU preprocessing (resize on uint8 pixels).
"""

from __future__ import annotations

from taco_cvgl.inference.base import BuildRequest, NetworkUnderAutocast
import torch


class EagerRunner:
    """The network under its autocast precision, in inference mode."""

    name = 'eager'

    def __init__(self, network: NetworkUnderAutocast):
        """Wrap the model's network (shared weights)."""
        self.network = network

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a normalised batch."""
        with torch.inference_mode():
            return self.network(x)


def build(request: BuildRequest) -> EagerRunner:
    """Return the eager runner of the request's model."""
    return EagerRunner(request.network)
