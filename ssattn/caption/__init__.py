"""Caption-model regulariser (seed 001): enhanced and reference images agree in a captioner's feature spaces.

Room reserved for the third system; nothing is implemented here yet.
"""
