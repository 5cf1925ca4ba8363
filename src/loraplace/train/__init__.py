"""One run: its steps, the Trainer, the fork server, evaluation, checkpoints."""
