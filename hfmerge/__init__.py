"""hfmerge: merge fine-tuned checkpoints of one pre-trained model and publish them with provenance."""

__version__ = "0.1.0"
