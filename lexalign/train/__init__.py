"""Training: SFT (the finetune step) and preference alignment (the align step), on TRL's trainers."""
