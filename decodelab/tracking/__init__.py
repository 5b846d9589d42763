"""Where results are recorded: run folders and sweep folders (their single reader), MLflow and W&B."""
