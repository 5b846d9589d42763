"""Commands over recorded runs and sweeps: report, reproduce, simulate."""
