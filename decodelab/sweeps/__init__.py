"""Many runs: named sweep files and the Hydra callback that records a multirun."""
