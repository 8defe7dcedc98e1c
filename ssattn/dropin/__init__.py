"""The drop-in mechanism: guided stages hooked into an existing network without editing its source.

Every guided system (-SS today; text guidance next) adds its stages through
this one mechanism: forward hooks pair decoder modules with encoder modules
and refine the decoder outputs with a stage module.
"""

from .wrapper import SemanticSensitive, remove_semantic_sensitive, semantic_sensitive

__all__ = ["SemanticSensitive", "remove_semantic_sensitive", "semantic_sensitive"]
