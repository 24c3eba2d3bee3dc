"""charlm: train recurrent language models on a text file, sample from them, and score text."""

__version__ = "1.0.0"
