"""The SynFER generator: the LightningModule, its conditioning and phases, the sampling pipeline, evaluation."""
