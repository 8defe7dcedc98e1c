"""Text guidance (seed 003, NaLSuper): image-word cross-attention, intra-modal and fusion attention.

Room reserved for the second system; nothing is implemented here yet.
"""
