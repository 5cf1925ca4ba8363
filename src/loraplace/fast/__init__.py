"""What the fast paths switch on: fused kernels, the head loss, segment attention, the hardware choices. Never imports train/ or the config."""
