"""The ops layer: torch.library registrations (schema, fake kernel, autograd) and dispatch choices.

One module per operation. Each registers its fast implementations with the
registry (ssattn._backends.register) when imported, and defines the
registered op that runs them, with explicit arguments (backend, precision,
deterministic), so torch.compile sees a single opaque node with a fake
kernel. No op module imports another.
"""

from . import alignment, attention, attention_cpu, pyramid  # noqa: F401  (registers the ops and their implementations)
from . import caption_loss  # noqa: F401
