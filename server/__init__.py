"""The Flower ServerApp: a thin adapter between Flower messages and shared.federated."""
