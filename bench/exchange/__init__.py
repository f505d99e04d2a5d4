"""A simulated exchange (python -m bench exchange): see docs/exchange.md."""
