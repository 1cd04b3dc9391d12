"""Trace replay: drive router → engine simulators with a trace and measure what caching buys."""
