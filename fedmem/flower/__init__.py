"""Flower glue: the ServerApp and ClientApp, the messages they exchange, the simulation engine.

Thin shells over ``fedmem.federation``: every round's math is there, testable without Flower.
"""
