"""Fitting models: the LightningModules of stage 1 and stage 2, stage-1 embeddings and the callbacks."""
