"""Recovery after slicing: fine-tuning (LoRA or full), distillation from the dense model, the teacher's text, and training checkpoints."""
