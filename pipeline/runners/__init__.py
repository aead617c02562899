"""Runners: the only modules that know the order of the stages (local threads, or a Ray cluster)."""
