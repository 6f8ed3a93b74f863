"""The round: the ServerApp, its strategy (budget handshake, fit, checks, aggregation),
SecAgg+ and the coordinator's view of Flower's Grid. Reads and writes the run store."""
