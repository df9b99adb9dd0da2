"""The reference MoE worker runtime."""
