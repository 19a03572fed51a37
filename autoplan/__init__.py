"""autoplan: plans and applies hybrid data/tensor/pipeline parallel training for PyTorch."""

__version__ = "0.1.0"
