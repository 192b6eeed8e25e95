"""The Flower ServerApp: a thin adapter between Flower messages and mdmt.fed.units."""
