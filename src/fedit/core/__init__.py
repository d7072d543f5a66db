"""The editing core: pure functions over (model, requests, hyperparameters, statistics).

Nothing in this package reads the command line, configures logging or talks to a network.
"""
