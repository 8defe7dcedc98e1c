"""The drop-in mechanism: guided stages hooked into an existing network without editing its source.

Every guided system adds its stages through this one mechanism (one wrapper,
several stage kinds): forward hooks refine chosen module outputs with a
stage module. -SS stages pair a decoder with an encoder and read a guidance
map (semantic_sensitive); text stages read word features (text_guided). One
wrapper can hold both.
"""

from .wrapper import GuidedModel, SemanticSensitive, remove_semantic_sensitive, semantic_sensitive, text_guided

__all__ = ["GuidedModel", "SemanticSensitive", "remove_semantic_sensitive", "semantic_sensitive", "text_guided"]
