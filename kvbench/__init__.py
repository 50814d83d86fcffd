"""kvbench: faithful LongBench evaluation of KV-cache compression methods."""

__version__ = "0.1.0"
