"""One run: composition, the prompt runner, the AR baseline, resume, metrics and what is recorded."""
