"""emseg: few-label segmentation of electron-microscopy stacks."""

__version__ = "0.1.0"

# Internal label encoding used after `prepare`: 0 background, 1 foreground, IGNORE not annotated.
IGNORE = 255
