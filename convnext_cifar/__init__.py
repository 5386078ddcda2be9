"""convnext-cifar: fine-tune ConvNeXt-V2 on CIFAR-10 from one typed command line."""

__version__ = "0.1.0"
