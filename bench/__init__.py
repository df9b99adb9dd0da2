"""Benchmarks: planner quality, migration volume and speed, eep vs the EPLB baseline."""
