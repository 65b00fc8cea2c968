"""Benchmarks: ``fedmem bench answer`` and ``fedmem bench quality``. The core never imports this package."""
