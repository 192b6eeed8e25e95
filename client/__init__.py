"""The Flower ClientApp: a thin adapter between Flower messages and mdmt.fed.site."""
