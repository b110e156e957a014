"""Running compiled artifacts beyond one process: data-parallel batches and pipeline stages on Ray actors."""
