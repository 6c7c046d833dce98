"""sacglam: online off-policy RL (discrete SAC + hindsight relabelling) for LLM agents in text environments."""

__version__ = "0.1.0"
