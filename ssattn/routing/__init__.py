"""Degradation routing (seed 002): classify each image's degradation and send it to the right expert.

Room reserved for the fourth system; nothing is implemented here yet.
"""
