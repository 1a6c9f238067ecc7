"""Model recipes shared by every trainer: the Llama config built from size params (`llama`) and
the one AdamW + warmup/cosine optimisation recipe (`optim`)."""
