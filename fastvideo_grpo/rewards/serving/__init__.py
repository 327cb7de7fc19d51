"""Rewards over HTTP: the reward server, its token and limits, and the client reward (``remote``)."""
