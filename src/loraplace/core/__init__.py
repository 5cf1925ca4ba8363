"""The lowest layer: errors, eval mode, result files, the output lock, injected faults. Imports nothing above it."""
