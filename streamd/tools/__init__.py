"""Operator tools built on the pipeline: bench, sample events, dead-letter administration."""
