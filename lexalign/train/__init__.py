"""Training stages: SFT (finetune) and preference alignment (align)."""
