"""A small Flower app that runs secure task-aware rounds and writes down what its ServerApp received."""
