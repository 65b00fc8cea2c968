"""The demo: three fictional organisations' corpora and held-out questions (a test set: never tune on it)."""

from importlib.resources import files
from pathlib import Path


def demo_dir() -> Path:
    return Path(str(files("fedmem.demo")))
