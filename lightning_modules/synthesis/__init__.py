"""Writing the synthetic set: the predict loop over a generation plan and its shard writer."""
