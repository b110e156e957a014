"""Partitioning passes: cut a graph into stages for pipeline-parallel execution."""
