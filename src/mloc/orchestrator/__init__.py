"""What only the orchestrator process runs. ``python -m mloc.orchestrator.server`` starts it."""
