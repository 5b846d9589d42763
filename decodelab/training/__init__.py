"""Training draft heads (EAGLE, Medusa) on the target's own answers: data, losses, the training run."""
