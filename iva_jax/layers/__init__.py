"""Building blocks: norms, rotary embeddings, attention, MLP, linear projections."""
