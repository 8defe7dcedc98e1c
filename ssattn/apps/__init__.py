"""Applications built on the library: datasets, training, evaluation and the `ssattn` command.

Nothing here is imported by `import ssattn`; the library proper never
imports from ssattn.apps.
"""
