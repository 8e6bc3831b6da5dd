"""Applications built on the pipeline: the CPU demos, the scaling study and the `ditkit serve` web page."""
