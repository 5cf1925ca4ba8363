"""loraplace: where should the LoRA adapters go?

loraplace plan --model embedded
loraplace study --config configs/offline.yaml --out runs/offline
loraplace report runs/offline
"""

__version__ = "0.1.0"
