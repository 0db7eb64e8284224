"""Programs users run: the batch scorer, export helpers and (later) the workstation app."""
