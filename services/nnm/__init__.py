"""nnm: unsupervised image classification (SimCLR -> neighbours -> SCAN/NNM -> self-label)."""

__version__ = "0.1.0"
