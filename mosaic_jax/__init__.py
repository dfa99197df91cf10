"""MoSAiC in JAX/Flax: multi-modal, multi-label contrastive learning for satellite imagery."""
