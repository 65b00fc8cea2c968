"""Coordinator side of fedmem: the Flower ServerApp and the ``fedmem-server`` CLI."""
