"""Log readers, the synthetic generator and the featurized, split data set."""
