"""digitkit: train, evaluate, explain and serve handwritten-digit recognizers."""

__version__ = "0.1.0"
