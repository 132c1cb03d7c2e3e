"""The worker: registers its hardware, takes assignments from its stream and runs executors."""
