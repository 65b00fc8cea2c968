"""Data-owner side of fedmem: the Flower ClientApp and the ``fedmem-client`` CLI."""
