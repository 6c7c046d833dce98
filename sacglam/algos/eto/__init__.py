"""ETO: expert warm start, then rounds of explore -> pair -> DPO."""
