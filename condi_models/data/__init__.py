"""Clinical data sources, missingness simulation and partitioning, all in one sample format."""
