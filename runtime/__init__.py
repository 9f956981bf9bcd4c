"""Process-level setup: device, torchrun/DDP, seeding and stop signals."""
